"""GraphIndex: constants, shapes, names and the dead-code sweep that every pass relies on."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_normfix.graph import GraphIndex

from conftest import IR_VERSION


def _model(nodes, inputs, outputs, inits=(), opset=17):
    m = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(inits)),
                          opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = IR_VERSION
    return m


def test_rank_through_an_exporter_computed_reshape_target():
    """Reshape(c, Concat(Unsqueeze(Constant)...)) as TorchScript writes it: the rank (and the
    shape) downstream is known only with data propagation. Regression: fix_inorm silently
    left a StarGAN norm uncollapsed because this rank came back unknown."""
    nodes = [helper.make_node("Constant", [], [f"k{i}"], value=numpy_helper.from_array(np.array(v, np.int64)))
             for i, v in enumerate([1, 5, 1, 1])]
    nodes += [helper.make_node("Constant", [], ["axes"], value=numpy_helper.from_array(np.array([0], np.int64)))]
    nodes += [helper.make_node("Unsqueeze", [f"k{i}", "axes"], [f"u{i}"]) for i in range(4)]
    # the Expand target is ConstantOfShape of a computed length, as TorchScript writes
    # c.view(...).repeat(...): its length (the rank of y) needs the value of `u0`
    nodes += [helper.make_node("Concat", [f"u{i}" for i in range(4)], ["shape"], axis=0),
              helper.make_node("Reshape", ["c", "shape"], ["c4"]),
              helper.make_node("Constant", [], ["four"], value=numpy_helper.from_array(np.array(4, np.int64))),
              helper.make_node("Unsqueeze", ["four", "axes"], ["len"]),
              helper.make_node("ConstantOfShape", ["len"], ["ones"],
                               value=numpy_helper.from_array(np.array([1], np.int64))),
              helper.make_node("Expand", ["c4", "ones"], ["e"]),
              helper.make_node("Relu", ["e"], ["y"])]
    m = _model(nodes, [helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 5])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    assert GraphIndex(m).rank("y") == 4


def test_constants_through_identity_constant_and_small_subgraphs():
    w = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "w")
    nodes = [helper.make_node("Identity", ["w"], ["w_shared"]),
             helper.make_node("Constant", [], ["shape"], value=numpy_helper.from_array(np.array([3], np.int64))),
             helper.make_node("ConstantOfShape", ["shape"], ["ones"],
                              value=numpy_helper.from_array(np.array([2.0], np.float32))),
             helper.make_node("Add", ["x", "ones"], ["y"])]
    m = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])], [w])
    ix = GraphIndex(m)
    np.testing.assert_array_equal(ix.constant("w_shared"), np.arange(6).reshape(2, 3))
    np.testing.assert_array_equal(ix.constant("ones"), [2.0, 2.0, 2.0])
    assert ix.constant("x") is None and ix.constant("y") is None


def test_random_ops_are_never_constants():
    nodes = [helper.make_node("Constant", [], ["z"], value=numpy_helper.from_array(np.zeros(3, np.float32))),
             helper.make_node("RandomNormalLike", ["z"], ["r"]),
             helper.make_node("Add", ["x", "r"], ["y"])]
    m = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])])
    assert GraphIndex(m).constant("r") is None


def test_commit_sweeps_dead_chains_but_keeps_live_and_custom_nodes():
    nodes = [helper.make_node("Constant", [], ["dead_c"], value=numpy_helper.from_array(np.ones(2, np.float32))),
             helper.make_node("Neg", ["dead_c"], ["dead"]),
             helper.make_node("Relu", ["x"], ["y"]),
             helper.make_node("Probe", ["x"], ["side"], domain="com.example")]
    m = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
               [numpy_helper.from_array(np.ones(2, np.float32), "unused")])
    ix = GraphIndex(m)
    assert ix.commit(sweep=True) == 2
    assert [n.op_type for n in m.graph.node] == ["Relu", "Probe"]
    assert not m.graph.initializer


def test_commit_without_edits_leaves_the_graph_as_it_came():
    nodes = [helper.make_node("Constant", [], ["dead_c"], value=numpy_helper.from_array(np.ones(2, np.float32))),
             helper.make_node("Relu", ["x"], ["y"])]
    m = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
               [numpy_helper.from_array(np.ones(2, np.float32), "unused")])
    before = m.SerializeToString()
    assert GraphIndex(m).commit() == 0
    assert m.SerializeToString() == before
    ix = GraphIndex(m)
    ix.changed = True  # an in-place edit: the sweep runs
    assert ix.commit() == 1 and not m.graph.initializer


def test_unique_names_never_collide():
    m = _model([helper.make_node("Relu", ["x"], ["y"], name="n")],
               [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    ix = GraphIndex(m)
    names = {ix.unique_name("y"), ix.unique_name("y"), ix.unique_name("n"), ix.unique_name("x")}
    assert len(names) == 4 and not names & {"x", "y", "n"}
