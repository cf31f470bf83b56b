"""Run a pass written over an `onnx_graphsurgeon.Graph` (`Pass(graph="graphsurgeon")`).

graphsurgeon is what TensorRT users write their graph surgery in. Its import/export round
trip costs ~2 s on a 10k-node graph, so the built-in passes work on the ModelProto through
`GraphIndex`; a user's graphsurgeon pass pays the round trip around itself only. Imported
only when such a pass runs.
"""

from __future__ import annotations

import onnx

from .errors import NormfixError
from .registry import Pass, PassContext, PassResult


def run_graphsurgeon(p: Pass, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
    try:
        import onnx_graphsurgeon as gs
    except ImportError:
        raise NormfixError(f"pass {p.name!r} is written for onnx-graphsurgeon, which is not installed "
                           "(pip install onnx-graphsurgeon)") from None
    graph = gs.import_onnx(model)
    outcome = p.run(graph, ctx)
    graph.cleanup().toposort()
    try:
        new = gs.export_onnx(graph, do_type_check=False)
    except Exception as exc:
        raise NormfixError(f"pass {p.name!r}: onnx-graphsurgeon cannot export the edited graph: {exc}") from None
    if outcome is None:  # the pass did not count: changed is what differs from a plain round trip
        plain = gs.export_onnx(gs.import_onnx(model).cleanup().toposort(), do_type_check=False)
        outcome = int(plain.graph.SerializeToString(deterministic=True) != new.graph.SerializeToString(deterministic=True))
    if isinstance(outcome, bool) or not isinstance(outcome, (int, PassResult)):
        raise NormfixError(f"pass {p.name!r} returned {type(outcome).__name__}; return the number of rewrites, "
                           "a PassResult, or None")
    result = outcome if isinstance(outcome, PassResult) else PassResult(rewrites=outcome)
    if result.rewrites:
        _adopt(model, new)
    return result


def _adopt(model: onnx.ModelProto, new: onnx.ModelProto) -> None:
    """Take graphsurgeon's graph and functions; keep the model's own metadata, IR version and
    opsets (graphsurgeon may only add domains)."""
    model.graph.CopyFrom(new.graph)
    del model.functions[:]
    model.functions.extend(new.functions)
    have = {op.domain or "" for op in model.opset_import}
    for op in new.opset_import:
        if (op.domain or "") not in have and op.domain != "ai.onnx":
            model.opset_import.append(op)
