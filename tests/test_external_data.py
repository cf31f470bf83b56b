"""Models with external data: kept on disk while the pipeline runs, streamed out on save.

    x[1,3,8,8] -> Conv(w1) -> BN -> Relu -> Conv(w2) -> BN -> Flatten -> MatMul(P) -> y[1,32]

w1, w2 and P sit in `model.onnx.data` (saved with size_threshold=1024); the BN parameters
are small and stay in the `.onnx`. fold_bn rewrites w1 and w2; P is never folded, so it must
never be read into memory: the save copies its bytes file to file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import IR_VERSION, conv_bn_model
from helpers import assert_close, count_ops, ort_run

import onnx_normfix
from onnx_normfix import cli, model_io
from onnx_normfix.errors import NormfixError, ValidationError
from onnx_normfix.graph import GraphIndex, array_of
from onnx_normfix.passes import fold_bn
from onnx_normfix.registry import PassContext


@pytest.fixture(autouse=True)
def keep_external_data_on_disk(monkeypatch):
    """These tests stand for models too large to read into memory: their external data stays
    on disk while the pipeline runs, as over `INLINE_EXTERNAL_BYTES` (small ones are inlined
    for validation: see test_small_external_data_is_validated_like_one_file)."""
    from onnx_normfix import pipeline

    monkeypatch.setattr(pipeline, "INLINE_EXTERNAL_BYTES", -1)


def two_convs(seed=0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def bn(name, inp, out, c):
        for key, value in (("s", rng.uniform(0.5, 2, c)), ("b", rng.standard_normal(c)),
                           ("m", rng.standard_normal(c) * 0.1), ("v", rng.uniform(0.5, 2, c))):
            inits.append(numpy_helper.from_array(value.astype(np.float32), f"{name}.{key}"))
        nodes.append(helper.make_node("BatchNormalization", [inp] + [f"{name}.{k}" for k in "sbmv"], [out],
                                      name=f"/{name}/BN"))

    inits.append(numpy_helper.from_array(rng.standard_normal((16, 3, 3, 3)).astype(np.float32) / 5, "w1"))
    nodes.append(helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="/conv1/Conv"))
    bn("bn1", "c1", "b1", 16)
    nodes.append(helper.make_node("Relu", ["b1"], ["r1"]))
    inits.append(numpy_helper.from_array(rng.standard_normal((16, 16, 3, 3)).astype(np.float32) / 12, "w2"))
    nodes.append(helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="/conv2/Conv"))
    bn("bn2", "c2", "b2", 16)
    nodes.append(helper.make_node("Flatten", ["b2"], ["flat"]))
    inits.append(numpy_helper.from_array(rng.standard_normal((1024, 32)).astype(np.float32) / 32, "P"))
    nodes.append(helper.make_node("MatMul", ["flat", "P"], ["y"]))
    graph = helper.make_graph(nodes, "ext", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = IR_VERSION
    return model


def save_external(model: onnx.ModelProto, path: Path, location: str | None = None) -> Path:
    onnx.save(model, str(path), save_as_external_data=True, location=location or f"{path.name}.data",
              size_threshold=1024)
    return path


def feeds(seed=1):
    return {"x": np.random.default_rng(seed).standard_normal((1, 3, 8, 8)).astype(np.float32)}


def outputs_of(path: Path) -> dict:
    return ort_run(onnx.load(str(path)), feeds())  # onnx.load pulls the external data in


def external_locations(path: Path) -> dict[str, str]:
    model = onnx.load(str(path), load_external_data=False)
    return {t.name: {e.key: e.value for e in t.external_data}["location"]
            for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL}


@pytest.fixture
def src(tmp_path) -> Path:
    (tmp_path / "in").mkdir()
    return save_external(two_convs(), tmp_path / "in" / "model.onnx")


# ---- loading -------------------------------------------------------------------------
def test_load_leaves_external_data_on_disk(src):
    model = model_io.load_model(src)
    reference = two_convs()
    big = {t.name for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL}
    assert big == {"w1", "w2", "P"}
    idx = GraphIndex(model)
    for t in model.graph.initializer:
        if t.name in big:
            info = {e.key: e.value for e in t.external_data}
            assert not t.HasField("raw_data")
            assert info["location"] == str((src.parent / "model.onnx.data").resolve())
    for want in reference.graph.initializer:
        np.testing.assert_array_equal(idx.constant(want.name), numpy_helper.to_array(want))


def test_fold_reads_only_the_tensors_it_folds(src, monkeypatch):
    read = []
    real = model_io.external_bytes
    monkeypatch.setattr(model_io, "external_bytes",
                        lambda t, base=None, into=None: read.append(t.name) or real(t, base, into))
    model = model_io.load_model(src)
    result = fold_bn.PASS.run(model, PassContext(options={}))
    assert result.rewrites == 2
    assert sorted(set(read)) == ["w1", "w2"]
    by_name = {t.name: t for t in model.graph.initializer}
    for name in ("w1", "w2"):  # rewritten: bytes in memory, no stale external fields
        t = by_name[name]
        assert t.HasField("raw_data") and not t.external_data and t.data_location == TensorProto.DEFAULT
    assert by_name["P"].data_location == TensorProto.EXTERNAL and not by_name["P"].HasField("raw_data")


def test_refuses_a_hard_linked_data_file_as_onnx_does(src, tmp_path):
    os.link(src.parent / "model.onnx.data", tmp_path / "elsewhere.data")
    with pytest.raises(NormfixError, match="hard links"):
        model_io.load_model(src)
    os.unlink(tmp_path / "elsewhere.data")  # twin: a single link loads
    assert model_io.has_external(model_io.load_model(src))


def test_a_data_file_that_shrank_after_loading_is_an_error_not_garbage(src):
    model = model_io.load_model(src)
    data = src.parent / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(NormfixError, match="shorter"):
        GraphIndex(model).constant("w2")


# ---- saving --------------------------------------------------------------------------
def test_fold_and_save_keeps_external_data_and_the_numbers(src, tmp_path):
    result = onnx_normfix.optimize(src, passes=["fold_bn"], validate=False)
    out = tmp_path / "out" / "fixed.onnx"
    out.parent.mkdir()
    result.save(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["fixed.onnx", "fixed.onnx.data"]
    onnx.checker.check_model(str(out), full_check=True)
    assert count_ops(onnx.load(str(out), load_external_data=False)) == {"Conv": 2, "Relu": 1, "Flatten": 1, "MatMul": 1}
    assert set(external_locations(out)) == {"w1", "w2", "P"}
    assert set(external_locations(out).values()) == {"fixed.onnx.data"}
    assert_close(outputs_of(out), outputs_of(src))
    # P was copied byte for byte, at an aligned offset
    saved = {t.name: t for t in onnx.load(str(out), load_external_data=False).graph.initializer}
    info = {e.key: int(e.value) for e in saved["P"].external_data if e.key != "location"}
    assert info["offset"] % 64 == 0
    with open(out.parent / "fixed.onnx.data", "rb") as f:
        f.seek(info["offset"])
        assert f.read(info["length"]) == numpy_helper.to_array(two_convs().graph.initializer[-1]).tobytes()


def test_output_stays_external_when_every_external_tensor_was_rewritten(tmp_path):
    model = conv_bn_model(channels=16)  # conv.weight: 16*3*3*3 floats, the only external tensor
    src = save_external(model, tmp_path / "m.onnx")
    result = onnx_normfix.optimize(src, passes=["fold_bn"], validate=False)
    assert result.external_data and not model_io.has_external(result.model)
    result.save(tmp_path / "out.onnx")
    assert set(external_locations(tmp_path / "out.onnx")) == {"conv.weight"}
    assert_close(outputs_of(tmp_path / "out.onnx"), ort_run(conv_bn_model(channels=16), feeds()))

    # twin: an input without external data gives a single file
    onnx.save(conv_bn_model(channels=16), str(tmp_path / "inline.onnx"))
    result = onnx_normfix.optimize(tmp_path / "inline.onnx", passes=["fold_bn"], validate=False)
    assert not result.external_data
    result.save(tmp_path / "inline_out.onnx")
    assert not external_locations(tmp_path / "inline_out.onnx")
    assert not (tmp_path / "inline_out.onnx.data").exists()


def test_in_place_keeps_the_stable_data_name_and_the_result_stays_usable(src):
    before = outputs_of(src)
    result = onnx_normfix.optimize(src, passes=["fold_bn"], validate=False)
    info = model_io.save_model(result.model, src, external=True)
    assert sorted(p.name for p in src.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert info["data_file"] == "model.onnx.data" and info["removed"] == []
    assert sorted(info["replaced"]) == sorted([str(src), str(src.parent / "model.onnx.data")])
    assert_close(outputs_of(src), before)
    # the in-memory model reads the file just written
    p = {t.name: t for t in result.model.graph.initializer}["P"]
    assert {e.key: e.value for e in p.external_data}["location"] == str(src.parent.resolve() / "model.onnx.data")
    np.testing.assert_array_equal(array_of(p), numpy_helper.to_array(two_convs().graph.initializer[-1]))
    result.save(src)  # again: the same name (issue 11 item 2)
    assert sorted(p.name for p in src.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert_close(outputs_of(src), before)


def test_cli_in_place_with_external_data(src):
    before = outputs_of(src)
    assert cli.main([str(src), str(src), "-q"]) == 0
    assert sorted(p.name for p in src.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert count_ops(onnx.load(str(src), load_external_data=False)).get("BatchNormalization") is None
    assert_close(outputs_of(src), before)


def test_never_overwrites_a_data_file_the_model_still_reads(tmp_path):
    """a.onnx keeps its tensors in `b.onnx.data`; saving to b.onnx must not write over them:
    refused (item 3), and nothing is written."""
    src = save_external(two_convs(), tmp_path / "a.onnx", location="b.onnx.data")
    original = (tmp_path / "b.onnx.data").read_bytes()
    before = outputs_of(src)
    result = onnx_normfix.optimize(src, passes=["fold_bn"], validate=False)
    with pytest.raises(NormfixError, match=r"refusing to overwrite b.onnx.data.*the input model reads it"):
        result.save(tmp_path / "b.onnx")
    assert (tmp_path / "b.onnx.data").read_bytes() == original
    assert not (tmp_path / "b.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "b.onnx.data"]
    assert_close(outputs_of(src), before)


def test_save_of_a_model_over_the_limit_streams_raw_data_out(tmp_path, monkeypatch):
    """An in-memory model (no external data) too big for one protobuf goes to a data file."""
    model = two_convs()
    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", 64 << 10)
    model_io.save_model(model, tmp_path / "big.onnx")
    assert set(external_locations(tmp_path / "big.onnx")) == {"w1", "w2", "P"}
    assert_close(outputs_of(tmp_path / "big.onnx"), ort_run(two_convs(), feeds()))
    # the caller's model now reads from the saved file
    assert model_io.has_external(model)
    want = {t.name: numpy_helper.to_array(t) for t in two_convs().graph.initializer}
    np.testing.assert_array_equal(GraphIndex(model).constant("w2"), want["w2"])


# ---- validation ----------------------------------------------------------------------
def test_validation_checks_and_runs_a_staged_copy(src, tmp_path, monkeypatch):
    import tempfile

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    result = onnx_normfix.optimize(src, passes=["fold_bn"])
    (stage,) = result.report["passes"]
    assert stage["validation"]["status"] == "passed"
    assert stage["validation"]["checks"][0] == "checker"
    assert stage["validation"]["max_abs_diff"] < 1e-4
    assert "notes" not in result.report  # the input was checked too, not skipped
    assert result.serialized is None  # never serialized whole
    assert list(scratch.iterdir()) == []  # staged copies removed


def test_validation_of_external_data_is_not_fooled(src, monkeypatch):
    real = fold_bn._scaled
    monkeypatch.setattr(fold_bn, "_scaled", lambda w, f: -real(w, f))
    with pytest.raises(ValidationError, match="changed output"):
        onnx_normfix.optimize(src, passes=["fold_bn"])


def test_checker_failure_on_a_staged_model_is_reported(src, monkeypatch):
    """A pass that breaks the graph of an external-data model fails the checker."""
    import dataclasses

    from onnx_normfix.registry import PASSES

    def broken(model, ctx):
        result = fold_bn._run(model, ctx)
        model.graph.node[0].input[0] = "nowhere"
        return result
    monkeypatch.setitem(PASSES, "fold_bn", dataclasses.replace(fold_bn.PASS, run=broken))
    with pytest.raises(ValidationError, match="invalid model"):
        onnx_normfix.optimize(src, passes=["fold_bn"])


def test_a_shared_external_weight_is_scaled_once_per_fold_never_twice(tmp_path):
    """    x -> Conv(W) -> BN1 -> y1        W: external, read by both convs
           x -> Conv(W) -> BN2 -> y2
    External reads are fresh arrays that fold_bn scales in place; the second fold must
    still start from the original W, and the first must not write into the shared tensor."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 3, 3, 3)).astype(np.float32), "W")]
    nodes = []
    for i in (1, 2):
        for k, v in zip("sbmv", (rng.uniform(0.5, 2, 16), rng.standard_normal(16), rng.standard_normal(16),
                                 rng.uniform(0.5, 2, 16))):
            inits.append(numpy_helper.from_array(v.astype(np.float32), f"bn{i}.{k}"))
        nodes += [helper.make_node("Conv", ["x", "W"], [f"c{i}"], pads=[1, 1, 1, 1], name=f"/conv{i}/Conv"),
                  helper.make_node("BatchNormalization", [f"c{i}"] + [f"bn{i}.{k}" for k in "sbmv"], [f"y{i}"])]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, 16, 8, 8])
                               for i in (1, 2)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = IR_VERSION
    reference = ort_run(model, feeds())
    src = save_external(model, tmp_path / "shared.onnx")
    result = onnx_normfix.optimize(src, passes=["fold_bn"])
    (stage,) = result.report["passes"]
    assert (stage["rewrites"], stage["validation"]["status"]) == (2, "passed")
    result.save(tmp_path / "out.onnx")
    assert count_ops(onnx.load(str(tmp_path / "out.onnx"), load_external_data=False)) == {"Conv": 2}
    assert_close(outputs_of(tmp_path / "out.onnx"), reference)


def test_calibrated_fix_inorm_then_fold_on_external_data(tmp_path):
    """fix_inorm's calibration runs the model on onnxruntime too (stats.estimate_stats):
    it must reach the data through a staged copy, and give what the inline model gives."""
    from conftest import FIXTURES

    rng = np.random.default_rng(0)
    data = {"x": rng.standard_normal((3, 3, 32, 32)).astype(np.float32),
            "c": np.array([[1.0], [0.0], [1.0]], np.float32)}
    inline = onnx_normfix.optimize(FIXTURES / "stargan_tiny_oldstyle.onnx", passes=["fix_inorm", "fold_bn"],
                                   calibration_data=data)
    src = save_external(onnx.load(str(FIXTURES / "stargan_tiny_oldstyle.onnx")), tmp_path / "sg.onnx")
    result = onnx_normfix.optimize(src, passes=["fix_inorm", "fold_bn"], calibration_data=data)
    stages = [(p["rewrites"], p["validation"]["status"]) for p in result.report["passes"]]
    assert stages == [(7, "changed"), (7, "passed")]
    result.save(tmp_path / "out.onnx")
    assert external_locations(tmp_path / "out.onnx")
    x = {k: v[:1] for k, v in data.items()}
    assert_close(ort_run(onnx.load(str(tmp_path / "out.onnx")), x), ort_run(inline.model, x))


def test_save_copies_by_hand_where_the_kernel_cannot(src, tmp_path, monkeypatch):
    """copy_file_range copies part of a range, then fails (old kernel, other file systems):
    the rest is read and written in chunks, at the right offsets."""
    real = os.copy_file_range
    calls = []

    def flaky(src_fd, dst_fd, count, offset_src=None, offset_dst=None):
        calls.append(count)
        if len(calls) > 1:
            raise OSError(18, "Invalid cross-device link")
        return real(src_fd, dst_fd, min(count, 1000), offset_src, offset_dst)
    monkeypatch.setattr(os, "copy_file_range", flaky)
    result = onnx_normfix.optimize(src, passes=["fold_bn"], validate=False)
    result.save(tmp_path / "out.onnx")
    assert len(calls) >= 2  # P was copied partly by the kernel, then by hand
    assert_close(outputs_of(tmp_path / "out.onnx"), outputs_of(src))


def test_small_external_data_is_validated_like_one_file(tmp_path, monkeypatch):
    """dynamo writes even kilobytes as external data: such a model is validated as fully as a
    one-file model (random draws captured, replace_random proven), and still written with its
    data file beside it."""
    from onnx_normfix import pipeline

    monkeypatch.setattr(pipeline, "INLINE_EXTERNAL_BYTES", 256 << 20)
    rng = np.random.default_rng(4)
    w = numpy_helper.from_array(rng.standard_normal((32, 32)).astype(np.float32), "w")  # over the 1 kB threshold
    g = helper.make_graph([helper.make_node("RandomNormalLike", ["x"], ["n"], name="noise"),
                           helper.make_node("Add", ["x", "n"], ["xn"]), helper.make_node("MatMul", ["xn", "w"], ["y"])],
                          "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = IR_VERSION
    src = tmp_path / "m.onnx"
    onnx.save(m, src, save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    result = onnx_normfix.optimize(src, passes=["replace_random"])
    (stage,) = result.report["passes"]
    assert stage["rewrites"] == 1 and stage["validation"]["status"] == "passed", stage["validation"]
    out = tmp_path / "o.onnx"
    assert cli.main([str(src), str(out), "--passes", "replace_random", "-q"]) == 0
    assert (tmp_path / "o.onnx.data").is_file() and (tmp_path / "m.onnx.data").is_file()
    assert [i.name for i in onnx.load(out).graph.input][:1] == ["x"]


def test_library_save_never_deletes_a_data_file_the_input_reads(tmp_path):
    """Result.save protects the input's data files like the CLI does: an old OUT and the input
    both read `out.onnx.alt.data` (say, the input is a copy of an older output); saving the new
    OUT must not delete it."""
    model = conv_bn_model(channels=16, seed=5)  # weights over the 1 kB external-data threshold
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, src, save_as_external_data=True, location="out.onnx.alt.data", size_threshold=0)
    onnx.save(onnx.load(src), out, save_as_external_data=True, location="out.onnx.alt.data", size_threshold=0)
    result = onnx_normfix.optimize(src, passes=["fold_bn"])
    result.save(out)
    assert (tmp_path / "out.onnx.alt.data").is_file()  # the input still reads it
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    assert_close(ort_run(onnx.load(src), {"x": x}), ort_run(onnx.load(out), {"x": x}))
