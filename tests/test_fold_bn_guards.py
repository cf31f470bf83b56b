"""fold_bn declines, per site, what it cannot fold safely, and folds the rest:

- MatMul [+ Add] -> Gemm is decided on inferred shapes: X must be 2-D (not 1-D, not a rank a
  wrong value_info claims), and the Add's constant must not broadcast the output up;
- folded fp16/bf16 weights that overflow or fall to subnormals/zero, and var + eps <= 0.
No numpy warning reaches the caller.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_normfix
from onnx_normfix.registry import PASSES, PassContext

from helpers import count_ops, ort_run

F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16


def _bn_inits(prefix, c, rng, dtype=np.float32, scale=None, var=None, centred=False):
    values = {"g": rng.uniform(0.5, 1.5, c) if scale is None else scale, "be": rng.standard_normal(c) * 0.2,
              "mu": rng.standard_normal(c) * 0.3, "var": rng.uniform(0.5, 2, c) if var is None else var}
    if centred:  # no shift: the BN output is the scaled conv output alone
        values["be"], values["mu"] = np.zeros(c), np.zeros(c)
    return [numpy_helper.from_array(np.asarray(v).astype(dtype), f"{prefix}{k}") for k, v in values.items()]


def _bn(x, y, prefix):
    return helper.make_node("BatchNormalization", [x] + [f"{prefix}{k}" for k in ("g", "be", "mu", "var")], [y],
                            name=f"{prefix}bn")


def _model(nodes, x_shape, inits, elem=F32, value_info=()):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", elem, x_shape)],
                          [helper.make_tensor_value_info("y", elem, None)], inits, value_info=list(value_info))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _fold(model):
    return PASSES["fold_bn"].run(model, PassContext(options={}))


def _matmul_model(x_shape, c_shape=None, value_info=()):
    rng = np.random.default_rng(7)
    n = 3
    inits = [numpy_helper.from_array(rng.standard_normal((x_shape[-1], n)).astype(np.float32), "W"),
             *_bn_inits("a", n, rng)]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"])]
    bn_in = "m"
    if c_shape is not None:
        inits.append(numpy_helper.from_array(rng.standard_normal(c_shape).astype(np.float32), "c"))
        nodes.append(helper.make_node("Add", ["m", "c"], ["h"]))
        bn_in = "h"
    nodes.append(_bn(bn_in, "y", "a"))
    return _model(nodes, list(x_shape), inits, value_info=value_info)


@pytest.mark.parametrize("x_shape,c_shape,why", [
    ((6,), None, "MatMul input rank is 1"),
    ((6,), (3,), "MatMul input rank is 1"),
    ((1, 6), (4, 3), "broadcasts the MatMul output [1, 3] up"),
])
def test_matmul_add_declines_what_gemm_cannot_express(x_shape, c_shape, why):
    model = _matmul_model(x_shape, c_shape)
    before = model.SerializeToString()
    result = _fold(model)
    assert result.rewrites == 0 and why in result.notes[0], result.notes
    assert model.SerializeToString() == before


def test_matmul_decides_from_inferred_shapes_not_value_info():
    """value_info claims the MatMul output is 2-D; it really is [2, 3, 3] (BN axis = 3 rows)."""
    lie = [helper.make_tensor_value_info("m", F32, [2, 3])]
    model = _matmul_model((2, 3, 5), value_info=lie)
    result = _fold(model)
    assert result.rewrites == 0 and "MatMul input rank is 3" in result.notes[0]


@pytest.mark.parametrize("x_shape,c_shape", [((4, 6), None), ((4, 6), (3,)), ((4, 6), (1, 3)), ((4, 6), (4, 3)),
                                             ((1, 6), (1, 3))])
def test_twin_matmul_add_of_gemm_shapes_folds(x_shape, c_shape):
    model = _matmul_model(x_shape, c_shape)
    x = np.random.default_rng(0).standard_normal(x_shape).astype(np.float32)
    want = ort_run(model, {"x": x})["y"]
    result = onnx_normfix.optimize(model, passes=["fold_bn"])
    assert result.report["passes"][0]["rewrites"] == 1
    assert count_ops(result.model) == {"Gemm": 1}
    np.testing.assert_allclose(ort_run(result.model, {"x": x})["y"], want, rtol=1e-4, atol=1e-5)


def _two_convs(dtype, bad_scale=None, bad_var=None, w_scale=0.3, centred=False):
    """x -> Conv(Wa) -> BN a (the site under test) -> Conv(Wb) -> BN b (always foldable)."""
    rng = np.random.default_rng(3)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    c = 5
    inits = [numpy_helper.from_array((rng.standard_normal((c, 3, 3, 3)) * w_scale).astype(dtype), "Wa"),
             numpy_helper.from_array((rng.standard_normal((4, c, 1, 1)) * 0.3).astype(dtype), "Wb"),
             *_bn_inits("a", c, rng, dtype, scale=bad_scale, var=bad_var, centred=centred), *_bn_inits("b", 4, rng, dtype, centred=centred)]
    nodes = [helper.make_node("Conv", ["x", "Wa"], ["ca"], pads=[1, 1, 1, 1]), _bn("ca", "ha", "a"),
             helper.make_node("Conv", ["ha", "Wb"], ["cb"]), _bn("cb", "y", "b")]
    return _model(nodes, [2, 3, 6, 6], inits, elem)


CASES = {
    "fp16 underflow": (np.float16, dict(bad_scale=np.full(5, 1e-6)), "subnormal values or zero"),
    "fp16 overflow": (np.float16, dict(bad_scale=np.full(5, 3e3), w_scale=40.0), "past the largest float16"),
    "var + eps == 0": (np.float32, dict(bad_var=np.array([1.0, -1e-5, 1.0, 1.0, 1.0])), "var + epsilon is 0 at channel 1"),
    "negative var": (np.float32, dict(bad_var=np.array([1.0, 1.0, -3.0, 1.0, 1.0])), "at channel 2"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_an_unsafe_site_is_declined_and_the_rest_folds(case):
    dtype, kw, why = CASES[case]
    model = _two_convs(dtype, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy warnings never reach the caller
        result = _fold(model)
    assert result.rewrites == 1, result.notes
    assert len(result.notes) == 1 and result.notes[0].startswith("skipped abn:") and why in result.notes[0], result.notes
    assert count_ops(model) == {"Conv": 2, "BatchNormalization": 1}


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_twin_ordinary_weights_fold_in_every_dtype(dtype):
    model = _two_convs(dtype)
    assert _fold(model).rewrites == 2 and count_ops(model) == {"Conv": 2}


def test_fp16_underflow_end_to_end_on_image_range_inputs():
    """The declined fp16 site keeps the model as accurate as it was; the other one folds.
    (Folded anyway, the output would be 4% of its max off on these image-range inputs.)"""
    model = _two_convs(np.float16, bad_scale=np.full(5, 1e-6), centred=True)
    x = np.random.default_rng(1).uniform(0, 255, (2, 3, 6, 6)).astype(np.float16)
    want = ort_run(model, {"x": x})["y"].astype(np.float32)
    result = onnx_normfix.optimize(model, passes=["fold_bn"])
    assert result.report["passes"][0]["rewrites"] == 1
    got = ort_run(result.model, {"x": x})["y"].astype(np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2 * np.abs(want).max())
