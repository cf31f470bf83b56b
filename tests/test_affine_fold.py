"""fold_bn's affine fold: a per-channel constant Mul/Add after Conv/Gemm/MatMul (tf2onnx's Keras BN).

The tf2onnx fixture is a real export (fixtures/_tf_models.py, made with tensorflow-cpu 2.21 and
tf2onnx 1.17 in a separate environment); the hand-built graphs cover each producer and twin.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_normfix
from conftest import FIXTURES
from helpers import count_ops, ort_run
from onnx_normfix.passes.fold_bn import PASS
from onnx_normfix.registry import PassContext


def model_of(kind="matmul", scale_shape=None, bias_add=True, linear_bias=False, dynamic=False, rank=2, seed=0):
    """x -> Conv | Gemm | MatMul [-> Add(c)] -> Mul(s) [-> Add(t)] -> y"""
    rng = np.random.default_rng(seed)
    c = 4
    inits, nodes, inputs = [], [], []
    if kind == "conv":
        xs, w = [1, 3, 5, 5], rng.standard_normal((c, 3, 3, 3)).astype(np.float32)
        inits += [numpy_helper.from_array(w, "W"), numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "b")]
        nodes.append(helper.make_node("Conv", ["x", "W", "b"], ["h"], pads=[1, 1, 1, 1]))
        default_shape, out_rank = (c, 1, 1), 4
    else:
        xs = [2, 6] if rank == 2 else [2, 3, 6]
        inits.append(numpy_helper.from_array(rng.standard_normal((c, 6) if kind == "gemm" else (6, c)).astype(np.float32), "W"))
        if kind == "gemm":
            inits.append(numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "b"))
            nodes.append(helper.make_node("Gemm", ["x", "W", "b"], ["h"], transB=1, beta=0.5))
        else:
            nodes.append(helper.make_node("MatMul", ["x", "W"], ["h0" if linear_bias else "h"]))
            if linear_bias:
                inits.append(numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "lb"))
                nodes.append(helper.make_node("Add", ["h0", "lb"], ["h"]))
        default_shape, out_rank = (c,), len(xs)
    shape = scale_shape or default_shape
    if dynamic:
        inputs.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, list(shape)))
    else:
        inits.append(numpy_helper.from_array(rng.uniform(0.5, 1.5, shape).astype(np.float32), "s"))
    nodes.append(helper.make_node("Mul", ["h", "s"], ["m" if bias_add else "y"]))
    if bias_add:
        inits.append(numpy_helper.from_array(rng.standard_normal(default_shape).astype(np.float32), "t"))
        nodes.append(helper.make_node("Add", ["t", "m"], ["y"]))
    graph = helper.make_graph(nodes, "affine", [helper.make_tensor_value_info("x", TensorProto.FLOAT, xs), *inputs],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 5, 5] if kind == "conv" else xs[:-1] + [c])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def run(model):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out, PASS.run(out, PassContext(options={}))


def feeds(model):
    rng = np.random.default_rng(1)
    return {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
            for i in model.graph.input}


@pytest.mark.parametrize("kwargs,ops", [
    (dict(kind="matmul"), {"Gemm": 1}),
    (dict(kind="matmul", linear_bias=True), {"Gemm": 1}),
    (dict(kind="matmul", bias_add=False, scale_shape=(1, 4)), {"Gemm": 1}),
    (dict(kind="gemm"), {"Gemm": 1}),
    (dict(kind="conv"), {"Conv": 1}),
    (dict(kind="conv", scale_shape=(1, 4, 1, 1), bias_add=False), {"Conv": 1}),
], ids=["matmul", "linear", "matmul_scale_only", "gemm", "conv", "conv_scale_only"])
def test_folds(kwargs, ops):
    model = model_of(**kwargs)
    after, result = run(model)
    assert result.rewrites == 1
    onnx.checker.check_model(after, full_check=True)
    assert count_ops(after) == ops
    f = feeds(model)
    np.testing.assert_allclose(ort_run(after, f)["y"], ort_run(model, f)["y"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs", [
    dict(kind="conv", scale_shape=(1, 5, 5)),  # varies along H, W: not a per-channel affine
    dict(kind="matmul", dynamic=True),  # input-dependent scale
    dict(kind="matmul", scale_shape=(2, 4)),  # varies along rows
], ids=["spatial_scale", "dynamic_scale", "row_scale"])
def test_must_not_fold(kwargs):
    model = model_of(**kwargs)
    after, result = run(model)
    # the Mul stays; a constant per-channel Add after it may not fold past the Mul either
    assert "Mul" in count_ops(after)
    f = feeds(model)
    np.testing.assert_allclose(ort_run(after, f)["y"], ort_run(model, f)["y"], rtol=1e-5, atol=1e-5)


def test_matmul_rank3_declines_with_note():
    after, result = run(model_of(kind="matmul", rank=3))
    assert result.rewrites == 0 and "not 2" in result.notes[0]
    assert count_ops(after) == {"MatMul": 1, "Mul": 1, "Add": 1}


def test_tf2onnx_keras_bn_after_dense_folds_and_matches_keras():
    model = onnx.load(FIXTURES / "keras_bn_dense_op13.onnx")
    io = np.load(FIXTURES / "keras_bn_dense_op13_io.npz")
    result = onnx_normfix.optimize(model, passes=["fold_bn"], inputs={"x": io["x"]}, reference={str(io["output"]): io["y"]})
    assert count_ops(result.model).get("MatMul", 0) == 0 and count_ops(result.model)["Gemm"] == 1
    assert result.report["passes"][0]["rewrites"] == 1
    assert result.report["reference"]["status"] == "passed"
