"""Writing a pass: declared options and order, the edit/match primitives, Declined,
graphsurgeon passes, and the packaging guard."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_normfix as nf
from onnx_normfix.graph import GraphIndex
from onnx_normfix.registry import Declined, Option, Pass, PassResult, order_passes

from conftest import IR_VERSION, conv_bn_model
from helpers import assert_declines, assert_rewrites, count_ops, ort_run

ROOT = Path(__file__).resolve().parent.parent


def _model(nodes, inputs, outputs, inits=(), opset=17):
    m = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(inits)),
                          opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = IR_VERSION
    return m


# ---- options ------------------------------------------------------------------------------
def test_two_passes_cannot_share_an_option(temp_pass):
    temp_pass("opt_a", lambda m, c: PassResult(), options=[Option("level", 1, int)])
    with pytest.raises(nf.NormfixError, match="already an option of pass 'opt_a'"):
        temp_pass("opt_b", lambda m, c: PassResult(), options=[Option("level", 2, int)])
    with pytest.raises(nf.NormfixError, match="core flag --seed"):
        temp_pass("opt_c", lambda m, c: PassResult(), options=[Option("seed", 2, int)])


def test_a_pass_sees_its_own_options_given_flat_or_namespaced(temp_pass):
    seen = []
    temp_pass("opt_probe", lambda m, c: seen.append(dict(c.options)) or PassResult(),
              options=[Option("level", 1, int, "how hard")])
    nf.optimize(conv_bn_model(), passes=["opt_probe"])
    nf.optimize(conv_bn_model(), passes=["opt_probe"], level=3)
    nf.optimize(conv_bn_model(), passes=["opt_probe"], opt_probe={"level": 5})
    assert [s["level"] for s in seen] == [1, 3, 5]
    assert all(set(s) == {"level", "seed"} for s in seen)  # nobody else's options
    with pytest.raises(nf.NormfixError, match="has no option 'lvl'"):
        nf.optimize(conv_bn_model(), passes=["opt_probe"], opt_probe={"lvl": 5})
    with pytest.raises(nf.NormfixError, match="belongs to pass 'opt_probe', which was not requested"):
        nf.optimize(conv_bn_model(), passes=["fold_bn"], level=3)


def test_unregistered_passes_sharing_a_name_must_be_namespaced():
    a = Pass("share_a", "a", True, lambda m, c: PassResult(), options=[Option("level", 1, int)])
    b = Pass("share_b", "b", True, lambda m, c: PassResult(), options=[Option("level", 1, int)])
    with pytest.raises(nf.NormfixError, match="declared by passes share_a, share_b"):
        nf.optimize(conv_bn_model(), passes=[a, b], level=2)


# ---- order --------------------------------------------------------------------------------
def _add_bn_after_relu(model, ctx):
    """A user pass that creates a BatchNormalization after the Conv."""
    ix = GraphIndex(model)
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    c = 4
    names = [ix.add_initializer(v, f"user_bn.{k}") for k, v in
             (("scale", np.full(c, 2, np.float32)), ("bias", np.ones(c, np.float32)),
              ("mean", np.zeros(c, np.float32)), ("var", np.ones(c, np.float32)))]
    mid = ix.unique_name("conv_raw")
    out = conv.output[0]
    conv.output[0] = mid
    bn = helper.make_node("BatchNormalization", [mid, *names], [out], name="/user/BatchNormalization")
    ix.insert([bn])  # at the end: commit() restores a topological order
    ix.commit()
    return PassResult(rewrites=1, sites=[([conv.input[0]], [out])])


def test_a_user_pass_that_creates_bns_runs_before_fold_bn(temp_pass):
    model = conv_bn_model(with_relu=True)
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    model.graph.node.remove(bn)
    model.graph.node[-1].input[0] = "conv_out"  # x -> Conv -> Relu: the user pass adds the BN
    temp_pass("user_bn", _add_bn_after_relu, preserves=False, creates={"BatchNormalization"})
    result = nf.optimize(model, passes=["fold_bn", "user_bn"])
    assert [p["name"] for p in result.report["passes"]] == ["user_bn", "fold_bn"]
    assert count_ops(result.model).get("BatchNormalization", 0) == 0  # its BN was folded too


def test_order_is_declared_and_cycles_are_refused():
    a = Pass("cyc_a", "a", True, lambda m, c: PassResult(), runs_before={"cyc_b"})
    b = Pass("cyc_b", "b", True, lambda m, c: PassResult(), runs_before={"cyc_a"})
    with pytest.raises(nf.NormfixError, match="cycle"):
        order_passes([a, b])
    builtins = [p.name for p in order_passes(nf.PASSES[n] for n in ("fold_bn", "fix_inorm", "replace_random"))]
    assert builtins == ["replace_random", "fix_inorm", "fold_bn"]


def test_pass_names_are_forgiving():
    assert [p.name for p in nf.registry.resolve_passes("FOLD-BN, fix_inorm")] == ["fix_inorm", "fold_bn"]


# ---- primitives ---------------------------------------------------------------------------
def test_match_parents_follows_a_chain_by_input_index():
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[-1]),
             helper.make_node("Sub", ["x", "m"], ["d"]),
             helper.make_node("Mul", ["d", "d"], ["sq"]),
             helper.make_node("Sqrt", ["sq"], ["s"]),
             helper.make_node("Div", ["d", "s"], ["y"])]
    m = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], opset=13)
    ix = GraphIndex(m)
    div = m.graph.node[4]
    chain = ix.match_parents(div, [("Sqrt", 1), ("Mul", 0), ("Sub", None), ("ReduceMean", 1)])
    assert [n.op_type for n in chain] == ["Sqrt", "Mul", "Sub", "ReduceMean"]
    assert ix.match_parents(div, [("Sqrt", 0)]) is None  # input 0 is the Sub
    assert ix.match_parents(div, [("Sub", 0), ("ReduceMean", 0)]) is None  # the Sub's input 0 is x
    # a step may accept several op types (exporters vary: Pow or Mul, Reshape or Identity)
    chain = ix.match_parents(div, [(("Sqrt", "Reciprocal"), 1), ({"Pow", "Mul"}, 0), (("Sub",), 0)])
    assert [n.op_type for n in chain] == ["Sqrt", "Mul", "Sub"]
    assert ix.match_parents(div, [(("Pow", "Reciprocal"), 1)]) is None
    assert ix.parent(div, 1, ("Sqrt", "Pow")) is m.graph.node[3] and ix.parent(div, 1, ("Pow",)) is None


def test_replace_and_insert_are_applied_in_topological_order():
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="relu"),
             helper.make_node("Neg", ["a"], ["b"], name="neg"),
             helper.make_node("Abs", ["b"], ["y"], name="abs")]
    m = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    before = ort_run(m, {"x": np.arange(-2, 2, dtype=np.float32)})
    ix = GraphIndex(m)
    relu, neg, _ = m.graph.node
    # Neg(Relu(x)) == Min(Neg(x), 0): replace Neg by nodes reading x and a Constant inserted later
    ix.replace(neg, [helper.make_node("Neg", ["x"], ["nx"], name="neg2"),
                     helper.make_node("Min", ["nx", "zero"], ["b"], name="min")])
    ix.insert([helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.zeros(1, np.float32)))])
    ix.remove(relu)
    ix.commit()
    assert [n.op_type for n in m.graph.node] == ["Neg", "Constant", "Min", "Abs"]
    onnx.checker.check_model(m)
    assert np.array_equal(ort_run(m, {"x": np.arange(-2, 2, dtype=np.float32)})["y"], before["y"])


def test_declined_reads_as_a_note():
    r = PassResult()
    r.decline(Declined("W is a graph input"), "/conv/Conv")
    r.decline("no constant eps", "/ln/Add")
    assert r.notes == ["skipped /conv/Conv: W is a graph input", "skipped /ln/Add: no constant eps"]


# ---- graphsurgeon -------------------------------------------------------------------------
def _min_max_model():
    """x -> Max(x, 0) -> Min(., 6) -> y   (relu6 as some exporters write it)"""
    nodes = [helper.make_node("Max", ["x", "zero"], ["hi"], name="max"),
             helper.make_node("Min", ["hi", "six"], ["y"], name="min")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
                  [numpy_helper.from_array(np.zeros((), np.float32), "zero"),
                   numpy_helper.from_array(np.full((), 6, np.float32), "six")])


def _replace_min_max_with_clip(graph, ctx):
    """graphsurgeon's own example 08, as a user already has it."""
    import onnx_graphsurgeon as gs

    count = 0
    for node in [n for n in graph.nodes if n.op == "Min"]:
        inp = node.inputs[0]
        if not inp.inputs or inp.inputs[0].op != "Max":
            continue
        mx = inp.inputs[0]
        lo, hi = mx.inputs[1], node.inputs[1]
        if not (isinstance(lo, gs.Constant) and isinstance(hi, gs.Constant)):
            continue
        clip = gs.Node("Clip", inputs=[mx.inputs[0], lo, hi], outputs=node.outputs)
        node.outputs = []
        graph.nodes.append(clip)
        count += 1
    return count


def test_a_graphsurgeon_pass_gets_validation_and_the_report(temp_pass):
    p = nf.graphsurgeon_pass("gs_clip", "Max/Min -> Clip", register=False)(_replace_min_max_with_clip)
    temp_pass(p)
    result = assert_rewrites("gs_clip", _min_max_model(), rewrites=1, ops={"Clip": 1, "Min": 0, "Max": 0})
    assert result.report["passes"][0]["validation"]["status"] == "passed"
    assert [i.name for i in result.model.graph.input] == ["x"] and result.model.opset_import[0].version == 17


def test_a_wrong_graphsurgeon_pass_is_caught(temp_pass):
    def wrong(graph, ctx):
        _replace_min_max_with_clip(graph, ctx)
        next(n for n in graph.nodes if n.op == "Clip").inputs[1].values = np.full((), 0.5, np.float32)
        return 1

    temp_pass(nf.graphsurgeon_pass("gs_wrong", "broken on purpose", register=False)(wrong))
    with pytest.raises(nf.ValidationError, match="gs_wrong"):
        nf.optimize(_min_max_model(), passes=["gs_wrong"])


def test_a_graphsurgeon_pass_that_does_not_count_is_counted(temp_pass):
    temp_pass(nf.graphsurgeon_pass("gs_nothing", "no-op", register=False)(lambda g, c: None))
    result = nf.optimize(_min_max_model(), passes=["gs_nothing"])
    assert result.report["passes"][0]["rewrites"] == 0


def test_importing_onnx_normfix_imports_no_graphsurgeon_nor_torch():
    code = "import sys, onnx_normfix; print(sorted(m for m in ('torch', 'onnx_graphsurgeon', 'onnxruntime') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "[]"


# ---- packaging ----------------------------------------------------------------------------
def _import_from_copy(tmp_path, keep_editable_finder: bool):
    shutil.copytree(ROOT / "onnx_normfix", tmp_path / "src" / "onnx_normfix")
    code = (
        "import sys\n"
        f"keep = {keep_editable_finder!r}\n"
        "if not keep:\n"
        "    sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__name__', type(f).__name__).lower()]\n"
        f"sys.path.insert(0, {str(tmp_path / 'src')!r})\n"
        "import onnx_normfix\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": ""})


def test_a_bare_checkout_says_to_install(tmp_path):
    run = _import_from_copy(tmp_path, keep_editable_finder=False)
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert "onnx_normfix.passes is not installed" in last and "pip install -e ." in last
    assert "circular" not in run.stderr


def test_a_second_checkout_does_not_mix_in_the_installed_passes(tmp_path):
    installed = subprocess.run([sys.executable, "-c", "import onnx_normfix.passes as p; print(p.__file__)"],
                               capture_output=True, text=True, cwd="/")
    run = _import_from_copy(tmp_path, keep_editable_finder=True)
    assert run.returncode != 0, (installed.stdout, run.stdout)
    last = run.stderr.strip().splitlines()[-1]
    assert ("another checkout" in last or "not installed" in last) and "pip install -e ." in last
