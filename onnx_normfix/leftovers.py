"""What a run leaves behind: the normalization nodes still in the output, and why.

After the passes, every BatchNormalization, InstanceNormalization and decomposed norm
(ReduceMean ... Sqrt chains an exporter wrote instead of one norm op) that remains in the
main graph is grouped by kind, with the reason it is still there and, where a pass or flag
would handle it, which one. Also the graph inputs a pass created (noise), with how to feed
them. Read-only: nothing here changes the model.

    [{"op": "BatchNormalization", "kind": "over N*C between Reshapes", "count": 2,
      "nodes": ["/in1/BatchNormalization", ...], "reason": "...", "hint": "run with fix_inorm"}]
"""

from __future__ import annotations

import onnx

from .graph import opset_of

FOLD_TARGETS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
MAX_NODES_LISTED = 20


def find_leftovers(model: onnx.ModelProto, passes_run, notes_by_pass: dict[str, list[str]] | None = None,
                   available=()) -> list[dict]:
    """Group the remaining norm nodes by (op, kind). `passes_run`: names of the passes that
    ran; `notes_by_pass`: their notes (a decline note that names a node is its reason);
    `available`: registered pass names (a hint names only a pass that exists)."""
    ran = set(passes_run)
    notes = notes_by_pass or {}
    producers = {o: n for n in model.graph.node for o in n.output if o}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    groups: dict[tuple, dict] = {}

    def add(node, op, kind, reason, hint):
        g = groups.setdefault((op, kind), {"op": op, "kind": kind, "count": 0, "nodes": [], "reason": reason,
                                           "hint": hint})
        g["count"] += 1
        if len(g["nodes"]) < MAX_NODES_LISTED:
            g["nodes"].append(node.name or op)

    opset = opset_of(model)
    fuser = "fuse_norms" if "fuse_norms" in available else None
    index = None
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "BatchNormalization":
            add(node, node.op_type, *_batchnorm(node, producers, consumers, ran, notes))
        elif node.op_type == "InstanceNormalization":
            if index is None and _between_reshapes(node, producers, consumers):
                from .graph import GraphIndex

                index = GraphIndex(model)
            if _between_reshapes(node, producers, consumers) and _ones_zeros(index, node):
                add(node, node.op_type, *_groupnorm(node, ran, notes, opset, fuser))
            else:
                add(node, node.op_type, *_instancenorm(node, ran, notes))
    for node, mean, kind in _decomposed_norms(model, producers):
        need = NEEDS_OPSET[kind]
        target = f" --target-opset {need}" if opset < need else ""
        if fuser and fuser not in ran:
            hint = f"run with {fuser}{target}"
        elif fuser:
            hint = None
        else:
            hint = "no pass of this version fuses it; it is correct as it is"
        if not fuser or fuser not in ran:
            reason = "a normalization the exporter wrote as elementary ops"
        else:
            reason = (_declined(node, notes.get(fuser, [])) or _declined_at(mean, notes.get(fuser, []))
                      or (_opset_reason(kind, need, opset) if target else "fuse_norms did not match it"))
        add(node, f"decomposed {kind}", "ReduceMean ... Sqrt chain", reason, hint)
    return list(groups.values())


# the op each decomposed kind fuses into needs this default-domain opset (see passes/fuse_norms.py)
NEEDS_OPSET = {"LayerNorm": 17, "RMSNorm": 23, "GroupNorm": 21}
OPS = {"LayerNorm": "LayerNormalization", "RMSNorm": "RMSNormalization", "GroupNorm": "GroupNormalization"}


def _opset_reason(kind: str, need: int, opset: int) -> str:
    return (f"{OPS[kind]} needs opset {need}, the model's default-domain opset is {opset}: "
            f"rerun with --target-opset {need}")


def _declined_at(node: onnx.NodeProto, notes: list[str]) -> str | None:
    """fuse_norms names a site by the scope of its variance ReduceMean ('... at /ln/: why');
    a name without a scope is its own ('... at /ReduceMean_1: why')."""
    name = node.name or (node.output[0] if node.output else "")
    if not name:
        return None
    scope = name.rsplit("/", 1)[0] + "/" if "/" in name.strip("/") else name
    return next((n for n in notes if f" at {scope}: " in n), None)


def _between_reshapes(node, producers, consumers) -> bool:
    src = producers.get(node.input[0]) if node.input else None
    after = consumers.get(node.output[0], [])
    return src is not None and src.op_type == "Reshape" and len(after) == 1 and after[0].op_type == "Reshape"


def _ones_zeros(index, node) -> bool:
    if index is None or len(node.input) < 3:
        return False
    import numpy as np

    scale, bias = index.constant(node.input[1]), index.constant(node.input[2])
    return scale is not None and bias is not None and bool(np.all(scale == 1)) and bool(np.all(bias == 0))


def _groupnorm(node, ran, notes, opset, fuser) -> tuple[str, str, str | None]:
    """Reshape -> InstanceNormalization(ones, zeros) -> Reshape: the exporters' GroupNorm."""
    kind = "GroupNorm between Reshapes"
    form = ("a GroupNorm: statistics per (sample, group) of the [N, G, -1] view, the per-channel "
            "affine after the Reshape back; correct as it is")
    target = " --target-opset 21" if opset < 21 else ""
    if fuser is None:
        return kind, form, None
    if fuser not in ran:
        return kind, form, f"GroupNormalization: run with {fuser}{target}"
    declined = _declined(node, notes.get(fuser, []))
    if declined:
        return kind, f"{form}; {declined}", None
    if target:
        return kind, f"{form}; {_opset_reason('GroupNorm', 21, opset)}", None
    return kind, f"{form} (fuse_norms left this form: --group-norm instance, or the split was not provable)", None


def _declined(node: onnx.NodeProto, notes: list[str]) -> str | None:
    """The note of a pass that names `node` (passes note 'skipped <node>: <why>')."""
    if not node.name:
        return None
    for note in notes:
        if node.name in note:
            return note
    return None


def _batchnorm(node, producers, consumers, ran, notes) -> tuple[str, str, str | None]:
    training = any(a.name == "training_mode" and a.i for a in node.attribute) or len([o for o in node.output if o]) > 1
    if training:
        return "training mode", "training mode or extra outputs: not an inference BatchNormalization", None
    src = producers.get(node.input[0])
    after = consumers.get(node.output[0], [])
    if src is not None and src.op_type == "Reshape" and (not after or all(c.op_type == "Reshape" for c in after)):
        if "fix_inorm" not in ran:
            return ("over N*C between Reshapes", "the exporters' InstanceNorm pattern (a BatchNormalization over "
                    "batch x channels that fold_bn cannot fold)", "run with fix_inorm")
        return ("over N*C between Reshapes", _declined(node, notes.get("fix_inorm", []))
                or "fix_inorm did not collapse it", None)
    if src is not None and src.op_type in FOLD_TARGETS:
        if "fold_bn" not in ran:
            return f"after {src.op_type}", f"foldable into its {src.op_type}", "run with fold_bn"
        return (f"after {src.op_type}", _declined(node, notes.get("fold_bn", [])) or "fold_bn declined it", None)
    what = f"a {src.op_type}" if src is not None else "a graph input or initializer"
    return ("no weights to fold into", f"its input comes from {what}, not Conv/ConvTranspose/Gemm/MatMul: "
            "nothing to fold it into (onnxruntime runs it as it is)", None)


def _instancenorm(node, ran, notes) -> tuple[str, str, str | None]:
    if "fix_inorm" in ran:
        reason = _declined(node, notes.get("fix_inorm", []))
        if reason:
            return "left by fix_inorm", reason, None
    return ("per-instance statistics", "correct as exported if the module had track_running_stats=False "
            "(PyTorch's default)", None if "fix_inorm" in ran else
            "if it had running stats: run with fix_inorm and --stats CKPT or --calibration-data FILE.npz")


def _decomposed_norms(model: onnx.ModelProto, producers) -> list[tuple[onnx.NodeProto, onnx.NodeProto, str]]:
    """(Sqrt, variance ReduceMean, kind) of the Sqrt(Add(ReduceMean(...), eps)) chains: LayerNorm when the mean is of (x - mean(x))
    squared, RMSNorm when of x squared. A coarse census, not a matcher: fuse_norms matches."""
    found = []
    for node in model.graph.node:
        if node.op_type != "Sqrt":
            continue
        add = producers.get(node.input[0])
        if add is None or add.op_type != "Add":
            continue
        mean = next((producers[i] for i in add.input if i in producers and producers[i].op_type == "ReduceMean"), None)
        if mean is None:
            continue
        square = producers.get(mean.input[0])
        if square is None or square.op_type not in ("Pow", "Mul"):
            continue
        centered = producers.get(square.input[0])
        kind = "LayerNorm" if centered is not None and centered.op_type == "Sub" else "RMSNorm"
        found.append((node, mean, kind))
    return found


def noise_inputs_summary(model: onnx.ModelProto) -> list[dict]:
    """The noise graph inputs a pass created: name, distribution, shape, dtype."""
    from .noise import read_noise_entries

    out = []
    for e in read_noise_entries(model):
        if e.get("input"):
            out.append({"input": e["input"], "distribution": e.get("distribution"), "shape": e.get("shape"),
                        "dtype": e.get("dtype"), "node": e.get("node")})
    return out
