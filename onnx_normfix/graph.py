"""A linear-time index over an ONNX graph, shared by every pass.

Passes work on the `onnx.ModelProto` itself (no copy into another IR: on a 100k-node graph
that copy alone costs more than the whole pass). `GraphIndex` is built once per pass in one
sweep; it answers "who produces / who consumes this tensor", resolves constants (initializers,
Constant nodes and small constant subgraphs), hands out unique names, and applies node
removals in bulk, followed by one dead-code sweep.
"""

from __future__ import annotations

import sys
import warnings
from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

# Ops whose output is a pure function of constant inputs and small enough to evaluate while
# resolving a parameter (ConstantOfShape of a constant shape, a Cast of a weight, ...).
FOLDABLE_OPS = frozenset(
    """Identity Cast CastLike Reshape Unsqueeze Squeeze Flatten Transpose Concat Slice Gather
    ConstantOfShape Expand Tile Shape Size Add Sub Mul Div Neg Sqrt Reciprocal Pow Abs Exp Log
    Range Split Where Max Min Clip""".split()
)
RANDOM_OPS = frozenset(
    "RandomNormal RandomNormalLike RandomUniform RandomUniformLike Bernoulli Multinomial".split()
)
# Constant evaluation never produces tensors larger than this many elements.
MAX_FOLD_ELEMENTS = 1 << 24
STAMP = "onnx_normfix:"


# The ai.onnx ops that carry graph attributes; ops of other domains may carry them too.
GRAPH_OPS = frozenset({"If", "Loop", "Scan", "SequenceMap"})
_ONNX_DOMAINS = ("", "ai.onnx")


def may_have_subgraphs(node: onnx.NodeProto) -> bool:
    return node.op_type in GRAPH_OPS or node.domain not in _ONNX_DOMAINS


def subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Outer-scope names that the If/Loop/Scan bodies of `node` read."""
    names: set[str] = set()
    if not may_have_subgraphs(node):  # skip the attribute walk on the other 99.9% of nodes
        return names
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for g in graphs:
            for inner in g.node:
                names.update(i for i in inner.input if i)
                names |= subgraph_inputs(inner)
    return names


# Tensor types whose raw_data is the numpy buffer as is (little-endian hosts): read and
# written without numpy_helper's per-call overhead (8 us, a third of fold_bn at 100k nodes).
_RAW_TYPES = {onnx.TensorProto.FLOAT: np.dtype(np.float32), onnx.TensorProto.DOUBLE: np.dtype(np.float64),
              onnx.TensorProto.FLOAT16: np.dtype(np.float16), onnx.TensorProto.INT64: np.dtype(np.int64),
              onnx.TensorProto.INT32: np.dtype(np.int32), onnx.TensorProto.INT8: np.dtype(np.int8),
              onnx.TensorProto.UINT8: np.dtype(np.uint8)} if sys.byteorder == "little" else {}
_RAW_TYPE_OF = {dtype: code for code, dtype in _RAW_TYPES.items()}


def array_of(tensor: onnx.TensorProto, base_dir: str | None = None) -> np.ndarray:
    """The tensor's value (read-only for raw data, as numpy_helper.to_array returns it).

    External data is read from its file on each call, into a fresh writable array that the
    caller owns (fold_bn scales it in place): `model_io.load_model` leaves it on disk with an
    absolute, verified location, which onnx's own reader refuses."""
    dtype = _RAW_TYPES.get(tensor.data_type)
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        from .model_io import external_bytes

        if dtype is not None:
            value = np.empty(tuple(tensor.dims), dtype=dtype)
            return external_bytes(tensor, base_dir, into=value) if value.size else value
        data = external_bytes(tensor, base_dir)
        inline = onnx.TensorProto()
        inline.CopyFrom(tensor)
        del inline.external_data[:]
        inline.data_location = onnx.TensorProto.DEFAULT
        inline.raw_data = data
        return numpy_helper.to_array(inline)
    if dtype is not None and tensor.HasField("raw_data"):
        return np.frombuffer(tensor.raw_data, dtype=dtype).reshape(tuple(tensor.dims))
    return numpy_helper.to_array(tensor, base_dir or "")


def tensor_of(value: np.ndarray, name: str = "") -> onnx.TensorProto:
    """`numpy_helper.from_array` with a fast path for plain numeric arrays."""
    code = _RAW_TYPE_OF.get(value.dtype)
    if code is None:
        return numpy_helper.from_array(value, name)
    return onnx.TensorProto(name=name, data_type=code, dims=value.shape, raw_data=np.ascontiguousarray(value).tobytes())


def constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The value of a `Constant` node, whichever attribute holds it."""
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    return None  # sparse_value / value_string(s): not numeric parameters


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))


def opset_of(model: onnx.ModelProto, domain: str = "") -> int:
    for op in model.opset_import:
        if op.domain in (domain, "ai.onnx" if domain == "" else domain):
            return op.version
    return 0


class GraphIndex:
    """Producer/consumer maps and constant resolution for `model.graph` (main graph only).

    A tensor is a constant when its value depends only on initializers, Constant nodes and
    STATIC properties of other tensors: the dtype of anything, the shape of an initializer,
    and a shape that shape inference fixes (from the inputs' declared shapes and the ops,
    never from the model's own value_info, which may be wrong). So `Shape(W)`, `CastLike(c, x)`
    of a graph input x, and the Expand/Slice/Concat/... arithmetic over them are constants.
    An initializer that is also a graph input is, from IR 4 on, a default the caller may
    override (onnxruntime: `get_overridable_initializers`): not a constant, and a graph input
    the dead-code sweep never drops. IR 3 lists every initializer as an input: constants.
    """

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in self.graph.initializer}
        self.graph_outputs = {o.name for o in self.graph.output}
        listed = {i.name for i in self.graph.input}
        self.overridable = {n for n in listed if n in self.initializers} if model.ir_version >= 4 else set()
        # the inputs a caller may feed: real inputs and (IR >= 4) overridable initializers
        self.graph_inputs = {n for n in listed if n not in self.initializers or n in self.overridable}
        producer: dict[str, onnx.NodeProto] = {}
        consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        used = set(self.initializers) | {i.name for i in self.graph.input}
        for node in self.graph.node:  # the hottest loop of every pass: locals, no helpers
            for out in node.output:
                producer[out] = node
            for inp in node.input:
                consumers[inp].append(node)
            if node.op_type in GRAPH_OPS or node.domain not in _ONNX_DOMAINS:
                for inp in subgraph_inputs(node):
                    consumers[inp].append(node)
            used.add(node.name)
        producer.pop("", None)  # "" marks an omitted optional input or output
        consumers.pop("", None)
        used.update(producer)
        used.discard("")
        self.producer, self.consumers, self.used_names = producer, consumers, used
        self._const_cache: dict[str, np.ndarray | None] = {}
        self._removed: set[int] = set()
        self._inserted: dict[int | None, list[onnx.NodeProto]] = {}
        # a pass that edits nodes in place (no remove/replace) sets this so commit() sweeps
        self.changed = False
        self._value_types: dict[str, onnx.TypeProto] | None = None
        self._inferred_types: dict[str, onnx.TypeProto] | None = None

    # ---- queries -----------------------------------------------------------------------
    def only_consumer(self, name: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        if len(users) == 1 and name not in self.graph_outputs:
            return users[0]
        return None

    def constant(self, name: str, depth: int = 8) -> np.ndarray | None:
        """The value of tensor `name` if it is a compile-time constant, else None."""
        if not name:
            return None
        if name in self._const_cache:
            return self._const_cache[name]
        value = None
        if name in self.graph_inputs:
            pass  # a feed (or a default the caller may override), never a constant
        elif name in self.initializers:
            tensor = self.initializers[name]
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                # read from disk on each use, not cached: the cache would keep every weight
                # a pass looked at in memory until the pass ends; the caller owns the array
                return array_of(tensor, self._base_dir())
            value = array_of(tensor, self._base_dir())
        elif name in self.producer and depth > 0:
            node = self.producer[name]
            if node.domain in ("", "ai.onnx"):
                if node.op_type == "Constant":
                    value = constant_node_value(node)
                elif node.op_type == "Identity":  # exporters share equal weights through Identity
                    value = self.constant(node.input[0], depth - 1)
                elif node.op_type in ("Shape", "Size") and node.input:
                    value = self._static_shape_value(node)
                elif node.op_type in FOLDABLE_OPS:
                    with np.errstate(all="ignore"), warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        value = self._evaluate(node, name, depth)
        if isinstance(value, np.ndarray):
            value.flags.writeable = False  # shared through the cache: writable means owned
        self._const_cache[name] = value
        return value

    def _base_dir(self) -> str:
        return getattr(self.model, "_normfix_base_dir", "") or ""

    def static_shape(self, name: str) -> list[int | None] | None:
        """The shape of tensor `name` as far as it is static: dims are ints or None (unknown or
        symbolic); None if even the rank is unknown. Initializers and Constant nodes give their
        exact shape (no data is read); other tensors the shape inference fixes."""
        if name in self.initializers and name not in self.graph_inputs:
            return [int(d) for d in self.initializers[name].dims]
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant" and node.domain in _ONNX_DOMAINS:
            value = constant_node_value(node)
            return None if value is None else list(value.shape)
        t = self.inferred_type(name)
        if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
            return None
        return [d.dim_value if d.HasField("dim_value") else None for d in t.tensor_type.shape.dim]

    def elem_type(self, name: str) -> int | None:
        """The element type of tensor `name` (static in ONNX), or None if not known."""
        if name in self.initializers:
            return self.initializers[name].data_type
        t = self.inferred_type(name)
        if t is None or not t.HasField("tensor_type") or not t.tensor_type.elem_type:
            return None
        return t.tensor_type.elem_type

    def _static_shape_value(self, node: onnx.NodeProto) -> np.ndarray | None:
        """Shape(x)[start:end] / Size(x) where those dims of x are static."""
        shape = self.static_shape(node.input[0])
        if shape is None:
            return None
        if node.op_type == "Size":
            return None if None in shape else np.array(int(np.prod(shape, dtype=np.int64)), dtype=np.int64)
        rank = len(shape)
        start, end = attr(node, "start", 0), attr(node, "end", rank)
        start = min(max(start + rank if start < 0 else start, 0), rank)
        end = min(max(end + rank if end < 0 else end, 0), rank)
        dims = shape[start:end]
        return None if None in dims else np.array(dims, dtype=np.int64)

    def not_constant(self, name: str, what: str) -> str:
        """Why `what` (tensor `name`) is not a constant, naming an overridable initializer it
        reads and the option that would treat it as a constant."""
        seen, todo = set(), [name]
        while todo and len(seen) < 256:
            n = todo.pop()
            if n in seen or not n:
                continue
            seen.add(n)
            if n in self.overridable:
                return (f"{what} reads {n!r}, an initializer that is also a graph input (IR >= 4: a default the "
                        "caller may override), so not a constant; initializer_inputs_as_constants=True "
                        "(--initializer-inputs-as-constants) treats such inputs as constants")
            node = self.producer.get(n)
            if node is not None:
                todo.extend(node.input)
        return f"{what} is not a constant"

    def _evaluate(self, node: onnx.NodeProto, name: str, depth: int) -> np.ndarray | None:
        inputs = []
        for k, inp in enumerate(node.input):
            if not inp:
                inputs.append(None)
                continue
            v = self.constant(inp, depth - 1)
            if v is None and node.op_type == "CastLike" and k == 1:
                # CastLike reads its second input for the dtype only
                code = self.elem_type(inp)
                try:
                    v = None if code is None else np.zeros((0,), dtype=onnx.helper.tensor_dtype_to_np_dtype(code))
                except Exception:
                    v = None
            if v is None:
                return None
            inputs.append(v)
        if not _small_enough(node, inputs):
            return None
        from onnx.reference import ReferenceEvaluator

        feeds = {f"i{k}": v for k, v in enumerate(inputs) if v is not None}
        tiny = onnx.helper.make_node(
            node.op_type,
            [f"i{k}" if v is not None else "" for k, v in enumerate(inputs)],
            [f"o{k}" for k in range(len(node.output))],
            domain=node.domain,
        )
        tiny.attribute.extend(node.attribute)
        try:
            graph = onnx.helper.make_graph(
                [tiny],
                "fold",
                [onnx.helper.make_tensor_value_info(k, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for k, v in feeds.items()],
                [onnx.helper.make_empty_tensor_value_info(o) for o in tiny.output],
            )
            m = onnx.helper.make_model(graph, opset_imports=list(self.model.opset_import))
            m.ir_version = max(self.model.ir_version, 7)
            results = ReferenceEvaluator(m).run(None, feeds)
        except Exception:  # an op the reference cannot evaluate: simply not a known constant
            return None
        for out, value in zip(node.output, results):
            if out:
                self._const_cache[out] = np.asarray(value)
        return self._const_cache.get(name)

    def value_type(self, name: str) -> onnx.TypeProto | None:
        """Type (with shape where known) of a tensor, from value_info or shape inference.
        Keeps the model's symbolic dim names; for decisions that must not trust the model's
        own value_info, use `static_shape`."""
        if self._value_types is None:
            self._value_types = self._infer(trust_value_info=True)
        return self._value_types.get(name)

    def inferred_type(self, name: str) -> onnx.TypeProto | None:
        """Type of a tensor inferred from the inputs' declared types and the ops only: the
        model's value_info and output shapes are claims (sometimes wrong) and are dropped."""
        if self._inferred_types is None:
            self._inferred_types = self._infer(trust_value_info=False)
        return self._inferred_types.get(name)

    def _infer(self, trust_value_info: bool) -> dict[str, onnx.TypeProto]:
        types: dict[str, onnx.TypeProto] = {}
        probe = without_weights(self.model, as_inputs=self.overridable)
        if not trust_value_info:
            del probe.graph.value_info[:]
            for out in probe.graph.output:
                if out.type.HasField("tensor_type"):
                    out.type.tensor_type.ClearField("shape")
        try:
            # data_prop: exporters compute Reshape targets (Concat of Unsqueezed
            # Constants, Shape arithmetic); without it every shape downstream is lost.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                inferred = onnx.shape_inference.infer_shapes(probe, data_prop=True)
            vis = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
        except Exception:
            vis = list(self.graph.input) + (list(self.graph.value_info) + list(self.graph.output)
                                            if trust_value_info else [])
        for vi in vis:
            types[vi.name] = vi.type
        for name_, t in self.initializers.items():
            types.setdefault(name_, onnx.helper.make_tensor_type_proto(t.data_type, list(t.dims)))
        return types

    def static_dim(self, name: str, k: int) -> int | None:
        """Axis `k` of tensor `name` if its size is known and fixed, else None."""
        t = self.value_type(name)
        if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
            return None
        dims = t.tensor_type.shape.dim
        return dims[k].dim_value if len(dims) > k and dims[k].HasField("dim_value") else None

    def rank(self, name: str) -> int | None:
        t = self.value_type(name)
        if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
            return None
        return len(t.tensor_type.shape.dim)

    # ---- edits -------------------------------------------------------------------------
    def unique_name(self, base: str) -> str:
        name, k = base, 1
        while name in self.used_names:
            k += 1
            name = f"{base}_{k}"
        self.used_names.add(name)
        return name

    def add_initializer(self, value: np.ndarray | onnx.TensorProto, base: str) -> str:
        name = self.unique_name(base)
        tensor = value if isinstance(value, onnx.TensorProto) else tensor_of(value)
        tensor.name = name
        self.graph.initializer.append(tensor)
        self.initializers[name] = self.graph.initializer[-1]
        if self.model.ir_version < 4:  # IR 3 requires every initializer to be an input too
            self.graph.input.append(
                onnx.helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims))
            )
        self._const_cache.pop(name, None)
        return name

    def uses_elsewhere(self, name: str, node: onnx.NodeProto) -> bool:
        """True if tensor `name` is read by anything besides `node` (or is a graph output)."""
        return name in self.graph_outputs or any(c is not node for c in self.consumers.get(name, []))

    def remove(self, node: onnx.NodeProto) -> None:
        self._removed.add(id(node))

    # ---- matching ------------------------------------------------------------------------
    def parent(self, node: onnx.NodeProto, index: int, op_type=None) -> onnx.NodeProto | None:
        """The node producing `node.input[index]` (of `op_type`, if given: one op type, or a
        tuple/set of them), else None."""
        if index >= len(node.input) or not node.input[index]:
            return None
        p = self.producer.get(node.input[index])
        if p is None or p.domain not in _ONNX_DOMAINS:
            return None
        if op_type is not None and p.op_type != op_type and (isinstance(op_type, str) or p.op_type not in op_type):
            return None
        return p

    def match_parents(self, node: onnx.NodeProto, path) -> list[onnx.NodeProto] | None:
        """Follow a chain upward: `path` is [(op_type, input_index), ...]; step k requires that
        input `input_index` of the previous node (`node` first) is produced by an `op_type`
        node (`op_type` may be a tuple/set of op types: any of them). `input_index` None tries
        every input. Returns the matched nodes, or None.

            ix.match_parents(div, [("Sqrt", 1), ("Add", 0), ("ReduceMean", None)])
            ix.match_parents(sub, [(("Reshape", "Identity"), 1), ("ReduceMean", 0)])
        """
        chain, current = [], node
        for op_type, index in path:
            indices = range(len(current.input)) if index is None else (index,)
            found = next((p for k in indices if (p := self.parent(current, k, op_type)) is not None), None)
            if found is None:
                return None
            chain.append(found)
            current = found
        return chain

    def consumers_of(self, node: onnx.NodeProto, op_type: str | None = None) -> list[onnx.NodeProto]:
        """Nodes reading any output of `node` (of `op_type`, if given)."""
        seen, out = set(), []
        for o in node.output:
            for c in self.consumers.get(o, ()):
                if id(c) not in seen and (op_type is None or c.op_type == op_type):
                    seen.add(id(c))
                    out.append(c)
        return out

    # ---- queued edits ----------------------------------------------------------------------
    def replace(self, node: onnx.NodeProto, new_nodes) -> None:
        """Queue: `node` is removed and `new_nodes` take its place (applied by `commit`)."""
        self._removed.add(id(node))
        self._inserted.setdefault(id(node), []).extend(new_nodes)

    def insert(self, new_nodes, before: onnx.NodeProto | None = None) -> None:
        """Queue new nodes, placed before `before` (default: at the end); `commit` then puts the
        graph in topological order if they read tensors produced later."""
        key = id(before) if before is not None else None
        self._inserted.setdefault(key, []).extend(new_nodes)

    def commit(self, sweep: bool | None = None) -> int:
        """Apply queued removals, replacements and insertions, then (when something was edited,
        or `sweep=True`) drop every node, initializer and value_info left unused. Graph inputs
        always stay.

        Returns the number of nodes dropped. Linear in graph size.
        """
        edited = bool(self._removed or self._inserted)
        if sweep is None:
            sweep = edited or self.changed
        if not sweep and not edited:
            return 0
        g = self.graph
        before = len(g.node)
        reordered = bool(self._inserted)
        if reordered:
            kept = []
            for n in g.node:
                kept.extend(self._inserted.get(id(n), ()))
                if id(n) not in self._removed:
                    kept.append(n)
            kept.extend(self._inserted.get(None, ()))
            kept = _toposorted(kept, {i.name for i in g.input} | set(self.initializers))
            self._inserted.clear()
        else:
            kept = [n for n in g.node if id(n) not in self._removed]
        if not sweep:
            del g.node[:]
            g.node.extend(kept)
            self._removed.clear()
            return before - len(g.node)
        live = set(self.graph_outputs)
        alive_nodes = []
        for node in reversed(kept):
            if any(o in live for o in node.output if o) or _has_effects(node):
                alive_nodes.append(node)
                live.update(i for i in node.input if i)
                live |= subgraph_inputs(node)
        alive_nodes.reverse()
        if reordered or len(alive_nodes) != len(g.node):
            del g.node[:]
            g.node.extend(alive_nodes)
        # overridable initializers are graph inputs with a default: both stay
        dead_inits = [t.name for t in g.initializer if t.name not in live and t.name not in self.overridable]
        if dead_inits:
            dead = set(dead_inits)
            # Move the dead to the end (a stable sort moves pointers) and cut them off:
            # extending with the kept ones would copy every weight into the arena, which
            # never frees the old copies (1x the model in memory, per commit).
            g.initializer.sort(key=lambda t: t.name in dead)
            del g.initializer[len(g.initializer) - len(dead_inits):]
            # IR 3 initializer-inputs go with their initializer; real inputs always stay.
            keep_inputs = [i for i in g.input if i.name not in dead or i.name in self.graph_inputs]
            if len(keep_inputs) != len(g.input):
                del g.input[:]
                g.input.extend(keep_inputs)
        produced = {o for n in g.node for o in n.output}
        keep_vi = [vi for vi in g.value_info if vi.name in produced or vi.name in live]
        if len(keep_vi) != len(g.value_info):
            del g.value_info[:]
            g.value_info.extend(keep_vi)
        self._removed.clear()
        self.changed = False
        return before - len(g.node)


def _toposorted(nodes: list, available: set) -> list:
    """`nodes` in a topological order, keeping the given order wherever it already is one.
    Linear when the order is already valid (the common case)."""
    produced_at = {}
    for k, n in enumerate(nodes):
        for o in n.output:
            if o:
                produced_at[o] = k
    if all(produced_at.get(i, -1) < k for k, n in enumerate(nodes) for i in n.input if i and i not in available):
        return nodes
    import heapq

    waiting = {}
    users = defaultdict(list)
    for k, n in enumerate(nodes):
        deps = {produced_at[i] for i in list(n.input) + sorted(subgraph_inputs(n))
                if i and i in produced_at and produced_at[i] != k}
        waiting[k] = len(deps)
        for d in deps:
            users[d].append(k)
    ready = [k for k, c in waiting.items() if c == 0]
    heapq.heapify(ready)
    out = []
    while ready:
        k = heapq.heappop(ready)
        out.append(nodes[k])
        for u in users[k]:
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    if len(out) != len(nodes):
        raise ValueError("the edited graph has a cycle")
    return out


def _has_effects(node: onnx.NodeProto) -> bool:
    # Nodes of unknown domains may have side effects we cannot see; keep them.
    return node.domain not in ("", "ai.onnx", "ai.onnx.ml")


def _small_enough(node: onnx.NodeProto, inputs: list) -> bool:
    sizes = [v.size for v in inputs if v is not None]
    if any(s > MAX_FOLD_ELEMENTS for s in sizes):
        return False
    if node.op_type in ("ConstantOfShape", "Expand", "Tile", "Range"):
        try:
            if node.op_type == "ConstantOfShape":
                n = int(np.prod(inputs[0])) if inputs[0].size else 1
            elif node.op_type == "Expand":
                n = int(np.prod(np.broadcast_shapes(inputs[0].shape, tuple(int(d) for d in inputs[1]))))
            elif node.op_type == "Tile":
                n = int(inputs[0].size * np.prod(inputs[1]))
            else:
                n = int(np.ceil((float(inputs[1]) - float(inputs[0])) / float(inputs[2])))
        except Exception:
            return False
        return 0 <= n <= MAX_FOLD_ELEMENTS
    return True


def without_weights(model: onnx.ModelProto, as_inputs=frozenset()) -> onnx.ModelProto:
    """A copy for shape inference: large initializers (and those named in `as_inputs`, e.g.
    overridable ones, whose value data propagation must not see) become typed inputs."""
    light = onnx.ModelProto()
    light.ir_version = max(model.ir_version, 4)
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    g, lg = model.graph, light.graph
    lg.node.extend(g.node)
    lg.output.extend(g.output)
    lg.value_info.extend(g.value_info)
    init_names = set()
    for t in g.initializer:
        init_names.add(t.name)
        if t.data_location == onnx.TensorProto.EXTERNAL or len(t.raw_data) > 1024 or t.name in as_inputs:
            lg.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            lg.initializer.append(t)
    lg.input.extend(i for i in g.input if i.name not in init_names)
    return light


def stamp(node: onnx.NodeProto, pass_name: str) -> onnx.NodeProto:
    """Mark a node as made by a pass, so a reader of the output sees where it came from."""
    node.doc_string = f"{STAMP}{pass_name}"
    return node
