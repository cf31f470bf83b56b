"""The validator is tested like a pass: deliberately wrong passes it must catch, correct twins
it must pass.

One wrong pass per class of planted bug that a weaker validator reported `passed` (issue 9):
each must raise ValidationError from the library, exit 1 from the CLI and write nothing. Each
has a correct twin on the same model that must pass, so a validator that refused everything
would fail here too.

    1 conv_taps        padded 3x3 conv, off-centre taps zeroed (symbolic H/W fed as 1 saw only the centre)
    2 gather_rows      embedding rows >= 2 corrupted (integer feeds were {0, 1})
    3 relu6            Relu -> Clip(0, 6) (N(0, 1) feeds never reach 6)
    4 flatten_batch    Flatten -> Reshape([1, -1]) on a symbolic batch (batch fed as 1)
    5 small_scores     boxes ~2000 and scores ~1 in one output, scores zeroed (tolerance of the whole tensor's max)
    6 mixing_batch     batch freed, per-sample norm replaced by one over the batch (batch check stacked one sample twice)
    7 noise_scale      replace_random with a wrong scale its binding inverts (the proof used the binding)
    7b noise_law       replace_random recording uniform noise for a normal op (only the distribution check sees it)
    8 fp16_underflow   fp16 fold whose W * s underflows (N(0, 1) outputs stay below the fp16 atol)
    9 bake_shapes      Shape(x) of symbolic N/H/W -> the constant feed shape (every stage ran at one shape)
"""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_normfix as nf
from onnx_normfix import cli
from onnx_normfix.registry import PASSES, Pass, PassResult

from conftest import IR_VERSION


def _model(nodes, inputs, outputs, inits=(), opset=17):
    g = helper.make_graph(nodes, "mutant", inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], producer_name="tests")
    m.ir_version = IR_VERSION
    return m


def _init(model, name):
    return next(t for t in model.graph.initializer if t.name == name)


def _set(model, name, value):
    _init(model, name).CopyFrom(numpy_helper.from_array(np.asarray(value), name))


def _node(model, op):
    return next(n for n in model.graph.node if n.op_type == op)


# ---- the models ------------------------------------------------------------------------
def conv_model():
    """x[N,3,H,W] -> Conv 3x3 pad 1 -> BN -> y (symbolic H/W, the usual GAN export)"""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.uniform(0.5, 2, 4).astype(np.float32), "s"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "m"),
             numpy_helper.from_array(rng.uniform(0.5, 2, 4).astype(np.float32), "v")]
    return _model([helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
                   helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, "H", "W"])], inits)


def embedding_model():
    """ids[N,S] int64 -> Gather(table[16,4]) -> y"""
    table = np.random.default_rng(2).standard_normal((16, 4)).astype(np.float32)
    return _model([helper.make_node("Gather", ["table", "ids"], ["y"], axis=0)],
                  [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", "S"])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "S", 4])],
                  [numpy_helper.from_array(table, "table")])


def relu_model():
    """x[N,8] -> Relu -> y"""
    return _model([helper.make_node("Relu", ["x"], ["y"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])])


def flatten_model():
    """x[N,3,4,4] -> Flatten -> Relu -> y[N,48]"""
    return _model([helper.make_node("Flatten", ["x"], ["f"], axis=1), helper.make_node("Relu", ["f"], ["y"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 48])])


def detection_model():
    """x[N,4] -> boxes = 100 x + 2000 | scores = Sigmoid(x) -> Concat -> y[N,8]"""
    return _model([helper.make_node("Mul", ["x", "hundred"], ["xm"]), helper.make_node("Add", ["xm", "offset"], ["boxes"]),
                   helper.make_node("Sigmoid", ["x"], ["scores"]),
                   helper.make_node("Concat", ["boxes", "scores"], ["y"], axis=1)],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
                  [numpy_helper.from_array(np.float32(100), "hundred"), numpy_helper.from_array(np.float32(2000), "offset")])


def instance_norm_model():
    """x[1,3,4,4] (fixed batch) -> InstanceNormalization -> y"""
    rng = np.random.default_rng(3)
    return _model([helper.make_node("InstanceNormalization", ["x", "g", "bb"], ["y"], epsilon=1e-5)],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])],
                  [numpy_helper.from_array(rng.uniform(0.5, 2, 3).astype(np.float32), "g"),
                   numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "bb")])


def random_model():
    """x[N,4] -> RandomNormalLike(mean 0.5, scale 3) -> + x -> y"""
    return _model([helper.make_node("RandomNormalLike", ["x"], ["r"], mean=0.5, scale=3.0, name="noise"),
                   helper.make_node("Add", ["x", "r"], ["y"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])


def fp16_model(gamma: float, gain: float):
    """x[1,64,8,8] fp16 -> Conv 3x3 (W ~ 1e-3) -> BN(gamma) -> Mul(gain) -> y, all fp16"""
    rng = np.random.default_rng(4)
    f16 = np.float16
    inits = [numpy_helper.from_array(rng.uniform(1e-3, 2e-3, (8, 64, 3, 3)).astype(f16), "w"),
             numpy_helper.from_array((gamma * rng.uniform(0.8, 1.2, 8)).astype(f16), "s"),
             numpy_helper.from_array((0.1 * rng.standard_normal(8)).astype(f16), "b"),
             numpy_helper.from_array((0.1 * rng.standard_normal(8)).astype(f16), "m"),
             numpy_helper.from_array(rng.uniform(0.8, 1.2, 8).astype(f16), "v"),
             numpy_helper.from_array(np.array(gain, f16), "gain")]
    return _model([helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
                   helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["n"], epsilon=1e-5),
                   helper.make_node("Mul", ["n", "gain"], ["y"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 64, 8, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 8, 8, 8])], inits)


# ---- the passes: wrong and right ---------------------------------------------------------
def zero_off_centre_taps(model, ctx):
    result = PASSES["fold_bn"].run(model, ctx)
    w = numpy_helper.to_array(_init(model, _node(model, "Conv").input[1])).copy()
    centre = w[:, :, 1, 1].copy()
    w[:] = 0
    w[:, :, 1, 1] = centre
    _set(model, _node(model, "Conv").input[1], w)
    return result


def fold_only(model, ctx):
    return PASSES["fold_bn"].run(model, ctx)


def corrupt_rows(model, ctx):
    t = numpy_helper.to_array(_init(model, "table")).copy()
    t[2:] += 0.5
    _set(model, "table", t)
    return PassResult(rewrites=1)


def table_as_constant(model, ctx):
    t = _init(model, "table")
    model.graph.node.insert(0, helper.make_node("Constant", [], ["table"], value=numpy_helper.from_array(numpy_helper.to_array(t), "v")))
    model.graph.initializer.remove(t)
    return PassResult(rewrites=1)


def relu_to_clip6(model, ctx):
    n = _node(model, "Relu")
    model.graph.initializer.extend([numpy_helper.from_array(np.float32(0), "lo"), numpy_helper.from_array(np.float32(6), "hi")])
    n.op_type, n.input[:] = "Clip", [n.input[0], "lo", "hi"]
    return PassResult(rewrites=1)


def relu_to_max0(model, ctx):
    n = _node(model, "Relu")
    model.graph.initializer.append(numpy_helper.from_array(np.float32(0), "zero"))
    n.op_type, n.input[:] = "Max", [n.input[0], "zero"]
    return PassResult(rewrites=1)


def _flatten_to_reshape(shape):
    def run(model, ctx):
        n = _node(model, "Flatten")
        model.graph.initializer.append(numpy_helper.from_array(np.array(shape, np.int64), "flat_shape"))
        n.op_type, n.input[:] = "Reshape", [n.input[0], "flat_shape"]
        del n.attribute[:]
        return PassResult(rewrites=1)
    return run


def zero_scores(model, ctx):
    n = _node(model, "Sigmoid")
    model.graph.initializer.append(numpy_helper.from_array(np.float32(0), "nil"))
    n.op_type, n.input[:] = "Mul", [n.input[0], "nil"]
    return PassResult(rewrites=1)


def sigmoid_by_hand(model, ctx):
    n = _node(model, "Sigmoid")
    k = list(model.graph.node).index(n)
    x, y = n.input[0], n.output[0]
    model.graph.initializer.append(numpy_helper.from_array(np.float32(1), "one"))
    new = [helper.make_node("Neg", [x], ["nx"]), helper.make_node("Exp", ["nx"], ["ex"]),
           helper.make_node("Add", ["ex", "one"], ["den"]), helper.make_node("Div", ["one", "den"], [y])]
    model.graph.node.remove(n)
    for j, m in enumerate(new):
        model.graph.node.insert(k + j, m)
    return PassResult(rewrites=1)


def shape_model():
    """x[N,3,H,W] -> Relu -> Reshape to Shape(x) -> y (a dynamo export's shape arithmetic)"""
    return _model([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Shape", ["x"], ["s"]),
                   helper.make_node("Reshape", ["r", "s"], ["y"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, "H", "W"])])


def _shape_as_constant(value):
    def run(model, ctx):
        n = _node(model, "Shape")
        n.CopyFrom(helper.make_node("Constant", [], [n.output[0]],
                                    value=numpy_helper.from_array(np.array(value, np.int64), n.output[0])))
        return PassResult(rewrites=1)
    return run


def _free_batch(model):
    for vi in list(model.graph.input) + list(model.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_param = "batch"


def free_batch_and_mix(model, ctx):
    """InstanceNormalization -> normalization over (batch, H, W): equal at batch 1 only."""
    _free_batch(model)
    n = _node(model, "InstanceNormalization")
    k = list(model.graph.node).index(n)
    x, g, b, y = n.input[0], n.input[1], n.input[2], n.output[0]
    model.graph.initializer.extend([numpy_helper.from_array(np.float32(1e-5), "eps"),
                                    numpy_helper.from_array(np.array([3, 1, 1], np.int64), "cshape")])
    new = [helper.make_node("ReduceMean", [x], ["mu"], axes=[0, 2, 3], keepdims=1), helper.make_node("Sub", [x, "mu"], ["xc"]),
           helper.make_node("Mul", ["xc", "xc"], ["sq"]), helper.make_node("ReduceMean", ["sq"], ["var"], axes=[0, 2, 3], keepdims=1),
           helper.make_node("Add", ["var", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["sd"]),
           helper.make_node("Div", ["xc", "sd"], ["xn"]), helper.make_node("Reshape", [g, "cshape"], ["g3"]),
           helper.make_node("Reshape", [b, "cshape"], ["b3"]), helper.make_node("Mul", ["xn", "g3"], ["xg"]),
           helper.make_node("Add", ["xg", "b3"], [y])]
    model.graph.node.remove(n)
    for j, m in enumerate(new):
        model.graph.node.insert(k + j, m)
    return PassResult(rewrites=1)


def free_batch_only(model, ctx):
    _free_batch(model)
    return PassResult(rewrites=1)


def wrong_noise_scale(model, ctx):
    """replace_random, then the noise scale doubled, and a binding that inverts the doubled
    scale: fed through its own binding, the rewritten model reproduces every draw exactly."""
    result = PASSES["replace_random"].run(model, ctx)
    mul = next(t for t in model.graph.initializer if t.name.endswith("_mul"))
    _set(model, mul.name, numpy_helper.to_array(mul) * 2)
    for binding in result.input_bindings.values():
        make = binding.make_feed
        binding.make_feed = lambda captured, make=make: (make(captured) / 2).astype(np.float32)
    return result


def replace_random_as_is(model, ctx):
    return PASSES["replace_random"].run(model, ctx)


def wrong_noise_law(model, ctx):
    """replace_random whose metadata calls the noise uniform although the graph treats it as
    N(0, 1): draw for draw the same outputs, but a deployment feeding U[0, 1) gets another model."""
    from onnx_normfix.noise import NOISE_METADATA_KEY

    result = PASSES["replace_random"].run(model, ctx)
    for prop in model.metadata_props:
        if prop.key == NOISE_METADATA_KEY:
            entries = json.loads(prop.value)
            for e in entries:
                e["distribution"] = "uniform"
            prop.value = json.dumps(entries)
    return result


def naive_fp16_fold(model, ctx):
    """Conv + BN -> Conv with W * s and the bias rounded straight to fp16 (no precision guard)."""
    conv, bn = _node(model, "Conv"), _node(model, "BatchNormalization")
    w = numpy_helper.to_array(_init(model, "w")).astype(np.float64)
    s, b, m, v = (numpy_helper.to_array(_init(model, n)).astype(np.float64) for n in "sbmv")
    scale = s / np.sqrt(v + 1e-5)
    _set(model, "w", (w * scale[:, None, None, None]).astype(np.float16))
    model.graph.initializer.append(numpy_helper.from_array((b - m * scale).astype(np.float16), "folded_bias"))
    conv.input.append("folded_bias")
    conv.output[0] = bn.output[0]
    model.graph.node.remove(bn)
    for name in "sbmv":
        model.graph.initializer.remove(_init(model, name))
    return PassResult(rewrites=1)


CASES = {  # name: (model, wrong pass, correct twin, options)
    "conv_taps": (conv_model, zero_off_centre_taps, fold_only, {}),
    "gather_rows": (embedding_model, corrupt_rows, table_as_constant, {}),
    "relu6": (relu_model, relu_to_clip6, relu_to_max0, {}),
    "flatten_batch": (flatten_model, _flatten_to_reshape([1, -1]), _flatten_to_reshape([0, -1]), {}),
    "small_scores": (detection_model, zero_scores, sigmoid_by_hand, {}),
    "mixing_batch": (instance_norm_model, free_batch_and_mix, free_batch_only, {}),
    "noise_scale": (random_model, wrong_noise_scale, replace_random_as_is, {"random_mode": "input"}),
    "noise_law": (random_model, wrong_noise_law, replace_random_as_is, {"random_mode": "input"}),
    "fp16_underflow": (lambda: fp16_model(gamma=3e-5, gain=1000.0), naive_fp16_fold, None, {}),
    "fp16_legit_fold": (lambda: fp16_model(gamma=1.0, gain=1.0), None, naive_fp16_fold, {}),
    # baked: the feed shape; right: Reshape's 0 (copy the dim), valid at every shape
    "bake_shapes": (shape_model, _shape_as_constant([2, 3, 8, 8]), _shape_as_constant([0, 0, 0, 0]), {}),
}


# what each must be caught by (the check that a weaker validator lacked)
CAUGHT_BY = {
    "conv_taps": r"changed output 'y' on draw \d: \d+ of 512 elements",       # 2x4x8x8: H, W = 8, not 1
    "gather_rows": r"changed output 'y' on draw \d",
    "relu6": r"changed output 'y' on draw 1.*became 6",                     # the [0, 255] draw
    "flatten_batch": r"shape \[2, 48\] became \[1, 96\]",                    # batch 2
    "small_scores": r"worst at \[\d, [4-7]\]: 1 became 0",                     # a score, not a box
    "mixing_batch": r"at batch 2 \(2 distinct samples\)",
    "noise_scale": r"changed output 'y'",
    "noise_law": r"does not reproduce the original's output distribution",
    "fp16_underflow": r"further from the float32 reference",
    "bake_shapes": r"pass wrong_bake_shapes: the model no longer runs at x 3x3x16x16, which the previous stage accepts",
}


@pytest.fixture
def registered():
    added = []

    def add(name, run, options):
        added.append(name)
        # the replace_random mutations read replace_random's own option (default "input") from
        # ctx.options; a pass may not declare another pass's option, so none are declared
        assert all(k == "random_mode" and v == "input" for k, v in options.items()), options
        return nf.register_pass(Pass(name, f"mutation {name}", True, run))

    yield add
    for name in added:
        PASSES.pop(name, None)


@pytest.mark.parametrize("case", [k for k, c in CASES.items() if c[1] is not None])
def test_wrong_pass_is_caught_by_the_library_and_the_cli(case, registered, tmp_path):
    make, wrong, _, options = CASES[case]
    registered(f"wrong_{case}", wrong, options)
    with pytest.raises(nf.ValidationError) as info:
        nf.optimize(make(), passes=[f"wrong_{case}"])
    assert info.value.stage == f"wrong_{case}" and info.value.exit_code == 1
    assert re.search(CAUGHT_BY[case], str(info.value)), str(info.value)
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(make(), src)
    assert cli.main([str(src), str(out), "--passes", f"wrong_{case}", "-q"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"], "nothing written"


@pytest.mark.parametrize("case", [k for k, c in CASES.items() if c[2] is not None])
def test_correct_twin_passes(case, registered):
    make, _, right, options = CASES[case]
    registered(f"right_{case}", right, options)
    v = nf.optimize(make(), passes=[f"right_{case}"]).report["passes"][0]["validation"]
    assert v["status"] == "passed", v
    assert "whole model" in v["checks"] and v["draws"] == 2


def test_the_old_validator_would_have_passed_them():
    """Each class escaped the previous validator for the reason named in the docstring; the
    figures here pin those reasons down, so the suite keeps testing what it claims to."""
    from onnx_normfix.validation.feeds import plan_shapes, shape_candidates

    # 1, 4: symbolic H/W and batch are no longer 1
    assert shape_candidates(conv_model())[0].shapes["x"] == (2, 3, 8, 8)
    assert plan_shapes(flatten_model()).shapes["x"][0] == 2
    # 2: Gather indices cover the whole gathered axis
    from onnx_normfix.validation.feeds import make_draws

    (draw,) = make_draws(embedding_model(), plan_shapes(embedding_model(), {"S": 64}), count=1)
    assert draw["ids"].max() == 15
    # 5: scores are judged at their own size, not against the boxes' 2000
    from onnx_normfix.validation.compare import compare

    old = np.array([[2000.0, 1.0]], np.float32)
    assert not compare({"y": old}, {"y": np.array([[2000.0, 0.0]], np.float32)})["ok"]


def test_second_shape_is_reported_and_fixed_shapes_get_none(registered, tmp_path):
    """Chosen symbolic dims: every stage also runs at batch 3 and the next size; given
    shapes (--input-shape) are the user's: no second shape."""
    registered("right_bake", _shape_as_constant([0, 0, 0, 0]), {})
    res = nf.optimize(shape_model(), passes=["right_bake"])
    v = res.report["passes"][0]["validation"]
    assert v["feed_shapes"] == {"x": [2, 3, 8, 8]} and v["second_shape"] == {"x": [3, 3, 16, 16]}, v
    assert v["draws"] == 2 and "feed_notes" not in v
    src, out, rep = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(shape_model(), src)
    assert cli.main([str(src), str(out), "--passes", "right_bake", "-q", "--report", str(rep)]) == 0
    summary = json.loads(rep.read_text())["validation"]["summary"]
    assert "at x:2x3x8x8 (seed 0, 2 draws, and 1 at x:3x3x16x16)" in summary, summary
    v = nf.optimize(shape_model(), passes=["right_bake"],
                    input_shapes={"x": [1, 3, 4, 4]}).report["passes"][0]["validation"]
    assert v["status"] == "passed" and "second_shape" not in v, v


def test_input_that_runs_at_one_shape_only_is_not_refused(registered):
    """x[N,3,H,W] reshaped to a fixed [2, 192]: runs at 2x3x8x8 only. The second shape is
    dropped with a note, and a correct pass still passes on the first one."""
    m = _model([helper.make_node("Reshape", ["x", "shape"], ["f"]), helper.make_node("Relu", ["f"], ["y"])],
               [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 192])],
               [numpy_helper.from_array(np.array([2, 192], np.int64), "shape")])
    registered("right_max0", relu_to_max0, {})
    v = nf.optimize(m, passes=["right_max0"]).report["passes"][0]["validation"]
    assert v["status"] == "passed" and v["draws"] == 2 and "second_shape" not in v, v
    assert any(n.startswith("second shape x 3x3x16x16 not used: the input model fails there") for n in v["feed_notes"]), v
