"""The validator's feeds, comparison and controls (issue 9), and the inputs users really bring
(issue 10): each with a case that must be handled and a twin that must still be caught."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_normfix as nf
from onnx_normfix import cli
from onnx_normfix.registry import PASSES, Pass, PassResult
from onnx_normfix.validation import feeds as F
from onnx_normfix.validation.compare import compare as compare_outputs

from conftest import IR_VERSION, conv_bn_model
from helpers import ort_run


@pytest.fixture
def temp_pass():
    added = []

    def add(name, run, preserves=True, order=50, options=None):
        added.append(name)
        return nf.register_pass(Pass(name, f"test pass {name}", preserves, run, order=order, options=options or {}))

    yield add
    for name in added:
        PASSES.pop(name, None)


def _negate_conv(model, ctx):
    t = next(t for t in model.graph.initializer if t.name == "conv.weight")
    t.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(t), t.name))
    return PassResult(rewrites=1)


def _stage(model, passes=("fold_bn",), **options):
    return nf.optimize(model, passes=list(passes), **options).report["passes"][0]["validation"]


def _gan_like(downsamples: int, unpadded: bool = True):
    """x[N,3,H,W] -> [Conv 4x4 stride 2 pad 1 -> BN -> Relu] * downsamples -> [Conv 3x3 no pad] -> y"""
    rng = np.random.default_rng(0)
    nodes, inits, x, c = [], [], "x", 3
    for k in range(downsamples):
        w = f"w{k}"
        inits += [numpy_helper.from_array(rng.standard_normal((8, c, 4, 4)).astype(np.float32) * 0.2, w)]
        inits += [numpy_helper.from_array(v.astype(np.float32), f"bn{k}.{n}") for n, v in
                  [("s", rng.uniform(0.5, 2, 8)), ("b", rng.standard_normal(8)), ("m", rng.standard_normal(8)),
                   ("v", rng.uniform(0.5, 2, 8))]]
        nodes += [helper.make_node("Conv", [x, w], [f"c{k}"], strides=[2, 2], pads=[1, 1, 1, 1]),
                  helper.make_node("BatchNormalization", [f"c{k}"] + [f"bn{k}.{n}" for n in "sbmv"], [f"n{k}"]),
                  helper.make_node("Relu", [f"n{k}"], [f"r{k}"])]
        x, c = f"r{k}", 8
    inits.append(numpy_helper.from_array(rng.standard_normal((2, c, 3, 3)).astype(np.float32), "wl"))
    nodes.append(helper.make_node("Conv", [x, "wl"], ["y"], pads=[0, 0, 0, 0] if unpadded else [1, 1, 1, 1]))
    g = helper.make_graph(nodes, "gan", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, None, None])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = IR_VERSION
    return m


# ---- 1. feed shapes ----------------------------------------------------------------------
@pytest.mark.parametrize("downsamples", [1, 3, 5])
def test_symbolic_height_and_width_run_and_exercise_every_conv(downsamples):
    """Fed as 1 (the old default), every one of these stops onnxruntime; now H and W are
    doubled from 8 until the last conv sees more than its kernel centre."""
    v = _stage(_gan_like(downsamples))
    assert v["status"] == "passed"
    n, c, h, w = v["feed_shapes"]["x"]
    assert n == 2 and c == 3 and h == w and h >> downsamples >= 3  # the unpadded 3x3 conv runs
    assert h >> downsamples <= 6  # and the search stopped at the first size that does


def test_padded_conv_after_downsampling_sees_more_than_its_centre():
    n, c, h, w = _stage(_gan_like(4, unpadded=False))["feed_shapes"]["x"]
    assert h >> 4 >= 2


def test_real_torch_export_with_dynamic_height_and_width(tmp_path):
    torch = pytest.importorskip("torch")

    class G(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(
                torch.nn.Conv2d(3, 8, 7, padding=3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                torch.nn.Conv2d(8, 16, 4, stride=2, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                torch.nn.Conv2d(16, 16, 4, stride=2, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                torch.nn.Conv2d(16, 4, 3))

        def forward(self, x):
            return self.body(x)

    torch.manual_seed(0)
    model = G().eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    path = tmp_path / "g.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, 32, 32),), str(path), dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "N", 2: "H", 3: "W"}, "y": {0: "N", 2: "h", 3: "w"}},
                      do_constant_folding=False)
    out = tmp_path / "o.onnx"
    assert cli.main([str(path), str(out), "--passes", "fold_bn", "-q"]) == 0
    result = nf.optimize(str(path), passes=["fold_bn"])
    v = result.report["passes"][0]["validation"]
    assert v["status"] == "passed" and v["feed_shapes"]["x"][0] == 2 and v["feed_shapes"]["x"][2] >= 16
    x = np.random.default_rng(0).standard_normal(v["feed_shapes"]["x"]).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ort_run(result.model, {"x": x})["y"], want, rtol=1e-4, atol=1e-4)


def test_user_shapes_win():
    v = _stage(_gan_like(1), input_shapes={"H": 12, "W": 20})
    assert v["feed_shapes"]["x"] == [2, 3, 12, 20]
    v = _stage(_gan_like(1), input_shapes={"x": [1, 3, 10, 10]})
    assert v["feed_shapes"]["x"] == [1, 3, 10, 10]


@pytest.mark.parametrize("bad", [{"X": [1, 3, 8, 8]}, {"height": 8}])
def test_input_shape_naming_nothing_is_an_error_listing_the_real_names(bad, tmp_path, capsys):
    with pytest.raises(nf.NormfixError, match=r"neither an input nor a symbolic dim; inputs: x \[N, 3, H, W\]; "
                                              r"symbolic dims: N, H, W"):
        _stage(_gan_like(1), input_shapes=bad)
    src = tmp_path / "g.onnx"
    onnx.save(_gan_like(1), src)
    (name, value), = bad.items()
    flag = f"{name}:{'x'.join(map(str, np.ravel(value)))}"
    assert cli.main([str(src), str(tmp_path / "o.onnx"), "--input-shape", flag]) == 2
    assert "symbolic dims: N, H, W" in capsys.readouterr().err


def test_input_shapes_of_the_right_name_still_work():
    assert _stage(conv_bn_model(batch="batch"), input_shapes={"batch": 3})["feed_shapes"]["x"] == [3, 3, 8, 8]


def test_no_shape_works_names_dims_shapes_tried_and_the_flag(temp_pass):
    """Reshape to [7, -1]: only a batch that is a multiple of 7 runs."""
    g = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["r"]), helper.make_node("Relu", ["r"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [7, None])],
                          [numpy_helper.from_array(np.array([7, -1], np.int64), "shape")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = IR_VERSION
    with pytest.raises(nf.NormfixError) as info:
        _stage(model)
    msg = str(info.value)
    assert "symbolic dims N" in msg and "x 2x5; x 1x5" in msg and "--input-shape" in msg
    assert not isinstance(info.value, nf.ValidationError)
    # the twin: the shape the user gives is taken, and it runs

    def relu_to_max(m, ctx):
        relu = m.graph.node[-1]
        m.graph.initializer.append(numpy_helper.from_array(np.float32(0), "zero"))
        relu.op_type, relu.input[:] = "Max", [relu.input[0], "zero"]
        return PassResult(rewrites=1)

    temp_pass("relu_to_max", relu_to_max)
    v = _stage(model, passes=["relu_to_max"], input_shapes={"N": 7})
    assert v["status"] == "passed" and v["feed_shapes"]["x"] == [7, 5]


def test_summary_and_report_name_the_feed_shapes(tmp_path, capsys):
    src, report = tmp_path / "g.onnx", tmp_path / "r.json"
    onnx.save(_gan_like(1), src)
    assert cli.main([str(src), str(tmp_path / "o.onnx"), "--report", str(report)]) == 0
    assert ("validation: whole model at x:2x3x8x8 (seed 0, 2 draws, and 1 at x:3x3x16x16) after fold_bn"
            in capsys.readouterr().out)
    import json

    v = json.loads(report.read_text())["passes"][0]["validation"]
    assert v["feed_shapes"] == {"x": [2, 3, 8, 8]} and v["draws"] == 2 and v["second_shape"] == {"x": [3, 3, 16, 16]}


# ---- 2. feed values ---------------------------------------------------------------------
def test_draws_cover_two_float_ranges_whole_gather_axes_and_bools_both_ways():
    g = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["e"], axis=0),
                           helper.make_node("Cast", ["flag"], ["f"], to=TensorProto.FLOAT),
                           helper.make_node("Add", ["x", "f"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64]),
                           helper.make_tensor_value_info("ids", TensorProto.INT64, [512]),
                           helper.make_tensor_value_info("k", TensorProto.INT32, [64]),
                           helper.make_tensor_value_info("flag", TensorProto.BOOL, [64])],
                          [helper.make_tensor_value_info("e", TensorProto.FLOAT, [512, 2]),
                           helper.make_tensor_value_info("y", TensorProto.FLOAT, [64])],
                          [numpy_helper.from_array(np.zeros((40, 2), np.float32), "table")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    d0, d1 = F.make_draws(model, F.plan_shapes(model))
    assert abs(d0["x"].mean()) < 0.5 and d0["x"].min() < 0 and d1["x"].min() >= 0 and d1["x"].max() > 200
    assert d0["ids"].min() == 0 and d0["ids"].max() == 39  # the whole gathered axis
    assert set(np.unique(d0["k"])) <= {0, 1, 2, 3} and len(np.unique(d0["k"])) > 2
    assert np.array_equal(d1["flag"], ~d0["flag"])


def test_each_stage_runs_all_draws_in_one_session(monkeypatch):
    from onnx_normfix.validation import worker

    calls = []
    real = worker._WORKER.run
    monkeypatch.setattr(worker._WORKER, "run", lambda source, feeds: calls.append(len(feeds)) or real(source, feeds))
    nf.optimize(conv_bn_model(), passes=["fold_bn"])
    assert calls == [3, 3]  # the input and the folded stage: one request (one session) each, two draws + second shape


# ---- 3. comparison ----------------------------------------------------------------------
def test_element_wise_comparison_reports_the_worst_element():
    old = np.array([[1000.0, 1.0], [2.0, 3.0]], np.float32)
    new = old.copy()
    new[0, 1] = 1.01
    cmp = compare_outputs({"y": old}, {"y": new})
    e = cmp["outputs"]["y"]
    assert not cmp["ok"] and e["worst"]["index"] == [0, 1] and "worst at [0, 1]" in e["reason"]
    assert e["max_rel_diff"] == pytest.approx(0.01, rel=1e-3)
    # twin: a change within atol + rtol * |old| at every element passes
    assert compare_outputs({"y": old}, {"y": old * (1 + 5e-5)})["ok"]


def test_integer_outputs_must_be_equal_and_say_where():
    cmp = compare_outputs({"i": np.arange(6).reshape(2, 3)}, {"i": np.array([[0, 1, 2], [3, 9, 5]])})
    assert not cmp["ok"] and "first at [1, 1]" in cmp["outputs"]["i"]["reason"]


# ---- issue 10: inputs users really bring ---------------------------------------------
def _with(model, nodes, inputs=(), outputs=(), inits=()):
    model.graph.node.extend(nodes)
    model.graph.input.extend(inputs)
    model.graph.output.extend(outputs)
    model.graph.initializer.extend(inits)
    return model


def _dropout_model(training=True):
    m = conv_bn_model()
    m.graph.node[-1].output[0] = "r"
    return _with(m, [helper.make_node("Dropout", ["r", "ratio", "train"], ["y"])],
                 inits=[numpy_helper.from_array(np.float32(0.3), "ratio"), numpy_helper.from_array(np.array(training), "train")])


@pytest.mark.parametrize("training", [True, False])
def test_training_mode_dropout_is_a_controlled_random_op(training, temp_pass):
    v = _stage(_dropout_model(training))
    assert v["status"] == "passed" and v["outputs"]["y"]["ok"]
    temp_pass("negate", _negate_conv)
    with pytest.raises(nf.ValidationError, match="'y'"):  # the mask is fed, y still recomputed from x
        nf.optimize(_dropout_model(training), passes=["negate"])


def test_rank0_bool_input_is_drawn_both_ways(temp_pass):
    def model():
        m = conv_bn_model()
        m.graph.node[-1].output[0] = "r"
        return _with(m, [helper.make_node("Neg", ["r"], ["nr"]), helper.make_node("Where", ["flag", "r", "nr"], ["y"])],
                     inputs=[helper.make_tensor_value_info("flag", TensorProto.BOOL, [])])

    assert _stage(model())["status"] == "passed"

    def assume_true(m, ctx):  # a wrong "constant fold" of the flag: right only when it is True
        where = m.graph.node[-1]
        m.graph.node.remove(where)
        m.graph.node.append(helper.make_node("Identity", ["r"], ["y"]))
        return PassResult(rewrites=1)

    temp_pass("assume_true", assume_true)
    with pytest.raises(nf.ValidationError, match="'y'"):
        nf.optimize(model(), passes=["assume_true"])


def _string_model():
    return _with(conv_bn_model(), [helper.make_node("Identity", ["txt"], ["txt_out"])],
                 inputs=[helper.make_tensor_value_info("txt", TensorProto.STRING, ["N"])],
                 outputs=[helper.make_tensor_value_info("txt_out", TensorProto.STRING, ["N"])])


def test_string_input_is_skipped_with_an_actionable_reason_or_fed_from_inputs(tmp_path, temp_pass):
    v = _stage(_string_model())
    assert v["status"] == "skipped" and "string tensor" in v["reason"] and "--inputs" in v["reason"]
    # the hint can be followed: string arrays through the library and through --inputs
    assert _stage(_string_model(), inputs={"txt": np.array(["a", "bb"])})["status"] == "passed"
    src, npz = tmp_path / "s.onnx", tmp_path / "in.npz"
    onnx.save(_string_model(), src)
    np.savez(npz, txt=np.array(["a", "bb", "c"]))
    assert cli.main([str(src), str(tmp_path / "o.onnx"), "--inputs", str(npz), "-q"]) == 0
    temp_pass("negate", _negate_conv)
    with pytest.raises(nf.ValidationError):
        nf.optimize(_string_model(), passes=["negate"], inputs={"txt": np.array(["a", "bb"])})


def test_input_with_a_zero_dim(temp_pass):
    def model():
        return _with(conv_bn_model(), [helper.make_node("Relu", ["e"], ["e_out"])],
                     inputs=[helper.make_tensor_value_info("e", TensorProto.FLOAT, [0, 4])],
                     outputs=[helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [0, 4])])

    v = _stage(model())
    assert v["status"] == "passed" and v["feed_shapes"]["e"] == [0, 4] and v["outputs"]["e_out"]["shape"] == [0, 4]
    temp_pass("negate", _negate_conv)
    with pytest.raises(nf.ValidationError, match="'y'"):
        nf.optimize(model(), passes=["negate"])


def _sequence_model():
    m = conv_bn_model()
    m.graph.node[-1].output[0] = "r"
    m.graph.output.pop()
    return _with(m, [helper.make_node("SplitToSequence", ["r", "split"], ["seq"], axis=1)],
                 inits=[numpy_helper.from_array(np.array([1, 3], np.int64), "split")],
                 outputs=[helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, None)])


def test_sequence_output_of_unequal_shapes(temp_pass, tmp_path):
    v = _stage(_sequence_model())
    assert v["status"] == "passed" and v["outputs"]["seq"]["kind"] == "sequence" and v["outputs"]["seq"]["length"] == 2
    src = tmp_path / "s.onnx"
    onnx.save(_sequence_model(), src)
    assert cli.main([str(src), str(tmp_path / "o.onnx"), "-q"]) == 0
    temp_pass("negate", _negate_conv)
    with pytest.raises(nf.ValidationError, match="'seq'.*item 0"):
        nf.optimize(_sequence_model(), passes=["negate"])


def _uniform_model(low, high):
    g = helper.make_graph([helper.make_node("RandomUniformLike", ["x"], ["u"], low=low, high=high),
                           helper.make_node("Add", ["x", "u"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = IR_VERSION
    return m


@pytest.mark.parametrize("low, high", [(2.0, 2.0), (-1.0, 3.0)])
def test_random_uniform_like_with_low_equal_high(low, high, temp_pass):
    v = _stage(_uniform_model(low, high), passes=["replace_random"])
    assert v["status"] == "passed" and v["max_abs_diff"] == 0.0

    def shifted(m, ctx):  # replace_random, then the shift off by one
        result = PASSES["replace_random"].run(m, ctx)
        t = next(t for t in m.graph.initializer if t.name.endswith("_add"))
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) + 1, t.name))
        return result

    temp_pass("shifted", shifted)  # reads replace_random's default random_mode
    with pytest.raises(nf.ValidationError, match="'y'"):
        nf.optimize(_uniform_model(low, high), passes=["shifted"])


def test_fp16_is_judged_against_its_own_rounding(temp_pass):
    """Held to float32 tolerances, a legitimate fp16 fold fails a naive element-wise test on
    fp16 rounding; against a float32 computation of the previous stage it is as close as the
    original, so it passes. The fold whose W * s underflows is far further: caught."""
    from test_mutations import fp16_model, naive_fp16_fold

    temp_pass("fp16_fold", naive_fp16_fold)
    v = _stage(fp16_model(gamma=0.7, gain=30.0), passes=["fp16_fold"], rtol=1e-4, atol=1e-5)
    y = v["outputs"]["y"]
    assert v["status"] == "passed" and y["own_rounding"] == "checked"
    assert y["new_vs_float32_max"] <= 2 * y["old_vs_float32_max"] and y["max_abs_diff"] > 1e-5 + 1e-4 * 100
    with pytest.raises(nf.ValidationError, match="further from the float32 reference"):
        _stage(fp16_model(gamma=3e-5, gain=1000.0), passes=["fp16_fold"], rtol=1e-4, atol=1e-5)


def _with_dropout(m):
    """y -> training-mode Dropout(ratio 0.5, unseeded) -> y: a random op after the fold."""
    mul = next(n for n in m.graph.node if n.op_type == "Mul")
    mul.output[0] = "pre_drop"
    m.graph.node.append(helper.make_node("Dropout", ["pre_drop", "ratio", "training"], ["y"]))
    m.graph.initializer.extend([numpy_helper.from_array(np.array(0.5, np.float32), "ratio"),
                                numpy_helper.from_array(np.array(True), "training")])
    m.opset_import[0].version = max(m.opset_import[0].version, 13)
    return m


def test_fp16_with_dropout_is_judged_against_its_own_rounding(temp_pass):
    """Fuzz seeds 10331, 11155, 14133: with a training-mode Dropout in the model, the float32
    reference was never run (random ops), so a legitimate fp16 fold failed the plain test.
    The reference now runs cut like the new stage, fed the previous stage's masks."""
    from test_mutations import fp16_model, naive_fp16_fold

    temp_pass("fp16_fold", naive_fp16_fold)
    v = _stage(_with_dropout(fp16_model(gamma=0.7, gain=30.0)), passes=["fp16_fold"], rtol=1e-4, atol=1e-5)
    y = v["outputs"]["y"]
    assert v["status"] == "passed" and y["own_rounding"] == "checked", v
    assert y["max_abs_diff"] > 1e-5 + 1e-4 * 100  # the plain test alone refuses it
    with pytest.raises(nf.ValidationError, match="further from the float32 reference"):
        _stage(_with_dropout(fp16_model(gamma=3e-5, gain=1000.0)), passes=["fp16_fold"], rtol=1e-4, atol=1e-5)


def _layer_norm_model(offset: float, amp: float):
    """x[2,4,5,5] -> x * amp + offset -> decomposed LayerNorm over W (eps 1e-5) -> affine -> y:
    rows of mean `offset` and spread `amp`, normalized (ill-conditioned for amp << offset)."""
    def c(v, n):
        return numpy_helper.from_array(np.array(v, np.float32), n)
    nodes = [helper.make_node("Mul", ["x", "amp"], ["xa"]), helper.make_node("Add", ["xa", "off"], ["xo"]),
             helper.make_node("ReduceMean", ["xo"], ["m"], axes=[-1]), helper.make_node("Sub", ["xo", "m"], ["d"]),
             helper.make_node("Mul", ["d", "d"], ["sq"]), helper.make_node("ReduceMean", ["sq"], ["v"], axes=[-1]),
             helper.make_node("Add", ["v", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["std"]),
             helper.make_node("Div", ["d", "std"], ["n"]), helper.make_node("Mul", ["n", "g"], ["ng"]),
             helper.make_node("Add", ["ng", "b"], ["y"])]
    g = helper.make_graph(nodes, "ln", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 5, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 5, 5])],
                          [c(amp, "amp"), c(offset, "off"), c(1e-5, "eps"), c([1.2], "g"), c([0.4], "b")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = IR_VERSION
    return m


def test_fp32_is_judged_against_a_float64_reference(temp_pass):
    """Fuzz seed 13264: a LayerNorm fusion of rows with spread 1e-3 around 3 differs from
    the decomposition by ~1e-4 (float32 cancellation, amplified by 1 / std), past fp32's
    plain atol; both are equally far from the float64 truth, so it passes. The same fusion
    with epsilon off by 10% is far further: caught, the plain figures quoted first."""
    v = _stage(_layer_norm_model(3.0, 3e-3), passes=["fuse_norms"])
    y = v["outputs"]["y"]
    assert v["status"] == "passed" and y["own_rounding"] == "checked" and y["reference"] == "float64", v
    assert y["max_abs_diff"] > 5 * 1e-5  # "checked": the plain test alone refused it
    assert y["new_vs_float32_max"] <= 2 * y["old_vs_float32_max"]

    def eps_off(m, ctx):
        result = PASSES["fuse_norms"].run(m, ctx)
        ln = next(n for n in m.graph.node if n.op_type == "LayerNormalization")
        next(a for a in ln.attribute if a.name == "epsilon").f *= 1.1
        return result

    temp_pass("eps_off", eps_off)
    with pytest.raises(nf.ValidationError, match=r"elements outside atol .*; \d+ elements further from the float64"):
        nf.optimize(_layer_norm_model(3.0, 3e-3), passes=["eps_off"])


def test_a_draw_the_input_model_cannot_run_is_dropped_not_refused():
    """floats cast to indices: N(0, 1) draws index a 4-row table, [0, 255] ones do not. The
    model runs on onnxruntime, so the tool accepts it and compares on the draws that run."""
    m = _with(conv_bn_model(), [helper.make_node("Abs", ["k"], ["ka"]), helper.make_node("Cast", ["ka"], ["ki"], to=TensorProto.INT64),
                                helper.make_node("Gather", ["table", "ki"], ["g"], axis=0)],
              inputs=[helper.make_tensor_value_info("k", TensorProto.FLOAT, [3])],
              outputs=[helper.make_tensor_value_info("g", TensorProto.FLOAT, [3, 2])],
              inits=[numpy_helper.from_array(np.zeros((6, 2), np.float32), "table")])
    v = _stage(m)
    assert v["status"] == "passed" and v["draws"] == 1 and "draw 1 (and later) not used" in v["feed_notes"][0]
