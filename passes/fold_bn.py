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
    Constant nodes and small constant subgraphs count, including those that read only the
    dtype or static shape of other tensors, like dynamo's zero bias
    Expand(CastLike(0, x), Expand(Shape(W)[0:1], [1])); so do IR-3 initializer-inputs; an
    IR >= 4 initializer that is also a graph input is a default the caller may override: not
    a constant, the note names the option that treats it as one);
  - shapes do not line up: BN parameters of another length than the producer's output
    channels, a weight of the wrong rank; for MatMul, an X not inferred to be 2-D (1-D, or a
    rank only a value_info claims), or an Add constant that broadcasts the output up;
  - the fold is not safe in the model's precision: var + epsilon <= 0 (in float64 or in
    float32, as onnxruntime adds it), a non-finite scale or shift, folded values past the
    dtype's largest, or fp16/bf16 output channels whose folded weights round off by more than
    the dtype's epsilon of the channel's largest (pushed to subnormals or zero).
A weight or bias that another node also reads is written to a fresh initializer named after
the producer, never changed in place. The producer takes the BN's output name, so graph input
and output names never change. All edits land in one `GraphIndex.commit()`.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx

from onnx_normfix.graph import GraphIndex, attr, opset_of, set_attr, stamp
from onnx_normfix.registry import Declined, Pass, PassContext, PassResult, register_pass

from ._affine_fold import merge_affine_folds

FOLDABLE = ("Conv", "ConvTranspose", "Gemm", "MatMul")
ONNX_DOMAINS = ("", "ai.onnx")


def _run(model: onnx.ModelProto, ctx: PassContext) -> PassResult:
    idx, opset, result, folded = GraphIndex(model), opset_of(model), PassResult(), Counter()
    for bn in list(model.graph.node):
        if bn.op_type != "BatchNormalization" or bn.domain not in ONNX_DOMAINS:
            continue
        with np.errstate(all="ignore"):  # a site's bad numbers are its note, never a warning
            outcome = _fold(idx, bn, opset)
        if isinstance(outcome, Declined):
            result.decline(outcome, bn.name or bn.output[0])
            continue
        kind, producer = outcome
        result.rewrites += 1
        folded[kind] += 1
        result.sites.append(([producer.input[0]], [producer.output[0]]))
    if result.rewrites:
        idx.commit()
    result.details = {"folded_into": dict(folded)}
    return merge_affine_folds(model, result)  # per-channel Mul/Add after Conv/Gemm/MatMul (tf2onnx)


def _fold(idx: GraphIndex, bn: onnx.NodeProto, opset: int) -> Declined | tuple[str, onnx.NodeProto]:
    """Fold `bn` if every guard passes: returns (the producer's op_type, the producer) or why not."""
    if opset < 7:
        return Declined(f"opset {opset} < 7 is not supported")
    if opset < 9 and attr(bn, "spatial", 1) == 0:
        return Declined("spatial=0 (per-element statistics)")
    if attr(bn, "training_mode", 0):
        return Declined("training_mode=1")
    if opset < 14 and len(bn.output) > 1:
        return Declined(f"declares {len(bn.output)} outputs (the training form of BN-{9 if opset >= 9 else 7})")
    if sum(1 for o in bn.output if o) > 1:
        return Declined(f"{sum(1 for o in bn.output if o)} outputs (training statistics are used)")
    # guards: what the BN reads, and who else reads it
    x = bn.input[0]
    producer, add = idx.producer.get(x), None
    if producer is None:
        return Declined("input is a graph input, not a node output")
    if producer.op_type == "Add" and producer.domain in ONNX_DOMAINS:
        add, producer = producer, _matmul_under(idx, producer)
        if producer is None:
            return Declined("input comes from an Add that is not MatMul + constant")
    if producer.op_type not in FOLDABLE or producer.domain not in ONNX_DOMAINS:
        return Declined(f"input comes from {producer.op_type}, not {'/'.join(FOLDABLE)}")
    for node, name, user in ((add or producer, x, bn), (producer, producer.output[0], add)):
        if user is not None and idx.only_consumer(name) is not user:
            if name in idx.graph_outputs:
                return Declined(f"{node.op_type} output is a graph output")
            return Declined(f"{node.op_type} output has {len(idx.consumers[name])} consumers")
    params = [idx.constant(n) if n else None for n in bn.input[1:5]]
    if len(params) < 4 or any(p is None for p in params):
        missing = next((n for n, p in zip(bn.input[1:5], params) if p is None), "")
        return Declined(idx.not_constant(missing, "scale, B, mean or var") if len(params) == 4
                        else "scale, B, mean or var is missing")
    if any(np.ndim(p) != 1 for p in params):
        return Declined("scale, B, mean and var must be 1-D")
    if len({p.size for p in params}) != 1:
        return Declined("scale, B, mean and var differ in length")
    # math: s and t in float64, safe in the model's precision
    scale, bias, mean, var = (np.asarray(p, dtype=np.float64).reshape(-1) for p in params)
    epsilon = attr(bn, "epsilon", float(np.float32(1e-5)))  # a float attribute: float32
    denominator = var + epsilon
    # onnxruntime adds in the model's precision (float32 at best): -1e-5 + 1e-5 is 0 there
    low = np.minimum(denominator, var.astype(np.float32) + np.float32(epsilon))
    if not np.all(low > 0):  # NaN too
        k = int(np.argmin(np.where(np.isnan(low), -np.inf, low)))
        return Declined(f"var + epsilon is {low[k]:g} at channel {k} (the BN divides by its square root)")
    s = scale / np.sqrt(denominator)
    if not (np.all(np.isfinite(s)) and np.all(np.isfinite(bias - mean * s))):
        return Declined("the folded scale or shift is not finite (scale, B or mean holds inf or NaN)")
    # the producer's own guards and weights, then the rewiring: it takes the BN's output name
    kind = producer.op_type
    fold = {"Conv": _fold_conv, "ConvTranspose": _fold_conv, "Gemm": _fold_gemm}.get(kind, _fold_matmul)
    declined = fold(idx, producer, add, s, bias - mean * s)
    if declined is not None:
        return declined
    producer.output[0] = bn.output[0]
    stamp(producer, "fold_bn")
    idx.remove(bn)
    if add is not None:
        idx.remove(add)
    return kind, producer


def _fold_conv(idx, node, _add, s, t) -> Declined | None:
    w, b = idx.constant(node.input[1]), _optional(idx, node, 2)
    if w is None or b is False:
        return Declined(idx.not_constant(node.input[1 if w is None else 2], f"{node.op_type} {'weight' if w is None else 'bias'}"))
    if w.ndim < 3:
        return Declined(f"{node.op_type} weight has rank {w.ndim}")
    group, k = int(attr(node, "group", 1)), (1,) * (w.ndim - 2)
    if node.op_type == "Conv":
        channels, grouped, factor_shape = w.shape[0], w, (-1, 1, *k)
    else:  # [Cin, Cout/group, k...] seen as [group, Cin/group, Cout/group, k...]
        if group < 1 or w.shape[0] % group:
            return Declined(f"ConvTranspose weight dim 0 ({w.shape[0]}) is not a multiple of group={group}")
        channels, factor_shape = w.shape[1] * group, (group, 1, w.shape[1], *k)
        grouped = w.reshape(group, w.shape[0] // group, *w.shape[1:])
    if s.size != channels or (b is not None and b.size != channels):
        return Declined(f"BN or bias length does not match the {channels} output channels of {node.op_type}")
    new_b = (0.0 if b is None else np.asarray(b, np.float64).reshape(-1)) * s + t
    declined = _lossy(grouped, s.reshape(factor_shape), new_b)
    if declined is not None:
        return declined
    _write(idx, node, 1, _scaled(grouped, s.reshape(factor_shape)).reshape(w.shape), "_W")
    _write(idx, node, 2, new_b.astype(w.dtype), "_B")
    return None


def _fold_gemm(idx, node, _add, s, t) -> Declined | None:
    w, c = idx.constant(node.input[1]), _optional(idx, node, 2)
    if w is None or c is False:
        return Declined(idx.not_constant(node.input[1 if w is None else 2], f"Gemm {'B' if w is None else 'C'}"))
    trans_b, beta = attr(node, "transB", 0), attr(node, "beta", 1.0)
    if w.ndim != 2 or s.size != w.shape[0 if trans_b else 1]:
        return Declined(f"BN length {s.size} does not match Gemm B of shape {list(w.shape)}")
    if c is not None and not _broadcasts(c, s):
        return Declined(f"Gemm C of shape {list(c.shape)} does not broadcast to the BN channels")
    new_c = t if c is None or beta == 0 else beta * np.asarray(c, np.float64) * s + t
    declined = _lossy(w, s[:, None] if trans_b else s, new_c)
    if declined is not None:
        return declined
    _write(idx, node, 1, _scaled(w, s[:, None] if trans_b else s), "_B")
    _write(idx, node, 2, new_c.astype(w.dtype), "_C")
    set_attr(node, "beta", 1.0)
    return None


def _fold_matmul(idx, node, add, s, t) -> Declined | None:
    w = idx.constant(node.input[1])
    if w is None:
        return Declined(idx.not_constant(node.input[1], "MatMul weight"))
    if w.ndim != 2:
        return Declined(f"MatMul weight has rank {w.ndim}, not 2")
    # Gemm needs X of rank 2 (a 1-D X gives a 1-D MatMul output; on [N, L, C] the BN axis is
    # L, not the output features): decided on inferred shapes, never on value_info claims
    x_shape = idx.static_shape(node.input[0])
    if x_shape is None or len(x_shape) != 2:
        return Declined(f"MatMul input rank is {'unknown' if x_shape is None else len(x_shape)}, not 2")
    c = None
    if add is not None:
        c = idx.constant(add.input[1] if add.input[0] == node.output[0] else add.input[0])
        # Gemm's C broadcasts to [M, N] one way only: a C that would grow the Add's output
        # ([1, N] + [3, N]) has no Gemm form
        if c.ndim > 2 or (c.ndim == 2 and c.shape[0] != 1 and x_shape[0] != c.shape[0]):
            return Declined(f"Add bias of shape {list(c.shape)} broadcasts the MatMul output {x_shape[:1] + [w.shape[1]]} up")
    if s.size != w.shape[1] or (c is not None and not _broadcasts(c, s)):
        return Declined(f"BN length {s.size} does not match MatMul weight {list(w.shape)} or Add bias")
    new_c = t if c is None else np.asarray(c, np.float64) * s + t
    declined = _lossy(w, s, new_c)
    if declined is not None:
        return declined
    _write(idx, node, 1, _scaled(w, s), "_W")
    _write(idx, node, 2, new_c.astype(w.dtype), "_C")
    node.op_type = "Gemm"
    del node.attribute[:]
    return None


def _lossy(w: np.ndarray, factor: np.ndarray, bias: np.ndarray) -> Declined | None:
    """Why the folded weights `w * factor` and `bias` cannot be stored in w's dtype without
    a loss the unfolded model does not have, or None. Overflow (a finite exact value that
    rounds to inf) in any float type; in fp16/bf16 also underflow: an output channel whose
    folded weights, rounded, are off from the exact product by more than the dtype's
    epsilon relative to the channel's largest exact weight (values pushed into the subnormal
    range or to zero)."""
    if w.dtype.kind != "f" and "bfloat16" not in str(w.dtype):
        return None
    info = _finfo(w.dtype)
    with np.errstate(all="ignore"):
        exact = w.astype(np.float64) * factor
        big = max(float(np.max(np.abs(exact), initial=0.0)), float(np.max(np.abs(bias), initial=0.0)))
        if big > info[1]:
            return Declined(f"the folded weights or bias reach {big:.3g}, past the largest {w.dtype} ({info[1]:.3g})")
        if w.dtype.itemsize > 2:
            return None
        rounded = exact.astype(w.dtype).astype(np.float64)
        # the output channels run along the axes where the factor varies
        channel_axes = [k for k in range(w.ndim) if factor.shape[k] != 1] if factor.ndim == w.ndim else [w.ndim - 1]
        reduce = tuple(k for k in range(w.ndim) if k not in channel_axes)
        scale = np.max(np.abs(exact), axis=reduce, keepdims=True)
        err = np.max(np.abs(rounded - exact), axis=reduce, keepdims=True)
        bad = (scale > 0) & (err > info[0] * scale)
    if np.any(bad):
        return Declined(f"folding loses precision in {w.dtype}: {int(np.sum(bad))} output channel(s) of folded "
                        f"weights would fall to subnormal values or zero (smallest normal {info[2]:.3g})")
    return None


def _finfo(dtype) -> tuple[float, float, float]:
    """(epsilon, max, smallest normal) of a float dtype, bfloat16 included."""
    if "bfloat16" in str(dtype):
        return 2.0 ** -7, 3.3895313892515355e38, 1.1754943508222875e-38
    f = np.finfo(dtype)
    return float(f.eps), float(f.max), float(f.tiny)


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
        node = idx.parent(add, mine, "MatMul")
        if node is not None and idx.constant(add.input[other]) is not None:
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
        # every BatchNormalization another pass creates (fix_inorm, a user's pass) gets folded
        runs_after_creators_of={"BatchNormalization"},
    )
)
