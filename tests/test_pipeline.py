"""The library API: optimize(), the registry, and the validator's verdicts."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_normfix as nf
from onnx_normfix import validate as V
from onnx_normfix.registry import PASSES, Pass, PassResult

from conftest import IR_VERSION, conv_bn_model
from helpers import count_ops, ort_run


@pytest.fixture
def temp_pass():
    """Register passes for one test only."""
    added = []

    def add(name, run, preserves=True, **declared):
        added.append(name)
        return nf.register_pass(Pass(name, f"test pass {name}", preserves, run, **declared))

    yield add
    for name in added:
        PASSES.pop(name, None)


def _negate_first_weight(model, ctx):
    """A deliberately wrong rewrite: flips the sign of one output channel."""
    for t in model.graph.initializer:
        if t.name == "conv.weight":
            w = numpy_helper.to_array(t).copy()
            w[0] *= -1
            t.CopyFrom(numpy_helper.from_array(w, t.name))
    return PassResult(rewrites=1, notes=["negated conv.weight[0]"])


def test_optimize_folds_and_reports(conv_bn_file):
    result = nf.optimize(conv_bn_file, passes=["fold_bn"])
    rep = result.report
    assert rep["input"] == str(conv_bn_file)
    assert (rep["nodes_before"], rep["nodes_after"]) == (3, 2)
    (stage,) = rep["passes"]
    assert stage["name"] == "fold_bn" and stage["rewrites"] == 1
    v = stage["validation"]
    # element-wise within rtol 1e-4 on N(0,1) and [0, 255] draws (outputs reach ~1e3 there)
    assert v["status"] == "passed" and v["max_abs_diff"] < 1e-2 and v["outputs"]["y"]["ok"]
    assert set(v["outputs"]) == {"y"} and v["draws"] == 2 and v["feed_shapes"] == {"x": [2, 3, 8, 8]}
    assert count_ops(result.model) == {"Conv": 1, "Relu": 1}


def test_user_model_proto_is_never_modified():
    model = conv_bn_model()
    before = model.SerializeToString()
    result = nf.optimize(model, passes="fold_bn")
    assert model.SerializeToString() == before
    assert result.model is not model and len(result.model.graph.node) == 2


def test_passes_run_in_pipeline_order_whatever_order_they_are_named(temp_pass):
    seen = []
    temp_pass("late_probe", lambda m, c: seen.append("late") or PassResult(), runs_after={"fold_bn"})
    temp_pass("early_probe", lambda m, c: seen.append("early") or PassResult(), runs_before={"fold_bn"})
    rep = nf.optimize(conv_bn_model(), passes=["late_probe", "fold_bn", "early_probe"]).report
    assert [p["name"] for p in rep["passes"]] == ["early_probe", "fold_bn", "late_probe"]
    assert seen == ["early", "late"]


def test_unknown_pass_lists_valid_ones():
    with pytest.raises(nf.NormfixError, match=r"unknown pass 'fold'.*fold_bn"):
        nf.optimize(conv_bn_model(), passes=["fold"])


def test_registering_a_name_twice_is_refused(temp_pass):
    temp_pass("twice", lambda m, c: PassResult())
    with pytest.raises(nf.NormfixError, match="already registered"):
        nf.register_pass(Pass("twice", "again", True, lambda m, c: PassResult()))


def test_unknown_option_and_option_of_unrequested_pass():
    with pytest.raises(nf.NormfixError, match="unknown option 'sead'"):
        nf.optimize(conv_bn_model(), passes=["fold_bn"], sead=1)
    with pytest.raises(nf.NormfixError, match="belongs to pass 'fix_inorm'"):
        nf.optimize(conv_bn_model(), passes=["fold_bn"], stats="x.pt")


def test_validator_fails_a_broken_pass_and_names_output_and_figures(temp_pass):
    temp_pass("negate", _negate_first_weight)
    with pytest.raises(nf.ValidationError) as info:
        nf.optimize(conv_bn_model(), passes=["fold_bn", "negate"])
    err = info.value
    assert err.stage == "negate" and err.exit_code == 1
    assert "'y'" in str(err) and "max abs diff" in str(err)
    assert err.details["outputs"]["y"]["ok"] is False


def test_validator_checks_every_output(temp_pass):
    """Two outputs; the broken pass changes only the second: still caught, on that output."""
    model = conv_bn_model(with_relu=False)
    model.graph.node.append(helper.make_node("Sigmoid", ["x"], ["x_sig"]))
    model.graph.output.append(helper.make_tensor_value_info("x_sig", TensorProto.FLOAT, ["N", 3, 8, 8]))

    def break_second(m, ctx):
        m.graph.node[-1].op_type = "Tanh"
        return PassResult(rewrites=1)

    temp_pass("break_second", break_second)
    with pytest.raises(nf.ValidationError, match="'x_sig'"):
        nf.optimize(model, passes=["break_second"])


def test_output_changing_pass_reports_changed_with_figures(temp_pass):
    temp_pass("negate_on_purpose", _negate_first_weight, preserves=False)
    v = nf.optimize(conv_bn_model(), passes=["negate_on_purpose"]).report["passes"][0]["validation"]
    assert v["status"] == "changed" and v["max_abs_diff"] > 0.1


def test_no_validate_skips_with_reason():
    v = nf.optimize(conv_bn_model(), passes=["fold_bn"], validate=False).report["passes"][0]["validation"]
    assert v["status"] == "skipped" and "disabled" in v["reason"]


def test_pass_that_breaks_loading_is_a_validation_error(temp_pass):
    def unknown_op(m, ctx):
        m.graph.node[-1].op_type = "NoSuchOp"
        return PassResult(rewrites=1)

    temp_pass("unknown_op", unknown_op)
    with pytest.raises(nf.ValidationError, match="unknown_op produced an invalid model"):
        nf.optimize(conv_bn_model(), passes=["unknown_op"])


def test_model_onnxruntime_cannot_run_is_skipped_with_reason():
    """A custom-domain op: fold_bn still folds, onnx.checker still runs, the comparison is
    reported as skipped with onnxruntime's reason instead of crashing."""
    model = conv_bn_model()
    model.graph.node[-1].op_type = "MyRelu"
    model.graph.node[-1].domain = "com.example"
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    rep = nf.optimize(model, passes=["fold_bn"]).report
    v = rep["passes"][0]["validation"]
    assert rep["passes"][0]["rewrites"] == 1
    assert v["status"] == "skipped" and "onnxruntime cannot run" in v["reason"]


def _random_model() -> onnx.ModelProto:
    """x -> Conv -> BN -> Add(RandomNormalLike(x-shaped)) -> y"""
    model = conv_bn_model(with_relu=False)
    model.graph.node[-1].output[0] = "bn_out"
    model.graph.node.extend([
        helper.make_node("RandomNormalLike", ["bn_out"], ["noise"], name="/noise/RandomNormalLike"),
        helper.make_node("Add", ["bn_out", "noise"], ["y"], name="/add/Add"),
    ])
    return model


def test_random_model_compared_on_captured_draws():
    """fold_bn on a model with an unseeded random op: the draws are captured from the
    previous stage and fed to the next, so the comparison is real (and tight)."""
    v = nf.optimize(_random_model(), passes=["fold_bn"]).report["passes"][0]["validation"]
    assert v["status"] == "passed" and v["max_abs_diff"] < 1e-2 and v["outputs"]["y"]["ok"]  # on [0, 255] draws too


def test_random_model_broken_pass_is_caught(temp_pass):
    temp_pass("negate", _negate_first_weight)
    with pytest.raises(nf.ValidationError, match="'y'"):
        nf.optimize(_random_model(), passes=["negate"])


def test_uncontrolled_new_random_op_is_not_reported_equivalent(temp_pass):
    def add_noise(m, ctx):
        relu = m.graph.node[-1]
        relu.output[0] = "pre"
        m.graph.node.extend([helper.make_node("RandomUniformLike", ["pre"], ["u"], high=1e-9),
                             helper.make_node("Add", ["pre", "u"], ["y"])])
        return PassResult(rewrites=1)

    temp_pass("add_noise", add_noise)
    v = nf.optimize(conv_bn_model(), passes=["add_noise"]).report["passes"][0]["validation"]
    assert v["status"] == "skipped" and "random ops not controlled" in v["reason"]


def test_input_shapes_choose_symbolic_dims():
    rep = nf.optimize(conv_bn_model(batch="batch"), passes=["fold_bn"], input_shapes={"batch": 3}).report
    assert rep["passes"][0]["validation"]["outputs"]["y"]["shape"] == [3, 4, 8, 8]
    rep = nf.optimize(conv_bn_model(), passes=["fold_bn"], input_shapes={"x": [2, 3, 8, 8]}).report
    assert rep["passes"][0]["validation"]["outputs"]["y"]["shape"] == [2, 4, 8, 8]


def test_reference_outputs_must_match():
    model = conv_bn_model()
    x = np.random.default_rng(5).standard_normal((2, 3, 8, 8)).astype(np.float32)
    want = ort_run(model, {"x": x})
    rep = nf.optimize(model, passes=["fold_bn"], inputs={"x": x}, reference=want).report
    assert rep["reference"]["status"] == "passed" and rep["reference"]["max_abs_diff"] < 1e-4
    with pytest.raises(nf.ValidationError, match="differs from the reference"):
        nf.optimize(model, passes=["fold_bn"], inputs={"x": x}, reference={"y": want["y"] + 1})
    with pytest.raises(nf.NormfixError, match="needs the inputs"):
        nf.optimize(model, passes=["fold_bn"], reference={"y": want["y"]})


def test_compare_flags_shape_dtype_and_nan_differences():
    a = np.ones((2, 3), np.float32)
    assert V.compare({"o": a}, {"o": a})["ok"]
    assert not V.compare({"o": a}, {"o": np.ones((3, 2), np.float32)})["ok"]
    assert not V.compare({"o": a}, {"o": a.astype(np.float64)})["ok"]
    b = a.copy()
    b[0, 0] = np.nan
    assert not V.compare({"o": a}, {"o": b})["ok"]
    assert V.compare({"o": b}, {"o": b})["ok"]
    near = a + 5e-6
    assert V.compare({"o": a}, {"o": near})["ok"] and not V.compare({"o": a}, {"o": a + 1e-3})["ok"]


def test_saved_result_roundtrips(tmp_path):
    result = nf.optimize(conv_bn_model(), passes=["fold_bn"])
    out = tmp_path / "out.onnx"
    result.save(out)
    loaded = onnx.load(out)
    assert [n.op_type for n in loaded.graph.node] == ["Conv", "Relu"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary file left behind"
    assert loaded.ir_version == IR_VERSION


def _fold_sites_pass(negate: bool):
    """Runs fold_bn, then (optionally) breaks the folded weight; reports fold_bn's sites."""
    def run(model, ctx):
        result = PASSES["fold_bn"].run(model, ctx)
        if negate:
            t = next(t for t in model.graph.initializer if t.name == "conv.weight")
            t.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(t), t.name))
        return result
    return run


@pytest.mark.parametrize("negate", [False, True])
def test_large_graphs_are_checked_at_the_rewrite_sites(monkeypatch, temp_pass, negate):
    import onnx_normfix.pipeline as P

    monkeypatch.setattr(P, "WHOLE_MODEL_NODES", 1)
    temp_pass("fold_sites", _fold_sites_pass(negate))
    if negate:
        with pytest.raises(nf.ValidationError, match="at its rewrite site"):
            nf.optimize(conv_bn_model(), passes=["fold_sites"])
        return
    v = nf.optimize(conv_bn_model(), passes=["fold_sites"]).report["passes"][0]["validation"]
    assert v["status"] == "passed" and v["checks"] == ["checker", "1 rewrite sites"]
    assert v["max_abs_diff"] < 1e-2 and set(v["outputs"]) == {"bn_out"} and v["outputs"]["bn_out"]["draws"] == 2
    # full_validation restores the whole-model comparison
    v = nf.optimize(conv_bn_model(), passes=["fold_sites"], full_validation=True).report["passes"][0]["validation"]
    assert v["checks"] == ["checker", "whole model"]


def _symbolic_batch(model, ctx):
    for vi in list(model.graph.input) + list(model.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_param = "batch"
    return PassResult(rewrites=1)


def test_pass_that_makes_batch_symbolic_is_checked_at_another_batch(temp_pass):
    temp_pass("symbolic_batch", _symbolic_batch)
    v = nf.optimize(conv_bn_model(batch=2), passes=["symbolic_batch"]).report["passes"][0]["validation"]
    assert v["status"] == "passed" and v["checks"][-1] == "batch 4"


def test_symbolic_batch_on_a_model_that_mixes_samples_is_caught(temp_pass):
    """y = relu(bn(conv(x))) + sum over the batch: fine at batch 2, wrong once the batch
    axis is declared free, and the stacked-batch check sees it."""
    model = conv_bn_model(batch=2)
    model.graph.node[-1].output[0] = "r"
    model.graph.node.extend([
        helper.make_node("ReduceSum", ["r", "axis0"], ["s"], keepdims=1),
        helper.make_node("Add", ["r", "s"], ["y"]),
    ])
    model.graph.initializer.append(numpy_helper.from_array(np.array([0], np.int64), "axis0"))
    temp_pass("symbolic_batch", _symbolic_batch)
    with pytest.raises(nf.ValidationError, match=r"at batch 4 \(2 distinct samples\) output 'y' is not the batch-2 outputs of each sample stacked"):
        nf.optimize(model, passes=["symbolic_batch"])


def test_model_that_crashes_onnxruntime_does_not_crash_the_tool():
    """onnxruntime 1.31 segfaults on a BN-9 that declares empty optional outputs. It runs in a
    worker process: the stage is reported skipped with the signal, the fold still happens."""
    model = conv_bn_model(opset=9)
    relu = model.graph.node[-1]
    relu.output[0] = "r"
    model.graph.node.append(helper.make_node(
        "BatchNormalization", ["r", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"],
        ["y", "", "", "", ""], name="/bn2/BatchNormalization"))
    rep = nf.optimize(model, passes=["fold_bn"]).report
    (stage,) = rep["passes"]
    assert stage["rewrites"] == 1 and "declares 5 outputs" in " ".join(stage["notes"])
    assert stage["validation"]["status"] == "skipped"
    assert "crashed" in stage["validation"]["reason"]
    # the worker is back for the next model
    assert nf.optimize(conv_bn_model(), passes=["fold_bn"]).report["passes"][0]["validation"]["status"] == "passed"
