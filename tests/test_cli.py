"""The command line contract: exit codes, one-line errors, report content, no partial output."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import onnx
import pytest

from onnx_normfix import cli
from onnx_normfix.registry import PASSES, Pass, PassResult

from conftest import conv_bn_model


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnx_normfix", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_one_line_error(stderr: str, *needles: str):
    lines = [line for line in stderr.splitlines() if not line.startswith("[")]  # progress lines
    assert len(lines) == 1, stderr
    assert lines[0].startswith("onnx-normfix: error:"), stderr
    assert "Traceback" not in stderr
    for needle in needles:
        assert needle in lines[0], (needle, stderr)


def test_success_writes_output_report_and_summary(conv_bn_file, tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    before = digest(conv_bn_file)
    proc = run_cli(conv_bn_file, out, "--passes", "fold_bn", "--report", report)
    assert proc.returncode == 0, proc.stderr
    assert digest(conv_bn_file) == before
    assert [n.op_type for n in onnx.load(out).graph.node] == ["Conv", "Relu"]
    rep = json.loads(report.read_text())
    assert {"input", "output", "nodes_before", "nodes_after", "passes"} <= set(rep)
    assert rep["output"] == str(out) and rep["nodes_before"] == 3 and rep["nodes_after"] == 2
    (stage,) = rep["passes"]
    assert {"name", "rewrites", "notes", "seconds", "validation"} <= set(stage)
    assert {"status", "max_abs_diff", "max_rel_diff", "outputs"} <= set(stage["validation"])
    assert stage["validation"]["status"] == "passed"
    assert "fold_bn" in proc.stdout and "1 rewrites" in proc.stdout and "3 -> 2" in proc.stdout


def test_list_passes():
    proc = run_cli("--list-passes")
    assert proc.returncode == 0
    for name in ("fold_bn", "fix_inorm", "replace_random"):
        assert name in proc.stdout


@pytest.mark.parametrize("content, needle", [
    (None, "not found"),
    (b"", "empty"),
    (b"hello, I am a text file\n", "not a valid ONNX"),
    (bytes(range(256)) * 4, "not a valid ONNX"),
])
def test_bad_input_files(tmp_path, content, needle):
    src = tmp_path / "in.onnx"
    if content is not None:
        src.write_bytes(content)
    out = tmp_path / "out.onnx"
    proc = run_cli(src, out)
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, needle)
    assert not out.exists()


def test_truncated_model(conv_bn_file, tmp_path):
    data = conv_bn_file.read_bytes()
    for cut in (len(data) // 3, len(data) - 7):
        src = tmp_path / f"cut{cut}.onnx"
        src.write_bytes(data[:cut])
        assert cli.main([str(src), str(tmp_path / "out.onnx")]) == 2
        assert not (tmp_path / "out.onnx").exists()


def test_unknown_pass_lists_valid(conv_bn_file, tmp_path, capsys):
    assert cli.main([str(conv_bn_file), str(tmp_path / "o.onnx"), "--passes", "fold_bn,nope"]) == 2
    err = capsys.readouterr().err
    assert_one_line_error(err, "unknown pass 'nope'", "fold_bn", "fix_inorm", "replace_random")


def test_missing_output_folder(conv_bn_file, tmp_path, capsys):
    assert cli.main([str(conv_bn_file), str(tmp_path / "no" / "such" / "o.onnx")]) == 2
    assert_one_line_error(capsys.readouterr().err, "output folder does not exist")


def test_usage_errors_are_one_line(conv_bn_file, tmp_path, capsys):
    out = str(tmp_path / "o.onnx")
    for argv, needle in [
        ([str(conv_bn_file), out, "--input-shape", "x=1,3"], "--input-shape"),
        ([str(conv_bn_file), out, "--stats", "a.pt"], "--stats applies to pass fix_inorm"),
        ([str(conv_bn_file), out, "--inputs", str(tmp_path / "none.npz")], "file not found"),
    ]:
        assert cli.main(argv) == 2, argv
        assert_one_line_error(capsys.readouterr().err, needle)
    with pytest.raises(SystemExit) as info:
        cli.main([str(conv_bn_file)])
    assert info.value.code == 2


def _negate(model, ctx):
    from onnx import numpy_helper

    t = next(t for t in model.graph.initializer if t.name == "conv.weight")
    t.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(t), t.name))
    return PassResult(rewrites=1)


@pytest.fixture
def negate_pass():
    PASSES.pop("negate_cli", None)
    yield PASSES.setdefault("negate_cli", Pass("negate_cli", "broken on purpose", True, _negate, runs_after={"fold_bn"}))
    PASSES.pop("negate_cli", None)


def test_validation_failure_exit_1_names_pass_output_and_writes_nothing(conv_bn_file, tmp_path, capsys, negate_pass):
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    assert cli.main([str(conv_bn_file), str(out), "--passes", "fold_bn,negate_cli", "--report", str(report)]) == 1
    err = capsys.readouterr().err
    assert_one_line_error(err, "negate_cli", "'y'", "max abs diff")
    assert not out.exists()
    rep = json.loads(report.read_text())
    assert rep["status"] == "validation_failed" and rep["exit_code"] == 1 and rep["output"] is None
    assert rep["error"]["kind"] == "validation" and rep["error"]["stage"] == "negate_cli"
    assert [p["name"] for p in rep["passes"]] == ["fold_bn", "negate_cli"]
    assert rep["passes"][0]["validation"]["status"] == "passed"
    assert rep["passes"][1]["validation"]["status"] == "failed"


def test_in_equals_out_is_replaced_atomically(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(), path)
    assert cli.main([str(path), str(path), "-q"]) == 0
    assert [n.op_type for n in onnx.load(path).graph.node] == ["Conv", "Relu"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert capsys.readouterr().out == ""


def test_interrupt_leaves_no_output(conv_bn_file, tmp_path, capsys):
    def interrupt(model, ctx):
        raise KeyboardInterrupt

    PASSES["interrupt_cli"] = Pass("interrupt_cli", "Ctrl-C", True, interrupt, runs_after={"fold_bn"})
    try:
        assert cli.main([str(conv_bn_file), str(tmp_path / "o.onnx"), "--passes", "fold_bn,interrupt_cli"]) == 130
    finally:
        PASSES.pop("interrupt_cli")
    assert list(tmp_path.iterdir()) == [] or not (tmp_path / "o.onnx").exists()


def test_internal_error_is_one_line_and_debug_shows_traceback(conv_bn_file, tmp_path, capsys):
    def crash(model, ctx):
        raise ZeroDivisionError("boom")

    PASSES["crash_cli"] = Pass("crash_cli", "bug", True, crash, runs_after={"fold_bn"})
    try:
        assert cli.main([str(conv_bn_file), str(tmp_path / "o.onnx"), "--passes", "crash_cli"]) == 3
        err = capsys.readouterr().err
        assert "internal error in pass crash_cli: ZeroDivisionError: boom" in err and "a bug in that pass" in err and "Traceback" not in err
        assert cli.main([str(conv_bn_file), str(tmp_path / "o.onnx"), "--passes", "crash_cli", "--debug"]) == 3
        assert "Traceback" in capsys.readouterr().err
    finally:
        PASSES.pop("crash_cli")


def test_verbose_and_no_validate(conv_bn_file, tmp_path, capsys):
    assert cli.main([str(conv_bn_file), str(tmp_path / "o.onnx"), "-v", "--no-validate"]) == 0
    out = capsys.readouterr().out
    assert "validation skipped" in out and "disabled" in out


def test_import_is_light():
    code = "import sys, onnx_normfix; bad = [m for m in ('torch', 'onnxruntime', 'onnx_graphsurgeon') if m in sys.modules]; print(bad)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_saved_file_is_the_final_model_even_when_the_last_pass_rewrote_nothing(tmp_path):
    """The CLI writes the bytes validation serialized; after a pass that rewrote nothing it
    must serialize the model as it is (a pass with nothing to do leaves the graph alone, dead
    code included)."""
    from onnx import helper

    model = conv_bn_model()
    model.graph.node.append(helper.make_node("Neg", ["x"], ["dead"], name="dead_end"))
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    assert cli.main([str(src), str(out), "--passes", "fix_inorm", "-q"]) == 0
    import onnx_normfix as nf

    expected = nf.optimize(src, passes=["fix_inorm"]).model
    assert "dead_end" in {n.name for n in expected.graph.node}  # nothing rewritten: nothing swept
    assert out.read_bytes() == expected.SerializeToString()
