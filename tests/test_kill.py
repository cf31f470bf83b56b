"""SIGKILL at random moments: the output is absent, the old file, or complete; never partial.

The model (built in a temp folder: 120 Conv+BN layers and 1024-wide MatMul+BN, ~14 MB)
takes ~2 s through the CLI: loading, checking, folding, validating, writing. A fixed-seed
set of kill times is spread over a measured uninterrupted run, plus kills triggered the
moment the last validation line appears (so the write itself is hit). After each kill:

  - the input is byte-identical to before;
  - the output path holds nothing, the file that was there before, or exactly the bytes an
    uninterrupted run writes (which load and pass onnx.checker);
  - nothing else appears in the output folder except hidden temporaries named
    `.<output name>.<random>.tmp` (or a `.<output name>.<random>` staging folder for external
    data), which can never be mistaken for the output; the next run does not read them.

Modes: IN != OUT (fresh and pre-existing output), IN == OUT, and IN == OUT with external
data (the 2 GB threshold patched down so a 14 MB model takes the external-data path).
"""

from __future__ import annotations

import hashlib
import re
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

from conftest import IR_VERSION

SEED = 20240611
RANDOM_KILLS = 10
TRIGGERED_DELAYS = (0.0, 0.05)  # seconds after "validation passed" is printed
# A driver that runs the real CLI with the external-data threshold at 1 MB instead of 2 GB.
EXTERNAL_DRIVER = ("import sys; import onnx_normfix.model_io as m; m.PROTOBUF_LIMIT = 1 << 20; "
                   "from onnx_normfix.cli import main; sys.exit(main(sys.argv[1:]))")


def kill_model(conv_layers=120, wide=2, width=1024, seed=0) -> onnx.ModelProto:
    """x[1,8,16,16] -> (Conv 3x3 -> BN -> Relu) * conv_layers -> Flatten -> MatMul
    -> (MatMul[width x width] -> BN) * wide -> y[1, width]"""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def bn(name, inp, out, c):
        for suffix, value in (("s", rng.uniform(0.5, 1.5, c)), ("b", rng.standard_normal(c) * 0.1),
                              ("m", rng.standard_normal(c) * 0.1), ("v", rng.uniform(0.5, 1.5, c))):
            inits.append(numpy_helper.from_array(value.astype(np.float32), f"{name}.{suffix}"))
        nodes.append(helper.make_node("BatchNormalization", [inp] + [f"{name}.{s}" for s in "sbmv"], [out],
                                      name=f"{name}/BN"))

    cur = "x"
    for i in range(conv_layers):
        inits.append(numpy_helper.from_array((rng.standard_normal((8, 8, 3, 3)) / 8.5).astype(np.float32), f"c{i}.w"))
        nodes.append(helper.make_node("Conv", [cur, f"c{i}.w"], [f"c{i}"], pads=[1, 1, 1, 1], name=f"c{i}/Conv"))
        bn(f"c{i}", f"c{i}", f"b{i}", 8)
        nodes.append(helper.make_node("Relu", [f"b{i}"], [f"r{i}"]))
        cur = f"r{i}"
    nodes.append(helper.make_node("Flatten", [cur], ["flat"]))
    inits.append(numpy_helper.from_array(np.full((8 * 16 * 16, width), 1 / 2048, np.float32), "proj"))
    nodes.append(helper.make_node("MatMul", ["flat", "proj"], ["p"]))
    cur = "p"
    for i in range(wide):
        w = np.full((width, width), 1.0 / width, np.float32) * rng.uniform(0.5, 1.5, width).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"fc{i}.w"))
        nodes.append(helper.make_node("MatMul", [cur, f"fc{i}.w"], [f"fc{i}"]))
        bn(f"fcbn{i}", f"fc{i}", f"fb{i}", width)
        cur = f"fb{i}"
    nodes.append(helper.make_node("Identity", [cur], ["y"]))
    graph = helper.make_graph(nodes, "kill", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = IR_VERSION
    return model


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def start(args, external=False) -> subprocess.Popen:
    head = [sys.executable, "-c", EXTERNAL_DRIVER] if external else [sys.executable, "-m", "onnx_normfix"]
    # -v: progress lines on a non-terminal stderr too (the triggered kills wait for one)
    args = [*map(str, args), *([] if "-q" in args else ["-v"])]
    return subprocess.Popen([*head, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def run_to_end(args, external=False) -> float:
    t = time.perf_counter()
    proc = start(args, external)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return time.perf_counter() - t


def kill_after(args, delay: float | None, trigger_delay: float | None = None, external=False) -> int | None:
    """Start the CLI and SIGKILL it after `delay` seconds, or `trigger_delay` seconds after it
    reports its validation result. Returns the exit code (-9 if the kill landed)."""
    proc = start(args, external)
    if delay is not None:
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    else:
        for line in proc.stderr:
            if "validation passed" in line:
                time.sleep(trigger_delay)
                proc.send_signal(signal.SIGKILL)
                break
    proc.communicate(timeout=120)
    return proc.returncode


def kill_plan(duration: float, seed: int) -> list[tuple[float | None, float | None]]:
    """Stratified random kill times over [0.05, 1.0] x the measured run, then the triggered ones."""
    rng = np.random.default_rng(seed)
    times = [duration * (0.05 + 0.95 * (k + rng.uniform()) / RANDOM_KILLS) for k in range(RANDOM_KILLS)]
    return [(t, None) for t in times] + [(None, d) for d in TRIGGERED_DELAYS]


def stray(folder: Path, keep: set[str], out_name: str) -> list[str]:
    """Files in `folder` besides `keep`; asserts each is a hidden temporary of `out_name`."""
    pattern = re.compile(rf"^\.{re.escape(out_name)}\.(data\.[A-Za-z0-9_]+\.staged|[A-Za-z0-9_]+(\.tmp|\.probe)?)$")
    extra = sorted(p.name for p in folder.iterdir() if p.name not in keep)
    for name in extra:
        assert pattern.match(name), f"unexpected file after a kill: {name}"
    return extra


def clean(folder: Path, names) -> None:
    for name in names:
        p = folder / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    src = root / "in" / "model.onnx"
    src.parent.mkdir()
    onnx.save(kill_model(), src)
    ref = root / "ref" / "fixed.onnx"
    ref.parent.mkdir()
    duration = run_to_end([src, ref, "-q"])
    folded = onnx.load(ref)
    onnx.checker.check_model(folded)
    assert len(folded.graph.node) == len(onnx.load(src).graph.node) - 122  # every BN folded
    return root, src, ref, duration


def test_kill_with_separate_output(work):
    root, src, ref, duration = work
    src_hash, ref_hash = sha(src), sha(ref)
    old = root / "old.onnx"  # an unrelated complete model that sits at the output path
    onnx.save(kill_model(conv_layers=1, wide=0, width=8), old)
    old_hash = sha(old)
    out_dir = root / "out"
    out_dir.mkdir()
    out = out_dir / "fixed.onnx"
    states, killed = [], 0
    for k, (delay, trigger) in enumerate(kill_plan(duration, SEED)):
        preexisting = k % 2 == 1
        if preexisting:
            shutil.copy(old, out)
        code = kill_after([src, out], delay, trigger)
        killed += code == -signal.SIGKILL
        assert sha(src) == src_hash, "input changed"
        if out.exists():
            got = sha(out)
            assert got in ({ref_hash, old_hash} if preexisting else {ref_hash}), "partial or foreign output"
            states.append("new" if got == ref_hash else "old")
        else:
            assert not preexisting, "the old output vanished"
            states.append("absent")
        temps = stray(out_dir, {"fixed.onnx"}, "fixed.onnx")
        states[-1] += "+tmp" * bool(temps)
        clean(out_dir, temps + (["fixed.onnx"] if out.exists() else []))
    print(f"\nkill states (IN != OUT, run {duration:.2f} s): {states}")
    assert killed >= 3, f"too few kills landed before the run ended: {states}"


def test_kill_in_place(work):
    root, src, ref, duration = work
    src_hash, ref_hash = sha(src), sha(ref)
    folder = root / "inplace"
    folder.mkdir()
    path = folder / "model.onnx"
    states, killed = [], 0
    for delay, trigger in kill_plan(duration, SEED + 1):
        shutil.copy(src, path)
        killed += kill_after([path, path], delay, trigger) == -signal.SIGKILL
        got = sha(path)
        assert got in (src_hash, ref_hash), "IN == OUT left a partial model"
        states.append("new" if got == ref_hash else "old")
        temps = stray(folder, {"model.onnx"}, "model.onnx")
        states[-1] += "+tmp" * bool(temps)
        clean(folder, temps)
    print(f"\nkill states (IN == OUT): {states}")
    assert killed >= 3, states


def _loaded_bytes(path: Path) -> bytes:
    """The model with its external data pulled in, as bytes comparable across layouts
    (loading external data leaves an explicit data_location=DEFAULT on each tensor)."""
    model = onnx.load(path)
    for t in model.graph.initializer:
        t.ClearField("data_location")
    return model.SerializeToString()


def test_kill_in_place_with_external_data(work):
    """IN == OUT where both sides use external data: the data file keeps its stable name
    `model.onnx.data`, and the old .onnx never points at new bytes: the new data is staged
    under a hidden name that a first new .onnx reads before the stable file is overwritten
    (model_io._save_external). A kill in between leaves the staged, consistent model."""
    root, src, ref, duration = work
    folder = root / "inplace_ext"
    folder.mkdir()
    path = folder / "model.onnx"
    original = onnx.load(src)
    onnx.save(original, path, save_as_external_data=True, location="model.onnx.data", size_threshold=1024)
    pristine = {p.name: p.read_bytes() for p in folder.iterdir()}
    old_bytes = _loaded_bytes(path)
    # the uninterrupted result, same layout
    run_to_end([path, path, "-q"], external=True)
    assert sorted(p.name for p in folder.iterdir()) == ["model.onnx", "model.onnx.data"]
    new_bytes = _loaded_bytes(path)
    assert new_bytes == _loaded_bytes(ref)
    plan = kill_plan(duration, SEED + 2)[::2] + kill_plan(duration, SEED + 2)[-len(TRIGGERED_DELAYS):]
    states, killed = [], 0
    for delay, trigger in plan:
        clean(folder, [p.name for p in folder.iterdir()])
        for name, data in pristine.items():
            (folder / name).write_bytes(data)
        killed += kill_after([path, path], delay, trigger, external=True) == -signal.SIGKILL
        got = _loaded_bytes(path)
        assert got in (old_bytes, new_bytes), "IN == OUT with external data left a mixed model"
        states.append("new" if got == new_bytes else "old")
        temps = stray(folder, {"model.onnx", "model.onnx.data"}, "model.onnx")
        states[-1] += "+tmp" * bool(temps)
    print(f"\nkill states (IN == OUT, external data): {states}")
    assert killed >= 2, states
