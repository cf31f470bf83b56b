"""fuse_hardswish: a newcomer's pass, written as a user would (one file, loaded by --plugin).

    Before                                        After
      x ----------------.                           x
      |                 |                           |
    HardSigmoid(1/6, 1/2)                        HardSwish
      |                 |                           |
      '----- Mul -------'                           y
             | y

    and the hand-written  x * relu6(x + 3) / 6 :  Div(Mul(x, Clip(Add(x, 3), 0, 6)), 6)

Formula: hardswish(x) = x * max(0, min(1, x / 6 + 1/2)) = x * relu6(x + 3) / 6.
Declines, with a note, when the opset is below 14 (no HardSwish), when an intermediate has
another consumer or is a graph output, or when the constants are not 1/6, 1/2 / 3, 0, 6, 6.
Option `hardswish_scope`: fuse only sites whose node name contains this text.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnx_normfix import Declined, Option, Pass, PassResult, register_pass
from onnx_normfix.graph import GraphIndex, attr, opset_of, stamp


def run(model: onnx.ModelProto, ctx) -> PassResult:
    ix, result = GraphIndex(model), PassResult()
    if opset_of(model) < 14:
        result.decline("HardSwish needs opset 14; the model has " + str(opset_of(model)), "every site")
        return result
    scope = ctx.options.get("hardswish_scope") or ""
    for node in list(model.graph.node):
        if node.op_type not in ("Mul", "Div") or scope not in node.name:
            continue
        found = _match(ix, node)
        if found is None:
            continue
        if isinstance(found, Declined):
            result.decline(found, node.name or node.output[0])
            continue
        x, inner = found
        # rewiring: one HardSwish takes the last node's place and output name
        fused = stamp(onnx.helper.make_node("HardSwish", [x], [node.output[0]], name=ix.unique_name(node.name + "/HardSwish")),
                      "fuse_hardswish")
        ix.replace(node, [fused])
        for n in inner:
            ix.remove(n)
        result.rewrites += 1
        result.sites.append(([x], [node.output[0]]))
    ix.commit()
    return result


def _match(ix: GraphIndex, node):
    """(x, the nodes the HardSwish replaces besides `node`), a Declined, or None (no pattern)."""
    if node.op_type == "Mul":  # Mul(x, HardSigmoid(x)) in either order
        for k in (0, 1):
            hs = ix.parent(node, k, "HardSigmoid")
            if hs is not None and hs.input[0] == node.input[1 - k]:
                if not (np.isclose(attr(hs, "alpha", 0.2), 1 / 6) and np.isclose(attr(hs, "beta", 0.5), 0.5)):
                    return Declined("HardSigmoid is not 1/6 x + 1/2")
                return _exclusive(ix, [hs]) or (hs.input[0], [hs])
        return None
    chain = ix.match_parents(node, [("Mul", 0), ("Clip", None), ("Add", 0)])  # Div(Mul(x, Clip(Add(x, 3))), 6)
    if chain is None:
        return None
    mul, clip, add = chain
    x = add.input[0]
    if x not in mul.input or x != next(i for i in mul.input if i != clip.output[0]):
        return None
    lo, hi = (ix.constant(clip.input[k]) if len(clip.input) > k and clip.input[k] else None for k in (1, 2))
    consts = [ix.constant(add.input[1]), lo, hi, ix.constant(node.input[1])]
    if any(c is None or c.size != 1 for c in consts):
        return Declined("the Add/Clip/Div constants are not scalar constants")
    if not np.allclose([float(c) for c in consts], [3, 0, 6, 6]):
        return Declined("not x * relu6(x + 3) / 6")
    return _exclusive(ix, [mul, clip, add]) or (x, [mul, clip, add])


def _exclusive(ix: GraphIndex, inner) -> Declined | None:
    """Every intermediate feeds only the pattern (else the fusion would duplicate work)."""
    for n in inner:
        if ix.uses_elsewhere(n.output[0], ix.consumers.get(n.output[0], [None])[0]) or len(ix.consumers[n.output[0]]) != 1:
            return Declined(f"{n.op_type} output {n.output[0]!r} is also used elsewhere")
    return None


PASS = register_pass(Pass(
    name="fuse_hardswish",
    summary="x * HardSigmoid(x) and x * relu6(x + 3) / 6 become HardSwish",
    preserves_outputs=True,
    run=run,
    options=[Option("hardswish_scope", "", str, "fuse only sites whose node name contains this text",
                    metavar="TEXT")],
    creates={"HardSwish"},
    runs_before={"fold_bn"},
), replace=True)
