"""Hand-built decomposed normalizations, one knob per exporter variant (tests and fuzzing).

    build(kind="ln", ...) -> onnx.ModelProto with input x and output y

kind: "ln" (LayerNorm over the trailing `axes`), "rms", "in" (InstanceNorm over 2..r-1),
"gn" (Reshape[N,G,-1] -> LayerNorm core -> Reshape back -> per-channel affine).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

NP = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.DOUBLE: np.float64,
      TensorProto.BFLOAT16: __import__("ml_dtypes").bfloat16}
IR_VERSION = 10


class _G:
    def __init__(self, opset):
        self.nodes, self.inits, self.opset, self.k = [], [], opset, 0

    def const(self, value, name=None, as_node=False):
        self.k += 1
        name = name or f"c{self.k}"
        if as_node:
            self.nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name)))
        else:
            self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op, inputs, name=None, **attrs):
        self.k += 1
        out = name or f"t{self.k}_{op}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"/norm/{op}_{self.k}", **attrs))
        return out

    def reduce_mean(self, x, axes, mode, keepdims):
        kw = {} if keepdims is None else {"keepdims": keepdims}
        if self.opset < 18:
            return self.op("ReduceMean", [x], axes=axes, **kw)
        if mode == "reshape_const":  # dynamo without optimize: Reshape(Constant, Constant)
            shape = self.const(np.array([-1], np.int64), as_node=True)
            raw = self.const(np.array(axes, np.int64), as_node=True)
            return self.op("ReduceMean", [x, self.op("Reshape", [raw, shape])], **kw)
        return self.op("ReduceMean", [x, self.const(np.array(axes, np.int64), as_node=(mode == "constant"))], **kw)


def build(kind="ln", shape=(2, 3, 8), axes=None, dtype=TensorProto.FLOAT, opset=17, eps=1e-5, square="pow",
          exp_dtype=None, normalize="div", root="sqrt", axes_mode="initializer", keepdims=None, dup_sub=False,
          affine="xw", casts="none", groups=2, extra_use=None, graph_output_mid=False, dead_leftover=False,
          eps_input=False, dynamic_scale=False, mean_axes=None, seed=0) -> onnx.ModelProto:
    """A decomposed norm; see the module docstring. Knobs:
    square pow|mul; exp_dtype: dtype of Pow's exponent (default: the statistics' dtype);
    normalize div|recip|div1|rsqrt_pow; root sqrt|pow; axes_mode initializer|constant|reshape_const;
    keepdims None (absent)|0|1; affine xw|wx|none|bias|scale; casts none|fp16_double|hf_float;
    extra_use: an intermediate ("sub"|"var"|"std") also read by a second output; graph_output_mid:
    that intermediate is a graph output instead; dead_leftover: a node reads an intermediate and
    reaches no output; eps_input: epsilon comes from a graph input; dynamic_scale: the scale is
    a graph input (not absorbable)."""
    rng = np.random.default_rng(seed)
    g = _G(opset)
    npd = NP[dtype]
    rank = len(shape)
    x = "x"
    extra_inputs, extra_outputs = [], []
    stat_type = {"fp16_double": TensorProto.DOUBLE, "hf_float": TensorProto.FLOAT}.get(casts, dtype)
    sdt = NP[stat_type]
    if kind == "gn":
        n, c = shape[0], shape[1]
        x = g.op("Reshape", [x, g.const(np.array([n, groups, -1], np.int64))])
        axes = [-1]
    if axes is None:
        axes = list(range(2, rank)) if kind == "in" else [-1]
    cast_in = None
    if casts == "hf_float":
        x = cast_in = g.op("Cast", [x], to=TensorProto.FLOAT)
    if kind == "rms":
        d = x
    else:
        mean = g.reduce_mean(x, mean_axes or axes, axes_mode, keepdims)
        d = g.op("Sub", [x, mean])
    d_stat = g.op("Cast", [d], to=TensorProto.DOUBLE) if casts == "fp16_double" else d
    exp = np.array(2.0, dtype=NP[exp_dtype] if exp_dtype else sdt)
    sq = g.op("Pow", [d_stat, g.const(exp)]) if square == "pow" else g.op("Mul", [d_stat, d_stat])
    var = g.reduce_mean(sq, axes, axes_mode, keepdims)
    if eps_input:
        extra_inputs.append(helper.make_tensor_value_info("eps", stat_type, []))
        var = g.op("Add", [var, "eps"])
    elif eps is not None:
        var = g.op("Add", [var, g.const(np.array(eps, sdt))])
    if normalize == "rsqrt_pow":
        rstd = g.op("Pow", [var, g.const(np.array(-0.5, sdt))])
        std = rstd
    else:
        std = g.op("Sqrt", [var]) if root == "sqrt" else g.op("Pow", [var, g.const(np.array(0.5, sdt))])
    num = d_stat
    if dup_sub:
        num = g.op("Sub", [x, mean])
        if casts == "fp16_double":
            num = g.op("Cast", [num], to=TensorProto.DOUBLE)
    if normalize == "div":
        y = g.op("Div", [num, std])
    elif normalize == "recip":
        y = g.op("Mul", [num, g.op("Reciprocal", [std])])
    elif normalize == "div1":
        y = g.op("Mul", [num, g.op("Div", [g.const(np.array(1.0, sdt)), std])])
    else:
        y = g.op("Mul", [num, rstd])
    if casts != "none":
        y = g.op("Cast", [y], to=dtype)
    taps = {"sub": d, "var": var, "std": std, "cast": cast_in}  # cast: HF's residual reads Cast(x)
    tap_type = {"sub": TensorProto.FLOAT if casts == "hf_float" else dtype, "var": stat_type, "std": stat_type,
                "cast": TensorProto.FLOAT}
    if extra_use:
        extra_outputs.append(helper.make_tensor_value_info(g.op("Neg", [taps[extra_use]], name="extra"),
                                                           tap_type[extra_use], None))
    if graph_output_mid:
        extra_outputs.append(helper.make_tensor_value_info(taps[graph_output_mid], tap_type[graph_output_mid], None))
    if dead_leftover:
        g.op("Shape", [taps["sub"]])  # reads an intermediate, reaches no output
    if kind == "gn":
        y = g.op("Reshape", [y, g.const(np.array(shape, np.int64))])
    if kind in ("in", "gn"):
        pshape = (shape[1],) + (1,) * (rank - 2)
    else:
        norm_rank = len(axes)
        pshape = tuple(shape[rank - norm_rank:])
    w = (rng.uniform(0.5, 1.5, pshape)).astype(npd)
    b = (rng.standard_normal(pshape) * 0.3).astype(npd)
    if dynamic_scale:
        extra_inputs.append(helper.make_tensor_value_info("scale", dtype, list(pshape)))
        y = g.op("Mul", [y, "scale"], name="y" if affine == "scale" else None)
    elif affine in ("xw", "wx", "scale"):
        wn = g.const(w, "gamma")
        y = g.op("Mul", [y, wn] if affine != "wx" else [wn, y], name="y" if affine == "scale" else None)
    if affine in ("xw", "wx", "bias"):
        y = g.op("Add", [y, g.const(b, "beta")], name="y")
    if y != "y":
        y = g.op("Identity", [y], name="y")
    graph = helper.make_graph(
        g.nodes, f"{kind}_norm", [helper.make_tensor_value_info("x", dtype, list(shape)), *extra_inputs],
        [helper.make_tensor_value_info("y", dtype, list(shape)), *extra_outputs], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tests")
    model.ir_version = IR_VERSION
    if extra_outputs:  # give the tapped outputs their inferred shapes (the checker wants them)
        done = onnx.shape_inference.infer_shapes(model).graph
        inferred = {vi.name: vi for vi in list(done.value_info) + list(done.output)}
        for out in model.graph.output:
            if out.name in inferred:
                out.CopyFrom(inferred[out.name])
    return model


def reference(kind, x, axes=None, eps=1e-5, groups=2, w=None, b=None):
    """The norm in float64, for checking fused results against the formula."""
    x = x.astype(np.float64)
    if kind == "gn":
        n, c = x.shape[:2]
        y = x.reshape(n, groups, -1)
        y = (y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + eps)
        return y.reshape(x.shape)
    axes = tuple(axes if axes is not None else (range(2, x.ndim) if kind == "in" else [-1]))
    if kind == "rms":
        return x / np.sqrt((x * x).mean(axes, keepdims=True) + eps)
    return (x - x.mean(axes, keepdims=True)) / np.sqrt(x.var(axes, keepdims=True) + eps)
