"""Fail fast, in one line, when the built-in passes are missing or belong to another checkout.

The design card puts `passes/` at the repository top; the install maps it to
`onnx_normfix.passes` (pyproject's package-dir). Without `pip install -e .` a bare checkout
has no `onnx_normfix.passes` (Python then reports a misleading "circular import"), and a second
checkout can pick up the first one's installed `passes/`.
"""

from __future__ import annotations

import importlib
from pathlib import Path

_FIX = "run `pip install -e .` in the checkout you want to use"


def check_passes_package():
    here = Path(__file__).resolve().parent
    try:
        passes = importlib.import_module("onnx_normfix.passes")
    except ModuleNotFoundError as exc:
        if exc.name not in ("onnx_normfix.passes", "onnx_normfix"):
            raise
        raise ImportError(f"onnx_normfix.passes is not installed (source tree at {here.parent}): {_FIX}") from None
    where = Path(passes.__file__).resolve().parent
    # installed: site-packages/onnx_normfix/passes; editable/source: <checkout>/passes
    if where not in (here / "passes", here.parent / "passes"):
        raise ImportError(f"onnx_normfix at {here} would use the passes of another checkout ({where}): {_FIX}")
    return passes
