"""Matching for fuse_norms: the normalization chains exporters write, read off a GraphIndex.

Everything here only looks at the graph; `passes/fuse_norms.py` decides and rewrites.
`GraphIndex.match_parents(node, [(op or (ops), input_index), ...])` is the path matcher the
rest is written around ("input k of this node comes from op A, whose input j comes from op B, ...").

`match_moments` starts at the ReduceMean of the squares and walks both ways:

    x -[Cast]-> ReduceMean -> Sub(x, mean) -[Cast]-> Pow(d, 2) | Mul(d, d) -> ReduceMean -> var
    var -> [Add eps] -> Sqrt | Pow(., 0.5) -> Div(d', std) | Mul(d', Reciprocal | Div(1, std))
        | Pow(., -0.5) -> Mul(d', rstd)        -> [Cast] -> normalized
    (RMS: no mean, no Sub: d is x itself)

where d' is d, a Cast of it, or a second identical Sub(x, mean) (the exporters duplicate it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from onnx_normfix.graph import GraphIndex, attr

T = onnx.TensorProto
FLOAT_TYPES = {T.FLOAT16, T.FLOAT, T.DOUBLE, T.BFLOAT16}
# Casts that change no value: the fused op may read the tensor before them.
_EXACT_UPCASTS = {(T.FLOAT16, T.FLOAT), (T.FLOAT16, T.DOUBLE), (T.BFLOAT16, T.FLOAT),
                  (T.BFLOAT16, T.DOUBLE), (T.FLOAT, T.DOUBLE)}
ONNX_DOMAINS = ("", "ai.onnx")
MEAN_OPS = ("ReduceMean", "GlobalAveragePool")


class Graph:
    """A GraphIndex plus liveness: consumers that reach no graph output are exporter
    leftovers and never block a rewrite."""

    def __init__(self, index: GraphIndex):
        self.ix = index
        live, alive = set(index.graph_outputs), set()
        for node in reversed(index.graph.node):
            if any(o in live for o in node.output if o):
                alive.add(id(node))
                live.update(i for i in node.input if i)
        self.alive = alive
        self._types: dict[str, int | None] = {}

    def op(self, name: str, *ops: str) -> onnx.NodeProto | None:
        node = self.ix.producer.get(name)
        if node is not None and node.op_type in ops and node.domain in ONNX_DOMAINS:
            return node
        return None

    def users(self, name: str) -> list[onnx.NodeProto]:
        return [c for c in self.ix.consumers.get(name, []) if id(c) in self.alive]

    def only_user(self, name: str, *ops: str) -> onnx.NodeProto | None:
        users = self.users(name)
        if len(users) != 1 or name in self.ix.graph_outputs:
            return None
        user = users[0]
        if ops and (user.op_type not in ops or user.domain not in ONNX_DOMAINS):
            return None
        return user

    def next_user(self, name: str, *ops: str) -> onnx.NodeProto | None:
        """The one live reader of `name` with one of `ops`, even if `name` is also a graph
        output or has other readers: the caller's leak check then says why it cannot fuse."""
        users = [u for u in self.users(name) if u.op_type in ops and u.domain in ONNX_DOMAINS]
        return users[0] if len(users) == 1 else None

    def dtype(self, name: str) -> int | None:
        if name not in self._types:
            node = self.ix.producer.get(name)
            if node is not None and node.op_type == "Cast":
                self._types[name] = attr(node, "to")
            else:
                t = self.ix.value_type(name)
                code = t.tensor_type.elem_type if t is not None and t.HasField("tensor_type") else 0
                self._types[name] = code or None
        return self._types[name]

    def shape(self, name: str) -> list | None:
        """Dims as ints (static) or strings/None (symbolic); None if the rank is unknown.
        A Reshape output that shape inference left without a shape gets one from its target
        (`reshape_shape`): Reshape-5/13's inference reads only constant targets."""
        t = self.ix.value_type(name)
        if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
            node = self.op(name, "Reshape")
            return reshape_shape(self, node) if node is not None else None
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.tensor_type.shape.dim]

    def scalar(self, name: str) -> float | None:
        value = self.ix.constant(name)
        if value is None or value.size != 1:
            return None
        try:  # bfloat16 & co. are numpy void types that still convert
            return float(value.reshape(-1)[0].astype(np.float64))
        except (TypeError, ValueError):
            return None

    def other_input(self, node: onnx.NodeProto, mine: str) -> str | None:
        """The input of a binary node that is not `mine` (None if both are, or arity differs)."""
        if len(node.input) != 2:
            return None
        a, b = node.input
        if a == mine and b != mine:
            return b
        if b == mine and a != mine:
            return a
        return None


def _cast_is_float(node: onnx.NodeProto) -> bool:
    return node.op_type == "Cast" and attr(node, "to") in FLOAT_TYPES


def strip_casts(g: Graph, name: str) -> tuple[str, list[onnx.NodeProto]]:
    """Walk up float Casts from `name`: (the tensor above them, the Casts, nearest first)."""
    casts = []
    while True:
        node = g.op(name, "Cast")
        if node is None or not _cast_is_float(node):
            return name, casts
        casts.append(node)
        name = node.input[0]


@dataclass
class Moments:
    """A matched normalization core, from its input to the normalized (unscaled) output."""

    centered: bool  # LayerNorm-like (x - mean) or RMS-like (x itself)
    inputs: list[str]  # candidate norm inputs: before each exact upcast on x's side, outermost first
    stats_input: str  # the tensor the statistics ReduceMeans read
    axes: list[int] | None  # as written (may be negative); None: all axes
    eps: float
    out: str  # normalized output (after a final Cast, if any)
    nodes: list[onnx.NodeProto] = field(default_factory=list)  # the core's nodes
    side_casts: list[onnx.NodeProto] = field(default_factory=list)  # x-side upcasts (kept if shared)
    anchor: onnx.NodeProto | None = None  # the variance ReduceMean (names derive from it)
    affine: "Affine | None" = None  # Keras form: gamma/beta are woven into the core's tail


def reduce_axes(g: Graph, node: onnx.NodeProto) -> tuple[list[int] | None, str | None]:
    """(axes or None for all, why not readable). keepdims=0 and non-constant axes are reasons.
    GlobalAveragePool (tf2onnx writes it for a mean over the last axes) is ReduceMean(2..r-1)."""
    if node.op_type == "GlobalAveragePool":
        shape = g.shape(node.input[0])
        if shape is None:
            return None, "rank of the GlobalAveragePool input unknown"
        return list(range(2, len(shape))), None
    if attr(node, "keepdims", 1) != 1:
        return None, "keepdims=0 (the statistics lose the reduced axes)"
    axes = attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = g.ix.constant(node.input[1])
        if value is None:
            return None, "ReduceMean axes are not a constant"
        axes = value.reshape(-1).astype(int).tolist()
        if not axes and attr(node, "noop_with_empty_axes", 0):
            return None, "ReduceMean with empty axes and noop_with_empty_axes=1 reduces nothing"
    return (list(axes) if axes else None), None


def match_moments(g: Graph, rv: onnx.NodeProto) -> Moments | str | None:
    """The normalization whose variance (or mean square) `rv` computes.

    None: `rv` is not the ReduceMean of a square (not a norm at all, say nothing).
    A string: a norm was recognized but cannot be fused safely, and why."""
    sq_in, _ = strip_casts(g, rv.input[0])
    sq = g.op(sq_in, "Pow", "Mul")
    if sq is None:
        return None
    if sq.op_type == "Pow" and g.scalar(sq.input[1]) != 2.0:
        return None
    if sq.op_type == "Mul" and (len(sq.input) != 2 or sq.input[0] != sq.input[1]):
        return None
    inner = [n for n in [g.ix.producer.get(x) for x in _between(g, rv.input[0], sq_in)] if n is not None]
    base = sq.input[0]
    base_root, base_casts = strip_casts(g, base)
    sub = g.op(base_root, "Sub")
    rm, relay = None, None
    if sub is not None and len(sub.input) == 2:
        direct = g.ix.match_parents(sub, [(MEAN_OPS, 1)])
        # tf2onnx: the mean through a Reshape that only relabels its (static) shape
        relayed = g.ix.match_parents(sub, [(("Reshape", "Identity"), 1), (MEAN_OPS, 0)])
        if direct:
            rm = direct[0]
        elif relayed and g.shape(relayed[0].output[0]) == g.shape(relayed[1].output[0]) and _static(g.shape(sub.input[1])):
            relay, rm = relayed
    centered = rm is not None and rm.input[0] == sub.input[0]
    var_axes, why = reduce_axes(g, rv)
    if why:
        return why
    nodes = [rv, sq, *inner]
    if centered:
        mean_axes, why = reduce_axes(g, rm)
        if why:
            return why
        rank = len(g.shape(sub.input[0]) or []) or None
        if normalized_axes(mean_axes, rank) != normalized_axes(var_axes, rank) or (rank is None and mean_axes != var_axes):
            return f"mean over axes {mean_axes} but variance over axes {var_axes}"
        stats_input = sub.input[0]
        nodes += [sub, rm, *base_casts] + ([relay] if relay is not None else [])
    else:
        stats_input = base  # x, or its upcast: the Casts above are x's side (below)
    # walk down: [Add eps] -> Sqrt / Pow(.5) -> Div / Mul(Reciprocal) / Pow(-.5) -> Mul
    t, eps = rv.output[0], 0.0
    add = g.next_user(t, "Add")
    if add is not None:
        other = g.other_input(add, t)
        value = g.scalar(other) if other else None
        if value is None:  # a norm (Sqrt follows) with a computed epsilon, or not a norm at all
            if other and g.ix.constant(other) is None and g.next_user(add.output[0], "Sqrt", "Pow") is not None:
                return "epsilon is not a constant scalar"
            return None
        eps, t = value, add.output[0]
        nodes.append(add)
    step = g.next_user(t, "Sqrt", "Pow")
    if step is None:
        return None
    nodes.append(step)
    rstd = None
    if step.op_type == "Pow":
        power = g.scalar(step.input[1])
        if power == -0.5:
            rstd = step.output[0]
        elif power != 0.5:
            return None
    if rstd is None:
        std = step.output[0]
        user = g.next_user(std, "Div", "Reciprocal")
        if user is None:
            return None
        if user.op_type == "Div" and user.input[1] == std and g.scalar(user.input[0]) == 1.0:
            rstd = user.output[0]
            nodes.append(user)
        elif user.op_type == "Reciprocal":
            rstd = user.output[0]
            nodes.append(user)
        elif user.op_type == "Div" and user.input[1] == std:
            norm, numerator = user, user.input[0]
        else:
            return None
    if rstd is not None and centered:
        keras = _keras_tail(g, rstd, stats_input, rm.output[0])
        if keras is not None:
            nodes += keras.nodes
            return Moments(centered=True, inputs=_side_inputs(g, stats_input)[0], stats_input=stats_input,
                           axes=var_axes, eps=eps, out=keras.out, nodes=_unique(nodes),
                           side_casts=_side_inputs(g, stats_input)[1], anchor=rv, affine=keras)
    if rstd is not None:
        norm = g.next_user(rstd, "Mul")
        if norm is None:
            return None
        numerator = g.other_input(norm, rstd)
        if numerator is None:
            return None
    nodes.append(norm)
    num_root, num_casts = strip_casts(g, numerator)
    if centered:
        twin = g.op(num_root, "Sub")
        if twin is None or list(twin.input) != list(sub.input):
            return None
        if twin is not sub:
            nodes.append(twin)  # the duplicated Sub(x, mean) of dynamo / hand-written `x - u`
        nodes += num_casts  # (_unique drops the ones already listed)
    else:
        if num_root != base_root:
            return None
        nodes += [c for c in num_casts if all(c is not b for b in base_casts)]
    out = norm.output[0]
    cast_back = g.only_user(out, "Cast")
    while cast_back is not None and _cast_is_float(cast_back):
        nodes.append(cast_back)
        out = cast_back.output[0]
        cast_back = g.only_user(out, "Cast")
    # x's side: the statistics (and, for RMS, the numerator) may read upcasts of x
    inputs, exact = _side_inputs(g, stats_input)
    return Moments(centered=centered, inputs=inputs, stats_input=stats_input, axes=var_axes, eps=eps,
                   out=out, nodes=_unique(nodes), side_casts=exact, anchor=rv)


def _side_inputs(g: Graph, stats_input: str) -> tuple[list[str], list[onnx.NodeProto]]:
    """(tensors the fused op may read: above each exact upcast, outermost first; those Casts)."""
    _, side = strip_casts(g, stats_input)
    inputs, exact = [stats_input], []
    for cast in side:
        src = cast.input[0]
        src_type, dst_type = g.dtype(src), attr(cast, "to")
        if src_type != dst_type and (src_type, dst_type) not in _EXACT_UPCASTS:
            break
        exact.append(cast)
        inputs.append(src)
    return inputs[::-1], exact


def _keras_tail(g: Graph, rstd: str, x: str, mean: str) -> "Affine | None":
    """Keras (tf.nn.batch_normalization, through tf2onnx): with k = rstd [* gamma],
        y = x * k + (Neg(mean) * k [+ beta])   or   y = x * k + (beta - mean * k)   or   x * k - mean * k
    as an Affine whose nodes are that tail and whose scale/bias are gamma/beta (None if absent)."""
    found = Affine()
    k = rstd
    first = g.users(rstd)
    if len(first) == 1 and first[0].op_type == "Mul":
        other = g.other_input(first[0], rstd)
        value = g.ix.constant(other) if other else None
        if value is None:
            return None
        found.scale, k = value, first[0].output[0]
        found.nodes.append(first[0])
    muls = [u for u in g.users(k) if u.op_type == "Mul" and u.domain in ONNX_DOMAINS]
    if len(muls) != 2:
        return None
    mx = next((u for u in muls if g.other_input(u, k) == x), None)
    mm = next((u for u in muls if u is not mx), None)
    if mx is None or mm is None:
        return None
    term = g.other_input(mm, k)
    neg = (g.ix.match_parents(mm, [("Neg", list(mm.input).index(term))]) or [None])[0] if term else None
    negated = neg is not None and neg.input[0] == mean
    if not negated and term != mean:
        return None
    found.nodes += [mx, mm] + ([neg] if negated else [])
    shift, shift_node = mm.output[0], g.next_user(mm.output[0], "Add", "Sub")
    if shift_node is None:
        return None
    if negated and shift_node.op_type == "Add" and mx.output[0] not in shift_node.input:
        beta = g.ix.constant(g.other_input(shift_node, shift) or "")
        if beta is None:
            return None
        found.bias, shift = beta, shift_node.output[0]
        found.nodes.append(shift_node)
        shift_node = g.next_user(shift, "Add")
    elif not negated and shift_node.op_type == "Sub" and shift_node.input[1] == shift and shift_node.input[0] != mx.output[0]:
        beta = g.ix.constant(shift_node.input[0])
        if beta is None:
            return None
        found.bias, shift = beta, shift_node.output[0]
        found.nodes.append(shift_node)
        shift_node = g.next_user(shift, "Add")
    want = {"Add"} if negated or found.bias is not None else {"Sub"}
    if shift_node is None or shift_node.op_type not in want or set(shift_node.input) != {mx.output[0], shift}:
        return None
    if shift_node.op_type == "Sub" and list(shift_node.input) != [mx.output[0], shift]:
        return None
    found.nodes.append(shift_node)
    found.out = shift_node.output[0]
    return found


def _static(shape) -> bool:
    return shape is not None and all(isinstance(d, int) and d > 0 for d in shape)


def _between(g: Graph, top: str, bottom: str) -> list[str]:
    """Tensor names from `top` up to (excluding) `bottom` along a Cast chain."""
    names = []
    while top != bottom:
        names.append(top)
        top = g.ix.producer[top].input[0]
    return names


def _unique(nodes: list) -> list:
    seen, out = set(), []
    for n in nodes:
        if id(n) not in seen:
            seen.add(id(n))
            out.append(n)
    return out


def normalized_axes(axes: list[int] | None, rank: int | None) -> list[int] | None:
    """Axes as sorted non-negative ints; None if the rank is needed but unknown."""
    if axes is None:
        return list(range(rank)) if rank is not None else None
    if rank is None:
        if all(a < 0 for a in axes):
            k = len(axes)
            return sorted(a for a in axes) if sorted(axes) == list(range(-k, 0)) else None
        return None
    if any(not -rank <= a < rank for a in axes):
        return None
    return sorted({a % rank for a in axes})


def trailing_start(axes: list[int], rank: int | None) -> int | None:
    """The first normalized axis if `axes` are the trailing ones (negative when rank unknown)."""
    if rank is None:
        k = len(axes)
        return -k if axes == list(range(-k, 0)) else None
    return axes[0] if axes == list(range(axes[0], rank)) else None


def leaks(g: Graph, nodes: list[onnx.NodeProto], final: str) -> str | None:
    """Why the pattern cannot be replaced: an intermediate that is a graph output or read by a
    live node outside the pattern. None if every intermediate stays inside."""
    inside = {id(n) for n in nodes}
    for n in nodes:
        for o in n.output:
            if not o or o == final:
                continue
            if o in g.ix.graph_outputs:
                return f"intermediate {o} is a graph output (left alone)"
            outside = [u for u in g.users(o) if id(u) not in inside]
            if outside:
                return f"intermediate {o} is also read by {outside[0].name or outside[0].op_type}"
    return None


@dataclass
class Affine:
    """Constant Mul / Add after a normalized tensor that the fused op can absorb."""

    scale: np.ndarray | None = None
    bias: np.ndarray | None = None
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    out: str = ""


def match_affine(g: Graph, out: str, fits, with_bias: bool = True) -> Affine:
    """Absorb `Mul(out, w)` / `Mul(w, out)` then `Add(., b)` while `fits(value)` accepts the
    constant; a dynamic operand (DiT modulation) or a shape that would broadcast the norm
    wider ends the absorption there, and the rest stays in the graph as it is."""
    found = Affine(out=out)
    user = g.only_user(out, "Mul", "Add")
    if user is not None and user.op_type == "Mul":
        other = g.other_input(user, out)
        value = g.ix.constant(other) if other else None
        if value is not None and fits(value):
            found.scale, found.out = value, user.output[0]
            found.nodes.append(user)
            user = g.only_user(found.out, "Add")
        else:
            return found
    if with_bias and user is not None and user.op_type == "Add":
        other = g.other_input(user, found.out)
        value = g.ix.constant(other) if other else None
        if value is not None and fits(value):
            found.bias, found.out = value, user.output[0]
            found.nodes.append(user)
    return found


def trailing_param(value: np.ndarray, rank: int, start: int, norm_shape: list) -> np.ndarray | None:
    """`value` (broadcast against a rank-`rank` tensor) as an array of the normalized shape
    x.shape[start:], or None if it varies along a non-normalized axis or the shape is unknown."""
    k = rank - start
    if value.ndim > rank or any(d != 1 for d in value.shape[: max(0, value.ndim - k)]):
        return None
    tail = value.reshape(value.shape[max(0, value.ndim - k):])
    tail = tail.reshape((1,) * (k - tail.ndim) + tail.shape)
    shape = [s if isinstance(s, int) and s > 0 else (t if t != 1 else None) for s, t in zip(norm_shape, tail.shape)]
    if any(s is None for s in shape) or any(t not in (1, s) for t, s in zip(tail.shape, shape)):
        return None
    return np.ascontiguousarray(np.broadcast_to(tail, shape))


def channel_param(value: np.ndarray, rank: int, channels: int) -> np.ndarray | None:
    """`value` (broadcast against [N, C, ...]) as a [C] vector, or None if it varies elsewhere."""
    if value.ndim > rank:
        return None
    aligned = value.reshape((1,) * (rank - value.ndim) + value.shape)
    if any(d != 1 for i, d in enumerate(aligned.shape) if i != 1) or aligned.shape[1] not in (1, channels):
        return None
    return np.ascontiguousarray(np.broadcast_to(aligned.reshape(-1), (channels,)))


def group_split(g: Graph, rs_in: onnx.NodeProto, rs_out: onnx.NodeProto) -> tuple[str, int, int, int] | None:
    """(x, C, G, rank of x) if Reshape `rs_in` splits x[N, C, *] into [N, G, (C/G)*prod(*)]
    and `rs_out` restores x's shape exactly; None if that cannot be proven.

    A row-major Reshape keeps each batch item's C*prod(*) elements in order, so [N, G, K] with
    G*K == C*prod(*) (static) groups C/G consecutive channels, batch dims included: the element
    count forces N' == N. A symbolic N or K is proven by the Reshape target instead:
    [Gather(Shape(x), 0) | 0 | N, G, -1] and, back, Shape(x) or x's static non-batch dims."""
    x = rs_in.input[0]
    shape0, shape = g.shape(x), _reshaped_to(g, rs_in)
    if shape0 is None or len(shape0) < 3 or shape is None or len(shape) < 3:
        return None
    channels, groups = shape0[1], shape[1]
    if not (isinstance(channels, int) and isinstance(groups, int) and channels > 0 and groups > 0) or channels % groups:
        return None
    spatial = shape0[2:]
    static0 = _static(spatial)
    if static0 and _static(shape[2:]) and int(np.prod(shape[2:])) == channels // groups * int(np.prod(spatial)):
        pass  # element count proves the split
    elif not _group_target(g, rs_in, x, groups):
        return None
    # back to x's shape
    back = g.shape(rs_out.output[0])
    shape_of = g.op(rs_out.input[1], "Shape")
    if shape_of is not None and shape_of.input[0] == x and whole_shape(shape_of, len(shape0)):
        return x, channels, groups, len(shape0)
    if back is not None and len(back) == len(shape0) and back[1:] == shape0[1:] and static0 and isinstance(channels, int):
        return x, channels, groups, len(shape0)
    if _restores(target_dims(g, rs_out.input[1]), x, shape0):
        return x, channels, groups, len(shape0)
    return None


def _restores(dims: list | None, x: str, shape0: list) -> bool:
    """The target is x's shape element by element: dim i of x (TorchScript's Concat of
    Unsqueeze(Gather(Shape(x), i))) or x's static dim; one -1 where all the others are."""
    if dims is None or len(dims) != len(shape0):
        return False
    proven = [d == ("dim", x, i) or (isinstance(d, int) and d > 0 and d == shape0[i]) for i, d in enumerate(dims)]
    return all(proven) or (proven.count(False) == 1 and dims[proven.index(False)] == -1)


def target_dims(g: Graph, name: str, depth: int = 4) -> list | None:
    """The elements of a 1-D shape tensor as far as they are known: an int, ("dim", x, i) for
    dim i of tensor x (Gather(Shape(x), i), Unsqueezed or not), None for anything else; None
    if even its length is unknown. Reads the exporters' Concat of such pieces."""
    value = g.ix.constant(name)
    if value is not None:
        return [int(v) for v in value.reshape(-1).tolist()] if value.ndim <= 1 else None
    node = g.ix.producer.get(name)
    if node is None or node.domain not in ONNX_DOMAINS or depth <= 0:
        return None
    if node.op_type == "Concat" and attr(node, "axis", 0) in (0, -1):
        parts = [target_dims(g, i, depth - 1) for i in node.input]
        return None if any(p is None for p in parts) else [d for p in parts for d in p]
    if node.op_type == "Unsqueeze" or (node.op_type == "Cast" and attr(node, "to") == T.INT64):
        inner = target_dims(g, node.input[0], depth - 1)
        return inner if inner is not None and len(inner) == 1 else None
    if node.op_type == "Shape" and whole_shape(node, len(g.shape(node.input[0]) or [])):
        rank = len(g.shape(node.input[0]) or [])
        return [("dim", node.input[0], i) for i in range(rank)] if rank else None
    if node.op_type == "Gather" and attr(node, "axis", 0) == 0:
        index = g.ix.constant(node.input[1])
        source = target_dims(g, node.input[0], depth - 1)
        if index is None or index.size != 1 or source is None:
            return None
        i = int(index.reshape(-1)[0])
        return [source[i]] if -len(source) <= i < len(source) else None
    t = g.ix.value_type(name)  # computed: only the length, if the shape of the shape is static
    if t is not None and t.HasField("tensor_type") and t.tensor_type.HasField("shape"):
        dims = t.tensor_type.shape.dim
        if len(dims) == 1 and dims[0].HasField("dim_value"):
            return [None] * dims[0].dim_value
    return None


def reshape_shape(g: Graph, rs: onnx.NodeProto) -> list | None:
    """The output shape of Reshape `rs` from its target (see `target_dims`): an int element
    > 0 is that dim, 0 copies the input's dim (allowzero 0), ("dim", x, i) is x's dim i,
    anything else (-1 included) is unknown; None if the target's length is unknown."""
    dims = target_dims(g, rs.input[1]) if len(rs.input) > 1 else None
    if dims is None:
        return None
    source = g.shape(rs.input[0]) if 0 in dims else None
    out = []
    for i, d in enumerate(dims):
        if isinstance(d, tuple):
            known = g.shape(d[1])
            out.append(known[d[2]] if known is not None and d[2] < len(known) else None)
        elif isinstance(d, int) and d > 0:
            out.append(d)
        elif d == 0 and not attr(rs, "allowzero", 0) and source is not None and i < len(source):
            out.append(source[i])
        else:
            out.append(None)
    return out


def _reshaped_to(g: Graph, rs: onnx.NodeProto) -> list | None:
    """The Reshape's output shape as inferred, with the dims its constant target fixes filled
    in: shape inference leaves [N, unk, unk] when the target is computed (dynamo's unoptimized
    Concat of Constants), yet the target itself folds to [0, G, -1]."""
    shape = g.shape(rs.output[0])
    target = g.ix.constant(rs.input[1])
    if target is None or target.ndim != 1 or (shape is not None and len(shape) != target.size):
        return shape
    shape = list(shape) if shape is not None else [None] * target.size
    return [int(t) if t > 0 and not isinstance(d, int) else d for d, t in zip(shape, target.tolist())]


def whole_shape(node: onnx.NodeProto, rank: int) -> bool:
    """A Shape node that returns every dim of its rank-`rank` input: no start/end, or the
    explicit start=0 (dynamo writes it; a start <= -rank clamps to 0) and an end past the last axis."""
    start, end = attr(node, "start", 0), attr(node, "end")
    return (start == 0 or (rank > 0 and start <= -rank)) and (end is None or (rank > 0 and end >= rank))


def _group_target(g: Graph, rs: onnx.NodeProto, x: str, groups: int) -> bool:
    """The Reshape target is [N of x, G, -1]: a constant (0 copies N when allowzero is 0) or
    the exporters' Concat(Unsqueeze(Gather(Shape(x), 0)), [G], [-1])."""
    target = g.ix.constant(rs.input[1])
    if target is not None:
        t = target.reshape(-1).tolist()
        return len(t) == 3 and t[0] == 0 and not attr(rs, "allowzero", 0) and t[1] == groups and t[2] == -1
    concat = g.op(rs.input[1], "Concat")
    if concat is None or len(concat.input) != 3:
        return False
    tail = [g.ix.constant(i) for i in concat.input[1:]]
    if any(v is None or v.size != 1 for v in tail) or [int(v.reshape(-1)[0]) for v in tail] != [groups, -1]:
        return False
    chain = (g.ix.match_parents(concat, [("Unsqueeze", 0), (("Gather", "Slice"), 0), ("Shape", 0)])
             or g.ix.match_parents(concat, [(("Gather", "Slice"), 0), ("Shape", 0)]))
    if not chain or chain[-1].input[0] != x or not whole_shape(chain[-1], len(g.shape(x) or [])):
        return False
    gather = chain[-2]
    if gather.op_type == "Gather":
        index = g.ix.constant(gather.input[1])
        return index is not None and index.size == 1 and int(index.reshape(-1)[0]) == 0 and attr(gather, "axis", 0) == 0
    starts, ends = (g.ix.constant(i) for i in gather.input[1:3])
    return starts is not None and ends is not None and starts.reshape(-1).tolist() == [0] and ends.reshape(-1).tolist() == [1]


# ---- small questions fuse_norms asks about a matched core ---------------------------------------
def is_group_split(g: Graph, reshaped: str, y: str) -> bool:
    return g.op(reshaped, "Reshape") is not None and g.only_user(y, "Reshape") is not None


def constant_affine_follows(g: Graph, out: str) -> bool:
    user = g.only_user(out, "Mul", "Add")
    other = g.other_input(user, out) if user is not None else None
    return other is not None and g.ix.constant(other) is not None


def per_channel_affine_follows(g: Graph, out: str, shape: list) -> bool:
    user = g.only_user(out, "Mul", "Add")
    other = g.other_input(user, out) if user is not None else None
    value = g.ix.constant(other) if other else None
    rank = len(shape)
    if value is None or not isinstance(shape[1], int) or not rank - 1 <= value.ndim <= rank:
        return False
    return value.shape[1 - (rank - value.ndim)] == shape[1] > 1 and channel_param(value, rank, shape[1]) is not None


def woven_affine(m: Moments, fits) -> Affine | None:
    """The Keras form's gamma/beta (already inside the core's nodes), if they fit the op."""
    if any(v is not None and not fits(v) for v in (m.affine.scale, m.affine.bias)):
        return None
    return Affine(scale=m.affine.scale, bias=m.affine.bias, nodes=[], out=m.out)


def side_casts(g: Graph, m: Moments, x: str) -> list[onnx.NodeProto]:
    """The upcasts between the chosen input and the statistics that only the pattern reads
    (HF RMSNorm's Cast(x) also feeds the residual: that one stays)."""
    inside = {id(n) for n in m.nodes}
    casts, taken = [], []
    for cast in m.side_casts if x != m.stats_input else ():  # nearest to the statistics first
        casts.append(cast)
        if cast.input[0] == x:
            break
    for cast in casts:
        users = g.users(cast.output[0])
        if cast.output[0] in g.ix.graph_outputs or any(id(u) not in inside for u in users):
            break
        taken.append(cast)
        inside.add(id(cast))
    return taken
