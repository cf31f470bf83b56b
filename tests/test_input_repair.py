"""Inputs the tool used to refuse or misread although onnxruntime runs them:

- graph inputs/outputs declared without a shape (onnx.checker: "Field 'shape' of 'type' is
  required but missing"): outputs get the inferred shape, the finding is a note, and a pass
  that breaks the model is still caught by the checker;
- an in-memory ModelProto whose external data was not loaded: read from `base_dir`, never
  from the current directory.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_normfix
from onnx_normfix import NormfixError, ValidationError
from onnx_normfix.registry import PASSES

from helpers import count_ops, ort_run


def _conv_bn(shapeless_input=False, shapeless_output=True, cin=3, cout=4, seed=5):
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((cout, cin, 3, 3)) * 0.3).astype(np.float32), "W")]
    for name, v in (("g", rng.uniform(0.5, 1.5, cout)), ("be", rng.standard_normal(cout)),
                    ("mu", rng.standard_normal(cout)), ("var", rng.uniform(0.5, 2, cout))):
        inits.append(numpy_helper.from_array(v.astype(np.float32), name))
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("BatchNormalization", ["c", "g", "be", "mu", "var"], ["y"], name="bn")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, cin, 7, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, cout, 7, 5])
    for vi, bare in ((x, shapeless_input), (y, shapeless_output)):
        if bare:
            vi.type.tensor_type.ClearField("shape")
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _x(cin=3):
    return np.random.default_rng(0).standard_normal((2, cin, 7, 5)).astype(np.float32)


def test_checker_refuses_the_raw_model_but_onnxruntime_runs_it():
    model = _conv_bn(shapeless_input=True)
    with pytest.raises(onnx.checker.ValidationError, match="shape"):
        onnx.checker.check_model(model)
    assert ort_run(model, {"x": _x()})["y"].shape == (2, 4, 7, 5)


def test_output_without_shape_gets_the_inferred_one_and_a_note():
    model = _conv_bn()
    result = onnx_normfix.optimize(model, passes=["fold_bn"])
    assert result.report["passes"][0]["validation"]["status"] == "passed"
    assert any("filled from shape inference: y [2, 4, 7, 5]" in n for n in result.report["notes"])
    assert [d.dim_value for d in result.model.graph.output[0].type.tensor_type.shape.dim] == [2, 4, 7, 5]
    onnx.checker.check_model(result.model, full_check=True)
    np.testing.assert_allclose(ort_run(result.model, {"x": _x()})["y"], ort_run(model, {"x": _x()})["y"],
                               rtol=1e-4, atol=1e-5)


def test_input_without_shape_is_a_note_and_the_model_folds():
    model = _conv_bn(shapeless_input=True, shapeless_output=True)
    result = onnx_normfix.optimize(model, passes=["fold_bn"], input_shapes={"x": [2, 3, 7, 5]})
    entry = result.report["passes"][0]
    assert entry["rewrites"] == 1 and entry["validation"]["status"] == "passed"
    assert any("x, y declared without a shape" in n for n in result.report["notes"]), result.report["notes"]
    assert not result.model.graph.input[0].type.tensor_type.HasField("shape")  # inputs never change


def test_twin_a_shaped_model_has_no_note():
    result = onnx_normfix.optimize(_conv_bn(shapeless_output=False), passes=["fold_bn"])
    assert "notes" not in result.report


@pytest.mark.parametrize("shapeless_input", [False, True])
def test_a_pass_that_breaks_the_checker_still_fails(monkeypatch, shapeless_input):
    real = PASSES["fold_bn"]

    def breaks_the_model(model, ctx):  # a deliberately wrong pass: a node reads what nothing produces
        result = real.run(model, ctx)
        model.graph.node[0].input[0] = "nowhere"
        return result

    monkeypatch.setitem(PASSES, "fold_bn", dataclasses.replace(real, run=breaks_the_model))
    with pytest.raises(ValidationError, match="invalid model"):
        onnx_normfix.optimize(_conv_bn(shapeless_input=shapeless_input), passes=["fold_bn"],
                              input_shapes={"x": [2, 3, 7, 5]})


def test_other_checker_findings_refuse_when_onnxruntime_cannot_run_it_either():
    model = _conv_bn(shapeless_output=False)
    model.graph.node[0].domain = "com.nowhere"  # no opset import for it
    with pytest.raises(NormfixError, match="invalid ONNX model: .*com.nowhere"):
        onnx_normfix.optimize(model, passes=["fold_bn"])


# ---- in-memory protos with external data --------------------------------------------------
@pytest.fixture
def external_model(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    model = _conv_bn(shapeless_output=False, cin=6, cout=5, seed=9)
    on_disk = onnx.ModelProto()
    on_disk.CopyFrom(model)  # onnx.save moves the tensors of what it saves to external data
    onnx.save(on_disk, folder / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    return folder, onnx.load(folder / "m.onnx", load_external_data=False), model


def test_proto_with_unloaded_external_data_needs_base_dir(external_model, tmp_path, monkeypatch):
    folder, proto, _ = external_model
    decoy = tmp_path / "cwd"
    decoy.mkdir()
    (decoy / "weights.bin").write_bytes((folder / "weights.bin").read_bytes()[::-1])  # same name, wrong bytes
    monkeypatch.chdir(decoy)
    with pytest.raises(NormfixError, match="base_dir"):
        onnx_normfix.optimize(proto, passes=["fold_bn"])
    with pytest.raises(NormfixError, match="base_dir"):
        onnx_normfix.optimize(proto, passes=["fold_bn"], validate=False)


def test_proto_with_base_dir_folds_the_real_bytes(external_model, tmp_path, monkeypatch):
    folder, proto, original = external_model
    monkeypatch.chdir(tmp_path)
    result = onnx_normfix.optimize(proto, passes=["fold_bn"], base_dir=folder)
    assert result.report["passes"][0]["rewrites"] == 1
    assert result.report["passes"][0]["validation"]["status"] == "passed"
    out = tmp_path / "out.onnx"
    result.save(out)
    saved = onnx.load(out)
    assert count_ops(saved) == {"Conv": 1}
    np.testing.assert_allclose(ort_run(saved, {"x": _x(6)})["y"], ort_run(original, {"x": _x(6)})["y"],
                               rtol=1e-4, atol=1e-5)
    assert proto.graph.initializer[0].external_data[0].value == "weights.bin"  # the caller's proto untouched


def test_twin_proto_with_loaded_data_needs_no_base_dir(external_model):
    folder, _, _ = external_model
    result = onnx_normfix.optimize(onnx.load(folder / "m.onnx"), passes=["fold_bn"])
    assert result.report["passes"][0]["rewrites"] == 1


def test_base_dir_is_refused_for_a_path(external_model):
    folder, _, _ = external_model
    with pytest.raises(NormfixError, match="base_dir"):
        onnx_normfix.optimize(folder / "m.onnx", passes=["fold_bn"], base_dir=folder)
