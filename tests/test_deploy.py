"""Issue 11: deploy-safe outputs and a command line that guides the user to a working run.

One test (at least) per numbered item of the issue, named `test_item<N>_...`, each with the
twin that must not fire where there is one. In-process `cli.main` unless the test needs a
fresh process (umask, --version).
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import FIXTURES, IR_VERSION, conv_bn_model
from helpers import assert_close, ort_run

import onnx_normfix
from onnx_normfix import cli, model_io
from onnx_normfix.validation import worker as validate  # the onnxruntime worker and its spill files
from onnx_normfix.errors import NormfixError
from onnx_normfix.registry import PASSES, Pass, PassResult

REPO = Path(__file__).resolve().parent.parent
REPORT_KEYS = {"schema", "status", "exit_code", "error", "tool", "input", "output", "options", "feeds", "files",
               "nodes_before", "nodes_after", "seconds", "load_seconds", "passes", "validation", "leftovers",
               "noise_inputs", "notes"}


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def external_model(path: Path, location: str | None = None) -> Path:
    onnx.save(conv_bn_model(channels=16), str(path), save_as_external_data=True,
              location=location or f"{path.name}.data", size_threshold=256)
    return path


def locations(path) -> set[str]:
    m = onnx.load(str(path), load_external_data=False)
    return {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"}


def outputs(path) -> dict:
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    return ort_run(onnx.load(str(path)), {"x": x})


def one_line_error(err: str, *needles):
    lines = [line for line in err.splitlines() if not line.startswith("[")]
    assert len(lines) == 1 and lines[0].startswith("onnx-normfix: error:"), err
    for needle in needles:
        assert needle in lines[0], (needle, err)
    return lines[0]


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


# ---- 1. permissions -------------------------------------------------------------------
def test_item1_new_files_get_the_umask_mode_and_replaced_files_keep_theirs(tmp_path, umask022, capsys):
    src = external_model(tmp_path / "in.onnx")
    out, report, noise = tmp_path / "out.onnx", tmp_path / "r.json", tmp_path / "n.npz"
    rnd = FIXTURES / "random_normal_ts.onnx"
    assert cli.main([str(src), str(out), "--report", str(report), "-q"]) == 0
    assert cli.main([str(rnd), str(tmp_path / "rnd.onnx"), "--passes", "replace_random", "--noise-feeds", str(noise),
                     "-q", "--input-shape", "batch:2"]) == 0
    for p in (out, tmp_path / "out.onnx.data", report, noise, tmp_path / "rnd.onnx"):
        assert mode_of(p) == 0o644, (p, oct(mode_of(p)))
    # replacing keeps the existing file's mode, in place too (it was 0600 before the fix)
    os.chmod(out, 0o640)
    os.chmod(tmp_path / "out.onnx.data", 0o604)
    assert cli.main([str(out), str(out), "-q"]) == 0
    assert mode_of(out) == 0o640 and mode_of(tmp_path / "out.onnx.data") == 0o604
    # another umask gives another mode: the tool follows it rather than a fixed 0644
    os.umask(0o077)
    assert cli.main([str(src), str(tmp_path / "private.onnx"), "-q"]) == 0
    assert mode_of(tmp_path / "private.onnx") == 0o600 and mode_of(tmp_path / "private.onnx.data") == 0o600


# ---- 2. a stable external-data name, crash-safe -----------------------------------------
def test_item2_rerunning_into_the_same_output_keeps_the_data_name(tmp_path):
    src = external_model(tmp_path / "in.onnx")
    out = tmp_path / "out.onnx"
    for _ in range(3):
        assert cli.main([str(src), str(out), "-q"]) == 0
        assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "in.onnx.data", "out.onnx", "out.onnx.data"]
        assert locations(out) == {"out.onnx.data"}
    assert_close(outputs(out), outputs(src))


@pytest.mark.parametrize("in_place", [False, True], ids=["rerun", "in_place"])
def test_item2_a_crash_at_any_step_of_the_replace_leaves_a_consistent_model(tmp_path, monkeypatch, in_place):
    """Simulated crashes at every rename/copy of the replace (a SIGKILL lands at most at one of
    them; test_kill.py kills real processes): OUT is then the old model with its old data or
    the new one with its new data, never a mix, and a rerun restores the stable name."""
    src = external_model(tmp_path / "in.onnx")
    out = tmp_path / "out.onnx"
    base = src if not in_place else out
    old_out = {"x": None}

    def prepare():
        for p in tmp_path.iterdir():
            if p.name.startswith("out.onnx") or p.name.startswith(".out.onnx"):
                p.unlink()
        if in_place:
            external_model(out)
        else:
            # an older, different model already at OUT, reading out.onnx.data
            onnx.save(conv_bn_model(channels=16, seed=1), str(out), save_as_external_data=True,
                      location="out.onnx.data", size_threshold=256)
        old_out["x"] = outputs(out)

    prepare()
    new = outputs(src)  # fold_bn preserves outputs: the new OUT computes what src does
    real_replace, real_copy = os.replace, model_io._copy_range
    steps = {"n": 0}

    class Crash(BaseException):
        pass

    def counting(limit):
        def replace(a, b):
            steps["n"] += 1
            if steps["n"] == limit:
                raise Crash
            return real_replace(a, b)

        def copy(*args):
            steps["n"] += 1
            if steps["n"] == limit:
                raise Crash
            return real_copy(*args)
        return replace, copy

    seen = set()
    for limit in range(1, 12):
        prepare()
        steps["n"] = 0
        replace, copy = counting(limit)
        monkeypatch.setattr(model_io.os, "replace", replace)
        monkeypatch.setattr(model_io, "_copy_range", copy)
        result = onnx_normfix.optimize(base, passes=["fold_bn"], validate=False)
        try:
            model_io.save_model(result.model, out, external=True)
            finished = True
        except Crash:
            finished = False
        monkeypatch.setattr(model_io.os, "replace", real_replace)
        monkeypatch.setattr(model_io, "_copy_range", real_copy)
        got = outputs(out)
        is_new = all(np.allclose(got[k], new[k], rtol=1e-4, atol=1e-5) for k in new)
        is_old = all(np.array_equal(got[k], old_out["x"][k]) for k in got)
        assert is_new or is_old, f"crash at step {limit}: a mixed model"
        seen.add(("new" if is_new and not is_old else "old") + ("/staged" if any(".staged" in n for n in locations(out)) else ""))
        if finished:
            assert locations(out) == {"out.onnx.data"}
            break
        # the next run repairs whatever the crash left
        again = onnx_normfix.optimize(out, passes=["fold_bn"], validate=False)
        model_io.save_model(again.model, out, external=True)
        assert locations(out) == {"out.onnx.data"}
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.onnx")]
    assert finished
    assert {"old", "new/staged"} <= seen, seen  # both sides of the replace were crashed into


# ---- 3. never clobber another model's data ----------------------------------------------
def test_item3_refuses_a_data_file_the_existing_output_does_not_read(tmp_path, capsys):
    src = external_model(tmp_path / "in.onnx")
    out = tmp_path / "out.onnx"
    foreign = tmp_path / "out.onnx.data"
    foreign.write_bytes(b"another model's weights")
    assert cli.main([str(src), str(out)]) == 2
    one_line_error(capsys.readouterr().err, "refusing to overwrite out.onnx.data", "move that file away",
                   "no model in that folder reads it")
    assert foreign.read_bytes() == b"another model's weights" and not out.exists()
    # the mv case: old.onnx (moved away from out.onnx) still reads out.onnx.data
    assert cli.main([str(src), str(out), "-q"]) == 2  # still refused
    capsys.readouterr()
    foreign.unlink()
    assert cli.main([str(src), str(out), "-q"]) == 0
    os.rename(out, tmp_path / "old.onnx")
    assert cli.main([str(src), str(out)]) == 2
    one_line_error(capsys.readouterr().err, "refusing to overwrite out.onnx.data", "old.onnx reads it")
    assert_close(outputs(tmp_path / "old.onnx"), outputs(src))
    # twin: the data file of the existing OUT itself is fine to replace
    os.rename(tmp_path / "old.onnx", out)
    assert cli.main([str(src), str(out), "-q"]) == 0


def test_item3_an_inline_output_ignores_an_unrelated_data_file(tmp_path):
    src = tmp_path / "in.onnx"
    onnx.save(conv_bn_model(), src)
    (tmp_path / "out.onnx.data").write_bytes(b"unrelated")
    assert cli.main([str(src), str(tmp_path / "out.onnx"), "-q"]) == 0
    assert (tmp_path / "out.onnx.data").read_bytes() == b"unrelated"


# ---- 4. in place with external data ------------------------------------------------------
def test_item4_in_place_report_names_what_was_replaced_and_removed(tmp_path):
    # an older version of the tool left the model reading model.onnx.alt.data
    path = external_model(tmp_path / "model.onnx", location="model.onnx.alt.data")
    before = outputs(path)
    report = tmp_path / "r.json"
    assert cli.main([str(path), str(path), "-q", "--report", str(report)]) == 0
    rep = json.loads(report.read_text())
    assert rep["files"]["removed"] == [str(tmp_path.resolve() / "model.onnx.alt.data")]
    assert str(path) in rep["files"]["replaced"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data", "r.json"]
    assert_close(outputs(path), before)
    # again in place: the stable file is replaced (named), nothing removed
    assert cli.main([str(path), str(path), "-q", "--report", str(report)]) == 0
    rep = json.loads(report.read_text())
    assert rep["files"]["removed"] == [] and str(tmp_path / "model.onnx.data") in rep["files"]["replaced"]


def test_item4_shared_data_files_are_kept_and_listed(tmp_path):
    """A data file not named after OUT (another model may read it) is never deleted."""
    path = external_model(tmp_path / "model.onnx", location="weights.bin")
    report = tmp_path / "r.json"
    assert cli.main([str(path), str(path), "-q", "--report", str(report)]) == 0
    rep = json.loads(report.read_text())
    assert rep["files"]["kept"] == [str(tmp_path.resolve() / "weights.bin")] and rep["files"]["removed"] == []
    assert (tmp_path / "weights.bin").exists()


# ---- 5. --external-data / --no-external-data / threshold -----------------------------------
def test_item5_external_data_flags_force_either_layout(tmp_path, monkeypatch, capsys):
    inline = tmp_path / "inline.onnx"
    onnx.save(conv_bn_model(channels=16), inline)
    ext = external_model(tmp_path / "ext.onnx")
    a, b, c = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "c.onnx"
    assert cli.main([str(inline), str(a), "-q", "--external-data"]) == 0
    assert locations(a) == {"a.onnx.data"}
    assert cli.main([str(ext), str(b), "-q", "--no-external-data"]) == 0
    assert locations(b) == set() and not (tmp_path / "b.onnx.data").exists()
    # a threshold above every tensor: nothing goes external, no empty data file is left
    assert cli.main([str(inline), str(c), "-q", "--external-data", "--external-data-threshold", "100000"]) == 0
    assert locations(c) == set() and not (tmp_path / "c.onnx.data").exists()
    for p in (a, b, c):
        assert_close(outputs(p), outputs(inline))
    # twin without flags: inline stays inline, external stays external
    assert cli.main([str(inline), str(tmp_path / "d.onnx"), "-q"]) == 0
    assert locations(tmp_path / "d.onnx") == set()
    # over the protobuf limit, --no-external-data is a clear error and nothing is written
    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", 1000)
    assert cli.main([str(ext), str(tmp_path / "e.onnx"), "--no-external-data"]) == 2
    one_line_error(capsys.readouterr().err, "2 GB limit", "--no-external-data")
    assert not (tmp_path / "e.onnx").exists()
    with pytest.raises(SystemExit):
        cli.main([str(ext), str(tmp_path / "f.onnx"), "--external-data", "--no-external-data"])


# ---- 6. everything checked before work starts ---------------------------------------------
@pytest.fixture
def no_loading(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(model_io, "load_model", fail)


@pytest.mark.parametrize("flag", ["--report", "--noise-feeds"])
def test_item6_side_file_paths_are_checked_before_loading(conv_bn_file, tmp_path, capsys, no_loading, flag):
    out = tmp_path / "out.onnx"
    argv = [str(conv_bn_file), str(out), flag, str(tmp_path / "missing" / "f")]
    if flag == "--noise-feeds":
        argv += ["--passes", "replace_random"]
    assert cli.main(argv) == 2
    one_line_error(capsys.readouterr().err, f"{flag} file folder does not exist")
    assert not out.exists()


def test_item6_read_only_folder_and_missing_stats_before_loading(conv_bn_file, tmp_path, capsys, no_loading):
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], capture_output=True).returncode:
        os.chmod(ro, 0o555)
        if os.access(ro, os.W_OK):
            pytest.skip("cannot make a read-only folder here (root without mount)")
    try:
        assert cli.main([str(conv_bn_file), str(tmp_path / "o.onnx"), "--report", str(ro / "r.json")]) == 2
        one_line_error(capsys.readouterr().err, "cannot write the --report file into")
        assert cli.main([str(conv_bn_file), str(ro / "o.onnx")]) == 2
        one_line_error(capsys.readouterr().err, "cannot write the output into")
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)
    assert not (tmp_path / "o.onnx").exists()


def test_item6_a_failing_side_file_leaves_no_output(conv_bn_file, tmp_path, monkeypatch, capsys):
    real = model_io.write_file_atomically

    def full_disk(path, data, what="file"):
        if "noise" in what:
            raise NormfixError(f"cannot write {what} {path}: No space left on device")
        return real(path, data, what)

    monkeypatch.setattr(model_io, "write_file_atomically", full_disk)
    out = tmp_path / "out.onnx"
    rnd = FIXTURES / "random_normal_ts.onnx"
    code = cli.main([str(rnd), str(out), "--passes", "replace_random", "--noise-feeds", str(tmp_path / "n.npz"),
                     "--report", str(tmp_path / "r.json")])
    assert code == 2
    one_line_error(capsys.readouterr().err, "No space left")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv_bn.onnx", "r.json"] or \
        sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    assert json.loads((tmp_path / "r.json").read_text())["status"] == "error"


def _big_model(channels=20000) -> onnx.ModelProto:
    return conv_bn_model(channels=channels)  # 2.2 MB of Conv weights: spilled to a file for the worker


def test_item6_a_full_tmpfs_falls_back_to_the_disk_temp_folder(tmp_path, monkeypatch):
    shm = tmp_path / "shm"
    shm.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(shm)], capture_output=True).returncode:
        pytest.skip("cannot mount a tiny tmpfs here to simulate a full /dev/shm")
    try:
        monkeypatch.setattr(validate, "SPILL_DIRS", (str(shm), None))
        monkeypatch.setattr(validate, "SPILL_BYTES", 1 << 20)
        spilled = []
        real = validate._spill

        def watch(data):
            path = real(data)
            spilled.append(path)
            return path

        monkeypatch.setattr(validate, "_spill", watch)
        src, out = tmp_path / "big.onnx", tmp_path / "out.onnx"
        onnx.save(_big_model(), src)
        assert cli.main([str(src), str(out), "-q"]) == 0
        assert spilled and all(not p.startswith(str(shm)) for p in spilled)  # the fallback was used
        assert list(shm.iterdir()) == []  # no partial file left on the full tmpfs
        assert all(not os.path.exists(p) for p in spilled)  # and the fallback files are gone too
        # twin: a tmpfs with room is used (and cleaned up)
        monkeypatch.setattr(validate, "SPILL_DIRS", (str(tmp_path), None))
        spilled.clear()
        assert cli.main([str(src), str(tmp_path / "out2.onnx"), "-q"]) == 0
        assert spilled and all(p.startswith(str(tmp_path)) for p in spilled)
        assert not [p for p in tmp_path.iterdir() if p.name.startswith("onnx_normfix_")]
    finally:
        subprocess.run(["umount", str(shm)], capture_output=True)


def test_item6_no_room_anywhere_is_a_clear_error_with_nothing_left(tmp_path, monkeypatch, capsys):
    shm = tmp_path / "shm"
    shm.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(shm)], capture_output=True).returncode:
        pytest.skip("cannot mount a tiny tmpfs here")
    try:
        monkeypatch.setattr(validate, "SPILL_DIRS", (str(shm), str(shm)))
        with pytest.raises(NormfixError, match="cannot write a temporary copy of the model.*No space"):
            validate._spill(b"\0" * (2 << 20))
        assert list(shm.iterdir()) == []
    finally:
        subprocess.run(["umount", str(shm)], capture_output=True)


# ---- 7. --version, --help ------------------------------------------------------------------
def test_item7_version_and_help_list_the_exit_codes():
    import tomllib
    from importlib import metadata

    proc = subprocess.run([sys.executable, "-m", "onnx_normfix", "--version"], capture_output=True, text=True, timeout=60)
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert proc.returncode == 0 and proc.stdout.strip() == f"onnx-normfix {declared}"
    assert onnx_normfix.__version__ == metadata.version("onnx-normfix") == declared
    proc = subprocess.run([sys.executable, "-m", "onnx_normfix", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    codes = re.findall(r"^\s+(\d+)\s+\w", proc.stdout.split("exit codes:")[1], flags=re.M)
    assert codes == ["0", "1", "2", "3", "130"]


# ---- 8. the full onnxruntime message ------------------------------------------------------
@pytest.mark.parametrize("debug", [False, True])
def test_item8_the_whole_onnxruntime_message_reaches_the_user(conv_bn_file, tmp_path, capsys, debug):
    np.savez(tmp_path / "in.npz", x=np.zeros((1, 4, 8, 8), np.float32))  # 4 channels where the model has 3
    argv = [str(conv_bn_file), str(tmp_path / "o.onnx"), "--inputs", str(tmp_path / "in.npz")] + (["--debug"] if debug else [])
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    last = [line for line in err.splitlines() if line.startswith("onnx-normfix: error:")]
    assert len(last) == 1 and "index: 1 Got: 4 Expected: 3" in last[0], err
    if not debug:
        one_line_error(err)


# ---- 9. --report on every run, one schema ------------------------------------------------
def _crash(model, ctx):
    raise ZeroDivisionError("boom")


def _interrupt(model, ctx):
    raise KeyboardInterrupt


from test_cli import _negate  # noqa: E402  (the same deliberately wrong pass: flips conv.weight)


@pytest.fixture
def odd_passes():
    added = {"crash_rep": _crash, "interrupt_rep": _interrupt, "negate_rep": _negate}
    for name, run in added.items():
        PASSES[name] = Pass(name, "test", True, run, runs_after={"fold_bn"})
    yield
    for name in added:
        PASSES.pop(name, None)


@pytest.mark.parametrize("case, passes, extra, code, status, kind", [
    ("ok", "fold_bn", [], 0, "ok", None),
    ("validation", "fold_bn,negate_rep", [], 1, "validation_failed", "validation"),
    ("usage", "fold_bn,nope", [], 2, "error", "usage"),
    ("bad_shape", "fold_bn", ["--input-shape", "x:1xa"], 2, "error", "usage"),
    ("internal", "fold_bn,crash_rep", [], 3, "error", "internal"),
    ("interrupted", "fold_bn,interrupt_rep", [], 130, "error", "interrupted"),
])
def test_item9_report_is_written_on_every_run_with_one_schema(conv_bn_file, tmp_path, odd_passes, case, passes,
                                                              extra, code, status, kind):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    assert cli.main([str(conv_bn_file), str(out), "--passes", passes, "--report", str(report), "-q", "--seed", "7",
                     *extra]) == code
    rep = json.loads(report.read_text())
    assert set(rep) == REPORT_KEYS, set(rep) ^ REPORT_KEYS
    assert rep["status"] == status and rep["exit_code"] == code and rep["schema"] == 1
    assert rep["tool"]["version"] == onnx_normfix.__version__ and rep["tool"]["onnx"] == onnx.__version__
    assert rep["feeds"]["seed"] == 7 and rep["options"]["seed"] == 7
    assert rep["files"]["input"]["bytes"] == conv_bn_file.stat().st_size
    assert rep["options"]["passes"] == [p for p in passes.split(",")]
    if status == "ok":
        assert rep["error"] is None and rep["output"] == str(out)
        assert rep["files"]["output"]["bytes"] == out.stat().st_size
        assert rep["feeds"]["shapes"] == {"x": [2, 3, 8, 8]}  # symbolic batch: 2 distinct samples
        assert rep["passes"][0]["name"] == "fold_bn" and rep["passes"][0]["validation"]["status"] == "passed"
    else:
        assert rep["error"]["kind"] == kind and rep["output"] is None and rep["files"]["output"] is None
        assert not out.exists()
    if case in ("validation", "internal", "interrupted"):  # the stages that ran are there
        assert rep["passes"][0]["name"] == "fold_bn" and rep["passes"][0]["rewrites"] == 1
    if case == "internal":  # a pass that raised is named: the bug is that pass's
        assert rep["error"]["stage"] == "crash_rep"


def test_item9_feed_shapes_follow_input_shape(tmp_path):
    src = tmp_path / "in.onnx"
    onnx.save(conv_bn_model(batch="N"), src)
    report = tmp_path / "r.json"
    assert cli.main([str(src), str(tmp_path / "o.onnx"), "-q", "--input-shape", "N:3", "--report", str(report)]) == 0
    rep = json.loads(report.read_text())
    assert rep["feeds"]["shapes"] == {"x": [3, 3, 8, 8]} and rep["feeds"]["input_shapes"] == {"N": 3}
    assert "x:3x3x8x8" in rep["validation"]["summary"]


# ---- 10. fix_inorm on ordinary InstanceNorm -------------------------------------------------
@pytest.fixture(scope="module")
def plain_inorm(tmp_path_factory):
    """A real PyTorch export of InstanceNorm2d with PyTorch's default track_running_stats=False."""
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.InstanceNorm2d(8, affine=True),
                              torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3, padding=1)).eval()
    folder = tmp_path_factory.mktemp("plain_inorm")
    x = torch.randn(1, 3, 16, 16)
    torch.onnx.export(net, (x,), str(folder / "g.onnx"), dynamo=False, opset_version=17, input_names=["x"],
                      output_names=["y"])
    torch.save(net.state_dict(), folder / "g.pt")
    with torch.no_grad():
        np.savez(folder / "io.npz", x=x.numpy(), y=net(x).numpy())
    return folder


def test_item10_plain_instance_norm_is_left_with_a_note_with_and_without_a_checkpoint(plain_inorm, tmp_path, capsys):
    src = plain_inorm / "g.onnx"
    assert [n.op_type for n in onnx.load(src).graph.node].count("InstanceNormalization") == 1
    for extra, needle in (([], "track_running_stats=False"), (["--stats", str(plain_inorm / "g.pt")],
                                                               "holds no running statistics")):
        out, report = tmp_path / "o.onnx", tmp_path / "r.json"
        assert cli.main([str(src), str(out), "--passes", "fix_inorm,fold_bn", "--report", str(report), *extra]) == 0
        rep = json.loads(report.read_text())
        (stage,) = [p for p in rep["passes"] if p["name"] == "fix_inorm"]
        assert stage["rewrites"] == 0 and any(needle in n for n in stage["notes"]), stage["notes"]
        (left,) = [g for g in rep["leftovers"] if g["op"] == "InstanceNormalization"]
        assert left["count"] == 1
        assert "InstanceNormalization" in capsys.readouterr().out
        io = np.load(plain_inorm / "io.npz")
        assert_close(ort_run(onnx.load(out), {"x": io["x"]}), {"y": io["y"]}, rtol=1e-4, atol=1e-5)


def test_item10_a_checkpoint_with_stats_still_restores_them(tmp_path):
    """Twin: an old-style export with its real checkpoint is still repaired."""
    out = tmp_path / "o.onnx"
    assert cli.main([str(FIXTURES / "stargan_tiny_oldstyle.onnx"), str(out), "--passes", "fix_inorm", "-q",
                     "--stats", str(FIXTURES / "stargan_tiny_stats.npz")]) == 0
    assert "InstanceNormalization" not in {n.op_type for n in onnx.load(out).graph.node}


# ---- 11. what is left behind is said -------------------------------------------------------
def test_item11_leftover_norms_with_reason_and_the_pass_that_would_handle_them(tmp_path, capsys):
    src = FIXTURES / "stargan_tiny_torchscript.onnx"
    report = tmp_path / "r.json"
    assert cli.main([str(src), str(tmp_path / "a.onnx"), "--passes", "fold_bn", "--report", str(report)]) == 0
    printed = capsys.readouterr().out
    rep = json.loads(report.read_text())
    (nc,) = [g for g in rep["leftovers"] if g["kind"] == "over N*C between Reshapes"]
    assert nc["op"] == "BatchNormalization" and nc["count"] == 7 and nc["hint"] == "run with fix_inorm"
    assert "left: 7 BatchNormalization" in printed and "run with fix_inorm" in printed
    assert "validation: nothing to compare (no pass rewrote anything)" in printed
    # twin: with fix_inorm too, nothing is left
    assert cli.main([str(src), str(tmp_path / "b.onnx"), "--passes", "fix_inorm,fold_bn", "--report", str(report)]) == 0
    assert json.loads(report.read_text())["leftovers"] == []
    printed = capsys.readouterr().out
    assert "left:" not in printed
    assert "validation: whole model at x:2x3x32x32, c:2x1 (seed 0, 2 draws) after fix_inorm, fold_bn" in printed


def test_item11_unfoldable_bn_and_decomposed_layernorm_are_named(tmp_path, capsys):
    c = 4
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 4, 4])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 8])
    w = helper.make_tensor_value_info("w", TensorProto.FLOAT, [2, 8])
    inits = [numpy_helper.from_array(np.full(c, v, np.float32), n) for n, v in
             (("s", 1.0), ("b", 0.0), ("m", 0.1), ("v", 2.0))]
    inits += [numpy_helper.from_array(np.array(2.0, np.float32), "two"),
              numpy_helper.from_array(np.array(1e-5, np.float32), "eps")]
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="/relu"),
             helper.make_node("BatchNormalization", ["r", "s", "b", "m", "v"], ["y"], name="/bn_after_relu"),
             helper.make_node("ReduceMean", ["z"], ["mu"], axes=[-1], name="/ln/mean"),
             helper.make_node("Sub", ["z", "mu"], ["d"], name="/ln/sub"),
             helper.make_node("Pow", ["d", "two"], ["d2"], name="/ln/pow"),
             helper.make_node("ReduceMean", ["d2"], ["var"], axes=[-1], name="/ln/var"),
             helper.make_node("Add", ["var", "eps"], ["ve"], name="/ln/add"),
             helper.make_node("Sqrt", ["ve"], ["sd"], name="/ln/sqrt"),
             helper.make_node("Div", ["d", "sd"], ["w"], name="/ln/div")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x, z], [y, w], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = IR_VERSION
    src = tmp_path / "in.onnx"
    onnx.save(model, src)
    report = tmp_path / "r.json"
    assert cli.main([str(src), str(tmp_path / "o.onnx"), "--report", str(report)]) == 0
    rep = json.loads(report.read_text())
    kinds = {(g["op"], g["kind"]): g for g in rep["leftovers"]}
    bn = kinds[("BatchNormalization", "no weights to fold into")]
    assert "comes from a Relu" in bn["reason"] and bn["hint"] is None
    ln = kinds[("decomposed LayerNorm", "ReduceMean ... Sqrt chain")]
    assert ln["count"] == 1 and ln["nodes"] == ["/ln/sqrt"]
    assert rep["validation"]["summary"] == "nothing to compare (no pass rewrote anything)"


def test_item11_new_noise_inputs_are_named_with_how_to_feed_them(tmp_path, capsys):
    report = tmp_path / "r.json"
    assert cli.main([str(FIXTURES / "random_normal_ts.onnx"), str(tmp_path / "o.onnx"), "--passes", "replace_random",
                     "--report", str(report)]) == 0
    printed = capsys.readouterr().out
    rep = json.loads(report.read_text())
    (noise,) = rep["noise_inputs"]
    assert noise["input"].startswith("noise__") and noise["distribution"] == "normal"
    assert f"new inputs: {noise['input']} (normal" in printed and "--noise-feeds" in printed
    assert "noise_feeds(model, seed)" in printed


# ---- 12. -v capped and rounded -------------------------------------------------------------
def _many_declines(n=30) -> onnx.ModelProto:
    """n Conv -> BN pairs where the Conv output has a second consumer: fold_bn declines each."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])
    nodes, inits, outs, prev = [], [], [], "x"
    for k in range(n):
        inits += [numpy_helper.from_array(rng.standard_normal((2, 2, 1, 1)).astype(np.float32), f"w{k}")]
        inits += [numpy_helper.from_array(rng.uniform(0.5, 1.5, 2).astype(np.float32), f"{p}{k}") for p in "smv"]
        inits += [numpy_helper.from_array(rng.standard_normal(2).astype(np.float32), f"b{k}")]
        nodes += [helper.make_node("Conv", [prev, f"w{k}"], [f"c{k}"], name=f"/conv{k}"),
                  helper.make_node("BatchNormalization", [f"c{k}", f"s{k}", f"b{k}", f"m{k}", f"v{k}"], [f"n{k}"],
                                   name=f"/bn{k}"),
                  helper.make_node("Add", [f"n{k}", f"c{k}"], [f"a{k}"], name=f"/add{k}")]
        prev = f"a{k}"
    out = helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, 2, 4, 4])
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [out], inits), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = IR_VERSION
    return model


def test_item12_verbose_caps_per_site_detail_and_rounds(tmp_path, capsys, monkeypatch):
    src, report = tmp_path / "in.onnx", tmp_path / "r.json"
    onnx.save(_many_declines(), src)
    assert cli.main([str(src), str(tmp_path / "o.onnx"), "-v", "--report", str(report)]) == 0
    printed = capsys.readouterr().out
    notes = [line for line in printed.splitlines() if line.strip().startswith("skipped /bn")]
    assert len(notes) == cli.VERBOSE_LINES and "... 10 more notes (all of them in --report)" in printed
    assert len(json.loads(report.read_text())["passes"][0]["notes"]) == 30  # the report keeps all
    # figures rounded, and rewrite-site checks name tensors, not outputs
    from onnx_normfix import pipeline

    monkeypatch.setattr(pipeline, "WHOLE_MODEL_NODES", 2)
    src2 = tmp_path / "cb.onnx"
    onnx.save(conv_bn_model(), src2)
    assert cli.main([str(src2), str(tmp_path / "o2.onnx"), "-v"]) == 0
    printed = capsys.readouterr().out
    figures = [line for line in printed.splitlines() if "max abs diff" in line and line.startswith("      ")]
    assert figures and all(line.strip().startswith("tensor ") for line in figures), printed
    # rounded to 3 significant digits (0.000488 is; 0.00048828125 is not)
    digits = [len(m.group(1).lstrip("0")) for m in re.finditer(r"\d\.(\d+)", printed)]
    assert digits and max(digits) <= 3, printed
    assert "1 rewrite sites" in printed


# ---- 13. truthful labels, complete README --------------------------------------------------
def test_item13_list_passes_labels_are_truthful(capsys):
    assert cli.main(["--list-passes"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "[preserves outputs]" in lines["fold_bn"]
    assert "changes outputs when it restores running stats" in lines["fix_inorm"]
    assert "changes them in modes constant and mean" in lines["replace_random"]


def test_item13_readme_lists_every_option_and_true_versions():
    readme = (REPO / "README.md").read_text()
    table = readme.split("## Command line")[1].split("## Library")[0]
    flags = {s for a in cli.build_parser()._actions for s in a.option_strings if s.startswith("--")}
    missing = {f for f in flags if f"`{f}" not in table and f not in ("--help",)}
    assert not missing, missing
    from importlib import metadata

    torch_pin = re.search(r"torch==([\d.]+)", readme).group(1)
    assert torch_pin == metadata.version("torch").split("+")[0]
    assert "https://download.pytorch.org/whl/cpu" in readme
    for name in ("onnx", "onnxruntime"):
        for mentioned in re.findall(rf"\b{name} (\d+\.\d+(?:\.\d+)?)\b", readme.split("## Benchmark")[0]):
            assert metadata.version(name).startswith(mentioned), (name, mentioned)


# ---- 14. small things ------------------------------------------------------------------------
@pytest.mark.parametrize("spelling", ["fold-bn", "FOLD_BN", " Fold-Bn "])
def test_item14_pass_name_spellings(conv_bn_file, tmp_path, spelling):
    out = tmp_path / "o.onnx"
    assert cli.main([str(conv_bn_file), str(out), "--passes", spelling, "-q"]) == 0
    assert [n.op_type for n in onnx.load(out).graph.node] == ["Conv", "Relu"]


def test_item14_onnxsim_style_shapes(tmp_path):
    src, report = tmp_path / "in.onnx", tmp_path / "r.json"
    onnx.save(conv_bn_model(batch="N"), src)
    assert cli.main([str(src), str(tmp_path / "o.onnx"), "-q", "--input-shape", "x:2,3,8,8", "--report", str(report)]) == 0
    assert json.loads(report.read_text())["feeds"]["shapes"] == {"x": [2, 3, 8, 8]}


def test_item14_a_pytorch_file_as_the_model(tmp_path, capsys):
    for name, data in (("model.pt", b"PK\x03\x04rest"), ("weights", b"\x80\x02}q\x00.")):
        p = tmp_path / name
        p.write_bytes(data)
        assert cli.main([str(p), str(tmp_path / "o.onnx")]) == 2
        one_line_error(capsys.readouterr().err, "PyTorch", "export it to ONNX first")


def test_item14_allow_partial_with_nothing_matched_is_an_error(tmp_path, capsys):
    np.savez(tmp_path / "other.npz", **{"net.5.running_mean": np.zeros(3, np.float32),
                                        "net.5.running_var": np.ones(3, np.float32)})
    argv = [str(FIXTURES / "stargan_tiny_oldstyle.onnx"), str(tmp_path / "o.onnx"), "--passes", "fix_inorm",
            "--allow-partial", "--stats", str(tmp_path / "other.npz")]
    assert cli.main(argv) == 2
    one_line_error(capsys.readouterr().err, "--allow-partial, but none of the 7")
    assert not (tmp_path / "o.onnx").exists()


def test_item14_quiet_with_verbose_is_a_usage_error(conv_bn_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([str(conv_bn_file), str(tmp_path / "o.onnx"), "-q", "-v"])
    assert info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_item14_missing_stats_file_before_loading(tmp_path, capsys, no_loading):
    argv = [str(FIXTURES / "stargan_tiny_oldstyle.onnx"), str(tmp_path / "o.onnx"), "--passes", "fix_inorm",
            "--stats", str(tmp_path / "nope.pt")]
    assert cli.main(argv) == 2
    one_line_error(capsys.readouterr().err, "--stats: file not found")


# ---- issue 10: bad numbers are usage errors ---------------------------------------------------
@pytest.mark.parametrize("flag, value", [("--seed", "-1"), ("--seed", "4294967296"), ("--rtol", "nan"),
                                         ("--atol", "-1"), ("--rtol", "inf"), ("--atol", "abc")])
def test_bad_numbers_are_usage_errors(conv_bn_file, tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as info:
        cli.main([str(conv_bn_file), str(tmp_path / "o.onnx"), flag, value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and flag in err and "Traceback" not in err
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("options", [{"seed": -1}, {"seed": 1.5}, {"rtol": float("nan")}, {"atol": -1.0},
                                     {"rtol": float("inf")}])
def test_bad_numbers_in_the_library(conv_bn_file, options):
    with pytest.raises(NormfixError, match="seed|rtol|atol"):
        onnx_normfix.optimize(conv_bn_file, **options)


def test_good_numbers_pass(conv_bn_file, tmp_path):
    assert cli.main([str(conv_bn_file), str(tmp_path / "o.onnx"), "-q", "--seed", "4294967295", "--rtol", "0",
                     "--atol", "1e-3"]) == 0


@pytest.fixture(scope="module")
def bn_and_plain_inorm(tmp_path_factory):
    """A real export mixing BatchNorm2d (running stats) and InstanceNorm2d(affine=True,
    track_running_stats=False): the checkpoint has stats, but none for the InstanceNorm."""
    import torch

    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.InstanceNorm2d(8, affine=True),
                              torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    with torch.no_grad():  # non-trivial stats and affine parameters
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
        net[4].weight.uniform_(0.5, 1.5)
        net[4].bias.uniform_(-0.5, 0.5)
    net.eval()
    folder = tmp_path_factory.mktemp("bn_and_inorm")
    x = torch.randn(1, 3, 16, 16)
    torch.onnx.export(net, (x,), str(folder / "g.onnx"), dynamo=False, opset_version=17, input_names=["x"],
                      output_names=["y"], do_constant_folding=False)
    torch.save(net.state_dict(), folder / "g.pt")
    with torch.no_grad():
        np.savez(folder / "io.npz", x=x.numpy(), y=net(x).numpy())
    return folder


def test_item10_a_checkpoint_without_stats_for_that_module_leaves_it(bn_and_plain_inorm, tmp_path):
    src = bn_and_plain_inorm / "g.onnx"
    ops = [n.op_type for n in onnx.load(src).graph.node]
    assert ops.count("BatchNormalization") == 1 and ops.count("InstanceNormalization") == 1
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    io = np.load(bn_and_plain_inorm / "io.npz")
    np.savez(tmp_path / "x.npz", x=io["x"])
    np.savez(tmp_path / "y.npz", y=io["y"])
    assert cli.main([str(src), str(out), "--passes", "fix_inorm,fold_bn", "--stats", str(bn_and_plain_inorm / "g.pt"),
                     "--report", str(report), "-q", "--inputs", str(tmp_path / "x.npz"),
                     "--reference", str(tmp_path / "y.npz")]) == 0
    rep = json.loads(report.read_text())
    (stage,) = [p for p in rep["passes"] if p["name"] == "fix_inorm"]
    assert stage["rewrites"] == 0 and stage["details"]["per_instance"] == ["/4/InstanceNormalization"]
    assert any("holds their weights but no running statistics" in n for n in stage["notes"])
    ops = [n.op_type for n in onnx.load(out).graph.node]
    assert ops.count("InstanceNormalization") == 1 and "BatchNormalization" not in ops  # the BN was folded
    assert rep["reference"]["status"] == "passed"  # equal to PyTorch eval
