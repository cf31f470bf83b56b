"""Overridable initializers (IR >= 4: an initializer also listed as a graph input) are defaults
a caller may override, not constants: no pass bakes them in, and graph inputs never change.

A real export: torch.onnx.export(..., keep_initializers_as_inputs=True) of a small CNN.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_normfix
from onnx_normfix.graph import GraphIndex

torch = pytest.importorskip("torch")
nn = torch.nn


def _net():
    torch.manual_seed(11)
    m = nn.Sequential(nn.Conv2d(2, 7, 3, padding=1), nn.BatchNorm2d(7), nn.ReLU(),
                      nn.Conv2d(7, 3, 1, bias=False), nn.BatchNorm2d(3)).eval()
    for bn in (m[1], m[4]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.3, 3)
        bn.weight.data.uniform_(0.5, 2)
        bn.bias.data.uniform_(-1, 1)
    return m


def _export(m, x, keep: bool) -> onnx.ModelProto:
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (x,), f, dynamo=False, keep_initializers_as_inputs=keep, do_constant_folding=False,
                          input_names=["x"], output_names=["y"], opset_version=13)
    return onnx.load_from_string(f.getvalue())


def _run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = {i.name for i in s.get_inputs()} | {i.name for i in s.get_overridable_initializers()}
    return s.run(None, {k: v for k, v in feeds.items() if k in names})[0]


@pytest.fixture(scope="module")
def export():
    m = _net()
    x = torch.randn(3, 2, 5, 6)
    return m, x, _export(m, x, keep=True)


def test_export_lists_its_initializers_as_inputs(export):
    _, _, model = export
    assert model.ir_version >= 4
    inits = {t.name for t in model.graph.initializer}
    assert len([i for i in model.graph.input if i.name in inits]) >= 10


def test_fold_bn_declines_overridable_parameters_and_keeps_every_input(export):
    m, x, model = export
    inputs = [i.name for i in model.graph.input]
    result = onnx_normfix.optimize(model, passes=["fold_bn"])
    entry = result.report["passes"][0]
    assert entry["rewrites"] == 0
    assert len(entry["notes"]) == 2
    assert all("--initializer-inputs-as-constants" in n and "graph input" in n for n in entry["notes"])
    assert [i.name for i in result.model.graph.input] == inputs
    # a caller overriding the first conv's weight gets the same answer from both models
    w = m[0].weight.detach().numpy() * -1.5
    feeds = {"x": x.numpy(), "0.weight": w}
    np.testing.assert_allclose(_run(result.model, feeds), _run(model, feeds), rtol=1e-5, atol=1e-6)


def test_option_treats_them_as_constants_and_says_it_removed_them(export):
    m, x, model = export
    result = onnx_normfix.optimize(model, passes=["fold_bn"], initializer_inputs_as_constants=True)
    assert result.report["passes"][0]["rewrites"] == 2
    assert [i.name for i in result.model.graph.input] == ["x"]
    note = " ".join(result.report["notes"])
    assert "removed from the graph inputs" in note and "0.weight" in note
    with torch.no_grad():
        want = m(x).numpy()
    np.testing.assert_allclose(_run(result.model, {"x": x.numpy()}), want, rtol=1e-4, atol=1e-5)


def test_twin_plain_export_folds_without_the_option():
    m = _net()
    x = torch.randn(2, 2, 4, 4)
    result = onnx_normfix.optimize(_export(m, x, keep=False), passes=["fold_bn"])
    assert result.report["passes"][0]["rewrites"] == 2
    assert "notes" not in result.report


def test_cli_flag(tmp_path, export):
    from onnx_normfix.cli import main

    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(export[2], src)
    assert main([str(src), str(out), "--initializer-inputs-as-constants", "-q"]) == 0
    assert [i.name for i in onnx.load(out).graph.input] == ["x"]
    assert main([str(src), str(out), "-q"]) == 0
    assert len(onnx.load(out).graph.input) == len(export[2].graph.input)


def _small(ir: int) -> onnx.ModelProto:
    """x -> Relu -> y with an unused plain graph input `u` and an unused initializer-input `d`."""
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in ("x", "u", "d")],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
                          [numpy_helper.from_array(np.ones(2, np.float32), "d"),
                           numpy_helper.from_array(np.ones(3, np.float32), "dead")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = ir
    return m


@pytest.mark.parametrize("passes", [["fix_inorm"], ["fold_bn"], ["fix_inorm", "fold_bn"]])
def test_a_pass_with_nothing_to_do_changes_no_graph_input(passes):
    model = _small(8)
    result = onnx_normfix.optimize(model, passes=passes)
    assert [i.name for i in result.model.graph.input] == ["x", "u", "d"]
    assert "d" in {t.name for t in result.model.graph.initializer}


def test_sweep_keeps_overridable_and_real_inputs_but_drops_dead_constants():
    """The twin: what is dead and no input goes; inputs (real or overridable) stay."""
    model = _small(8)
    ix = GraphIndex(model)
    assert ix.overridable == {"d"} and ix.constant("d") is None
    ix.commit(sweep=True)  # nothing was edited: ask for the sweep
    assert [i.name for i in model.graph.input] == ["x", "u", "d"]
    assert {t.name for t in model.graph.initializer} == {"d"}


def test_ir3_initializer_inputs_stay_constants():
    model = _small(3)
    ix = GraphIndex(model)
    assert ix.overridable == set() and ix.constant("d") is not None
