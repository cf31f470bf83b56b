"""fold_bn: fold inference BatchNormalization into the Conv/ConvTranspose/Gemm/MatMul before it.

    Before                                   After
      X    W   b                               X    W'   b'
      |    |   |                               |    |    |
    Conv | ConvTranspose | Gemm              Conv | ConvTranspose | Gemm
           | y                                      | Y   (the BN's output name)
    BatchNormalization(scale, B, mean, var)
           | Y

    MatMul(X, W) [-> Add(X @ W, c)] -> BN    becomes    Gemm(X, W', c')

Per output channel k (the BN's axis 1):
    s[k] = scale[k] / sqrt(var[k] + epsilon)        t[k] = B[k] - mean[k] * s[k]
    Conv           W'[k, ...] = W[k, ...] * s[k]                b' = b * s + t  (b = 0 if absent)
    ConvTranspose  W is [Cin, Cout/group, ...]; W'[i, j, ...] = W[i, j, ...] * s[k] with
                   k = (i // (Cin/group)) * (Cout/group) + j    b' = b * s + t
    Gemm           columns of op(B) times s; C' = beta * C * s + t, beta' = 1  (no C: C' = t)
    MatMul         W'[:, k] = W[:, k] * s[k]; c' = c * s + t  (c = 0 without the Add)
s and t are computed in float64. fp16/bf16 weights are scaled in float64 and rounded once;
float32 weights are scaled in float32 by the rounded s (within 1 ulp, half the memory traffic).
MatMul becomes Gemm(X, W', c') rather than MatMul + Add: one node, the form the TorchScript
exporter gives nn.Linear, and legal because the fold only fires when X @ W has rank 2.

The pass declines, with a note "skipped <BN>: <why>", when:
  - the model's ai.onnx opset is below 7, or a BN-7 has spatial=0 (per-element statistics);
  - the BN has training_mode=1 or more than one non-empty output, or (before opset 14, where
    the number of outputs is the mode) declares more than one output at all;
  - its input does not come from Conv, ConvTranspose, Gemm, MatMul, or Add(MatMul, constant);
  - that producer's output (or the MatMul's, before the Add) has other consumers or is a
    graph output;
  - scale, B, mean, var, the weight, the bias or Gemm's C is not a constant (initializers,
    Constant nodes and small constant subgraphs count; so do IR-3 initializer-inputs);
  - shapes do not line up: BN parameters of another length than the producer's output
    channels, a weight of the wrong rank, a MatMul (or Add) output not known to be rank 2.
A weight or bias that another node also reads is written to a fresh initializer named after
the producer, never changed in place. The producer takes the BN's output name, so graph input
and output names never change. All edits land in one `GraphIndex.commit()`.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx

from onnx_normfix.graph import GraphIndex, attr, opset_of, set_attr, stamp
from onnx_normfix.registry import Pass, PassContext, PassResult, register_pass

from ._affine_fold import merge_affine_folds

FOLDABLE = ("Conv", "ConvTranspose", "Gemm", "MatMul")
ONNX_DOMAINS = ("", "ai.onnx")


def _run(model: onnx.ModelProto, ctx: PassContext) -> PassResult:
    idx, opset, result, folded = GraphIndex(model), opset_of(model), PassResult(), Counter()
    for bn in list(model.graph.node):
        if bn.op_type != "BatchNormalization" or bn.domain not in ONNX_DOMAINS:
            continue
        outcome = _fold(idx, bn, opset)
        if isinstance(outcome, str):
            result.notes.append(f"skipped {bn.name or bn.output[0]}: {outcome}")
            continue
        kind, producer = outcome
        result.rewrites += 1
        folded[kind] += 1
        result.sites.append(([producer.input[0]], [producer.output[0]]))
    if result.rewrites:
        idx.commit()
    result.details = {"folded_into": dict(folded)}
    return merge_affine_folds(model, result)  # per-channel Mul/Add after Conv/Gemm/MatMul (tf2onnx)


def _fold(idx: GraphIndex, bn: onnx.NodeProto, opset: int) -> str | tuple[str, onnx.NodeProto]:
    """Fold `bn` if every guard passes: returns (the producer's op_type, the producer) or why not."""
    if opset < 7:
        return f"opset {opset} < 7 is not supported"
    if opset < 9 and attr(bn, "spatial", 1) == 0:
        return "spatial=0 (per-element statistics)"
    if attr(bn, "training_mode", 0):
        return "training_mode=1"
    if opset < 14 and len(bn.output) > 1:
        return f"declares {len(bn.output)} outputs (the training form of BN-{9 if opset >= 9 else 7})"
    if sum(1 for o in bn.output if o) > 1:
        return f"{sum(1 for o in bn.output if o)} outputs (training statistics are used)"
    x = bn.input[0]
    producer, add = idx.producer.get(x), None
    if producer is None:
        return "input is a graph input, not a node output"
    if producer.op_type == "Add" and producer.domain in ONNX_DOMAINS:
        add, producer = producer, _matmul_under(idx, producer)
        if producer is None:
            return "input comes from an Add that is not MatMul + constant"
    if producer.op_type not in FOLDABLE or producer.domain not in ONNX_DOMAINS:
        return f"input comes from {producer.op_type}, not {'/'.join(FOLDABLE)}"
    for node, name, user in ((add or producer, x, bn), (producer, producer.output[0], add)):
        if user is not None and idx.only_consumer(name) is not user:
            if name in idx.graph_outputs:
                return f"{node.op_type} output is a graph output"
            return f"{node.op_type} output has {len(idx.consumers[name])} consumers"
    params = [idx.constant(n) if n else None for n in bn.input[1:5]]
    if len(params) < 4 or any(p is None for p in params):
        return "scale, B, mean or var is not a constant"
    if any(np.ndim(p) != 1 for p in params):
        return "scale, B, mean and var must be 1-D"
    if len({p.size for p in params}) != 1:
        return "scale, B, mean and var differ in length"
    scale, bias, mean, var = (np.asarray(p, dtype=np.float64).reshape(-1) for p in params)
    s = scale / np.sqrt(var + attr(bn, "epsilon", 1e-5))
    kind = producer.op_type
    fold = {"Conv": _fold_conv, "ConvTranspose": _fold_conv, "Gemm": _fold_gemm}.get(kind, _fold_matmul)
    why = fold(idx, producer, add, s, bias - mean * s)
    if why:
        return why
    producer.output[0] = bn.output[0]
    stamp(producer, "fold_bn")
    idx.remove(bn)
    if add is not None:
        idx.remove(add)
    return kind, producer


def _fold_conv(idx, node, _add, s, t) -> str | None:
    w, b = idx.constant(node.input[1]), _optional(idx, node, 2)
    if w is None or b is False:
        return f"{node.op_type} {'weight' if w is None else 'bias'} is not a constant"
    if w.ndim < 3:
        return f"{node.op_type} weight has rank {w.ndim}"
    group, k = int(attr(node, "group", 1)), (1,) * (w.ndim - 2)
    if node.op_type == "Conv":
        channels, grouped, factor_shape = w.shape[0], w, (-1, 1, *k)
    else:  # [Cin, Cout/group, k...] seen as [group, Cin/group, Cout/group, k...]
        if group < 1 or w.shape[0] % group:
            return f"ConvTranspose weight dim 0 ({w.shape[0]}) is not a multiple of group={group}"
        channels, factor_shape = w.shape[1] * group, (group, 1, w.shape[1], *k)
        grouped = w.reshape(group, w.shape[0] // group, *w.shape[1:])
    if s.size != channels or (b is not None and b.size != channels):
        return f"BN or bias length does not match the {channels} output channels of {node.op_type}"
    _write(idx, node, 1, _scaled(grouped, s.reshape(factor_shape)).reshape(w.shape), "_W")
    _write(idx, node, 2, ((0.0 if b is None else b) * s + t).astype(w.dtype), "_B")
    return None


def _fold_gemm(idx, node, _add, s, t) -> str | None:
    w, c = idx.constant(node.input[1]), _optional(idx, node, 2)
    if w is None or c is False:
        return f"Gemm {'B' if w is None else 'C'} is not a constant"
    trans_b, beta = attr(node, "transB", 0), attr(node, "beta", 1.0)
    if w.ndim != 2 or s.size != w.shape[0 if trans_b else 1]:
        return f"BN length {s.size} does not match Gemm B of shape {list(w.shape)}"
    if c is not None and not _broadcasts(c, s):
        return f"Gemm C of shape {list(c.shape)} does not broadcast to the BN channels"
    new_c = t if c is None or beta == 0 else beta * c * s + t
    _write(idx, node, 1, _scaled(w, s[:, None] if trans_b else s), "_B")
    _write(idx, node, 2, new_c.astype(w.dtype), "_C")
    set_attr(node, "beta", 1.0)
    return None


def _fold_matmul(idx, node, add, s, t) -> str | None:
    w = idx.constant(node.input[1])
    if w is None or w.ndim != 2:
        return "MatMul weight is not a constant 2-D matrix"
    rank = idx.rank((add or node).output[0])
    if rank != 2:  # on [N, L, C] the BN axis is L, not the MatMul's output features
        return f"MatMul output rank is {'unknown' if rank is None else rank}, not 2"
    c = None
    if add is not None:
        c = idx.constant(add.input[1] if add.input[0] == node.output[0] else add.input[0])
    if s.size != w.shape[1] or (c is not None and not _broadcasts(c, s)):
        return f"BN length {s.size} does not match MatMul weight {list(w.shape)} or Add bias"
    _write(idx, node, 1, _scaled(w, s), "_W")
    _write(idx, node, 2, (t if c is None else c * s + t).astype(w.dtype), "_C")
    node.op_type = "Gemm"
    del node.attribute[:]
    return None


def _scaled(w: np.ndarray, factor: np.ndarray) -> np.ndarray:
    if w.dtype in (np.float32, np.float64):
        if w.flags.writeable:  # a fresh read of external data (GraphIndex.constant only
            w *= factor.astype(w.dtype)  # shares read-only arrays): no second weight-sized copy
            return w
        return w * factor.astype(w.dtype)
    return (w.astype(np.float64) * factor).astype(w.dtype)


def _broadcasts(c: np.ndarray, s: np.ndarray) -> bool:
    return c.ndim <= 2 and (c.ndim == 0 or c.shape[-1] in (1, s.size))


def _optional(idx: GraphIndex, node: onnx.NodeProto, slot: int):
    """Constant value of an optional input: None if absent, False if present but not constant."""
    name = node.input[slot] if len(node.input) > slot else ""
    value = idx.constant(name) if name else None
    return False if name and value is None else value


def _matmul_under(idx: GraphIndex, add: onnx.NodeProto) -> onnx.NodeProto | None:
    """The MatMul feeding `add` when its other input is a constant (Linear exported as 2 ops)."""
    for mine, other in ((0, 1), (1, 0)) if len(add.input) == 2 else ():
        node = idx.producer.get(add.input[mine])
        if node is not None and node.op_type == "MatMul" and node.domain in ONNX_DOMAINS:
            if idx.constant(add.input[other]) is not None:
                return node
    return None


def _write(idx: GraphIndex, node: onnx.NodeProto, slot: int, value: np.ndarray, suffix: str):
    """Put `value` in input `slot` of `node`: in place if only `node` reads an initializer of
    the same shape (just the bytes change: no copy of a big tensor), else a new initializer."""
    name = node.input[slot] if len(node.input) > slot else ""
    tensor = idx.initializers.get(name)
    if (tensor is not None and not idx.uses_elsewhere(name, node) and list(node.input).count(name) == 1
            and tuple(tensor.dims) == value.shape
            and tensor.data_type == onnx.helper.np_dtype_to_tensor_dtype(value.dtype)):
        for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "external_data"):
            tensor.ClearField(field)
        tensor.data_location = onnx.TensorProto.DEFAULT
        tensor.raw_data = value.astype(value.dtype.newbyteorder("<"), copy=False).tobytes()
        return
    new = idx.add_initializer(value, f"{node.name or node.output[0]}{suffix}")
    node.input.extend([""] * (slot + 1 - len(node.input)))
    node.input[slot] = new


PASS = register_pass(
    Pass(
        name="fold_bn",
        summary="Fold inference BatchNormalization into the Conv, ConvTranspose, Gemm or MatMul before it.",
        preserves_outputs=True,
        run=_run,
        order=30,
    )
)
