"""Matching for fix_inorm: the Reshape -> BatchNormalization(N*C) -> Reshape that the
exporters write for an InstanceNorm with running stats (see passes/fix_inorm.py for the diagram).

Only looks at the graph; fix_inorm decides and rewrites. `find_tiled_norm` returns the site,
a `Declined` saying why it does not fold, or None when the BN is no candidate at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnx_normfix.graph import GraphIndex, attr
from onnx_normfix.registry import Declined

_PARAM_ROLES = ("scale", "bias", "running_mean", "running_var")


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


def find_tiled_norm(ix: GraphIndex, bn: onnx.NodeProto) -> TiledNorm | Declined | None:
    """The pattern around `bn`, why it does not fold (`Declined`), or None if it is no candidate."""
    head = ix.parent(bn, 0, "Reshape")
    if head is None or len(bn.input) != 5:
        return None
    x = head.input[0]
    rank = ix.rank(x)
    target = _shape_entries(ix, head.input[1], x, rank)
    if rank is None:
        return Declined("rank of the tensor before the Reshape is unknown (shape inference could not tell)")
    if rank < 3 or target is None or len(target) != rank or target[0] != 1:
        return None  # not a reshape into [1, N*C, *spatial]: some other Reshape -> BN
    if attr(bn, "training_mode", 0) or attr(bn, "spatial", 1) != 1 or any(o for o in bn.output[1:]):
        return Declined("BatchNormalization is in training mode")
    xdims = [ix.static_dim(x, k) for k in range(rank)]
    # spatial axes must pass through unchanged, so that only N and C are merged
    for k in range(2, rank):
        if target[k] not in (("x", k), -1) and not (target[k] == 0 and not attr(head, "allowzero", 0)) \
                and not (xdims[k] is not None and target[k] == xdims[k]):
            return Declined(f"the Reshape before it does not keep spatial axis {k}")
    if sum(1 for t in target if t == -1) > 1 or (target[1] == -1 and -1 in target[2:]):
        return Declined("the Reshape before it leaves more than one axis to infer")

    raw = [_tiled_param(ix, name, x) for name in bn.input[1:]]
    channels = xdims[1] or next((v.size for v, n in raw if v is not None and n is None), None)
    if channels is None:
        return Declined("channel count unknown (no static shape for the input)")
    params, sources, batches, kinds = [], [], set(), set()
    for role, name, (value, copies) in zip(_PARAM_ROLES, bn.input[1:], raw):
        if value is None:
            return Declined(ix.not_constant(name, role))
        if copies is None:  # Tile(param, Shape(x)[0:1]): one copy per sample by construction
            if value.size != channels:
                return Declined(f"{role} has {value.size} values for {channels} channels")
            vector = value.reshape(-1)
            kinds.add("dynamic")
        else:
            if value.size % channels:
                return Declined(f"{role} has {value.size} values, not a multiple of {channels} channels")
            rows = value.reshape(-1, channels)
            if not all(np.array_equal(r, rows[0]) for r in rows[1:]):
                return Declined(f"{role} is not {rows.shape[0]} identical copies of a {channels}-channel vector")
            vector = rows[0]
            batches.add(rows.shape[0])
            kinds.add("initializer" if name in ix.initializers else "chain")
        params.append(vector)
        sources.append(_reusable_source(ix, name, vector))
    if len(batches) > 1 or (batches and xdims[0] is not None and batches != {xdims[0]}):
        return Declined(f"parameters tiled {sorted(batches)} times for a batch of {xdims[0]}")
    batch = batches.pop() if batches else xdims[0]
    if target[1] not in (-1, None) and (batch is None or target[1] != batch * channels):
        return Declined("the Reshape before it does not merge batch and channels")

    users = ix.consumers.get(bn.output[0], [])
    tail = users[0] if len(users) == 1 and users[0].op_type == "Reshape" and users[0].input[0] == bn.output[0] else None
    if tail is not None and bn.output[0] not in ix.graph_outputs:
        declined = _restores(ix, tail, x, xdims, channels, batch)
        if declined is not None:
            return declined
        out = tail.output[0]
    elif batch == 1:
        tail, out = None, bn.output[0]  # [1, C, ...] is already the input's shape
    else:
        return Declined("no Reshape back to [N, C, ...] after it")
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


def _restores(ix, tail, x, xdims, channels, batch) -> Declined | None:
    """None if the Reshape after the BN gives back x's shape, else why not."""
    rank = len(xdims)
    entries = _shape_entries(ix, tail.input[1], x, rank)
    if entries is None or len(entries) != rank:
        return Declined("cannot tell that the Reshape after it restores the input shape")
    want = [batch, channels] + xdims[2:]
    copies_zero = not attr(tail, "allowzero", 0)
    for k, e in enumerate(entries):
        ok = (e == ("x", k) or e == -1 or (e == 0 and copies_zero and (k >= 2 or batch == 1))
              or (isinstance(e, int) and e > 0 and want[k] == e))
        if not ok:
            return Declined(f"the Reshape after it does not restore axis {k} of the input")
    if sum(1 for e in entries if e == -1) > 1:
        return Declined("the Reshape after it leaves more than one axis to infer")
    return None
