"""fold_bn's second job: a per-channel constant Mul/Add after Conv/Gemm/MatMul folds into it.

tf2onnx writes an inference Keras BatchNormalization as a per-channel Mul + Add (its own
optimizer folds the Conv case already; after Dense it does not):

    X -> MatMul(W) [-> Add(c)] -> Mul(s) [-> Add(t)]    =>   X -> Gemm(X, W * s, c * s + t)
    X -> Conv(W, b)            -> Mul(s) [-> Add(t)]    =>   X -> Conv(W * s[k], b * s + t)
    X -> Gemm(A, B, C)         -> Mul(s) [-> Add(t)]    =>   Gemm with columns of op(B) times s
    (an Add(t) alone folds into the bias)

s and t must be constants that vary along the channel axis only (axis 1: Conv output
channels, the columns of a rank-2 Gemm/MatMul output) and never broadcast the output wider.
Declines (noted) when the producer's output has other readers or is a graph output, a weight
or bias is not constant, or a MatMul's output is not known to be rank 2 (on [N, L, C] the
columns are still the channels, but Gemm needs rank 2). Weights another node reads are copied.
The folded node takes the last Mul/Add's output name. Arithmetic in float64, cast back once.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnx_normfix.graph import GraphIndex, attr, set_attr, stamp
from onnx_normfix.registry import Declined, PassResult

ONNX_DOMAINS = ("", "ai.onnx")
PRODUCERS = ("Conv", "Gemm", "MatMul")


def merge_affine_folds(model: onnx.ModelProto, result: PassResult) -> PassResult:
    """Run fold_affine on `model` (after fold_bn's own folds) and add its figures to `result`."""
    extra = fold_affine(model)
    result.rewrites += extra.rewrites
    result.notes.extend(extra.notes)
    result.sites.extend(extra.sites)
    if extra.rewrites:
        result.details["affine_folded_into"] = extra.details["folded_into"]
    return result


def fold_affine(model: onnx.ModelProto) -> PassResult:
    idx, result, folded = GraphIndex(model), PassResult(), {}
    claimed: set[int] = set()
    for node in list(model.graph.node):
        if node.op_type not in PRODUCERS or node.domain not in ONNX_DOMAINS or id(node) in claimed:
            continue
        outcome = _fold(idx, node, claimed)
        if outcome is None:
            continue
        if isinstance(outcome, Declined):
            result.decline(outcome, f"affine after {node.name or node.output[0]}")
            continue
        result.rewrites += 1
        folded[node.op_type] = folded.get(node.op_type, 0) + 1
        result.sites.append(([node.input[0]], outcome))
    if result.rewrites:
        idx.commit()
    result.details = {"folded_into": folded}
    return result


def _channel(idx: GraphIndex, node: onnx.NodeProto, mine: str, rank: int, channels: int):
    """The other input of binary `node` as a [channels] vector if it is a per-channel constant."""
    if len(node.input) != 2 or list(node.input).count(mine) != 1:
        return None
    value = idx.constant(node.input[1] if node.input[0] == mine else node.input[0])
    if value is None or value.ndim > rank:
        return None
    aligned = value.reshape((1,) * (rank - value.ndim) + value.shape)
    if any(d != 1 for i, d in enumerate(aligned.shape) if i != 1) or aligned.shape[1] not in (1, channels):
        return None
    return np.broadcast_to(aligned.reshape(-1).astype(np.float64), (channels,))


def _affine_follows(idx: GraphIndex, producer: onnx.NodeProto) -> bool:
    """A Mul/Add with a constant operand reads the producer's output (past a MatMul's bias Add)."""
    out = producer.output[0]
    for _ in range(2):
        user = idx.only_consumer(out)
        if user is None or user.op_type not in ("Mul", "Add") or user.domain not in ONNX_DOMAINS or len(user.input) != 2:
            return False
        other = user.input[1] if user.input[0] == out else user.input[0]
        if other == out or (other not in idx.initializers and other not in idx.producer):
            return False
        if user.op_type == "Mul" or producer.op_type != "MatMul":
            return True
        out = user.output[0]  # MatMul -> Add(bias): the affine may come after it
    return True


def _fold(idx: GraphIndex, producer: onnx.NodeProto, claimed: set) -> list[str] | Declined | None:
    """[the folded output] on success, why not (`Declined`), or None when there is no affine."""
    if not _affine_follows(idx, producer):
        return None  # checked before reading the weight: a big one may live in external data
    w = idx.constant(producer.input[1]) if len(producer.input) > 1 else None
    if w is None or w.ndim < 2:
        return None  # not a weight layer we can scale: nothing to say
    kind = producer.op_type
    bias_add, bias = None, None
    out = producer.output[0]
    if kind == "MatMul":  # Linear exported as MatMul + Add(c)
        if w.ndim != 2:
            return None
        user = idx.only_consumer(out)
        if user is not None and user.op_type == "Add" and user.domain in ONNX_DOMAINS:
            c = _channel(idx, user, out, 2, w.shape[1])
            if c is not None:
                bias_add, bias, out = user, c, user.output[0]
    trans_b = attr(producer, "transB", 0) if kind == "Gemm" else 0
    channels = w.shape[0] if kind == "Conv" or trans_b else w.shape[1]
    rank = w.ndim if kind == "Conv" else 2
    mul = idx.only_consumer(out)
    s = t = None
    tail = []
    if mul is not None and mul.op_type == "Mul" and mul.domain in ONNX_DOMAINS:
        s = _channel(idx, mul, out, rank, channels)
        if s is not None:
            tail.append(mul)
    last = tail[-1].output[0] if tail else out
    add = idx.only_consumer(last)
    if add is not None and add.op_type == "Add" and add.domain in ONNX_DOMAINS:
        t = _channel(idx, add, last, rank, channels)
        if t is not None:
            tail.append(add)
    if not tail:
        return None
    if any(id(n) in claimed for n in tail):
        return None
    if kind == "MatMul":
        rank_out = idx.rank(out)
        if rank_out != 2:
            return Declined(f"MatMul output rank is {'unknown' if rank_out is None else rank_out}, not 2 (Gemm needs rank 2)")
    s = np.ones(channels) if s is None else s
    t = np.zeros(channels) if t is None else t
    dtype = w.dtype
    if kind == "Conv":
        b = idx.constant(producer.input[2]) if len(producer.input) > 2 and producer.input[2] else None
        if len(producer.input) > 2 and producer.input[2] and b is None:
            return Declined("Conv bias is not a constant")
        new_w = w.astype(np.float64) * s.reshape((-1,) + (1,) * (w.ndim - 1))
        new_b = (np.zeros(channels) if b is None else b.astype(np.float64)) * s + t
    elif kind == "Gemm":
        c = idx.constant(producer.input[2]) if len(producer.input) > 2 and producer.input[2] else None
        if len(producer.input) > 2 and producer.input[2] and (
                c is None or c.size not in (1, channels) or (c.ndim == 2 and c.shape[0] != 1) or c.ndim > 2):
            return Declined("Gemm C is not a constant per-column vector")
        beta = attr(producer, "beta", 1.0)
        new_w = w.astype(np.float64) * (s[:, None] if trans_b else s[None, :])
        c = np.zeros(channels) if c is None else beta * np.broadcast_to(c.reshape(-1).astype(np.float64), (channels,))
        new_b = c * s + t
        set_attr(producer, "beta", 1.0)
    else:
        new_w = w.astype(np.float64) * s[None, :]
        new_b = (np.zeros(channels) if bias is None else bias) * s + t
    base = producer.name or producer.output[0]
    producer.input[1] = idx.add_initializer(new_w.astype(dtype), f"{base}_W")
    bias_name = idx.add_initializer(new_b.astype(dtype), f"{base}_B")
    if len(producer.input) < 3:
        producer.input.append(bias_name)
    else:
        producer.input[2] = bias_name
    if kind == "MatMul":
        producer.op_type = "Gemm"
        del producer.attribute[:]
    final = tail[-1].output[0]
    producer.output[0] = final
    for n in tail + ([bias_add] if bias_add is not None else []):
        idx.remove(n)
        claimed.add(id(n))
    claimed.add(id(producer))
    stamp(producer, "fold_bn")
    return [final]
