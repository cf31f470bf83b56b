"""Which checkpoint module holds the running stats of an old-style InstanceNormalization
(used by fix_inorm, beside `stats.py`, which reads the checkpoints).

Node -> module, first rule that gives exactly one module wins:
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

from .graph import GraphIndex
from .registry import Declined

_SCOPE_KEY = "pkg.torch.onnx.name_scopes"


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
        channels = int(scale.size) if scale is not None else ix.static_dim(node.input[0], 1)
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
            if isinstance(found, Declined):
                reasons[n.label] = found.reason
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




def _source_name(ix: GraphIndex, name: str) -> str:
    """Look through Identity nodes (TorchScript shares equal initializers through them)."""
    for _ in range(8):
        p = ix.producer.get(name)
        if p is None or p.op_type != "Identity":
            return name
        name = p.input[0]
    return name


def _checked(n: NormNode, candidates: list) -> list | Declined:
    fitting = [m for m in candidates if m.channels == n.channels]
    if candidates and not fitting:
        m = candidates[0]
        return Declined(f"module {m.name} has {m.channels} channels of stats, the node has {n.channels}")
    return fitting


def _dotted_match(path: str, modules: list) -> list:
    exact = [m for m in modules if m.name == path]
    if exact:
        return exact
    return [m for m in modules if "." in path and (m.name.endswith("." + path) or path.endswith("." + m.name))]


def _by_name(ix, n: NormNode, modules) -> list | Declined:
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


def _by_scope(ix, n: NormNode, modules) -> list | Declined:
    for path in scope_paths(n.node):
        found = [m for m in modules if m.name == path]
        if found:
            return _checked(n, found)
    return []


def _by_values(ix, n: NormNode, modules) -> list:
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
