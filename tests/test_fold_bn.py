"""fold_bn: one tiny graph per rule, each with a twin on which the pass must not fire.

Numbers are compared with onnxruntime (optimizations off) before and after the pass, at
rtol 1e-4 / atol 1e-5 for float32; looser figures for fp16/bf16 are justified where used.
"""

from __future__ import annotations

import copy
import pathlib

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import assert_close, count_ops, ort_run
from onnx_normfix.passes.fold_bn import PASS
from onnx_normfix.registry import PassContext

FIXTURES = pathlib.Path(__file__).resolve().parent.parent / "fixtures"
NEWEST = onnx.defs.onnx_opset_version()
BN_INPUTS = ["scale", "B", "mean", "var"]


# ---- builders ------------------------------------------------------------------------------
def bn_arrays(channels: int, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "scale": (rng.random(channels) + 0.5).astype(dtype),
        "B": (rng.standard_normal(channels) * 0.3).astype(dtype),
        "mean": (rng.standard_normal(channels) * 0.5).astype(dtype),
        "var": (rng.random(channels) * 1.5 + 0.5).astype(dtype),
    }


def make(nodes, inputs, outputs, inits, opset=21, ir=None):
    """A model from helper pieces; `inputs`/`outputs` are (name, dtype, shape) triples."""
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes, "g",
        [vi(n, t, s) for n, t, s in inputs],
        [vi(n, t, s) for n, t, s in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir or min(10, max(4, helper.find_min_ir_version_for([helper.make_opsetid("", opset)])))
    return with_output_shapes(model)


def with_output_shapes(model):
    """The checker wants a shape on graph outputs: take it from shape inference."""
    graph = onnx.shape_inference.infer_shapes(model).graph
    inferred = {v.name: v for v in list(graph.value_info) + list(graph.output)}
    for out in model.graph.output:
        if not out.type.tensor_type.HasField("shape") and out.name in inferred:
            out.type.CopyFrom(inferred[out.name].type)
    return model


def bn_node(x="h", y="y", **attrs):
    return helper.make_node("BatchNormalization", [x, *BN_INPUTS], [y], name="bn", **attrs)


def conv_model(op="Conv", dims=2, cin=4, cout=6, group=1, k=3, bias=True, stride=1,
               dtype=np.float32, opset=21, seed=0, bn_attrs=None):
    """x -> Conv|ConvTranspose(W[, b]) -> h -> BatchNormalization -> y"""
    rng = np.random.default_rng(seed)
    w_shape = [cout, cin // group] if op == "Conv" else [cin, cout // group]
    inits = {"W": (rng.standard_normal(w_shape + [k] * dims) * 0.3).astype(dtype)}
    if bias:
        inits["b"] = (rng.standard_normal(cout) * 0.2).astype(dtype)
    inits.update(bn_arrays(cout, seed, dtype))
    conv = helper.make_node(op, ["x", "W"] + (["b"] if bias else []), ["h"], name="conv",
                            group=group, strides=[stride] * dims)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    x_shape = [2, cin] + [5] * dims
    return make([conv, bn_node(**(bn_attrs or {}))], [("x", elem, x_shape)], [("y", elem, None)],
                inits, opset)


def gemm_model(trans_b=0, alpha=1.0, beta=1.0, c_shape=(5,), opset=21, dtype=np.float32):
    """x[3,4] -> Gemm(B, C) -> h[3,5] -> BatchNormalization -> y"""
    rng = np.random.default_rng(1)
    inits = {"Bw": (rng.standard_normal((5, 4) if trans_b else (4, 5)) * 0.5).astype(dtype)}
    if c_shape is not None:
        inits["C"] = rng.standard_normal(c_shape).astype(dtype)
    inits.update(bn_arrays(5, 1, dtype))
    gemm = helper.make_node("Gemm", ["x", "Bw"] + (["C"] if c_shape is not None else []), ["h"],
                            name="fc", transB=trans_b, alpha=alpha, beta=beta)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    return make([gemm, bn_node()], [("x", elem, [3, 4])], [("y", elem, None)], inits, opset)


def matmul_model(x_shape=(3, 4), add_bias=None, bias_first=False, opset=21):
    """x -> MatMul(W[4,5]) [-> Add(c)] -> h -> BatchNormalization -> y"""
    rng = np.random.default_rng(2)
    inits = {"W": (rng.standard_normal((4, 5)) * 0.5).astype(np.float32), **bn_arrays(5, 2)}
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm" if add_bias is not None else "h"], name="mm")]
    if add_bias is not None:
        inits["c"] = rng.standard_normal(add_bias).astype(np.float32)
        nodes.append(helper.make_node("Add", ["c", "mm"] if bias_first else ["mm", "c"], ["h"], name="add"))
    return make(nodes + [bn_node()], [("x", 1, list(x_shape))], [("y", 1, None)], inits, opset)


def feeds_for(model, seed=7):
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in model.graph.input:
        if i.name in {t.name for t in model.graph.initializer}:
            continue
        dims = [d.dim_value for d in i.type.tensor_type.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
        feeds[i.name] = rng.standard_normal(dims).astype(dtype)
    return feeds


def run_reference(model, feeds):
    """onnx's reference evaluator: for opsets newer than onnxruntime knows."""
    from onnx.reference import ReferenceEvaluator

    names = [o.name for o in model.graph.output]
    return dict(zip(names, ReferenceEvaluator(model).run(None, feeds)))


def fold(model, **options):
    result = PASS.run(model, PassContext(options=options))
    return result


def assert_folds(model, rewrites=1, ops=None, rtol=1e-4, atol=1e-5, runner=ort_run, feeds=None,
                 allow_notes=False):
    """Run the pass on a copy; check the count, the ops left, the checker and the numbers."""
    feeds = feeds or feeds_for(model)
    want = runner(model, feeds)
    out = copy.deepcopy(model)
    result = fold(out)
    assert result.rewrites == rewrites, result.notes
    assert allow_notes or result.notes == []
    onnx.checker.check_model(out, full_check=True)
    assert allow_notes or "BatchNormalization" not in count_ops(out)
    if ops is not None:
        assert count_ops(out) == ops
    assert [i.name for i in out.graph.input] == [i.name for i in model.graph.input if i.name in feeds] + [
        i.name for i in out.graph.input if i.name not in feeds]
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    assert_close(runner(out, feeds), want, rtol=rtol, atol=atol)
    return out, result


def assert_declines(model, why: str):
    """The must-not-fire twin: no rewrite, a note that says why, the model byte-identical."""
    before = model.SerializeToString()
    result = fold(model)
    assert result.rewrites == 0
    assert len(result.notes) == 1 and why in result.notes[0], result.notes
    assert result.notes[0].startswith("skipped bn: ")
    assert model.SerializeToString() == before


# ---- Conv / ConvTranspose ------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    dict(dims=1), dict(dims=2), dict(dims=3), dict(group=2), dict(cin=6, cout=6, group=6),
    dict(bias=False), dict(stride=2, k=1), dict(cin=4, cout=12, group=4, bias=False),
], ids=["conv1d", "conv2d", "conv3d", "groups", "depthwise", "no-bias", "stride-1x1", "grouped-no-bias"])
def test_conv(kwargs):
    out, result = assert_folds(conv_model(**kwargs), ops={"Conv": 1})
    assert result.details == {"folded_into": {"Conv": 1}}
    assert len(out.graph.node[0].input) == 3  # a bias exists even when the Conv had none


@pytest.mark.parametrize("kwargs", [
    dict(), dict(group=2), dict(cin=6, cout=3, group=3, bias=False), dict(dims=1, stride=2),
    dict(dims=3, group=2, bias=False), dict(cin=4, cout=4, group=4),
], ids=["plain", "groups", "groups-no-bias", "1d-stride", "3d-groups-no-bias", "depthwise"])
def test_conv_transpose(kwargs):
    assert_folds(conv_model("ConvTranspose", **kwargs), ops={"ConvTranspose": 1})


def test_conv_output_with_two_consumers_is_skipped():
    model = conv_model()
    model.graph.node.append(helper.make_node("Relu", ["h"], ["r"]))
    model.graph.output.append(helper.make_tensor_value_info("r", 1, None))
    assert_declines(model, "Conv output has 2 consumers")


def test_conv_transpose_output_that_is_a_graph_output_is_skipped():
    model = conv_model("ConvTranspose", group=2)
    model.graph.output.append(helper.make_tensor_value_info("h", 1, None))
    assert_declines(model, "ConvTranspose output is a graph output")


def test_conv_weight_that_is_a_graph_input_is_skipped():
    model = conv_model()
    w = [t for t in model.graph.initializer if t.name == "W"][0]
    model.graph.input.append(helper.make_tensor_value_info("W", 1, list(w.dims)))
    model.graph.initializer.remove(w)
    assert_declines(model, "Conv weight is not a constant")


def test_bn_channels_that_do_not_match_the_conv_are_skipped():
    model = conv_model(cout=1)
    model.graph.node[0].CopyFrom(helper.make_node("Conv", ["x", "W"], ["h"], name="conv"))
    for t in model.graph.initializer:  # BN sized 2 after a 1-channel Conv: no valid fold
        if t.name in BN_INPUTS:
            t.CopyFrom(numpy_helper.from_array(np.ones(2, np.float32), t.name))
    assert_declines(model, "BN or bias length does not match the 1 output channels of Conv")


def test_sites_name_the_tensors_around_each_fold():
    model = conv_model()
    model.graph.node.insert(0, helper.make_node("Relu", ["x"], ["rx"]))
    model.graph.node[1].input[0] = "rx"
    result = fold(model)
    assert result.sites == [(["rx"], ["y"])]


def test_one_bn_folds_and_another_is_skipped_in_the_same_graph():
    model = conv_model()
    model.graph.node.append(helper.make_node("Relu", ["y"], ["r"]))
    model.graph.node.append(helper.make_node("BatchNormalization", ["r", *BN_INPUTS], ["y2"], name="bn2"))
    model.graph.output[0].name = "y2"
    with_output_shapes(model)
    out, result = assert_folds(model, ops={"Conv": 1, "Relu": 1, "BatchNormalization": 1}, allow_notes=True)
    assert result.notes == ["skipped bn2: input comes from Relu, not Conv/ConvTranspose/Gemm/MatMul"]


def test_sharing_is_reported_before_constness():
    model = conv_model()
    model.graph.initializer.remove([t for t in model.graph.initializer if t.name == "scale"][0])
    model.graph.input.append(helper.make_tensor_value_info("scale", 1, [6]))
    model.graph.output.append(helper.make_tensor_value_info("h", 1, None))
    assert_declines(model, "Conv output is a graph output")


# ---- Gemm / MatMul -------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    dict(), dict(trans_b=1), dict(alpha=0.5, beta=2.0), dict(trans_b=1, alpha=1.5, beta=0.25),
    dict(c_shape=None), dict(c_shape=(1, 5)), dict(c_shape=(3, 5)), dict(c_shape=(3, 1)), dict(c_shape=()),
    dict(beta=0.0), dict(c_shape=None, opset=11), dict(opset=7, c_shape=(5,)),
], ids=["plain", "transB", "alpha-beta", "transB-alpha-beta", "no-C", "C-1xN", "C-MxN", "C-Mx1",
        "C-scalar", "beta-0", "no-C-opset11", "opset7"])
def test_gemm(kwargs):
    out, _ = assert_folds(gemm_model(**kwargs), ops={"Gemm": 1})
    gemm = out.graph.node[0]
    assert helper.get_attribute_value([a for a in gemm.attribute if a.name == "beta"][0]) == 1.0


def test_gemm_whose_columns_do_not_match_the_bn_is_skipped():
    model = gemm_model(trans_b=1)  # B [5, 4] read as transB=0: 4 output columns for 5 BN channels
    model.graph.node[0].attribute.remove([a for a in model.graph.node[0].attribute if a.name == "transB"][0])
    assert_declines(model, "BN length 5 does not match Gemm B of shape [5, 4]")


def test_gemm_with_c_from_a_graph_input_is_skipped():
    model = gemm_model()
    model.graph.initializer.remove([t for t in model.graph.initializer if t.name == "C"][0])
    model.graph.input.append(helper.make_tensor_value_info("C", 1, [5]))
    assert_declines(model, "Gemm C is not a constant")


@pytest.mark.parametrize("kwargs", [dict(), dict(add_bias=(5,)), dict(add_bias=(1, 5), bias_first=True),
                                    dict(add_bias=())],
                         ids=["matmul", "matmul-add", "add-bias-first", "add-scalar"])
def test_matmul_becomes_gemm(kwargs):
    out, result = assert_folds(matmul_model(**kwargs), ops={"Gemm": 1})
    assert result.details == {"folded_into": {"MatMul": 1}}
    assert out.graph.node[0].name == "mm" and out.graph.node[0].doc_string == "onnx_normfix:fold_bn"


def test_matmul_of_rank_3_is_skipped():
    # BatchNorm1d on [N, L, C]: the BN axis is L, not the MatMul's output features.
    model = matmul_model(x_shape=(2, 5, 4))
    for t in model.graph.initializer:
        if t.name in BN_INPUTS:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t)[:5], t.name))
    assert_declines(model, "MatMul input rank is 3, not 2")


def test_matmul_of_unknown_rank_is_skipped():
    model = matmul_model()
    model.graph.input[0].type.tensor_type.ClearField("shape")
    assert_declines(model, "MatMul input rank is unknown, not 2")


def test_matmul_of_two_activations_is_skipped():
    model = matmul_model()
    model.graph.initializer.remove([t for t in model.graph.initializer if t.name == "W"][0])
    model.graph.input.append(helper.make_tensor_value_info("W", 1, [4, 5]))
    assert_declines(model, "MatMul weight is not a constant")


def test_add_of_two_activations_is_skipped():
    model = matmul_model(add_bias=(5,))
    model.graph.initializer.remove([t for t in model.graph.initializer if t.name == "c"][0])
    model.graph.input.append(helper.make_tensor_value_info("c", 1, [3, 5]))
    assert_declines(model, "input comes from an Add that is not MatMul + constant")


def test_matmul_feeding_add_and_another_node_is_skipped():
    model = matmul_model(add_bias=(5,))
    model.graph.output.append(helper.make_tensor_value_info("mm", 1, None))
    assert_declines(model, "MatMul output is a graph output")


# ---- where parameters come from ------------------------------------------------------------
def test_parameters_from_constant_nodes():
    model = conv_model()
    consts = []
    for t in list(model.graph.initializer):  # every parameter becomes a Constant node
        consts.append(helper.make_node("Constant", [], [t.name], value=t))
        model.graph.initializer.remove(t)
    model.graph.node.insert(0, consts[0])
    for n in consts[1:]:
        model.graph.node.insert(0, n)
    out, _ = assert_folds(model, ops={"Conv": 1})
    assert {t.name for t in out.graph.initializer} == {"conv_W", "conv_B"}


def test_parameters_from_a_constant_subgraph():
    # scale = ConstantOfShape(Shape(mean)) * 1.5 ; conv bias = Cast(b64) ; var = Identity(var0)
    model = conv_model()
    inits = {t.name: t for t in model.graph.initializer}
    inits["var"].name = "var0"
    b = inits["b"]
    b.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(b).astype(np.float64), "b64"))
    model.graph.initializer.remove(inits["scale"])
    model.graph.initializer.append(numpy_helper.from_array(np.array(1.5, np.float32), "k"))
    pre = [
        helper.make_node("Shape", ["mean"], ["mean_shape"]),
        helper.make_node("ConstantOfShape", ["mean_shape"], ["ones"],
                         value=numpy_helper.from_array(np.ones(1, np.float32))),
        helper.make_node("Mul", ["ones", "k"], ["scale"]),
        helper.make_node("Cast", ["b64"], ["b"], to=TensorProto.FLOAT),
        helper.make_node("Identity", ["var0"], ["var"]),
    ]
    for n in reversed(pre):
        model.graph.node.insert(0, n)
    out, _ = assert_folds(model, ops={"Conv": 1})
    assert len(out.graph.initializer) == 2  # the subgraph and its inputs are swept


def test_non_constant_bn_scale_is_skipped():
    model = conv_model()
    model.graph.initializer.remove([t for t in model.graph.initializer if t.name == "scale"][0])
    model.graph.input.append(helper.make_tensor_value_info("scale", 1, [6]))
    assert_declines(model, "scale, B, mean or var is not a constant")


def test_scale_from_a_random_op_is_skipped():
    model = conv_model()
    model.graph.initializer.remove([t for t in model.graph.initializer if t.name == "scale"][0])
    model.graph.node.insert(0, helper.make_node("RandomUniform", [], ["scale"], shape=[6]))
    assert_declines(model, "scale, B, mean or var is not a constant")


def ir3(model):
    """Old IR-3 layout: every initializer is listed as a graph input too."""
    model.ir_version = 3
    for t in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return model


def test_ir3_model_initializers_listed_as_inputs_are_constants():
    model = ir3(conv_model(bias=False, opset=7))
    out, _ = assert_folds(model, ops={"Conv": 1}, feeds={"x": feeds_for(conv_model())["x"]})
    inits = {t.name for t in out.graph.initializer}
    assert inits == {"W", "conv_B"} and {i.name for i in out.graph.input} == inits | {"x"}


def test_ir3_model_with_a_real_weight_input_is_skipped():
    model = ir3(conv_model(bias=False, opset=7))
    model.graph.initializer.remove([t for t in model.graph.initializer if t.name == "W"][0])
    assert_declines(model, "Conv weight is not a constant")


def test_shared_weight_is_copied_and_the_other_user_untouched():
    model = conv_model()
    model.graph.node.append(helper.make_node("Conv", ["x", "W", "b"], ["z"], name="other"))
    model.graph.output.append(helper.make_tensor_value_info("z", 1, None))
    with_output_shapes(model)
    original = {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}
    out, _ = assert_folds(model, ops={"Conv": 2})
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    other = [n for n in out.graph.node if n.name == "other"][0]
    assert list(other.input) == ["x", "W", "b"]
    np.testing.assert_array_equal(inits["W"], original["W"])
    np.testing.assert_array_equal(inits["b"], original["b"])
    assert list(out.graph.node[0].input) == ["x", "conv_W", "conv_B"]


def test_weight_shared_by_two_folds_gives_two_copies():
    model = conv_model()
    model.graph.node.append(helper.make_node("Conv", ["x", "W", "b"], ["h2"], name="conv2"))
    model.graph.node.append(helper.make_node("BatchNormalization", ["h2", *BN_INPUTS], ["y2"], name="bn2"))
    model.graph.output.append(helper.make_tensor_value_info("y2", 1, None))
    with_output_shapes(model)
    out, _ = assert_folds(model, rewrites=2, ops={"Conv": 2})
    assert {t.name for t in out.graph.initializer} == {"conv_W", "conv_B", "conv2_W", "conv2_B"}


def test_unshared_weight_is_replaced_in_place():
    out, _ = assert_folds(conv_model(), ops={"Conv": 1})
    assert [t.name for t in out.graph.initializer] == ["W", "b"]
    assert list(out.graph.node[0].output) == ["y"]


def test_one_initializer_as_both_gemm_b_and_c_is_not_overwritten_twice():
    model = gemm_model(c_shape=(4, 5))  # x [3, 4]: C of shape [4, 5] broadcasts only if M = 4
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    model.graph.node[0].input[2] = "Bw"
    model.graph.initializer.remove([t for t in model.graph.initializer if t.name == "C"][0])
    model.graph.output[0].type.tensor_type.ClearField("shape")
    out, _ = assert_folds(with_output_shapes(model), ops={"Gemm": 1})
    assert list(out.graph.node[0].input) == ["x", "fc_B", "Bw"]  # Bw now only holds C


def test_bias_of_another_dtype_is_never_overwritten_with_mismatched_bytes():
    # An (invalid) float64 bias beside a float32 weight: the folded bias must be a new
    # float32 initializer, not float32 bytes under a double tensor header.
    model = conv_model()
    b = [t for t in model.graph.initializer if t.name == "b"][0]
    b.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(b).astype(np.float64), "b"))
    assert fold(model).rewrites == 1
    inits = {t.name: t for t in model.graph.initializer}
    assert "b" not in inits and inits["conv_B"].data_type == TensorProto.FLOAT
    onnx.checker.check_model(model, full_check=True)


# ---- BN attributes and outputs -------------------------------------------------------------
def test_training_mode_is_skipped():
    assert_declines(conv_model(opset=15, bn_attrs={"training_mode": 1}), "training_mode=1")


def test_training_mode_0_folds():
    assert_folds(conv_model(opset=15, bn_attrs={"training_mode": 0}))


@pytest.mark.parametrize("opset,outputs,why", [
    (9, ["m", "v"], "declares 3 outputs"),
    (9, ["", "", "", ""], "declares 5 outputs (the training form of BN-9)"),
    (7, ["", "", "", ""], "declares 5 outputs (the training form of BN-7)"),
    (15, ["m", "v"], "3 outputs (training statistics are used)"),
])
def test_bn_with_more_than_one_output_is_skipped(opset, outputs, why):
    # Before opset 14 the spec tells the modes apart by the output count alone, so even empty
    # extra outputs mean training (onnxruntime 1.31 segfaults on that BN-9 form).
    model = conv_model(opset=opset)
    model.graph.node[1].output.extend(outputs)
    assert_declines(model, why)


def test_bn15_with_empty_optional_outputs_folds():
    model = conv_model(opset=15, bn_attrs={"training_mode": 0})
    model.graph.node[1].output.extend(["", ""])
    # onnxruntime rejects empty optional BN outputs outright; onnx's evaluator runs BN-15.
    assert_folds(model, runner=run_reference)


def test_spatial_0_is_skipped():
    assert_declines(conv_model(opset=7, bn_attrs={"spatial": 0}), "spatial=0")


def test_spatial_1_folds():
    assert_folds(conv_model(opset=7, bn_attrs={"spatial": 1, "epsilon": 1e-3}))


def test_bn_after_relu_or_on_a_graph_input_is_skipped():
    model = conv_model()
    model.graph.node[0].CopyFrom(helper.make_node("Relu", ["x"], ["h"]))
    assert_declines(model, "input comes from Relu")
    model = conv_model()
    model.graph.node[1].input[0] = "x"
    del model.graph.node[0]
    assert_declines(model, "input is a graph input")


@pytest.mark.parametrize("opset", [7, 9, 14, 15, 22, 26])
def test_opsets(opset):
    assert_folds(conv_model(opset=opset, bn_attrs={"epsilon": 1e-2}), ops={"Conv": 1})


def test_newest_opset_with_the_reference_evaluator():
    # onnxruntime lags behind onnx's newest opset; onnx's own evaluator checks the numbers.
    assert_folds(conv_model(opset=NEWEST, group=2), runner=run_reference)
    assert_folds(gemm_model(trans_b=1, opset=NEWEST), runner=run_reference)


def test_opset_6_is_skipped():
    model = conv_model(opset=6)
    assert_declines(model, "opset 6 < 7")


# ---- fp16 / bf16 ---------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["Conv", "ConvTranspose"])
def test_fp16(op):
    # Both sides round to fp16 (unit roundoff 2^-11 = 4.9e-4): the reference rounds the Conv
    # output and again after BN, the folded model rounds the folded weights and bias once.
    # |y| reaches ~4 where one fp16 ulp is 2^-9 ~ 2e-3; measured: 1 ulp. Allowed: 2 ulps.
    out, _ = assert_folds(conv_model(op, dtype=np.float16, opset=15, group=2), rtol=2e-3, atol=4e-3)
    assert {t.data_type for t in out.graph.initializer} == {TensorProto.FLOAT16}


def test_fp16_weight_folds_in_float64():
    model = conv_model(dtype=np.float16, opset=15)
    arrays = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    out, _ = assert_folds(model, rtol=2e-3, atol=4e-3)
    s = arrays["scale"] / np.sqrt(arrays["var"] + 1e-5)
    want = (arrays["W"] * s[:, None, None, None]).astype(np.float16)
    np.testing.assert_array_equal(numpy_helper.to_array(out.graph.initializer[0]), want)


def test_fp16_conv_output_with_two_consumers_is_skipped():
    model = conv_model(dtype=np.float16, opset=15)
    model.graph.output.append(helper.make_tensor_value_info("h", TensorProto.FLOAT16, None))
    assert_declines(model, "Conv output is a graph output")


def widen_bf16(model):
    """The same model in float32 (bf16 values are exact in float32): onnxruntime has no bf16
    kernels for Conv/Gemm/BN on CPU, so the numbers are checked on the widened model."""
    model = copy.deepcopy(model)
    for t in model.graph.initializer:
        if t.data_type == TensorProto.BFLOAT16:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
    for v in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        if v.type.tensor_type.elem_type == TensorProto.BFLOAT16:
            v.type.tensor_type.elem_type = TensorProto.FLOAT
    return model


@pytest.mark.parametrize("build", [
    lambda: conv_model(dtype=ml_dtypes.bfloat16, opset=22, group=2),
    lambda: conv_model("ConvTranspose", dtype=ml_dtypes.bfloat16, opset=22, bias=False),
    lambda: gemm_model(trans_b=1, beta=0.5, dtype=ml_dtypes.bfloat16, opset=15),
], ids=["conv", "conv-transpose", "gemm"])
def test_bf16(build):
    model = build()
    out = copy.deepcopy(model)
    assert fold(out).rewrites == 1
    onnx.checker.check_model(out, full_check=True)
    assert {t.data_type for t in out.graph.initializer} == {TensorProto.BFLOAT16}
    # bf16 keeps 8 significant bits (unit roundoff 2^-8 = 3.9e-3): each folded weight is off
    # by at most that much relative to the exact product, and those errors partly cancel in
    # the sums. Measured: 1.4e-3 to 1.7e-3 of max|y|; allowed: one unit roundoff of max|y|.
    feeds = {"x": feeds_for(model)["x"].astype(np.float32)}
    want, got = ort_run(widen_bf16(model), feeds)["y"], ort_run(widen_bf16(out), feeds)["y"]
    np.testing.assert_allclose(got, want, rtol=4e-3, atol=4e-3 * np.abs(want).max())


def test_bf16_graph_output_producer_is_skipped():
    model = gemm_model(dtype=ml_dtypes.bfloat16, opset=15)
    model.graph.output.append(helper.make_tensor_value_info("h", TensorProto.BFLOAT16, None))
    assert_declines(model, "Gemm output is a graph output")


# ---- real PyTorch exports ------------------------------------------------------------------
MIX = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}
EXPORTS = {"bn_mix_ts_nofold": MIX, "bn_mix_ts_preserve": MIX, "bn_mix_dynamo": MIX,
           "resnet_tiny_bn": {"Conv": 6}}


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_pytorch_exports_match_pytorch(name):
    model = onnx.load(str(FIXTURES / f"{name}.onnx"))
    x = np.load(FIXTURES / f"{name}_inputs.npz")["x"]
    y = np.load(FIXTURES / f"{name}_torch.npz")["y"]
    bns = count_ops(model)["BatchNormalization"]
    result = fold(model)
    assert result.rewrites == bns == sum(EXPORTS[name].values()) and result.notes == []
    assert result.details == {"folded_into": EXPORTS[name]}
    assert "BatchNormalization" not in count_ops(model)
    onnx.checker.check_model(model, full_check=True)
    np.testing.assert_allclose(ort_run(model, {"x": x})["y"], y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["bn_mix_dynamo", "resnet_tiny_bn"])
def test_optimize_folds_and_validates_against_pytorch(name, tmp_path):
    import onnx_normfix

    result = onnx_normfix.optimize(str(FIXTURES / f"{name}.onnx"), passes=["fold_bn"],
                                   inputs=str(FIXTURES / f"{name}_inputs.npz"),
                                   reference=str(FIXTURES / f"{name}_torch.npz"))
    stage = result.report["passes"][0]
    assert stage["rewrites"] == sum(EXPORTS[name].values()) and stage["notes"] == []
    assert stage["validation"]["status"] == "passed" and stage["validation"]["max_abs_diff"] < 1e-5
    assert result.report["reference"]["status"] == "passed"
    result.save(tmp_path / "out.onnx")
    assert "BatchNormalization" not in count_ops(onnx.load(str(tmp_path / "out.onnx")))


def test_optimize_reports_why_a_bn_stayed():
    import onnx_normfix

    model = conv_model()
    model.graph.output.append(helper.make_tensor_value_info("h", 1, None))
    stage = onnx_normfix.optimize(with_output_shapes(model), passes=["fold_bn"]).report["passes"][0]
    assert stage["rewrites"] == 0
    assert stage["notes"] == ["skipped bn: Conv output is a graph output"]


def test_cli_demo_command(tmp_path):
    import json
    import subprocess
    import sys

    out, report = tmp_path / "resnet_folded.onnx", tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "onnx_normfix", str(FIXTURES / "resnet_tiny_bn.onnx"), str(out),
         "--passes", "fold_bn", "--inputs", str(FIXTURES / "resnet_tiny_bn_inputs.npz"),
         "--reference", str(FIXTURES / "resnet_tiny_bn_torch.npz"), "--report", str(report)],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    stage = json.loads(report.read_text())["passes"][0]
    assert stage["name"] == "fold_bn" and stage["rewrites"] == 6
    assert count_ops(onnx.load(str(out))) == {"Conv": 6, "Relu": 5, "Add": 2, "GlobalAveragePool": 1,
                                              "Flatten": 1, "Gemm": 1}
