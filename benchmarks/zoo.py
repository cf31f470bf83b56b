"""Directory mode against separate runs: a zoo of small models, `--jobs 2` vs one CLI per model.

    python benchmarks/zoo.py                 # 50 models, both ways, prints the ratio
    python benchmarks/zoo.py --models 20 --jobs 2

The zoo is built from the fixtures (real PyTorch exports) under benchmarks/out/zoo/: the
fold_bn models are copied with their float weights scaled by a seeded factor in [0.99, 1.01]
(distinct bytes, same structure); the fix_inorm models (stats matched by weight values) and
the random ones are copied as they are. Per-model passes and checkpoints come from a manifest.

Both sides are whole processes, run one after the other on the same machine: the sequential
side runs `python -m onnx_normfix IN OUT --passes ...` once per model (what a shell loop or a
CI matrix over models costs); the zoo side runs `python -m onnx_normfix IN_DIR OUT_DIR
--manifest M --jobs N --force` once. Every output of both sides is checked to exist; the
zoo's index must report every model ok. Not a test: figures depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
OUT = Path(__file__).resolve().parent / "out" / "zoo"

# fixture -> (passes, extra CLI args, may its weights be scaled?)
BASES = [
    ("resnet_tiny_bn.onnx", "fold_bn", [], True),
    ("bn_mix_dynamo.onnx", "fold_bn", [], True),
    ("bn_mix_ts_nofold.onnx", "fold_bn", [], True),
    ("bn_mix_ts_preserve.onnx", "fold_bn", [], True),
    ("stargan_tiny_oldstyle.onnx", "fix_inorm,fold_bn", ["--stats", str(FIXTURES / "stargan_tiny_stats.npz")], False),
    ("stargan_tiny_torchscript.onnx", "fix_inorm,fold_bn", [], False),
    ("stargan_tiny_dynamo.onnx", "fix_inorm,fold_bn", [], False),
    ("cyclegan_tiny_dynamo.onnx", "fix_inorm,fold_bn", [], False),
    ("inorm_small_3d_plain_dynamo.onnx", "fix_inorm", [], False),
    ("random_vae_ts.onnx", "replace_random", [], False),
]


def build_zoo(count: int) -> tuple[Path, Path, list[tuple[str, str, list[str]]]]:
    src = OUT / "in"
    if src.exists():
        shutil.rmtree(src)
    entries = []
    for k in range(count):
        name, passes, extra, scale = BASES[k % len(BASES)]
        rel = f"family{k % 5}/{Path(name).stem}_{k:02d}.onnx"
        dest = src / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if scale:
            model = onnx.load(FIXTURES / name)
            rng = np.random.default_rng(k)
            for t in model.graph.initializer:
                a = numpy_helper.to_array(t)
                if a.dtype == np.float32 and a.size > 1:
                    t.CopyFrom(numpy_helper.from_array((a * rng.uniform(0.99, 1.01)).astype(np.float32), t.name))
            onnx.save(model, dest)
        else:
            shutil.copy(FIXTURES / name, dest)
        entries.append((rel, passes, extra))
    manifest = OUT / "zoo.jsonl"
    with open(manifest, "w") as f:
        for rel, passes, extra in entries:
            line = {"path": rel, "passes": passes}
            if extra[:1] == ["--stats"]:
                line["stats"] = extra[1]
            f.write(json.dumps(line) + "\n")
    return src, manifest, entries


def run(cmd: list[str]) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=50)
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()

    src, manifest, entries = build_zoo(args.models)
    py = [sys.executable, "-m", "onnx_normfix"]
    seq_out, zoo_out = OUT / "sequential", OUT / "directory"
    for d in (seq_out, zoo_out):
        if d.exists():
            shutil.rmtree(d)

    t0 = time.perf_counter()
    for rel, passes, extra in entries:
        (seq_out / rel).parent.mkdir(parents=True, exist_ok=True)
        run(py + [str(src / rel), str(seq_out / rel), "--passes", passes, "-q", *extra])
    sequential = time.perf_counter() - t0

    directory = run(py + [str(src), str(zoo_out), "--manifest", str(manifest), "--jobs", str(args.jobs), "--force", "-q"])
    index = json.loads((zoo_out / "normfix-reports" / "index.json").read_text())
    assert index["exit_code"] == 0 and index["counts"] == {"ok": len(entries)}, index["counts"]
    for rel, _, _ in entries:
        assert (seq_out / rel).is_file() and (zoo_out / rel).is_file(), rel
    again = run(py + [str(src), str(zoo_out), "--manifest", str(manifest), "--jobs", str(args.jobs), "-q"])

    print(f"Machine: {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    print(f"{len(entries)} models ({len(BASES)} fixtures, copied and varied), every output ok on both sides")
    print("| run | wall s | per model s |\n|---|---|---|")
    print(f"| {len(entries)} sequential single-model CLI runs | {sequential:.1f} | {sequential / len(entries):.2f} |")
    print(f"| one directory run, --jobs {args.jobs} | {directory:.1f} | {directory / len(entries):.2f} |")
    print(f"| the same again (all up to date) | {again:.1f} | {again / len(entries):.2f} |")
    print(f"ratio directory / sequential: {directory / sequential:.2f}x (target < 0.6x)")


if __name__ == "__main__":
    main()
