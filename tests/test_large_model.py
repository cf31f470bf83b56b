"""A model over protobuf's 2 GB limit: loaded from external data, folded, validated, saved
with external data; peak memory of the whole process tree measured and printed.

    x[1, 16384] -> MatMul W0[16384, 16384] -> BN -> MatMul W1[16384, 16384] -> BN
                -> MatMul W2[16384, 4096] -> BN -> y[1, 4096]          (2.25 GiB of weights)

Each weight has constant columns (W[i, j] = a[j]), so it is written in chunks without ever
holding the model in this process, and the expected output is exact in float64:
x @ W = sum(x) * a. The fold scales columns (W'[:, j] = a[j] * s[j]), so a scale applied to
the wrong axis would be caught by any non-constant x.

Skipped when the disk has less than 3.5x the model free (input, output, and the validator's
staged copy) or the machine has less than 3x the model in available memory. The weights
stay on disk while the pipeline runs (only the folded ones come into memory), the validator
checks and runs a staged copy, and the save streams tensors out; the peak memory (summed
RSS of the tool and its onnxruntime worker, sampled every 50 ms) must stay under 3x the
model (about 2x measured; issue target 2.5x) and is printed.
Run alone with `pytest tests/test_large_model.py -s -m slow`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import IR_VERSION

pytestmark = pytest.mark.slow

LAYERS = [(16384, 16384), (16384, 16384), (16384, 4096)]
EPS = 1e-5
MODEL_BYTES = sum(k * m * 4 for k, m in LAYERS)


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def build(folder: Path, seed=0) -> tuple[Path, dict]:
    """Write model.onnx + model.onnx.data without materializing any weight in memory."""
    rng = np.random.default_rng(seed)
    data_path = folder / "model.onnx.data"
    nodes, inits, params = [], [], {}
    cur = "x"
    with open(data_path, "wb") as data:
        for i, (k, m) in enumerate(LAYERS):
            a = rng.uniform(-1, 1, m).astype(np.float32) / np.float32(k) ** 0.5
            offset = data.tell()
            block = np.tile(a, (1024, 1)).tobytes()  # 1024 rows at a time
            for _ in range(k // 1024):
                data.write(block)
            w = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[k, m],
                            data_location=TensorProto.EXTERNAL)
            for key, value in (("location", data_path.name), ("offset", str(offset)), ("length", str(k * m * 4))):
                w.external_data.add(key=key, value=value)
            inits.append(w)
            bn = {"s": rng.uniform(0.5, 2, m), "b": rng.standard_normal(m), "mean": rng.standard_normal(m) * 0.1,
                  "var": rng.uniform(0.5, 2, m)}
            bn = {key: v.astype(np.float32) for key, v in bn.items()}
            inits += [numpy_helper.from_array(v, f"bn{i}.{key}") for key, v in bn.items()]
            nodes += [helper.make_node("MatMul", [cur, f"w{i}"], [f"mm{i}"], name=f"/fc{i}/MatMul"),
                      helper.make_node("BatchNormalization", [f"mm{i}"] + [f"bn{i}.{key}" for key in bn],
                                       [f"bn{i}" if i < len(LAYERS) - 1 else "y"], name=f"/bn{i}/BN", epsilon=EPS)]
            params[i] = (a, bn)
            cur = f"bn{i}"
    graph = helper.make_graph(nodes, "large", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, LAYERS[0][0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, LAYERS[-1][1]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = IR_VERSION
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path, params


def expected(x: np.ndarray, params: dict) -> np.ndarray:
    h = x.astype(np.float64)
    for i in range(len(LAYERS)):
        a, bn = params[i]
        z = h.sum(axis=-1, keepdims=True) * a.astype(np.float64)
        h = (z - bn["mean"]) * bn["s"] / np.sqrt(bn["var"].astype(np.float64) + EPS) + bn["b"]
    return h


class TreeRss:
    """Samples the summed resident memory of a process and all its descendants."""

    def __init__(self, pid: int, period=0.05):
        self.pid, self.period, self.peak = pid, period, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree(self, pid: int) -> list[int]:
        pids = [pid]
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    for child in f.read().split():
                        pids += self._tree(int(child))
        except OSError:
            pass
        return pids

    def _rss(self, pid: int) -> int:
        try:
            with open(f"/proc/{pid}/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return 0

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, sum(self._rss(p) for p in self._tree(self.pid)))
            time.sleep(self.period)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    root = tmp_path_factory.mktemp("large")
    free = shutil.disk_usage(root).free
    if free < 3.5 * MODEL_BYTES:
        pytest.skip(f"needs {3.5 * MODEL_BYTES / 2**30:.1f} GiB free disk, has {free / 2**30:.1f}")
    if _mem_available() < 3 * MODEL_BYTES:
        pytest.skip(f"needs {3 * MODEL_BYTES / 2**30:.1f} GiB available memory, has {_mem_available() / 2**30:.1f}")
    (root / "in").mkdir()
    (root / "out").mkdir()
    path, params = build(root / "in")
    return root, path, params


def test_large_model_is_folded_and_saved_with_external_data(large):
    root, src, params = large
    out = root / "out" / "fixed.onnx"
    in_stat = {p.name: p.stat().st_mtime_ns for p in src.parent.iterdir()}
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "onnx_normfix", str(src), str(out), "--passes", "fold_bn",
                             "--report", str(root / "report.json")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    meter = TreeRss(proc.pid)
    stdout, stderr = proc.communicate(timeout=1800)
    peak = meter.stop()
    seconds = time.perf_counter() - t
    assert proc.returncode == 0, stderr
    assert {p.name: p.stat().st_mtime_ns for p in src.parent.iterdir()} == in_stat, "input touched"

    # saved as a small graph plus one data file beside it, nothing else
    assert sorted(p.name for p in out.parent.iterdir()) == ["fixed.onnx", "fixed.onnx.data"]
    assert out.stat().st_size < 1 << 20
    assert (out.parent / "fixed.onnx.data").stat().st_size >= MODEL_BYTES
    onnx.checker.check_model(str(out))  # the path form handles > 2 GB
    graph = onnx.load(str(out), load_external_data=False).graph
    assert [n.op_type for n in graph.node] == ["Gemm"] * len(LAYERS)
    assert [o.name for o in graph.output] == ["y"]

    import json

    report = json.loads((root / "report.json").read_text())
    (stage,) = report["passes"]
    assert stage["rewrites"] == len(LAYERS)
    assert stage["validation"]["status"] == "passed", stage["validation"]
    assert stage["validation"]["checks"][0] == "checker"
    assert report["notes"] == []  # the input passed onnx.checker too (no note about it)

    # numbers: onnxruntime on the saved files against the exact float64 result
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    x = np.random.default_rng(1).standard_normal((1, LAYERS[0][0])).astype(np.float32)
    sess = ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"])
    (y,) = sess.run(["y"], {"x": x})
    del sess
    want = expected(x, params)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())

    ratio = peak / MODEL_BYTES
    print(f"\nlarge model: {MODEL_BYTES / 2**30:.2f} GiB of weights, {seconds:.1f} s, "
          f"peak RSS of the tool's process tree {peak / 2**30:.2f} GiB = {ratio:.2f}x the model; "
          f"validation {stage['validation']['status']}")
    assert ratio < 3.0, f"peak memory {ratio:.2f}x the model"
