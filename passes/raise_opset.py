"""raise_opset: convert the model to a newer default-domain opset with onnx.version_converter.

    opset 13 model (ReduceMean axes attribute, ...)  =>  opset N model (axes input, ...)

Runs before fuse_norms when `target_opset` is given (`--target-opset N`), as its own stage
(fuse_norms brings it, see `Pass.brings`; it is not registered, so `target_opset` stays
fuse_norms' option),
so the validator proves the conversion apart from the fusions that need it: LayerNormalization
needs 17, GroupNormalization 21, RMSNormalization 23. It never lowers an opset (a model already
at or above N is left alone, with a note), and never runs unasked. The IR version is raised to
the one the new opset requires. Declines with an error (nothing rewritten) when the converter
cannot convert the model (e.g. ops of other domains it does not know, or model-local functions).
"""

from __future__ import annotations

import onnx

from onnx_normfix.errors import NormfixError
from onnx_normfix.graph import opset_of
from onnx_normfix.registry import Pass, PassContext, PassResult

NAME = "raise_opset"
def _ir_for(opset: int) -> int:
    """The oldest IR version that allows `opset` (onnxruntime loads older IRs more widely)."""
    return onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", opset)])


def _run(model: onnx.ModelProto, ctx: PassContext) -> PassResult:
    target = ctx.options.get("target_opset")
    result = PassResult()
    if target is None:
        return result
    current = opset_of(model)
    newest = onnx.defs.onnx_opset_version()
    try:  # an int from the library, a string from a flag built without a type
        target = int(target) if not isinstance(target, (bool, float)) else None
    except (TypeError, ValueError):
        target = None if not isinstance(target, str) else target
    if not isinstance(target, int) or target < 1 or target > newest:
        raise NormfixError(f"--target-opset {ctx.options.get('target_opset')!r}: expected an opset from 1 to {newest} "
                           "(this onnx's newest)")
    if current >= target:
        result.notes.append(f"opset {current} already >= target {target}: not converted (opsets are never lowered)")
        return result
    if model.functions:
        raise NormfixError(f"--target-opset {target}: model-local functions are not converted by onnx.version_converter")
    try:
        converted = onnx.version_converter.convert_version(model, target)
    except Exception as exc:  # the converter's errors are C++ messages: keep their first line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NormfixError(f"--target-opset {target}: onnx.version_converter cannot convert this model: {first}") from None
    converted.ir_version = max(model.ir_version, _ir_for(target))
    model.CopyFrom(converted)
    result.rewrites = 1
    result.notes.append(f"default-domain opset {current} -> {target} (onnx.version_converter)")
    result.details = {"opset_before": current, "opset_after": target}
    return result


def stage(target) -> tuple[Pass, dict]:
    """The conversion stage fuse_norms' `target_opset` brings with it (`Pass.brings`): not
    registered, so `target_opset` has one owner, and it never runs unasked."""
    return PASS, {"target_opset": target}


PASS = Pass(
    name=NAME,
    summary="Raise the default-domain opset to --target-opset with onnx.version_converter (runs before fuse_norms).",
    preserves_outputs=True,
    run=_run,
    runs_before={"fuse_norms", "replace_random", "fix_inorm", "fold_bn"},
)
