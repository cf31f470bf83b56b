"""onnx-normfix: repair and optimize exported ONNX files, validated by onnxruntime.

    import onnx_normfix
    result = onnx_normfix.optimize("model.onnx", passes=["fix_inorm", "fold_bn"], stats="G.ckpt")
    result.save("fixed.onnx")

torch is imported only when a PyTorch checkpoint is read; onnxruntime only when validating.
"""

from .errors import NormfixError, ValidationError
from .registry import (PASSES, Declined, InputBinding, Option, Pass, PassContext, PassResult, graphsurgeon_pass,
                       register_pass)
from ._install import check_passes_package

_builtin_passes = check_passes_package()  # registers fold_bn, fix_inorm, replace_random
from .noise import NOISE_METADATA_KEY, noise_feeds, save_noise_feeds
from .pipeline import Result, optimize

__all__ = [
    "optimize",
    "Result",
    "PASSES",
    "Pass",
    "PassResult",
    "PassContext",
    "InputBinding",
    "register_pass",
    "graphsurgeon_pass",
    "Option",
    "Declined",
    "NormfixError",
    "ValidationError",
    "noise_feeds",
    "save_noise_feeds",
    "NOISE_METADATA_KEY",
]


def _version() -> str:
    """The installed distribution's version (pyproject.toml is the one source); a bare
    checkout without an install says so."""
    from importlib import metadata

    try:
        return metadata.version("onnx-normfix")
    except metadata.PackageNotFoundError:
        return "0+unknown (not installed: run pip install -e .)"


__version__ = _version()
