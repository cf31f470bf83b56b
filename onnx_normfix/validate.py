"""Backwards-compatible name for the validator, which lives in `onnx_normfix.validation`
(one module per job: feeds, worker, compare, randomness, sites, stages)."""

from .model_io import _first_line  # noqa: F401  (callers format onnx errors with it)
from .validation import *  # noqa: F401,F403
from .validation import __all__  # noqa: F401
