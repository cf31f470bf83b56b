"""Shared model builders: tiny graphs made with onnx.helper, fixed seeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
# onnxruntime 1.2x loads IR <= 10..13; onnx.helper defaults to the newest IR it knows.
IR_VERSION = 8


def conv_bn_model(channels=4, opset=17, batch="N", with_relu=True, seed=0) -> onnx.ModelProto:
    """x -> Conv(3->C, 3x3) -> BatchNormalization -> [Relu] -> y"""
    rng = np.random.default_rng(seed)
    c = channels
    inits = [
        numpy_helper.from_array(rng.standard_normal((c, 3, 3, 3)).astype(np.float32), "conv.weight"),
        numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "conv.bias"),
        numpy_helper.from_array(rng.uniform(0.5, 2, c).astype(np.float32), "bn.weight"),
        numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "bn.bias"),
        numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "bn.running_mean"),
        numpy_helper.from_array(rng.uniform(0.2, 3, c).astype(np.float32), "bn.running_var"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight", "conv.bias"], ["conv_out"], name="/conv/Conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["conv_out", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"],
                         ["bn_out" if with_relu else "y"], name="/bn/BatchNormalization", epsilon=1e-5),
    ]
    if with_relu:
        nodes.append(helper.make_node("Relu", ["bn_out"], ["y"], name="/relu/Relu"))
    graph = helper.make_graph(
        nodes, "conv_bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, c, 8, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tests")
    model.ir_version = IR_VERSION
    return model


@pytest.fixture
def temp_pass():
    """Register passes for one test only: `temp_pass(name, run, preserves=True, **declared)`
    (or `temp_pass(a_pass)`); they are unregistered when the test ends."""
    from onnx_normfix.registry import PASSES, Pass, register_pass

    added = []

    def add(name_or_pass, run=None, preserves=True, **declared):
        p = name_or_pass if isinstance(name_or_pass, Pass) else Pass(name_or_pass, f"test pass {name_or_pass}",
                                                                      preserves, run, **declared)
        added.append(p.name)
        return register_pass(p)

    yield add
    for name in added:
        PASSES.pop(name, None)


@pytest.fixture
def conv_bn_file(tmp_path) -> Path:
    path = tmp_path / "conv_bn.onnx"
    onnx.save(conv_bn_model(), path)
    return path
