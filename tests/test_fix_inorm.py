"""fix_inorm: old-style InstanceNormalization + checkpoint stats, and the exporters' patterns.

Real exports live in fixtures/ (fixtures/_inorm_models.py): a StarGAN-style generator
(affine=True) and a CycleGAN-style one (affine=False, plus a BatchNorm module in the
checkpoint), each with the PyTorch eval outputs in *_io.npz. Hand-built graphs cover the
must-not-fire twins and the old-style 1d/3d/fp16 cases.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import FIXTURES, IR_VERSION, conv_bn_model
from helpers import assert_close, count_ops, ort_run
from onnx_normfix.errors import NormfixError
from onnx_normfix.graph import STAMP
from onnx_normfix.passes.fix_inorm import PASS
from onnx_normfix.registry import PassContext
from onnx_normfix.stats import ModuleStats


def load(name: str) -> onnx.ModelProto:
    return onnx.load(str(FIXTURES / name))


def apply(model: onnx.ModelProto, **options):
    """prepare + run, as the pipeline does."""
    opts = {name: options.get(name, default) for name, default in {**dict.fromkeys(PASS.reads), **PASS.option_defaults}.items()}
    return PASS.run(model, PassContext(options=PASS.prepare(model, opts)))


def feeds(model: onnx.ModelProto, npz: str, n: int | None = None, prefix: str = "") -> tuple[dict, np.ndarray]:
    """Inputs (first n samples) for `model` and the PyTorch eval outputs for them."""
    data = np.load(FIXTURES / npz)
    names = [i.name for i in model.graph.input]
    stem = {"x": "x", "c": "c"}
    f = {k: data[prefix + stem.get(k, k)][:n] for k in names}
    return f, data[prefix + "y"][:n]


def output(model, f) -> np.ndarray:
    return next(iter(ort_run(model, f).values()))


def max_diff(a, b) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


# ---- old style: InstanceNormalization + checkpoint ---------------------------------------------
OLD_STYLE = [
    # fixture, stats file, nodes, how every node must match
    ("stargan_tiny_oldstyle.onnx", "stargan_tiny.pt", 7, "name"),
    ("stargan_tiny_oldstyle.onnx", "stargan_tiny_nested.pth", 7, "name"),
    ("stargan_tiny_oldstyle.onnx", "stargan_tiny_module.ckpt", 7, "name"),
    ("stargan_tiny_oldstyle.onnx", "stargan_tiny_stats.npz", 7, "name"),
    ("stargan_tiny_anon.onnx", "stargan_tiny.pt", 7, "values"),
    ("cyclegan_tiny_oldstyle.onnx", "cyclegan_tiny.pt", 5, "scope"),
]


@pytest.mark.parametrize("fixture,stats,norms,method", OLD_STYLE, ids=[f"{a}-{b}" for a, b, _, _ in OLD_STYLE])
def test_old_style_restores_pytorch_eval(fixture, stats, norms, method, record_property):
    if not stats.endswith(".npz"):
        pytest.importorskip("torch")
    model = load(fixture)
    f, want = feeds(model, fixture.split("_tiny")[0] + "_tiny_io.npz", 1)
    before = max_diff(output(model, f), want)
    assert before > 0.1  # the lost stats matter: StarGAN 0.94, CycleGAN 1.06

    result = apply(model, stats=str(FIXTURES / stats))

    record_property("mismatch_before", before)
    record_property("mismatch_after", max_diff(output(model, f), want))
    assert result.rewrites == norms and result.changes_outputs is True
    assert count_ops(model).get("InstanceNormalization", 0) == 0
    assert [d["method"] for d in result.details["norms"]] == [method] * norms
    bns = [n for n in model.graph.node if n.doc_string == STAMP + "fix_inorm"]
    assert len(bns) == norms and all(n.op_type == "BatchNormalization" and len(n.input) == 5 for n in bns)
    assert len({n.name for n in model.graph.node}) == len(model.graph.node)
    onnx.checker.check_model(model, full_check=True)
    assert_close({"y": output(model, f)}, {"y": want})


def test_scope_match_when_initializers_are_renamed():
    model = load("stargan_tiny_oldstyle.onnx")
    renames = {t.name: f"onnx::InstanceNormalization_{k}" for k, t in enumerate(model.graph.initializer)}
    for t in model.graph.initializer:
        t.name = renames[t.name]
    for node in model.graph.node:
        node.input[:] = [renames.get(i, i) for i in node.input]
    f, want = feeds(model, "stargan_tiny_io.npz", 1)
    result = apply(model, stats=str(FIXTURES / "stargan_tiny_stats.npz"))
    assert [d["method"] for d in result.details["norms"]] == ["scope"] * 7
    assert result.details["norms"][2]["module"] == "main.6.main.1"  # from /main/main.6/main/main.1/...
    assert_close({"y": output(model, f)}, {"y": want})


def _nameless(model):
    for k, node in enumerate(model.graph.node):
        node.name = f"n{k}"
    return model


CYCLEGAN_MODULES = ["model.2", "model.5", "model.7.conv_block.2", "model.7.conv_block.6", "model.9"]


def test_affine_false_of_equal_channels_is_refused_with_the_candidates():
    """Unscoped names, affine=False: two 4-channel and three 8-channel norms. Checkpoint order
    is no evidence, so this is ambiguous (it used to be matched "by order", a guess)."""
    model = _nameless(load("cyclegan_tiny_oldstyle.onnx"))
    pytest.importorskip("torch")
    with pytest.raises(NormfixError) as err:
        apply(model, stats=str(FIXTURES / "cyclegan_tiny.pt"))
    message = str(err.value)
    assert "nodes n19, n71 and modules model.2, model.9 all have 4 channels" in message
    assert "model.7.conv_block.2" in message and "--reference" in message and "--inorm-module" in message
    assert "model.11" not in message  # the BatchNorm module is never a candidate
    assert count_ops(model).get("InstanceNormalization") == 5  # nothing rewritten


def test_affine_false_ambiguity_settled_by_the_pytorch_reference():
    model = _nameless(load("cyclegan_tiny_oldstyle.onnx"))
    f, want = feeds(model, "cyclegan_tiny_io.npz", 1)
    pytest.importorskip("torch")
    result = apply(model, stats=str(FIXTURES / "cyclegan_tiny.pt"), inputs=f,
                   reference={model.graph.output[0].name: want})
    assert [d["module"] for d in result.details["norms"]] == CYCLEGAN_MODULES
    assert all(d["method"].startswith("reference (12 assignments tried") for d in result.details["norms"])
    assert_close({"y": output(model, f)}, {"y": want})


def test_affine_false_ambiguity_settled_by_an_explicit_mapping():
    model = _nameless(load("cyclegan_tiny_oldstyle.onnx"))
    f, want = feeds(model, "cyclegan_tiny_io.npz", 1)
    pytest.importorskip("torch")
    labels = [n.name for n in model.graph.node if n.op_type == "InstanceNormalization"]
    result = apply(model, stats=str(FIXTURES / "cyclegan_tiny.pt"),
                   inorm_modules=[f"{a}={b}" for a, b in zip(labels, CYCLEGAN_MODULES)])
    assert [d["method"] for d in result.details["norms"]] == ["explicit"] * 5
    assert_close({"y": output(model, f)}, {"y": want})


def test_explicit_mapping_with_the_wrong_channel_count_is_refused():
    model = _nameless(load("cyclegan_tiny_oldstyle.onnx"))
    pytest.importorskip("torch")
    first = next(n.name for n in model.graph.node if n.op_type == "InstanceNormalization")
    with pytest.raises(NormfixError, match="module model.5 given for it has 8 channels"):
        apply(model, stats=str(FIXTURES / "cyclegan_tiny.pt"), inorm_modules={first: "model.5"}, allow_partial=False)


def _npz_stats(name="stargan_tiny_stats.npz") -> dict:
    with np.load(FIXTURES / name) as data:
        return {k: data[k] for k in data.files}


def test_stats_as_dict_and_as_module_list_give_the_same_model():
    state = _npz_stats()
    a, b = load("stargan_tiny_oldstyle.onnx"), load("stargan_tiny_oldstyle.onnx")
    apply(a, stats=state)
    modules = [ModuleStats(p, state[p + ".running_mean"], state[p + ".running_var"], state.get(p + ".weight"),
                           state.get(p + ".bias")) for p in ["main.1", "main.4", "main.6.main.1", "main.6.main.4",
                                                             "main.7.main.1", "main.7.main.4", "main.9"]]
    PASS.run(b, PassContext(options={"stats": modules}))
    assert a.SerializeToString() == b.SerializeToString()


@pytest.mark.parametrize("fixture,stats", [("stargan_tiny_oldstyle.onnx", "cyclegan_tiny.pt"),
                                           ("cyclegan_tiny_oldstyle.onnx", "stargan_tiny_stats.npz")])
def test_stats_from_another_model_is_an_error_and_nothing_is_written(fixture, stats):
    if stats.endswith(".pt"):
        pytest.importorskip("torch")
    model = _nameless(load(fixture))
    original = model.SerializeToString()
    with pytest.raises(NormfixError, match=r"no usable running statistics for \d of \d") as err:
        apply(model, stats=str(FIXTURES / stats))
    labels = [n.name for n in model.graph.node if n.op_type == "InstanceNormalization"]
    assert "another model" in str(err.value) and all(label in str(err.value) for label in labels)
    assert model.SerializeToString() == original


def test_no_stats_for_old_style_nodes_leaves_them_with_a_note_that_explains_both_cases():
    """Issue 11 item 10: InstanceNorm(track_running_stats=False) is correct as exported; without
    --stats the nodes are left and listed, not a dead end."""
    model = load("stargan_tiny_oldstyle.onnx")
    original = model.SerializeToString()
    result = apply(model)
    assert result.rewrites == 0 and model.SerializeToString() == original
    (note,) = [n for n in result.notes if "InstanceNormalization" in n]
    assert "left 7 InstanceNormalization" in note and "track_running_stats=False" in note
    assert "--stats" in note and "--calibration-data" in note
    with pytest.raises(NormfixError, match="--allow-partial needs --stats"):
        apply(model, allow_partial=True)


def test_wrong_channel_count_is_an_error_and_allow_partial_fixes_the_rest():
    state = _npz_stats()
    for key in [k for k in state if k.startswith("main.4.") and state[k].ndim == 1]:
        state[key] = state[key][:4]  # a 4-channel module where the graph has 8 channels
    model = load("stargan_tiny_oldstyle.onnx")
    with pytest.raises(NormfixError, match=r"1 of 7.*/main/main.4/InstanceNormalization: module main.4 has 4 channels"):
        apply(model, stats=state)
    result = apply(model, stats=state, allow_partial=True)
    assert result.rewrites == 6 and count_ops(model)["InstanceNormalization"] == 1
    assert list(result.details["unmatched"]) == ["/main/main.4/InstanceNormalization"]
    assert any("left 1 InstanceNormalization" in n for n in result.notes)


def test_two_modules_with_the_same_weights_are_ambiguous():
    state = _npz_stats()
    for key in [k for k in state if k.startswith("main.9.")]:
        state["copy_of." + key] = state[key]
    model = load("stargan_tiny_anon.onnx")
    with pytest.raises(NormfixError, match=r"InstanceNormalization_27: ambiguous by values: main.9, copy_of.main.9"):
        apply(model, stats=state)


def test_calibration_matches_pytorch_training_accumulation():
    """Stats estimated from samples equal what InstanceNorm(track_running_stats=True,
    momentum=None) accumulates in train mode on the same samples."""
    torch = pytest.importorskip("torch")
    import sys

    sys.path.insert(0, str(FIXTURES))
    from _inorm_models import _stargan

    torch.set_num_threads(1)
    g = _stargan()
    g.load_state_dict(torch.load(FIXTURES / "stargan_tiny.pt", weights_only=True))
    norms = [m for m in g.modules() if isinstance(m, torch.nn.InstanceNorm2d)]
    for m in norms:
        m.momentum = 1.0  # running stats := this forward call's stats (momentum=None means 0 here)
    rng = np.random.default_rng(0)
    data = {"x": rng.standard_normal((3, 3, 32, 32)).astype(np.float32), "c": np.array([[1.0], [0.0], [1.0]], np.float32)}
    sums = [[0.0, 0.0] for _ in norms]
    g.train()
    with torch.no_grad():
        for k in range(3):  # the old-style export has batch 1
            g(torch.from_numpy(data["x"][k:k + 1]), torch.from_numpy(data["c"][k:k + 1]))
            for s, m in zip(sums, norms):
                s[0], s[1] = s[0] + m.running_mean.numpy() / 3, s[1] + m.running_var.numpy() / 3
    for s, m in zip(sums, norms):  # the cumulative average of what training fed the buffers
        m.running_mean.copy_(torch.from_numpy(s[0]))
        m.running_var.copy_(torch.from_numpy(s[1]))

    model = load("stargan_tiny_oldstyle.onnx")
    result = apply(model, calibration_data=data)

    assert result.rewrites == 7 and {d["method"] for d in result.details["norms"]} == {"calibration (estimate)"}
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    for bn, m in zip(bns, norms):
        np.testing.assert_allclose(inits[bn.input[3]], m.running_mean.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(inits[bn.input[4]], m.running_var.numpy(), rtol=1e-4, atol=1e-5)
    g.eval()
    f, _ = feeds(model, "stargan_tiny_io.npz", 1)
    with torch.no_grad():
        want = g(torch.from_numpy(f["x"]), torch.from_numpy(f["c"])).numpy()
    assert_close({"y": output(model, f)}, {"y": want})


# ---- exporter patterns -------------------------------------------------------------------------
PATTERNS = [
    # fixture, samples, nodes before -> after, ops gone (before count), exporter label
    ("stargan_tiny_torchscript.onnx", 2, 199, 31, {"Reshape": 15, "Tile": 29, "Expand": 29, "ConstantOfShape": 29}, "TorchScript"),
    ("stargan_tiny_dynamo.onnx", 2, 41, 27, {"Reshape": 15}, "dynamo, static batch"),
    ("stargan_tiny_dynamo_dynamic.onnx", 2, 76, 27, {"Reshape": 15, "Tile": 29, "Shape": 7}, "dynamo, symbolic batch"),
    ("cyclegan_tiny_dynamo.onnx", 2, 32, 22, {"Reshape": 10}, "dynamo, static batch"),
    ("cyclegan_tiny_dynamo_n1.onnx", 1, 27, 22, {"Reshape": 5}, "dynamo, static batch"),
    ("cyclegan_tiny_dynamo_dynamic.onnx", 2, 57, 22, {"Reshape": 10, "Tile": 20, "Shape": 5}, "dynamo, symbolic batch"),
]


@pytest.mark.parametrize("fixture,n,nodes_before,nodes_after,gone,exporter", PATTERNS, ids=[p[0] for p in PATTERNS])
def test_exporter_pattern_collapses_to_batchnorm_over_c(fixture, n, nodes_before, nodes_after, gone, exporter):
    model = load(fixture)
    norms = 7 if fixture.startswith("stargan") else 5
    f, want = feeds(model, fixture.split("_tiny")[0] + "_tiny_io.npz", n)
    before_out = output(model, f)
    before_ops = count_ops(model)
    assert len(model.graph.node) == nodes_before and all(before_ops[op] == k for op, k in gone.items())

    result = apply(model)

    after_ops = count_ops(model)
    assert result.rewrites == norms and not result.changes_outputs
    assert len(model.graph.node) == nodes_after
    assert after_ops["BatchNormalization"] == before_ops["BatchNormalization"]
    # StarGAN keeps one Reshape/Tile/Expand/ConstantOfShape: its condition input's view/repeat
    leftover = 1 if fixture.startswith("stargan") else 0
    assert all(after_ops.get(op, 0) <= leftover for op in gone)
    assert {d["exporter"] for d in result.details["patterns"]} == {exporter}
    assert [d["channels"] for d in result.details["patterns"]] == ([4, 8, 8, 8, 8, 8, 4] if norms == 7 else [4, 8, 8, 8, 4])
    inits = {t.name: t for t in model.graph.initializer}
    for bn in (b for b in model.graph.node if b.doc_string == STAMP + "fix_inorm"):
        assert all(len(inits[p].dims) == 1 and inits[p].dims[0] in (4, 8) for p in bn.input[1:] if p in inits)
    if norms == 7:  # the module's own names survive, via the tiling chains or the scope metadata
        first = next(b for b in model.graph.node if b.op_type == "BatchNormalization")
        assert list(first.input[1:]) == ["main.1.weight", "main.1.bias", "main.1.running_mean", "main.1.running_var"]
    onnx.checker.check_model(model, full_check=True)
    got = output(model, f)
    np.testing.assert_allclose(got, before_out, rtol=1e-5, atol=1e-6)
    assert_close({"y": got}, {"y": want})


@pytest.mark.parametrize("fixture,prefix,n", [("cyclegan_tiny_dynamo.onnx", "", None),
                                              ("inorm_small_1d_affine_ts.onnx", "1d_affine_ts_", None)])
def test_dynamic_batch_runs_at_other_batch_sizes(fixture, prefix, n):
    model = load(fixture)
    npz = "cyclegan_tiny_io.npz" if fixture.startswith("cyclegan") else "inorm_small_io.npz"
    f, want = feeds(model, npz, n, prefix)
    name = model.graph.input[0].name
    result = apply(model, dynamic_batch=True)
    assert "now 'batch'" in result.details["dynamic_batch"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert model.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    x = f[name]
    three = output(model, {name: np.concatenate([x, x[:1]])})
    assert three.shape[0] == 3
    for k in range(2):  # instance norm is per sample: batch 3 == batch 1 == PyTorch
        one = output(model, {name: x[k:k + 1]})
        np.testing.assert_allclose(three[k:k + 1], one, rtol=1e-5, atol=1e-6)
        assert_close({"y": one}, {"y": want[k:k + 1]})


def test_dynamic_batch_refused_while_another_node_fixes_the_batch():
    model = load("stargan_tiny_torchscript.onnx")  # c.view(N, 1, 1, 1) was traced as Reshape [2, 1, 1, 1]
    with pytest.raises(NormfixError, match=r"batch size 2 is still fixed by /Reshape"):
        apply(model, dynamic_batch=True)


def test_dynamic_batch_on_an_already_dynamic_model_is_a_note():
    model = load("cyclegan_tiny_dynamo_dynamic.onnx")
    result = apply(model, dynamic_batch=True)
    assert result.rewrites == 5 and "already symbolic" in result.details["dynamic_batch"]


@pytest.mark.parametrize("tag,atol", [("1d_affine_ts", 1e-5), ("3d_plain_dynamo", 1e-5),
                                      # fp16 vs PyTorch: one fp16 ulp at |y|~2 is 2e-3
                                      ("2d_fp16_dynamo", 4e-3)])
def test_small_patterns_1d_3d_fp16(tag, atol):
    model = load(f"inorm_small_{tag}.onnx")
    f, want = feeds(model, "inorm_small_io.npz", None, tag + "_")
    before = output(model, f)
    result = apply(model)
    assert result.rewrites == 1 and count_ops(model) == {"Conv": 1, "BatchNormalization": 1, "Relu": 1}
    got = output(model, f)
    assert got.dtype == want.dtype
    np.testing.assert_allclose(got.astype(np.float32), before.astype(np.float32), rtol=0, atol=atol / 4)
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=1e-4, atol=atol)


# ---- hand-built graphs: old style in 1d/3d/fp16, and the must-not-fire twins --------------------
def _model(nodes, inits, x_shape, y_shape, dtype=TensorProto.FLOAT, opset=17):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", dtype, x_shape)],
                              [helper.make_tensor_value_info("y", dtype, y_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = IR_VERSION
    return model


@pytest.mark.parametrize("spatial,np_dtype,opset", [((7,), np.float32, 11), ((3, 4, 5), np.float32, 17),
                                                    ((6, 6), np.float16, 17)], ids=["1d", "3d", "fp16"])
def test_old_style_any_rank_and_fp16_follow_the_formula(spatial, np_dtype, opset):
    rng = np.random.default_rng(1)
    c = 3
    w, b = rng.uniform(0.5, 1.5, c).astype(np_dtype), rng.uniform(-0.3, 0.3, c).astype(np_dtype)
    mean, var = rng.uniform(-0.5, 0.5, c).astype(np.float32), rng.uniform(0.2, 3, c).astype(np.float32)
    dtype = helper.np_dtype_to_tensor_dtype(np.dtype(np_dtype))
    node = helper.make_node("InstanceNormalization", ["x", "norm.weight", "norm.bias"], ["y"], name="/norm/InstanceNormalization", epsilon=1e-3)
    model = _model([node], [numpy_helper.from_array(w, "norm.weight"), numpy_helper.from_array(b, "norm.bias")],
                   [2, c, *spatial], [2, c, *spatial], dtype, opset)
    result = apply(model, stats={"norm.running_mean": mean, "norm.running_var": var, "norm.weight": w, "norm.bias": b,
                                 "other.running_mean": mean[:2], "other.running_var": var[:2]})
    assert result.rewrites == 1 and result.details["norms"][0] == {"node": "/norm/InstanceNormalization", "module": "norm",
                                                                   "method": "name", "channels": 3}
    (bn,) = model.graph.node
    assert bn.op_type == "BatchNormalization" and bn.name == "/norm/BatchNormalization"
    assert helper.get_attribute_value(bn.attribute[0]) == pytest.approx(1e-3)
    x = rng.standard_normal((2, c, *spatial)).astype(np_dtype)
    shape = (1, c) + (1,) * len(spatial)
    m16, v16 = mean.astype(np_dtype).astype(np.float64), var.astype(np_dtype).astype(np.float64)
    want = ((x - m16.reshape(shape)) / np.sqrt(v16.reshape(shape) + 1e-3) * w.reshape(shape) + b.reshape(shape))
    atol = 1e-5 if np_dtype == np.float32 else 4e-3  # fp16: a few ulps at |y| ~ 3
    np.testing.assert_allclose(output(model, {"x": x}).astype(np.float64), want, rtol=1e-4, atol=atol)


def _tiled_pattern(scale_rows, tail=(2, 3, 4, 4), training=False):
    """x[2,3,4,4] -> Reshape[1,6,4,4] -> BN(6 channels) -> Reshape(tail) -> y"""
    rng = np.random.default_rng(2)
    row = rng.uniform(0.5, 1.5, 3).astype(np.float32)
    scale = np.concatenate([row * r for r in scale_rows]).astype(np.float32)
    tile = lambda v: np.tile(v, 2).astype(np.float32)  # noqa: E731
    inits = [numpy_helper.from_array(np.array([1, 6, 4, 4], np.int64), "head_shape"),
             numpy_helper.from_array(np.array(tail, np.int64), "tail_shape"),
             numpy_helper.from_array(scale, "s"),
             numpy_helper.from_array(tile(rng.uniform(-0.3, 0.3, 3)), "b"),
             numpy_helper.from_array(tile(rng.uniform(-0.5, 0.5, 3)), "m"),
             numpy_helper.from_array(tile(rng.uniform(0.2, 3, 3)), "v")]
    nodes = [helper.make_node("Reshape", ["x", "head_shape"], ["merged"], name="/norm/Reshape"),
             helper.make_node("BatchNormalization", ["merged", "s", "b", "m", "v"], ["normed"], name="/norm/BatchNormalization",
                              **({"training_mode": 1} if training else {})),
             helper.make_node("Reshape", ["normed", "tail_shape"], ["y"], name="/norm/Reshape_1")]
    return _model(nodes, inits, [2, 3, 4, 4], list(tail))


@pytest.mark.parametrize("case,kwargs,why", [
    ("identical copies", dict(scale_rows=(1, 1)), None),
    ("copies differ", dict(scale_rows=(1, 1.01)), "scale is not 2 identical copies of a 3-channel vector"),
    ("tail does not restore", dict(scale_rows=(1, 1), tail=(3, 2, 4, 4)), "the Reshape after it does not restore axis 0 of the input"),
])
def test_reshape_bn_reshape_fires_only_on_identical_copies(case, kwargs, why):
    model = _tiled_pattern(**kwargs)
    original = model.SerializeToString()
    x = np.random.default_rng(3).standard_normal((2, 3, 4, 4)).astype(np.float32)
    before = output(model, {"x": x})
    result = apply(model)
    if why is None:
        assert result.rewrites == 1 and count_ops(model) == {"BatchNormalization": 1}
        assert model.graph.node[0].input[0] == "x" and model.graph.node[0].output[0] == "y"
        np.testing.assert_allclose(output(model, {"x": x}), before, rtol=1e-5, atol=1e-6)
    else:
        assert result.rewrites == 0 and model.SerializeToString() == original
        assert result.notes == [f"skipped /norm/BatchNormalization: {why}"]


def test_find_tiled_norm_returns_the_site_a_declined_or_none():
    from onnx_normfix.graph import GraphIndex
    from onnx_normfix.passes._fix_inorm_patterns import TiledNorm, find_tiled_norm
    from onnx_normfix.registry import Declined

    def found(model):
        ix = GraphIndex(model)
        return find_tiled_norm(ix, next(n for n in model.graph.node if n.op_type == "BatchNormalization"))

    site = found(_tiled_pattern(scale_rows=(1, 1)))
    assert isinstance(site, TiledNorm) and (site.x, site.out, site.channels, site.batch) == ("x", "y", 3, 2)
    declined = found(_tiled_pattern(scale_rows=(1, 1), training=True))
    assert declined == Declined("BatchNormalization is in training mode")
    assert str(declined.at("/norm/BatchNormalization")) == "skipped /norm/BatchNormalization: BatchNormalization is in training mode"
    assert found(conv_bn_model()) is None  # a BN over C after a Conv: no candidate, nothing to say


def test_plain_batchnorm_over_c_is_left_alone():
    model = conv_bn_model()
    original = model.SerializeToString()
    result = apply(model)
    assert result.rewrites == 0 and result.notes == [] and model.SerializeToString() == original


# ---- through the pipeline --------------------------------------------------------------------
def test_pipeline_reports_the_change_and_checks_the_reference():
    pytest.importorskip("torch")
    import onnx_normfix

    model = load("stargan_tiny_oldstyle.onnx")
    f, want = feeds(model, "stargan_tiny_io.npz", 1)
    result = onnx_normfix.optimize(model, passes=["fold_bn", "fix_inorm"], stats=str(FIXTURES / "stargan_tiny_module.ckpt"),
                                   inputs=f, reference={"y": want})
    fix, fold = result.report["passes"]
    assert fix["name"] == "fix_inorm" and fix["validation"]["status"] == "changed"
    assert fix["validation"]["max_abs_diff"] > 0.1
    assert fold["rewrites"] == 7 and count_ops(result.model).get("BatchNormalization", 0) == 0
    assert result.report["reference"]["status"] == "passed"


def test_pipeline_pattern_collapse_is_validated_as_output_preserving():
    import onnx_normfix

    result = onnx_normfix.optimize(str(FIXTURES / "stargan_tiny_torchscript.onnx"), passes=["fix_inorm"])
    (fix,) = result.report["passes"]
    assert fix["rewrites"] == 7 and fix["validation"]["status"] == "passed"
    assert fix["nodes_before"] == 199 and fix["nodes_after"] == 31


def test_malicious_checkpoint_is_refused_not_run(tmp_path):
    torch = pytest.importorskip("torch")
    import os

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"main.1.running_mean": Evil()}, path)
    with pytest.raises(NormfixError, match="refused to unpickle"):
        apply(load("stargan_tiny_oldstyle.onnx"), stats=str(path))
    assert not marker.exists()
