"""Directory mode: failure isolation, exit codes, manifest, incremental skips, memory-aware
scheduling, progress output, report merging. Small zoos (tiny graphs plus two PyTorch
exports), --jobs 2."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_normfix import zoo

from conftest import FIXTURES, IR_VERSION, conv_bn_model
from helpers import assert_close, count_ops, ort_run
from zoo_workers import dying_worker, sleepy_worker


def run(*args, timeout=300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnx_normfix", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, **kw)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def external_model(folder: Path, name: str = "ext.onnx") -> Path:
    """conv_bn with its tensors in `name.data` beside it."""
    model = conv_bn_model(channels=16, seed=3)  # a weight over the 1 kB external-data threshold
    path = folder / name
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=name + ".data",
              size_threshold=0)
    return path


@pytest.fixture
def zoo_dir(tmp_path) -> Path:
    """in/a.onnx, in/gan/resnet_tiny_bn.onnx (PyTorch export), in/gan/deep/ext.onnx (+ .data),
    in/gan/bn_mix.onnx (dynamo export), in/broken.onnx; a hidden folder that must be ignored."""
    src = tmp_path / "in"
    (src / "gan" / "deep").mkdir(parents=True)
    onnx.save(conv_bn_model(seed=1), src / "a.onnx")
    shutil.copy(FIXTURES / "resnet_tiny_bn.onnx", src / "gan" / "resnet_tiny_bn.onnx")
    shutil.copy(FIXTURES / "bn_mix_dynamo.onnx", src / "gan" / "bn_mix.onnx")
    external_model(src / "gan" / "deep")
    (src / "broken.onnx").write_bytes(b"\x08\x07garbage, not a model")
    (src / ".cache").mkdir()
    onnx.save(conv_bn_model(), src / ".cache" / "hidden.onnx")
    return src


def index_of(out: Path) -> dict:
    return json.loads((out / zoo.REPORTS_DIRNAME / zoo.INDEX_NAME).read_text())


def by_path(index: dict) -> dict:
    return {m["zoo"]["path"]: m for m in index["models"]}


def test_directory_run_isolates_a_failure_and_mirrors_the_tree(zoo_dir, tmp_path):
    out = tmp_path / "out"
    before = {p: digest(p) for p in zoo_dir.rglob("*") if p.is_file()}
    proc = run(zoo_dir, out, "--passes", "fold_bn", "--jobs", "2", "--html", tmp_path / "zoo.html")
    assert proc.returncode == 2, proc.stderr
    assert {p: digest(p) for p in zoo_dir.rglob("*") if p.is_file()} == before  # inputs untouched
    models = ["a.onnx", "gan/resnet_tiny_bn.onnx", "gan/bn_mix.onnx", "gan/deep/ext.onnx"]
    for rel in models:
        got, ref = onnx.load(out / rel), onnx.load(zoo_dir / rel)
        assert "BatchNormalization" not in count_ops(got), rel
        x = np.random.default_rng(0).standard_normal([d.dim_value or 1 for d in ref.graph.input[0].type.tensor_type.shape.dim]).astype(np.float32)
        assert_close(ort_run(got, {ref.graph.input[0].name: x}), ort_run(ref, {ref.graph.input[0].name: x}))
    assert (out / "gan" / "deep" / "ext.onnx.data").is_file()  # external data followed per model
    assert not (out / "broken.onnx").exists() and not (out / ".cache").exists()
    # the summary: a count line, one line per failure with its reason, where the reports are
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("5 models") and "4 ok" in lines[0] and "1 error" in lines[0] and "exit code 2" in lines[0]
    failed = [line for line in lines if "FAILED" in line]
    assert len(failed) == 1 and "broken.onnx" in failed[0] and "exit 2" in failed[0] and "not a valid ONNX" in failed[0]
    # non-terminal: one plain line per model on stderr, no redrawn status line
    assert "\r" not in proc.stderr and len([line for line in proc.stderr.splitlines() if line.startswith("[")]) == 5
    index = index_of(out)
    assert index["exit_code"] == 2 and index["counts"] == {"ok": 4, "error": 1} and index["jobs"] == 2
    entries = by_path(index)
    assert set(entries) == set(models) | {"broken.onnx"}
    for rel in models:
        report = json.loads((out / zoo.REPORTS_DIRNAME / (rel + ".json")).read_text())
        z = report["zoo"]
        assert z["exit_code"] == 0 and z["status"] == "ok" and z["input_sha256"] and z["output_sha256"]
        assert z["tool_version"].startswith("onnx-normfix ") and z["options"] == ["--passes", "fold_bn"]
        assert report["passes"][0]["validation"]["status"] == "passed"  # the CLI's own report, kept
        assert z["ops_before"]["BatchNormalization"] > 0 and "BatchNormalization" not in z["ops_after"]
    assert entries["broken.onnx"]["zoo"]["status"] == "error" and entries["broken.onnx"]["output"] is None
    page = (tmp_path / "zoo.html").read_text()
    assert all(rel in page for rel in models) and "not a valid ONNX" in page


def test_incremental_skips_until_input_options_or_force_change(zoo_dir, tmp_path, capsys):
    from onnx_normfix import cli

    (zoo_dir / "broken.onnx").unlink()
    (zoo_dir / "gan" / "resnet_tiny_bn.onnx").unlink()
    out = tmp_path / "out"
    args = [str(zoo_dir), str(out), "--passes", "fold_bn", "--jobs", "1"]

    def again(*extra) -> str:
        assert cli.main(args + list(extra)) == 0
        return capsys.readouterr().out

    assert "3 ok" in again()
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.onnx")}
    assert "3 up to date" in again()
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.onnx")} == mtimes  # nothing rewritten
    assert all(m["zoo"]["up_to_date"] for m in index_of(out)["models"])

    onnx.save(conv_bn_model(seed=9), zoo_dir / "a.onnx")  # new bytes, same name
    (out / "gan" / "bn_mix.onnx").write_bytes(b"tampered")  # an output that is no longer ours
    assert "2 ok, 1 up to date" in again()
    rerun = {p for p, m in by_path(index_of(out)).items() if not m["zoo"]["up_to_date"]}
    assert rerun == {"a.onnx", "gan/bn_mix.onnx"}
    assert onnx.load(out / "gan" / "bn_mix.onnx").graph.node



def test_options_tool_version_and_force_decide_what_is_up_to_date(tmp_path, capsys, monkeypatch):
    from onnx_normfix import cli

    src = tmp_path / "in"
    src.mkdir()
    onnx.save(conv_bn_model(), src / "m.onnx")
    np.savez(tmp_path / "stats.npz", a=np.zeros(3))
    out = tmp_path / "out"
    assert cli.main([str(src), str(out), "--jobs", "1", "-q"]) == 0
    capsys.readouterr()
    report = out / zoo.REPORTS_DIRNAME / "m.onnx.json"

    def fresh(argv, force=False) -> bool:
        task = {"path": "m.onnx", "input": str(src / "m.onnx"), "output": str(out / "m.onnx"), "report": str(report),
                "argv": argv, "force": force}
        done, todo = zoo.check_up_to_date([task])
        return bool(done)

    assert fresh(["--passes", "fold_bn"])
    assert not fresh(["--passes", "fold_bn"], force=True)
    assert not fresh(["--passes", "fold_bn", "--seed", "1"])
    monkeypatch.setattr(zoo, "_tool_version", lambda: "onnx-normfix 99")
    assert not fresh(["--passes", "fold_bn"])
    monkeypatch.undo()
    # a file an option names is part of the options: same path, new bytes, new key
    key = zoo._options_key(["--stats", str(tmp_path / "stats.npz")])
    np.savez(tmp_path / "stats.npz", a=np.ones(3))
    assert zoo._options_key(["--stats", str(tmp_path / "stats.npz")]) != key
    # a file the run writes is not an input: its bytes do not change the key
    noise = ["--passes", "replace_random", "--noise-feeds", str(tmp_path / "noise.npz")]
    key = zoo._options_key(noise)
    np.savez(tmp_path / "noise.npz", a=np.ones(3))
    assert zoo._options_key(noise) == key


def test_manifest_per_model_options_and_worst_exit_code(zoo_dir, tmp_path, capsys):
    """Per-model passes, shapes, seed and a wrong reference (validation failure, exit 1);
    only the listed models run; the exit code is the worst (1)."""
    np.savez(tmp_path / "feeds.npz", x=np.ones((1, 3, 32, 32), np.float32))
    np.savez(tmp_path / "wrong.npz", y=np.zeros((1, 10), np.float32))
    manifest = tmp_path / "zoo.jsonl"
    manifest.write_text("\n".join([
        "# per-model options",
        json.dumps({"path": "gan/resnet_tiny_bn.onnx", "passes": ["fold_bn"], "inputs": "feeds.npz",
                    "reference": "wrong.npz"}),
        json.dumps({"path": "a.onnx", "passes": "fold_bn", "seed": 4, "input_shapes": {"x": [2, 3, 8, 8]}}),
        "",
        json.dumps({"path": "gan/deep/ext.onnx", "args": ["--no-validate"]}),
        json.dumps({"path": "gan/bn_mix.onnx", "skip": True}),
    ]) + "\n")
    out = tmp_path / "out"
    from onnx_normfix import cli

    assert cli.main([str(zoo_dir), str(out), "--manifest", str(manifest), "--jobs", "1"]) == 1
    stdout = capsys.readouterr().out
    entries = by_path(index_of(out))
    assert set(entries) == {"a.onnx", "gan/resnet_tiny_bn.onnx", "gan/deep/ext.onnx"}
    r = entries["gan/resnet_tiny_bn.onnx"]["zoo"]
    assert r["exit_code"] == 1 and r["status"] == "validation_failed" and "reference" in r["error"]
    assert not (out / "gan" / "resnet_tiny_bn.onnx").exists()
    a = entries["a.onnx"]["zoo"]
    assert a["exit_code"] == 0 and a["options"] == ["--passes", "fold_bn", "--input-shape", "x:2x3x8x8", "--seed", "4"]
    assert entries["a.onnx"]["passes"][0]["validation"]["outputs"]["y"]["shape"] == [2, 4, 8, 8]
    e = entries["gan/deep/ext.onnx"]
    assert "--no-validate" in e["zoo"]["options"] and e["passes"][0]["validation"]["status"] == "skipped"
    failed = [line for line in stdout.splitlines() if "FAILED" in line]
    assert len(failed) == 1 and "resnet_tiny_bn.onnx" in failed[0] and "exit 1" in failed[0]


@pytest.mark.parametrize("line, needle", [
    ("{not json", "line 2: not valid JSON"),
    ('["a.onnx"]', "line 2: expected a JSON object"),
    ('{"path": "a.onnx", "pases": "fold_bn"}', "line 2: unknown key 'pases'"),
    ('{"passes": "fold_bn"}', "line 2: \"path\""),
    ('{"path": "missing.onnx"}', "line 2: model 'missing.onnx' not found"),
    ('{"path": "../a.onnx"}', "line 2: path '../a.onnx' must be relative"),
    ('{"path": "a.onnx"}', "line 2: model 'a.onnx' is already listed on line 1"),
    ('{"path": "gan/bn_mix.onnx", "seed": "3"}', "line 2: 'seed' must be an integer"),
    ('{"path": "gan/bn_mix.onnx", "input_shapes": {"x": [1, -3]}}', "line 2: input_shapes['x']"),
    ('{"path": "gan/bn_mix.onnx", "stats": "nope.npz"}', "line 2: stats file not found"),
    ('{"path": "gan/bn_mix.onnx", "args": ["--no-such-flag"]}', "line 2: args: unrecognized arguments"),
    ('{"path": "gan/bn_mix.onnx", "args": "--no-validate"}', "line 2: 'args' must be a list"),
])
def test_manifest_errors_name_the_line(zoo_dir, tmp_path, capsys, line, needle):
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text('{"path": "a.onnx"}\n' + line + "\n")
    from onnx_normfix import cli

    assert cli.main([str(zoo_dir), str(tmp_path / "out"), "--manifest", str(manifest)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("onnx-normfix: error: manifest ") and needle in err[0], err
    assert not (tmp_path / "out").exists()  # nothing started


def test_forwarded_options_rebuild_the_namespace():
    """Every kind of option the single-model CLI has (or may add) is forwarded so that its
    parser reads back the same values."""
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("input", nargs="?")
    p.add_argument("--passes", default="fold_bn")
    p.add_argument("--flag", action="store_true")
    p.add_argument("--no-thing", dest="thing", action="store_false")
    p.add_argument("--layout", dest="layout", action="store_const", const="external")
    p.add_argument("--shape", action="append", default=[])
    p.add_argument("--tol", type=float)
    p.add_argument("--pair", nargs=2)
    p.add_argument("--data", action=argparse.BooleanOptionalAction)
    p.add_argument("-v", "--verbose", action="store_true")
    argv = ["--flag", "--no-thing", "--layout", "--shape", "x:1x3", "--shape", "y:2", "--tol", "1e-07",
            "--pair", "a", "b", "--no-data", "-v"]
    ns = p.parse_args(argv)
    forwarded = zoo.forward_argv(p, ns)
    assert "--verbose" not in forwarded and forwarded[:2] == ["--passes", "fold_bn"]
    back = p.parse_args(forwarded)
    assert {k: v for k, v in vars(back).items() if k != "verbose"} == {k: v for k, v in vars(ns).items() if k != "verbose"}
    assert zoo.forward_argv(p, p.parse_args([])) == ["--passes", "fold_bn"]


def test_which_words_mean_directory_mode(zoo_dir, tmp_path):
    assert zoo.wants([str(zoo_dir), str(tmp_path / "out")])
    assert zoo.wants(["--passes", "fold_bn", str(zoo_dir), str(tmp_path / "out"), "--jobs", "2"])
    assert zoo.wants(["merge-reports", "a.json", "b.json"]) and zoo.wants(["manifest", str(zoo_dir)])
    assert not zoo.wants([str(zoo_dir / "a.onnx"), str(tmp_path / "o.onnx")])
    assert not zoo.wants([str(zoo_dir), str(tmp_path / "o.onnx")])  # a folder as IN.onnx: the CLI refuses it
    assert not zoo.wants(["--list-passes"]) and not zoo.wants([])


def test_usage_errors_before_any_work(zoo_dir, tmp_path, capsys):
    from onnx_normfix import cli

    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main([str(empty), str(tmp_path / "o")]) == 2
    assert "no .onnx files" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert cli.main([str(zoo_dir), str(tmp_path / "file")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert cli.main([str(zoo_dir), str(tmp_path / "o"), "--jobs", "0"]) == 2
    assert "positive integer" in capsys.readouterr().err
    assert cli.main([str(zoo_dir), str(tmp_path / "o"), "--timeout", "-1"]) == 2
    assert "positive number of seconds" in capsys.readouterr().err
    assert cli.main([str(zoo_dir), str(tmp_path / "o"), "--noise-feeds", "n.npz"]) == 2
    assert "per model" in capsys.readouterr().err
    assert cli.main([str(zoo_dir), str(tmp_path / "o"), "--report", "r.json"]) == 2
    assert "--reports DIR" in capsys.readouterr().err
    assert cli.main([str(zoo_dir), str(tmp_path / "o"), "--html", str(tmp_path / "no" / "x.html")]) == 2
    assert "--html: folder does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_discovery_skips_hidden_files_and_the_output_tree(tmp_path):
    (tmp_path / "a" / ".git").mkdir(parents=True)
    (tmp_path / "out").mkdir()
    for rel in ("a/m.onnx", "a/M2.ONNX", "a/.m.onnx.x1.tmp", "a/.hidden.onnx", "a/.git/x.onnx", "out/m.onnx",
                "a/notes.txt", "top.onnx"):
        (tmp_path / rel).write_bytes(b"x")
    assert zoo.discover(tmp_path, exclude=[tmp_path / "out"]) == ["a/M2.ONNX", "a/m.onnx", "top.onnx"]


def test_a_dangling_symlink_is_left_to_its_worker(tmp_path):
    link = tmp_path / "gone.onnx"
    link.symlink_to(tmp_path / "missing.onnx")
    assert zoo.discover(tmp_path) == ["gone.onnx"] and zoo.model_bytes(link) == 0
    task = {"path": "gone.onnx", "input": str(link), "output": str(tmp_path / "o" / "gone.onnx"),
            "report": str(tmp_path / "r" / "gone.onnx.json"), "argv": ["--passes", "fold_bn"]}
    assert zoo.check_up_to_date([task]) == ([], [task])
    report = zoo.run_model(task)
    assert report["zoo"]["exit_code"] == 2 and "not found" in report["zoo"]["error"]


@pytest.mark.parametrize("codes, want", [
    ([], 0), ([0, 0], 0), ([0, 1, 0], 1), ([1, 2, 0], 2), ([2, 3, 1], 3), ([3, 130, 2], 130), ([0, 7], 7), ([7, 130], 130),
])
def test_exit_code_is_the_worst(codes, want):
    assert zoo.worst(codes) == want


def test_a_dying_worker_costs_only_its_model(tmp_path):
    tasks = []
    for name in ("die.onnx", "a.onnx", "b.onnx", "c.onnx"):
        onnx.save(conv_bn_model(), tmp_path / name)
        tasks.append({"path": name, "input": str(tmp_path / name), "output": str(tmp_path / "out" / name),
                      "report": str(tmp_path / "r" / (name + ".json")), "argv": ["--no-validate"], "bytes": 1})
    reports, interrupted = zoo.run_tasks(tasks, 2, target=dying_worker)
    assert not interrupted
    got = {r["zoo"]["path"]: r["zoo"] for r in reports}
    assert got["die.onnx"]["exit_code"] == 3 and "SIGKILL" in got["die.onnx"]["error"]
    assert all(got[n]["exit_code"] == 0 for n in ("a.onnx", "b.onnx", "c.onnx"))
    assert zoo.build_index(reports)["exit_code"] == 3


def test_a_hanging_model_is_stopped_at_the_timeout(tmp_path):
    tasks = []
    for name in ("slow.onnx", "a.onnx"):
        onnx.save(conv_bn_model(), tmp_path / name)
        tasks.append({"path": name, "input": str(tmp_path / name), "output": str(tmp_path / "out" / name),
                      "report": str(tmp_path / "r" / (name + ".json")), "argv": ["--no-validate"], "bytes": 1})
    t = time.perf_counter()
    reports, _ = zoo.run_tasks(tasks, 2, target=sleepy_worker, timeout=4)
    assert time.perf_counter() - t < 60
    got = {r["zoo"]["path"]: r["zoo"] for r in reports}
    assert got["slow.onnx"]["exit_code"] == 2 and "timed out after 4 s" in got["slow.onnx"]["error"]
    assert got["a.onnx"]["exit_code"] == 0


def wide_model(channels=64) -> onnx.ModelProto:
    """x -> Conv(C->C, 3x3) -> BatchNormalization -> y: about 150 KB of weights."""
    rng = np.random.default_rng(0)
    c = channels
    inits = [numpy_helper.from_array(rng.standard_normal((c, c, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.uniform(0.5, 2, c).astype(np.float32), "s"),
             numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "b"),
             numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "m"),
             numpy_helper.from_array(rng.uniform(0.5, 2, c).astype(np.float32), "v")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["t"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["t", "s", "b", "m", "v"], ["y"], name="bn")]
    graph = helper.make_graph(nodes, "wide", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 4, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = IR_VERSION
    return model


def test_a_model_too_large_for_its_memory_share_runs_alone(tmp_path, capsys):
    from onnx_normfix import cli

    src = tmp_path / "in"
    src.mkdir()
    onnx.save(wide_model(), src / "big.onnx")  # ~150 KB: x4 > 1 MB / 2 jobs
    for k in range(4):
        onnx.save(conv_bn_model(seed=k), src / f"small{k}.onnx")  # ~1 KB
    out = tmp_path / "out"
    assert cli.main([str(src), str(out), "--jobs", "2", "--memory", "1", "--no-validate"]) == 0
    entries = {p: m["zoo"] for p, m in by_path(index_of(out)).items()}
    big = entries.pop("big.onnx")
    assert big["alone"] and not any(z["alone"] for z in entries.values())
    for z in entries.values():
        assert z["finished"] <= big["started"] or z["started"] >= big["finished"], (z, big)


def test_memory_plan():
    tasks = [{"bytes": 150_000}, {"bytes": 1000}]
    zoo.plan_memory(tasks, 2, 1 << 20)
    assert [t["alone"] for t in tasks] == [True, False]
    zoo.plan_memory(tasks, 2, zoo._available_memory())  # the twin: this machine's memory
    assert [t["alone"] for t in tasks] == [False, False]
    zoo.plan_memory(tasks, 1, 1 << 20)  # one job: everything runs alone anyway
    assert [t["alone"] for t in tasks] == [False, False]


def test_progress_line_on_a_terminal(tmp_path):
    import pty

    src = tmp_path / "in"
    src.mkdir()
    for k in range(2):
        onnx.save(conv_bn_model(seed=k), src / f"m{k}.onnx")
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "onnx_normfix", str(src), str(tmp_path / "out"), "--jobs", "2",
                             "--no-validate"], stdout=subprocess.PIPE, stderr=slave, text=True)
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    proc.wait(timeout=120)
    os.close(master)
    text = seen.decode()
    assert proc.returncode == 0
    assert "\r\x1b[K[0/2] 0 failed | running: m" in text and "[2/2] ok m" in text, text
    assert proc.stdout.read().startswith("2 models")


def test_merge_reports_of_two_shards(zoo_dir, tmp_path, capsys):
    """One manifest slice per CI job, each with its own reports folder; merged after."""
    from onnx_normfix import cli

    (zoo_dir / "gan" / "deep" / "ext.onnx").unlink()
    (zoo_dir / "gan" / "resnet_tiny_bn.onnx").unlink()
    assert cli.main(["manifest", str(zoo_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["path"] for line in lines] == ["a.onnx", "broken.onnx", "gan/bn_mix.onnx"]
    indexes = []
    for k in range(2):
        shard = tmp_path / f"shard{k}.jsonl"
        shard.write_text("\n".join(lines[k::2]) + "\n")
        reports = tmp_path / f"reports{k}"
        cli.main([str(zoo_dir), str(tmp_path / "out"), "--manifest", str(shard), "--reports", str(reports), "--jobs", "1"])
        indexes.append(str(reports / zoo.INDEX_NAME))
    capsys.readouterr()
    merged = tmp_path / "merged.json"
    assert cli.main(["merge-reports", str(merged), *indexes, "--html", str(tmp_path / "all.html")]) == 2  # broken.onnx
    index = json.loads(merged.read_text())
    assert [m["zoo"]["path"] for m in index["models"]] == ["a.onnx", "broken.onnx", "gan/bn_mix.onnx"]
    assert index["counts"] == {"ok": 2, "error": 1} and "FAILED broken.onnx" in capsys.readouterr().out
    assert "gan/bn_mix.onnx" in (tmp_path / "all.html").read_text()
    # per-model reports merge too; a model in two inputs keeps the later entry, with a note
    one = tmp_path / "reports0" / "gan" / "bn_mix.onnx.json"
    assert cli.main(["merge-reports", str(tmp_path / "m2.json"), indexes[0], str(one)]) == 0
    assert "several reports" in capsys.readouterr().err
    assert len(json.loads((tmp_path / "m2.json").read_text())["models"]) == 2
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    assert cli.main(["merge-reports", str(tmp_path / "m3.json"), str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("onnx-normfix: error:") and "bad.json" in err and len(err.splitlines()) == 1


def test_interrupt_stops_the_run_with_130(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for k in range(16):
        onnx.save(conv_bn_model(seed=k), src / f"m{k:02d}.onnx")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "onnx_normfix", str(src), str(out), "--jobs", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()  # the first model done: the worker is up
    assert line.startswith("[ 1/16] ok"), line
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout + stderr
    index = index_of(out)
    assert index["exit_code"] == 130 and index["counts"].get("interrupted", 0) >= 1
    assert "interrupted" in stdout and "Traceback" not in stderr
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temporaries left
    for m in index["models"]:  # every output there is complete
        if m["zoo"]["exit_code"] == 0:
            onnx.checker.check_model(onnx.load(out / m["zoo"]["path"]))


def test_in_place_directory_run_is_up_to_date_after(tmp_path, capsys):
    from onnx_normfix import cli

    src = tmp_path / "zoo"
    src.mkdir()
    for k in range(2):
        onnx.save(conv_bn_model(seed=k), src / f"m{k}.onnx")
    assert cli.main([str(src), str(src), "--jobs", "1"]) == 0
    assert all("BatchNormalization" not in count_ops(onnx.load(p)) for p in src.glob("*.onnx"))
    capsys.readouterr()
    assert cli.main([str(src), str(src), "--jobs", "2"]) == 0
    assert "2 up to date" in capsys.readouterr().out
