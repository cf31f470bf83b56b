"""Matching for fix_inorm: which checkpoint module holds the stats of an old-style
InstanceNormalization, and which Reshape/BatchNormalization/Reshape triples are an exported
InstanceNorm with running stats.

Old-style node -> module, first rule that gives exactly one module wins:
  name    the scale/B initializers are called "<module>.weight" / "<module>.bias"
  scope   the node's scope ("/main/main.6/main/main.1/InstanceNormalization", or dynamo's
          pkg.torch.onnx.name_scopes metadata) spells the module path
  values  scale and B equal exactly one module's weight and bias (compared in the node's dtype)
  explicit  a mapping the caller gives ({node name or label: module name}), checked
          against the channel counts
  channels  nodes without weights (scale all 1, B all 0: affine=False) left over take the
          modules without weights nobody took (BatchNorm modules in the checkpoint are
          skipped) when exactly one node and one module have that channel count
  reference among several nodes and modules of equal channel count, the assignment that
          reproduces PyTorch's outputs on the caller's inputs (`--inputs`/`--reference`),
          found by fix_inorm's prepare step, which tries them all (bounded)
Checkpoint order is never evidence: modules register in another order than they run, and a
.safetensors file sorts its keys by name. Several nodes and modules of one channel count are
ambiguous, and refused with the candidates listed. A module whose channel count differs from
the node's is never taken.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .graph import GraphIndex, attr

_SCOPE_KEY = "pkg.torch.onnx.name_scopes"
_PARAM_ROLES = ("scale", "bias", "running_mean", "running_var")


# ---- old style: node -> module -------------------------------------------------------------
@dataclass
class NormNode:
    node: onnx.NodeProto
    label: str  # node name, or "InstanceNormalization #k" for unnamed nodes
    channels: int | None
    scale: np.ndarray | None
    bias: np.ndarray | None

    @property
    def has_weights(self) -> bool:
        return not _trivial(self.scale, self.bias)


def _trivial(weight, bias) -> bool:
    """affine=False: nothing to compare (exporters write scale=1, B=0; checkpoints nothing)."""
    if weight is None:
        return True
    return bool(np.all(weight == 1)) and (bias is None or bool(np.all(bias == 0)))


def norm_nodes(ix: GraphIndex) -> list[NormNode]:
    found = []
    for k, node in enumerate(n for n in ix.graph.node if n.op_type == "InstanceNormalization" and n.domain in ("", "ai.onnx")):
        scale, bias = ix.constant(node.input[1]), ix.constant(node.input[2])
        channels = int(scale.size) if scale is not None else _dim(ix, node.input[0], 1)
        found.append(NormNode(node, node.name or f"InstanceNormalization #{k}", channels,
                              None if scale is None else scale.reshape(-1), None if bias is None else bias.reshape(-1)))
    return found


HOW_TO_DISAMBIGUATE = ("give --inputs with --reference (PyTorch's outputs for them: the assignment that "
                       "reproduces them is kept) or --inorm-module NODE=MODULE")


@dataclass
class AmbiguousGroup:
    """Nodes without weights and the modules they could take: equal channel counts, no evidence."""

    channels: int | None
    nodes: list  # NormNode
    modules: list  # ModuleStats

    def describe(self) -> str:
        return (f"nodes {', '.join(n.label for n in self.nodes)} and modules {', '.join(m.name for m in self.modules)} "
                f"all have {self.channels} channels")


def match_modules(ix: GraphIndex, nodes: list[NormNode], modules: list, explicit: dict | None = None,
                  decided: dict | None = None) -> tuple[dict, dict, list]:
    """Returns ({label: (module, method)}, {label: reason}, [AmbiguousGroup]) for every node.
    `explicit`: {node name or label: module name} from the caller; `decided`: {label: module
    name} that a search against a reference settled (method "reference")."""
    matched: dict = {}
    reasons: dict = {}
    by_name = {m.name: m for m in modules}
    refused = set()  # a mapping the caller gave that does not fit: never guessed over
    for n in nodes:
        wanted = None
        for source, method in ((explicit, "explicit"), (decided, "reference")):
            if source and (n.label in source or n.node.name in source):
                wanted = (source.get(n.label) or source.get(n.node.name), method)
                break
        if wanted is not None:
            module = by_name.get(wanted[0])
            if module is None:
                reasons[n.label] = f"module {wanted[0]!r} given for it is not in the checkpoint"
            elif n.channels is not None and module.channels != n.channels:
                reasons[n.label] = f"module {module.name} given for it has {module.channels} channels, the node {n.channels}"
            else:
                matched[n.label] = (module, wanted[1])
            if n.label not in matched:
                refused.add(n.label)
            continue
        for method, finder in (("name", _by_name), ("scope", _by_scope), ("values", _by_values)):
            found = finder(ix, n, modules)
            if isinstance(found, str):
                reasons[n.label] = found
                break
            if len(found) == 1:
                matched[n.label] = (found[0], method)
                break
            if len(found) > 1:
                reasons[n.label] = f"ambiguous by {method}: " + ", ".join(m.name for m in found)
                break
        else:
            reasons[n.label] = ("no weights to compare" if not n.has_weights else
                                "no module matches its initializer names, scope or weight values")
    # affine=False nodes left over: by channel count, among modules without weights nobody took
    groups: list[AmbiguousGroup] = []
    left = [n for n in nodes if n.label not in matched and n.label not in refused and not n.has_weights]
    if left:
        taken = {id(m) for m, _ in matched.values()} | _claimed_by_batchnorms(ix, modules)
        pool = [m for m in modules if id(m) not in taken and _trivial(m.weight, m.bias)]
        for c in dict.fromkeys(n.channels for n in left):
            group = [n for n in left if n.channels == c]
            fits = [m for m in pool if c is not None and m.channels == c]
            def base(n):
                return reasons.get(n.label, "no weights to compare")

            if not fits:
                for n in group:
                    reasons[n.label] = f"{base(n)}; no module without weights left has {c} channels"
            elif len(fits) < len(group):
                for n in group:
                    reasons[n.label] = (f"{base(n)}; {len(group)} nodes of {c} channels but only {len(fits)} "
                                        f"module(s) without weights: {', '.join(m.name for m in fits)}")
            elif len(group) == 1 and len(fits) == 1:
                matched[group[0].label] = (fits[0], "channels")
                reasons.pop(group[0].label, None)
            else:
                g = AmbiguousGroup(c, group, fits)
                groups.append(g)
                for n in group:
                    reasons[n.label] = f"ambiguous: {g.describe()}"
    return matched, reasons, groups


def _dim(ix: GraphIndex, name: str, k: int) -> int | None:
    t = ix.value_type(name)
    if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    dims = t.tensor_type.shape.dim
    return dims[k].dim_value if len(dims) > k and dims[k].HasField("dim_value") else None


def _source_name(ix: GraphIndex, name: str) -> str:
    """Look through Identity nodes (TorchScript shares equal initializers through them)."""
    for _ in range(8):
        p = ix.producer.get(name)
        if p is None or p.op_type != "Identity":
            return name
        name = p.input[0]
    return name


def _checked(n: NormNode, candidates: list) -> list | str:
    fitting = [m for m in candidates if m.channels == n.channels]
    if candidates and not fitting:
        m = candidates[0]
        return f"module {m.name} has {m.channels} channels of stats, the node has {n.channels}"
    return fitting


def _dotted_match(path: str, modules: list) -> list:
    exact = [m for m in modules if m.name == path]
    if exact:
        return exact
    return [m for m in modules if "." in path and (m.name.endswith("." + path) or path.endswith("." + m.name))]


def _by_name(ix, n: NormNode, modules) -> list | str:
    prefixes = set()
    for inp, suffix in ((n.node.input[1], ".weight"), (n.node.input[2], ".bias")):
        src = _source_name(ix, inp)
        if src.endswith(suffix):
            prefixes.add(src[: -len(suffix)].removeprefix("module."))
    if len(prefixes) != 1:
        return []
    return _checked(n, _dotted_match(prefixes.pop(), modules))


def scope_paths(node: onnx.NodeProto) -> list[str]:
    """Module paths a node's scope spells, innermost first.

    TorchScript: "/main/main.6/main/main.1/Op" -> main.6.main.1 (a component that extends the
    previous one, "main" -> "main.6", replaces it). dynamo: the name_scopes metadata list."""
    paths = []
    parts = [p for p in node.name.split("/") if p][:-1] if node.name.startswith("/") else []
    path: list[str] = []
    for part in parts:
        if path and part.startswith(path[-1] + "."):
            path[-1] = part
        else:
            path.append(part)
    if path:
        paths.append(".".join(path))
    for prop in node.metadata_props:
        if prop.key == _SCOPE_KEY:  # "['', 'main', 'main.1', 'instance_norm']": last is the op
            paths += [s.strip(" '\"") for s in prop.value.strip("[]").split(",")][-2::-1]
    return list(dict.fromkeys(p for p in paths if p))


def _by_scope(ix, n: NormNode, modules) -> list | str:
    for path in scope_paths(n.node):
        found = [m for m in modules if m.name == path]
        if found:
            return _checked(n, found)
    return []


def _by_values(ix, n: NormNode, modules) -> list | str:
    if not n.has_weights or n.bias is None:
        return []
    dtype = n.scale.dtype
    return [m for m in modules if m.weight is not None and m.bias is not None
            and m.weight.shape == n.scale.shape and m.bias.shape == n.bias.shape
            and np.array_equal(m.weight.astype(dtype), n.scale) and np.array_equal(m.bias.astype(dtype), n.bias)]


def _claimed_by_batchnorms(ix: GraphIndex, modules) -> set[int]:
    """Modules whose stats a BatchNormalization in the graph already carries (BN layers)."""
    claimed = set()
    for node in ix.graph.node:
        if node.op_type == "BatchNormalization" and len(node.input) >= 5:
            mean = ix.constant(node.input[3])
            if mean is not None:
                claimed |= {id(m) for m in modules if m.running_mean.shape == mean.shape
                            and np.allclose(m.running_mean, mean, rtol=1e-3, atol=1e-6)}
    return claimed


# ---- exporter patterns: Reshape -> BatchNormalization(N*C) -> Reshape ------------------------
@dataclass
class TiledNorm:
    bn: onnx.NodeProto
    tail: onnx.NodeProto | None  # the Reshape back (missing at N=1)
    x: str  # the tensor the InstanceNorm normalizes, [N, C, *spatial]
    out: str  # what the pattern produces
    params: list  # four C-vectors: scale, B, mean, var
    sources: list  # an existing constant tensor holding each vector, or None
    channels: int
    batch: int | None  # None: symbolic
    exporter: str


def find_tiled_norm(ix: GraphIndex, bn: onnx.NodeProto) -> TiledNorm | str | None:
    """The pattern around `bn`, a reason it was declined, or None if it is not a candidate."""
    head = ix.producer.get(bn.input[0])
    if head is None or head.op_type != "Reshape" or len(bn.input) != 5:
        return None
    x = head.input[0]
    rank = ix.rank(x)
    target = _shape_entries(ix, head.input[1], x, rank)
    if rank is None:
        return "rank of the tensor before the Reshape is unknown (shape inference could not tell)"
    if rank < 3 or target is None or len(target) != rank or target[0] != 1:
        return None  # not a reshape into [1, N*C, *spatial]: some other Reshape -> BN
    if attr(bn, "training_mode", 0) or attr(bn, "spatial", 1) != 1 or any(o for o in bn.output[1:]):
        return "BatchNormalization is in training mode"
    xdims = [_dim(ix, x, k) for k in range(rank)]
    # spatial axes must pass through unchanged, so that only N and C are merged
    for k in range(2, rank):
        if target[k] not in (("x", k), -1) and not (target[k] == 0 and not attr(head, "allowzero", 0)) \
                and not (xdims[k] is not None and target[k] == xdims[k]):
            return f"the Reshape before it does not keep spatial axis {k}"
    if sum(1 for t in target if t == -1) > 1 or (target[1] == -1 and -1 in target[2:]):
        return "the Reshape before it leaves more than one axis to infer"

    raw = [_tiled_param(ix, name, x) for name in bn.input[1:]]
    channels = xdims[1] or next((v.size for v, n in raw if v is not None and n is None), None)
    if channels is None:
        return "channel count unknown (no static shape for the input)"
    params, sources, batches, kinds = [], [], set(), set()
    for role, name, (value, copies) in zip(_PARAM_ROLES, bn.input[1:], raw):
        if value is None:
            return ix.not_constant(name, role)
        if copies is None:  # Tile(param, Shape(x)[0:1]): one copy per sample by construction
            if value.size != channels:
                return f"{role} has {value.size} values for {channels} channels"
            vector = value.reshape(-1)
            kinds.add("dynamic")
        else:
            if value.size % channels:
                return f"{role} has {value.size} values, not a multiple of {channels} channels"
            rows = value.reshape(-1, channels)
            if not all(np.array_equal(r, rows[0]) for r in rows[1:]):
                return f"{role} is not {rows.shape[0]} identical copies of a {channels}-channel vector"
            vector = rows[0]
            batches.add(rows.shape[0])
            kinds.add("initializer" if name in ix.initializers else "chain")
        params.append(vector)
        sources.append(_reusable_source(ix, name, vector))
    if len(batches) > 1 or (batches and xdims[0] is not None and batches != {xdims[0]}):
        return f"parameters tiled {sorted(batches)} times for a batch of {xdims[0]}"
    batch = batches.pop() if batches else xdims[0]
    if target[1] not in (-1, None) and (batch is None or target[1] != batch * channels):
        return "the Reshape before it does not merge batch and channels"

    users = ix.consumers.get(bn.output[0], [])
    tail = users[0] if len(users) == 1 and users[0].op_type == "Reshape" and users[0].input[0] == bn.output[0] else None
    if tail is not None and bn.output[0] not in ix.graph_outputs:
        why = _restores(ix, tail, x, xdims, channels, batch)
        if why:
            return why
        out = tail.output[0]
    elif batch == 1:
        tail, out = None, bn.output[0]  # [1, C, ...] is already the input's shape
    else:
        return "no Reshape back to [N, C, ...] after it"
    exporter = ("dynamo, symbolic batch" if "dynamic" in kinds else
                "TorchScript" if "chain" in kinds else "dynamo, static batch")
    return TiledNorm(bn, tail, x, out, params, sources, channels, batch, exporter)


def _shape_entries(ix: GraphIndex, name: str, x: str, rank: int | None) -> list | None:
    """A shape tensor as a list of ints and ("x", k) = "dim k of x", or None if unknown."""
    value = ix.constant(name)
    if value is not None:
        return [int(v) for v in value.reshape(-1)]
    node = ix.producer.get(name)
    if node is None:
        return None
    if node.op_type == "Shape" and node.input[0] == x and rank is not None:
        start, end = attr(node, "start", 0), attr(node, "end", rank)
        start, end = (start + rank if start < 0 else start), (end + rank if end < 0 else min(end, rank))
        return [("x", k) for k in range(start, end)]
    if node.op_type == "Concat":
        parts = [_shape_entries(ix, i, x, rank) for i in node.input]
        return None if any(p is None for p in parts) else [e for p in parts for e in p]
    return None


def _tiled_param(ix: GraphIndex, name: str, x: str):
    """(value, 0 for a constant or None for "tiled once per sample at run time")."""
    node = ix.producer.get(name)
    if node is not None and node.op_type == "Tile" and _shape_entries(ix, node.input[1], x, ix.rank(x)) == [("x", 0)]:
        return ix.constant(node.input[0]), None
    return ix.constant(name), 0


def _reusable_source(ix: GraphIndex, name: str, vector: np.ndarray) -> str | None:
    """The initializer or Constant equal to `vector` that the chain tiles, if any (reusing it
    keeps names like "norm.weight" and lets the whole chain die)."""
    for _ in range(8):
        node = ix.producer.get(name)
        if name in ix.initializers or (node is not None and node.op_type == "Constant"):
            value = ix.constant(name)
            return name if value is not None and value.shape == vector.shape and np.array_equal(value, vector) else None
        if node is None or node.op_type not in ("Tile", "Expand", "Identity") or not node.input:
            return None
        name = node.input[0]
    return None


def _restores(ix, tail, x, xdims, channels, batch) -> str | None:
    """None if the Reshape after the BN gives back x's shape, else why not."""
    rank = len(xdims)
    entries = _shape_entries(ix, tail.input[1], x, rank)
    if entries is None or len(entries) != rank:
        return "cannot tell that the Reshape after it restores the input shape"
    want = [batch, channels] + xdims[2:]
    copies_zero = not attr(tail, "allowzero", 0)
    for k, e in enumerate(entries):
        ok = (e == ("x", k) or e == -1 or (e == 0 and copies_zero and (k >= 2 or batch == 1))
              or (isinstance(e, int) and e > 0 and want[k] == e))
        if not ok:
            return f"the Reshape after it does not restore axis {k} of the input"
    if sum(1 for e in entries if e == -1) > 1:
        return "the Reshape after it leaves more than one axis to infer"
    return None
