"""fuse_norms: decomposed LayerNorm / RMSNorm / GroupNorm / InstanceNorm become the ONNX norm ops.

    LayerNorm (opset >= 17)                              RMSNorm (opset >= 23)
    x -+-> ReduceMean -> Sub -+-> Pow(2) | Mul(d, d)     x -[Cast f32]-+-> Pow(2) -> ReduceMean
       |                ^     |   -> ReduceMean            |             -> [Add eps] -> Sqrt
       +----------------+     |   -> [Add eps]             |             -> Reciprocal | Div(1, .)
                              |   -> Sqrt | Pow(.5)        +-----------> Mul -[Cast]-> [Mul w]
                              +-> Div -[Cast]-> [Mul w] -> [Add b]
    =>  x -> LayerNormalization(w, b, axis, epsilon)     =>  x -> RMSNormalization(w, axis, epsilon)

    GroupNorm (opset >= 21)                              InstanceNorm (every opset)
    x[N,C,*] -> Reshape[N,G,-1] -> <LayerNorm core>      x[N,C,*] -> <LayerNorm core over 2..r-1>
      or -> InstanceNormalization(ones, zeros)             -> [Mul w[C,1,..]] -> [Add b[C,1,..]]
      -> Reshape[N,C,*] -> [Mul w[C,1,..]] -> [Add b]    =>  x -> InstanceNormalization(w, b, epsilon)
    =>  x -> GroupNormalization(w, b, num_groups=G)

Formulas: LayerNorm y = (x - E[x]) / sqrt(Var[x] + eps) * w + b over the trailing axes from
`axis`; RMSNorm y = x / sqrt(E[x^2] + eps) * w; GroupNorm/InstanceNorm the same statistics per
(n, group) / per (n, c), then a per-channel affine. Variants matched (passes/_fuse_norms_patterns.py):
Pow(d, 2) with the exponent in any float type or Mul(d, d); Div(d, std), Mul(d, Reciprocal(std)),
Mul(d, Div(1, std)) or Pow(var, -0.5); Sqrt or Pow(., 0.5); no eps Add (eps 0); float Casts
around the statistics (fp16 -> double -> fp16, HF's float32 RMSNorm); axes as attribute, input
or computed constant; a duplicated Sub(x, mean); affine Mul(x, w) / Mul(w, x), bias only, or
none; tf2onnx's Keras form (GlobalAveragePool means, x * (gamma * rstd) + (beta - mean * ...)).
A dynamic Mul/Add after the norm (DiT modulation) stays after the fused op. Option
`group_norm="instance"` writes every GroupNorm in the Reshape/InstanceNormalization form
(onnxruntime 1.32's CPU GroupNormalization is about 2x slower than it). Below opset 21
a ReduceMean-based GroupNorm becomes Reshape -> InstanceNormalization(ones, zeros) -> Reshape +
affine (the exporters' own form, valid at every opset); its InstanceNormalization then reaches
fix_inorm and fold_bn, which run later. The fused ops compute their statistics in float32
(`stash_type` 1; double for double inputs): fp16 `Pow(x - mean, 2)` no longer overflows past
|x - mean| > 256.

The pass declines, with a note "skipped <kind> at <scope>: <why>", when
  - the model's opset lacks the op (the note names `--target-opset N`: the `raise_opset` stage
    converts the model with onnx.version_converter first, validated on its own);
  - an intermediate is read by a live node outside the pattern, or is a graph output (nodes
    that reach no graph output, e.g. exporter leftovers, do not count);
  - epsilon or ReduceMean axes are not constant, keepdims is 0, mean and variance reduce
    different axes, or the rank is unknown;
  - the reduced axes are not trailing (ConvNeXt's channels-first LayerNorm over axis 1);
  - the dtype is not float16/float/double, or the norm's input and output dtypes differ, or
    (InstanceNormalization) is double, which onnxruntime has no kernel for;
  - the normalized dims (LayerNorm/RMSNorm scale) or the channels (Instance/GroupNorm) are not
    static;
  - (the exporters' Reshape -> InstanceNormalization(ones, zeros) -> Reshape GroupNorm) the opset
    is below 21, or the Reshapes cannot be proven to split C into G groups and restore x.
An affine constant that varies along other axes is not absorbed (it stays a Mul/Add).
Symbolic shapes are proven through the Reshape targets (group_split): constant or computed
[0, G, -1], TorchScript's Concat(Unsqueeze(Gather(Shape(x), i))), Shape(x) with dynamo's start=0.
The fused node takes the pattern's last output name (graph outputs keep their names) and the
place of its last node; the others go in one GraphIndex.commit().
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx

from onnx_normfix.errors import NormfixError
from onnx_normfix.graph import GraphIndex, attr, opset_of, stamp
from onnx_normfix.registry import Option, Pass, PassContext, PassResult, register_pass

from ._fuse_norms_patterns import (
    ONNX_DOMAINS, Graph, Moments, channel_param, constant_affine_follows, group_split, is_group_split, leaks,
    match_affine, match_moments, normalized_axes, per_channel_affine_follows, side_casts, trailing_param,
    trailing_start, woven_affine,
)

NAME = "fuse_norms"
T = onnx.TensorProto
NEEDS_OPSET = {"LayerNormalization": 17, "RMSNormalization": 23, "GroupNormalization": 21,
               "InstanceNormalization": 6}
SUPPORTED = {T.FLOAT16: np.float16, T.FLOAT: np.float32, T.DOUBLE: np.float64}
# "op": GroupNormalization (opset >= 21); "instance": Reshape -> InstanceNormalization -> Reshape
# + affine at every opset (onnxruntime 1.32's CPU GroupNormalization is ~2x slower than that).
GROUP_FORMS = ("op", "instance")


@dataclass
class Plan:
    op: str
    x: str
    params: list[np.ndarray | None]  # scale, bias (None: omitted input)
    attrs: dict
    nodes: list[onnx.NodeProto]
    out: str
    scope: str
    replaced: int = 0
    kind: str = ""


def _run(model: onnx.ModelProto, ctx: PassContext) -> PassResult:
    ix = GraphIndex(model)
    g, opset, result = Graph(ix), opset_of(model), PassResult()
    plans, claimed = [], set()
    form = ctx.options.get("group_norm") or "op"
    if form not in GROUP_FORMS:
        raise NormfixError(f"--group-norm {form!r}: expected one of {', '.join(GROUP_FORMS)}")
    group_op = form == "op"
    for node in list(model.graph.node):
        if node.domain not in ONNX_DOMAINS:
            continue
        if node.op_type in ("ReduceMean", "GlobalAveragePool"):
            outcome = _plan_moments(g, node, opset, group_op)
        elif node.op_type == "InstanceNormalization" and group_op:
            outcome = _plan_group_of_inorm(g, node, opset)
        else:
            continue
        if outcome is None:
            continue
        if isinstance(outcome, str):
            result.notes.append(f"skipped {outcome}")
            continue
        if any(id(n) in claimed for n in outcome.nodes):
            continue
        claimed.update(id(n) for n in outcome.nodes)
        plans.append(outcome)
    fused = Counter()
    for plan in plans:
        _rewrite(ix, plan)
        fused[plan.op] += 1
        result.sites.append(([plan.x], [plan.out]))
    if plans:
        ix.commit()
        result.notes.insert(0, "fused " + ", ".join(f"{n} {op}" for op, n in sorted(fused.items())))
    result.rewrites = len(plans)
    result.details = {"fused": dict(fused),
                      "sites": [{"scope": p.scope, "kind": p.kind, "op": p.op, "nodes_replaced": p.replaced} for p in plans]}
    return result


def _scope(node: onnx.NodeProto) -> str:
    name = node.name or node.output[0]
    return name.rsplit("/", 1)[0] + "/" if "/" in name.strip("/") else name


def _opset_note(what: str, op: str, opset: int) -> str:
    need = NEEDS_OPSET[op]
    return (f"{what}: {op} needs opset {need}, the model's default-domain opset is {opset}; rerun with "
            f"--target-opset {need} (raises the opset with onnx.version_converter, validated as its own stage)")


# ---- guards: decide what a matched core becomes -----------------------------------------------
def _plan_moments(g: Graph, rv: onnx.NodeProto, opset: int, group_op: bool = True) -> Plan | str | None:
    m = match_moments(g, rv)
    scope = _scope(rv)
    if m is None:
        return None
    if isinstance(m, str):
        return f"normalization at {scope}: {m}"
    what = f"{'LayerNorm' if m.centered else 'RMSNorm'} at {scope}"
    out_type = g.dtype(m.out)
    x = next((name for name in m.inputs if g.dtype(name) == out_type), None)
    if out_type not in SUPPORTED:
        return f"{what}: dtype {_type_name(out_type)} is not float16/float/double"
    if x is None:
        return f"{what}: output dtype {_type_name(out_type)} differs from the input's"
    shape = g.shape(m.stats_input)
    rank = None if shape is None else len(shape)
    axes = normalized_axes(m.axes, rank)
    if axes is None or rank is None:
        return f"{what}: rank of the input unknown, cannot tell which axes are reduced"
    nodes = m.nodes + side_casts(g, m, x)
    start = trailing_start(axes, rank)
    instance_axes = rank >= 3 and axes == list(range(2, rank))
    if m.centered and instance_axes:
        grouped = is_group_split(g, x, m.out)
        if grouped and opset >= 21 and group_op:
            group = _group_plan(g, x, m.out, nodes, m.eps, scope, opset)
            if isinstance(group, Plan):
                return group
        # rank 3 is a [N, L, D] LayerNorm unless the affine is per channel: an InstanceNorm
        # scale of L would tie the model to one sequence length
        if grouped or per_channel_affine_follows(g, m.out, shape) or (
                rank >= 4 and (opset < 17 or not constant_affine_follows(g, m.out))):
            return _instance_plan(g, what, x, m, nodes, shape, scope)
    if start is None:
        return (f"{what}: reduced axes {axes} of a rank-{rank} tensor are not the trailing axes "
                f"{'LayerNormalization' if m.centered else 'RMSNormalization'} normalizes")
    op = "LayerNormalization" if m.centered else "RMSNormalization"
    if opset < NEEDS_OPSET[op]:
        return _opset_note(what, op, opset)
    norm_shape = shape[start:]

    def fits(value):
        return value.dtype == SUPPORTED[out_type] and trailing_param(value, rank, start, norm_shape) is not None

    affine = woven_affine(m, fits) if m.affine is not None else match_affine(g, m.out, fits, with_bias=m.centered)
    if affine is None:
        return f"{what}: Keras-form gamma/beta vary along axes it does not normalize"
    scale = None if affine.scale is None else trailing_param(affine.scale, rank, start, norm_shape)
    if scale is None:
        if any(not isinstance(d, int) or d <= 0 for d in norm_shape):
            return f"{what}: normalized dims {norm_shape} are not static (the fused op needs a scale of that shape)"
        scale = np.ones(norm_shape, SUPPORTED[out_type])
    bias = None if affine.bias is None else trailing_param(affine.bias, rank, start, list(scale.shape))
    return _finish(g, what, Plan(
        op=op, x=x, params=[scale, bias],
        attrs={"axis": start, "epsilon": m.eps, "stash_type": T.DOUBLE if out_type == T.DOUBLE else T.FLOAT},
        nodes=nodes + affine.nodes, out=affine.out, scope=scope, kind="LayerNorm" if m.centered else "RMSNorm"))


def _instance_plan(g: Graph, what: str, x: str, m: Moments, nodes, shape, scope) -> Plan | str:
    what = what.replace("LayerNorm", "InstanceNorm")
    channels = shape[1]
    if not isinstance(channels, int) or channels <= 0:
        return f"{what}: channel count (axis 1) is not static"
    dtype = SUPPORTED[g.dtype(m.out)]
    if dtype == np.float64:
        return f"{what}: double InstanceNormalization has no onnxruntime kernel"
    rank = len(shape)

    def fits(value):
        return value.dtype == dtype and channel_param(value, rank, channels) is not None

    affine = woven_affine(m, fits) if m.affine is not None else match_affine(g, m.out, fits)
    if affine is None:
        return f"{what}: Keras-form gamma/beta are not per-channel"
    scale, bias = (np.ones(channels, dtype) if affine.scale is None else channel_param(affine.scale, rank, channels),
                   np.zeros(channels, dtype) if affine.bias is None else channel_param(affine.bias, rank, channels))
    return _finish(g, what, Plan(op="InstanceNormalization", x=x, params=[scale, bias], attrs={"epsilon": m.eps},
                                 nodes=nodes + affine.nodes, out=affine.out, scope=scope, kind="InstanceNorm"))


def _group_plan(g: Graph, reshaped: str, y: str, core: list, eps: float, scope: str, opset: int) -> Plan | str:
    """Reshape[N,G,...] -> core -> Reshape back to x's [N,C,*] -> per-channel affine, as
    GroupNormalization (opset >= 21). A reason (str) when the Reshapes do not provably split
    exactly C into G and restore x, or the dtype does not fit."""
    rs_in, rs_out = g.op(reshaped, "Reshape"), g.only_user(y, "Reshape")
    if rs_in is None or rs_out is None:
        return "not between two Reshapes"
    if opset < 21:
        return _opset_note("kept as Reshape -> InstanceNormalization -> Reshape", "GroupNormalization", opset)
    split = group_split(g, rs_in, rs_out)
    if split is None:
        return ("cannot prove the Reshapes split x[N, C, *] into [N, G, -1] with G dividing a static C "
                "and restore x's shape (static C and G, a [0, G, -1] target or Shape(x) back)")
    x0, channels, groups, rank = split
    dtype = SUPPORTED.get(g.dtype(y))
    if dtype is None:
        return f"dtype {_type_name(g.dtype(y))} is not float16/float/double"
    if g.dtype(x0) != g.dtype(y):
        return f"output dtype {_type_name(g.dtype(y))} differs from the input's"

    def fits(value):
        return value.dtype == dtype and channel_param(value, rank, channels) is not None

    affine = match_affine(g, rs_out.output[0], fits)
    nodes = list(core) + [rs_out]
    inside = {id(n) for n in nodes}
    if all(id(u) in inside for u in g.users(reshaped)) and reshaped not in g.ix.graph_outputs:
        nodes.append(rs_in)
    scale = np.ones(channels, dtype) if affine.scale is None else channel_param(affine.scale, rank, channels)
    bias = np.zeros(channels, dtype) if affine.bias is None else channel_param(affine.bias, rank, channels)
    plan = Plan(op="GroupNormalization", x=x0, params=[scale, bias],
                attrs={"epsilon": eps, "num_groups": int(groups), "stash_type": T.FLOAT},
                nodes=nodes + affine.nodes, out=affine.out, scope=scope, kind="GroupNorm")
    why = leaks(g, plan.nodes, plan.out)
    if why:
        return why
    plan.replaced = len(plan.nodes)
    return plan


def _plan_group_of_inorm(g: Graph, node: onnx.NodeProto, opset: int) -> Plan | str | None:
    """The exporters' GroupNorm: Reshape -> InstanceNormalization(ones, zeros) -> Reshape.
    None for any other InstanceNormalization; a note naming the node when it is that
    GroupNorm but stays (opset below 21, a split that cannot be proven, a leak)."""
    if len(node.input) < 3 or not is_group_split(g, node.input[0], node.output[0]):
        return None
    scale, bias = g.ix.constant(node.input[1]), g.ix.constant(node.input[2])
    if scale is None or bias is None or not np.all(scale == 1) or not np.all(bias == 0):
        return None
    plan = _group_plan(g, node.input[0], node.output[0], [node], float(attr(node, "epsilon", 1e-5)), _scope(node), opset)
    return plan if isinstance(plan, Plan) else f"GroupNorm at {node.name or _scope(node)}: {plan}"


def _finish(g: Graph, what: str, plan: Plan) -> Plan | str:
    why = leaks(g, plan.nodes, plan.out)
    if why:
        return f"{what}: {why}"
    plan.replaced = len(plan.nodes)
    return plan


def _type_name(code) -> str:
    return onnx.TensorProto.DataType.Name(code) if code else "unknown"


# ---- rewiring --------------------------------------------------------------------------------
def _rewrite(ix: GraphIndex, plan: Plan) -> None:
    last = ix.producer[plan.out]
    base = f"{plan.scope}{plan.op}"
    inputs = [plan.x]
    for role, value in zip(("scale", "bias"), plan.params):
        if value is not None:
            inputs.append(ix.add_initializer(np.ascontiguousarray(value), f"{base}.{role}"))
    node = onnx.helper.make_node(plan.op, inputs, [plan.out], name=ix.unique_name(base), **plan.attrs)
    stamp(node, NAME)
    for n in plan.nodes:
        if n is not last:
            ix.remove(n)
    last.CopyFrom(node)  # in the last node's place: the graph stays topologically sorted


def _brings(options: dict) -> list:
    """--target-opset N: the opset conversion runs first, as its own validated stage."""
    from .raise_opset import stage

    target = options.get("target_opset")
    return [] if target is None else [stage(target)]


PASS = register_pass(
    Pass(
        name=NAME,
        summary="Fuse decomposed LayerNorm/RMSNorm/GroupNorm/InstanceNorm into the ONNX normalization ops.",
        preserves_outputs=True,
        run=_run,
        options=[
            Option("target_opset", None, int, "first raise the default-domain opset to N (onnx.version_converter, "
                   "its own validated stage); LayerNormalization needs 17, GroupNormalization 21, "
                   "RMSNormalization 23", metavar="N"),
            Option("group_norm", "op", str, "GroupNorm as GroupNormalization (op, default; opset >= 21) or "
                   "Reshape/InstanceNormalization/Reshape (instance: faster on onnxruntime 1.32's CPU)",
                   choices=GROUP_FORMS),
        ],
        brings=_brings,
        # the InstanceNormalizations it makes reach fix_inorm, the BNs fold_bn makes of them too
        creates={"LayerNormalization", "RMSNormalization", "GroupNormalization", "InstanceNormalization"},
        runs_before={"fold_bn"},
    )
)
