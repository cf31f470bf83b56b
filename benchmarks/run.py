"""Benchmark onnx-normfix against the load+save floor and the peers, whole process each.

    python benchmarks/run.py                      # everything, ~14 min on 2 cores (6 of them: peers at the cap)
    python benchmarks/run.py --quick              # resnet50, grid1k, grid10k; 1 repeat, 30 s cap
    python benchmarks/run.py --only resnet50,grid10k --repeats 5 --tools floor,ours,onnxsim

Every tool runs in its own subprocess (whole process: interpreter start, imports, load,
optimize, save), the tools alternate within each repeat, and the median is reported. Peak
memory is the child's own maximum RSS (`os.wait4`). A run longer than `--cap` seconds is
killed and reported as "> cap"; a tool capped on a grid is not re-run on the larger grids.
Each tool's output is then compared with the original on onnxruntime (all optimizations
disabled, seeded inputs; a separate process) and its BatchNormalizations are counted.
Also measured: onnxruntime inference latency before/after our passes, and the import time of
onnx_normfix. Results go to stdout (Markdown) and benchmarks/out/results.{md,json}.

Peers: pip install onnxoptimizer onnxslim onnxsim psutil   (a missing one is reported as such)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
PY = sys.executable
PEERS = ("onnxoptimizer", "onnxslim", "onnxsim", "ort-basic")
TOOLS = ("floor", "ours", "ours+validate") + PEERS
PEER_MODULE = {"onnxoptimizer": "onnxoptimizer", "onnxslim": "onnxslim", "onnxsim": "onnxsim", "ort-basic": "onnxruntime"}
ALL_MODELS = ("resnet50", "mobilenetv2", "stargan", "grid1k", "grid10k", "grid100k", "big")
QUICK_MODELS = ("resnet50", "grid1k", "grid10k")
LATENCY_MODELS = ("stargan", "resnet50", "mobilenetv2")
GRIDS = ("grid1k", "grid10k", "grid100k")
# Whole-model onnxruntime sessions take minutes beyond this many nodes (135 s at 100k, with
# optimizations disabled): outputs of larger graphs are not compared here.
CHECK_MAX_NODES = 20_000
ATOL, RTOL = 1e-5, 1e-4  # float32: max|new - old| <= atol + rtol * max|old|, per output


# ---- children: one tool, one model; nothing heavy is imported before this point -------------
def child(tool: str, src: str, dst: str, passes: str) -> None:
    if tool == "floor":
        import onnx

        onnx.save(onnx.load(src), dst)
    elif tool == "onnxoptimizer":
        import onnx
        import onnxoptimizer

        onnx.save(onnxoptimizer.optimize(onnx.load(src), ["fuse_bn_into_conv"]), dst)
    elif tool == "onnxslim":
        import onnx
        import onnxslim

        onnx.save(onnxslim.slim(onnx.load(src)), dst)
    elif tool == "onnxsim":
        import onnx
        import onnxsim

        model, _ = onnxsim.simplify(onnx.load(src))
        onnx.save(model, dst)
    elif tool == "ort-basic":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = dst
        so.log_severity_level = 3
        ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    else:
        raise SystemExit(f"unknown tool {tool}")


def command(tool: str, src: Path, dst: Path, passes: str) -> list[str]:
    if tool in ("ours", "ours+validate"):
        cmd = [PY, "-m", "onnx_normfix", str(src), str(dst), "--passes", passes, "-q"]
        return cmd + (["--no-validate"] if tool == "ours" else [])
    return [PY, str(Path(__file__).resolve()), "--child", tool, str(src), str(dst), passes]


def run_once(cmd: list[str], cap: float, log: Path) -> dict:
    """Wall time and peak RSS of one child process (and its own children, summed: our
    validator runs onnxruntime in a worker process); killed after `cap` seconds.

    RSS is sampled every 20 ms with psutil: the kernel's ru_maxrss of a child starts at the
    parent's RSS at fork time, so it cannot measure a small child of a large parent."""
    with open(log, "wb") as err:
        t0 = time.perf_counter()
        # cwd outside the source tree: `python -m onnx_normfix` must run the installed package
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True, cwd=log.parent,
                                env={**os.environ, "PYTHONWARNINGS": "ignore"})
        timer = threading.Timer(cap, lambda: _kill(proc.pid))
        timer.start()
        peak = [0]
        done = threading.Event()
        sampler = threading.Thread(target=_sample_rss, args=(proc.pid, peak, done), daemon=True)
        sampler.start()
        try:
            _, status, _ = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
            done.set()
        seconds = time.perf_counter() - t0
        sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    result = {"seconds": seconds, "rss_mb": peak[0] / 2**20}
    if seconds >= cap and proc.returncode != 0:
        result["capped"] = True
    elif proc.returncode != 0:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        result["error"] = f"exit {proc.returncode}: {lines[-1][:160] if lines else ''}"
    return result


def _sample_rss(pid: int, peak: list, done: threading.Event) -> None:
    import psutil

    try:
        root = psutil.Process(pid)
    except psutil.Error:
        return
    while not done.is_set():
        total = 0
        try:
            for p in [root] + root.children(recursive=True):
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
        except psutil.Error:
            return
        peak[0] = max(peak[0], total)
        done.wait(0.02)


def _kill(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)  # our own child's process group (start_new_session)
    except ProcessLookupError:
        pass


def available(tool: str) -> bool:
    if tool not in PEER_MODULE:
        return True
    probe = subprocess.run([PY, "-c", f"import {PEER_MODULE[tool]}"], capture_output=True)
    return probe.returncode == 0


# ---- output checks, in a child so the parent never holds a 1 GB model ---------------------
def check_child(src: str, dst: str, ref: str) -> None:
    import numpy as np
    import onnx
    import onnxruntime as ort

    def session(path):
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.log_severity_level = 3
        return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])

    def feeds(sess):
        rng = np.random.default_rng(0)
        return {i.name: rng.standard_normal([d if isinstance(d, int) else 1 for d in i.shape]).astype(np.float32)
                for i in sess.get_inputs()}

    if not Path(ref).exists():
        s = session(src)
        np.savez(ref, **dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds(s)))))
    want = dict(np.load(ref))
    model = onnx.load(dst, load_external_data=False)
    out = {"nodes": len(model.graph.node), "bn": sum(n.op_type == "BatchNormalization" for n in model.graph.node)}
    del model
    try:
        s = session(dst)
        got = dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds(s))))
        worst, ok = 0.0, set(got) == set(want)
        for k in want:
            if k in got and got[k].shape == want[k].shape:
                diff = float(np.max(np.abs(got[k].astype(np.float64) - want[k]))) if want[k].size else 0.0
                ok &= diff <= ATOL + RTOL * float(np.max(np.abs(want[k])))
                worst = max(worst, diff)
            else:
                ok = False
        out.update(match=bool(ok), max_abs_diff=worst)
    except Exception as exc:  # the tool wrote something onnxruntime cannot run
        out.update(match=False, error=str(exc).splitlines()[0][:160])
    print(json.dumps(out))


def check(src: Path, dst: Path, nodes: int) -> dict:
    if not dst.exists():
        return {}
    if nodes > CHECK_MAX_NODES:
        import onnx

        model = onnx.load(str(dst), load_external_data=False)
        return {"nodes": len(model.graph.node), "bn": sum(n.op_type == "BatchNormalization" for n in model.graph.node),
                "match": None}
    proc = subprocess.run([PY, str(Path(__file__).resolve()), "--check", str(src), str(dst), str(src.parent / "ref.npz")],
                          capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        return {"match": False, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:160]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- inference latency before/after our passes ----------------------------------------
def latency_child(before: str, after: str, runs: int) -> None:
    import numpy as np
    import onnxruntime as ort

    result = {}
    for level in ("ORT_DISABLE_ALL", "ORT_ENABLE_ALL"):
        sessions = {}
        for tag, path in (("before", before), ("after", after)):
            so = ort.SessionOptions()
            so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
            so.intra_op_num_threads = 1
            so.inter_op_num_threads = 1
            so.log_severity_level = 3
            sessions[tag] = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        s = sessions["before"]
        feeds = {i.name: rng.standard_normal([d if isinstance(d, int) else 1 for d in i.shape]).astype(np.float32)
                 for i in s.get_inputs()}
        times = {"before": [], "after": []}
        for k in range(runs + 3):  # alternate, first 3 rounds are warm-up
            for tag, sess in sessions.items():
                t = time.perf_counter()
                sess.run(None, feeds)
                if k >= 3:
                    times[tag].append(time.perf_counter() - t)
        result[level] = {tag: statistics.median(v) * 1e3 for tag, v in times.items()}
    print(json.dumps(result))


def latency(before: Path, after: Path, runs: int) -> dict:
    proc = subprocess.run([PY, str(Path(__file__).resolve()), "--latency", str(before), str(after), str(runs)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:160]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- import time ----------------------------------------------------------------------
def import_time(repeats: int = 3) -> dict:
    totals, last = [], ""
    for _ in range(repeats):
        proc = subprocess.run([PY, "-X", "importtime", "-c", "import onnx_normfix"], capture_output=True, text=True)
        last = proc.stderr
        rows = _importtime_rows(last)
        totals.append(next(cum for _, cum, name, depth in rows if name == "onnx_normfix" and depth == 0))
    rows = _importtime_rows(last)
    by_package: dict[str, int] = {}  # outermost import of each top-level package
    for _, cum, name, _ in rows:
        root = name.split(".")[0]
        if root not in ("onnx_normfix", "site", "encodings") and not root.startswith("_"):
            by_package[root] = max(by_package.get(root, 0), cum)
    own = sum(self_us for self_us, _, name, _ in rows if name.startswith("onnx_normfix"))
    top = sorted(((cum, name) for name, cum in by_package.items()), reverse=True)[:5] + [(own, "onnx_normfix's own modules")]
    names = set(by_package)
    return {"total_ms": statistics.median(totals) / 1e3, "top_ms": [(n, c / 1e3) for c, n in top],
            "torch": "torch" in names, "onnxruntime": "onnxruntime" in names}


def _importtime_rows(text: str) -> list[tuple[int, int, str, int]]:
    rows = []
    for line in text.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if m:
            rows.append((int(m[1]), int(m[2]), m[4], len(m[3]) // 2))
    return rows


# ---- the benchmark --------------------------------------------------------------------
def bench_model(name: str, tools: list[str], args, capped_before: dict) -> dict:
    sys.path.insert(0, str(HERE))
    import models

    src = models.build(name)
    passes = models.PASSES[name]
    import onnx

    nodes = len(onnx.load(str(src), load_external_data=False).graph.node)
    work = OUT / name / "runs"
    work.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {t: [] for t in tools}
    status: dict[str, str] = {}
    for t in tools:
        if t in capped_before:
            status[t] = f"> cap (already on {capped_before[t]})"
    print(f"\n## {name}: {nodes} nodes, {models.disk_size(src) / 1e6:.1f} MB, passes {passes}", flush=True)
    for r in range(args.repeats):
        for t in tools:
            if t in status or (r > 0 and runs[t] and runs[t][0]["seconds"] > args.slow):
                continue
            dst = work / f"{t}.onnx"
            res = run_once(command(t, src, dst, passes), args.cap, work / f"{t}.log")
            print(f"  [{r + 1}/{args.repeats}] {t:14s} {_fmt_run(res, args.cap)}", flush=True)
            if res.get("capped"):
                status[t] = "capped"
                capped_before.setdefault(t, name)
            elif "error" in res:
                status[t] = res["error"]
            else:
                runs[t].append(res)
    rows = {}
    for t in tools:
        row: dict = {"runs": len(runs[t])}
        if runs[t]:
            row["seconds"] = statistics.median(x["seconds"] for x in runs[t])
            row["rss_mb"] = max(x["rss_mb"] for x in runs[t])
        if t in status:
            row["status"] = status[t]
        if t != "floor" and runs[t]:
            row.update(check(src, work / f"{t}.onnx", nodes))
        rows[t] = row
    return {"name": name, "nodes": nodes, "mb": models.disk_size(src) / 1e6, "passes": passes, "cap": args.cap,
            "tools": rows}


def _fmt_run(res: dict, cap: float) -> str:
    if res.get("capped"):
        return f"> {cap:.0f} s (killed)"
    if "error" in res:
        return f"failed: {res['error']}"
    return f"{res['seconds']:7.2f} s  {res['rss_mb']:7.0f} MB"


def table(result: dict) -> str:
    rows, cap = result["tools"], result["cap"]
    floor = rows.get("floor", {}).get("seconds")
    ours = rows.get("ours", {}).get("seconds")
    lines = [f"**{result['name']}** ({result['nodes']} nodes, {result['mb']:.1f} MB, passes `{result['passes']}`)", "",
             "| tool | median s | peak RSS MB | x floor | ours (no-validate) is | output matches | BN left | nodes after |",
             "|---|---|---|---|---|---|---|---|"]
    for t, row in rows.items():
        s = row.get("seconds")
        if s is None:
            st = row.get("status", "not run")
            secs = f"> {cap:.0f}" if st.startswith(">") or st == "capped" else st
            vs = f"> {cap / ours:.0f}x faster" if ours and (st.startswith(">") or st == "capped") else "–"
            lines.append(f"| {t} | {secs} | – | – | {vs} | – | – | – |")
            continue
        xf = f"{s / floor:.2f}" if floor else "–"
        if t in PEERS and ours:
            vs = f"{s / ours:.1f}x faster" if s >= ours else f"{ours / s:.1f}x slower"
        else:
            vs = "–"
        match = {True: "yes", False: "**no**", None: "not checked"}.get(row.get("match"), "–") if t != "floor" else "–"
        if row.get("match") is not None and "max_abs_diff" in row:
            match += f" ({row['max_abs_diff']:.1e})"
        if row.get("error"):
            match = f"**no** ({row['error'][:60]})"
        lines.append(f"| {t} | {s:.2f} | {row['rss_mb']:.0f} | {xf} | {vs} | {match} | {row.get('bn', '–')} | "
                     f"{row.get('nodes', '–')} |")
    return "\n".join(lines)


def machine() -> str:
    cpu = "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    except OSError:
        pass
    mem = "?"
    try:
        kb = int(next(ln.split()[1] for ln in open("/proc/meminfo") if ln.startswith("MemTotal")))
        mem = f"{kb / 2**20:.0f} GiB"
    except (OSError, StopIteration):
        pass
    import onnx
    import onnxruntime

    return (f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores ({cpu}), {mem} RAM, Python {platform.python_version()}, "
            f"onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="resnet50, grid1k, grid10k; 1 repeat; 30 s cap; no latency")
    p.add_argument("--only", help=f"comma list of models ({', '.join(ALL_MODELS)})")
    p.add_argument("--tools", help=f"comma list of tools ({', '.join(TOOLS)})")
    p.add_argument("--repeats", type=int, help="runs per tool (median); default 3, --quick 1")
    p.add_argument("--cap", type=float, help="seconds before a run is killed; default 60, --quick 30")
    p.add_argument("--slow", type=float, default=15.0, help="a tool slower than this on its first run is not repeated")
    p.add_argument("--latency-runs", type=int, default=20)
    p.add_argument("--no-latency", action="store_true")
    p.add_argument("--child", nargs=4, metavar=("TOOL", "IN", "OUT", "PASSES"), help=argparse.SUPPRESS)
    p.add_argument("--check", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--latency", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    if args.check:
        check_child(*args.check)
        return 0
    if args.latency:
        latency_child(args.latency[0], args.latency[1], int(args.latency[2]))
        return 0

    args.repeats = args.repeats or (1 if args.quick else 3)
    args.cap = args.cap or (30.0 if args.quick else 60.0)
    models_ = args.only.split(",") if args.only else list(QUICK_MODELS if args.quick else ALL_MODELS)
    wanted = args.tools.split(",") if args.tools else list(TOOLS)
    tools = [t for t in wanted if available(t)]
    missing = [t for t in wanted if t not in tools]
    started = time.perf_counter()
    header = f"Machine: {machine()}"
    print(header, flush=True)
    if missing:
        print(f"unavailable (not installed): {', '.join(missing)}")
    results, capped = [], {}
    for name in models_:
        results.append(bench_model(name, tools, args, capped if name in GRIDS else {}))
    lat = {}
    if not (args.quick or args.no_latency):
        sys.path.insert(0, str(HERE))
        import models

        for name in LATENCY_MODELS:
            after = OUT / name / "runs" / "ours.onnx"
            if name in models_ and after.exists():
                lat[name] = latency(models.path_of(name), after, args.latency_runs)
    imports = import_time()

    md = [header, "", f"Each figure: median of up to {args.repeats} whole-process runs (tools interleaved); cap "
          f"{args.cap:.0f} s; 'output matches': onnxruntime (optimizations disabled) on seeded inputs, "
          f"max|diff| <= {ATOL:g} + {RTOL:g} * max|ref|.", ""]
    if missing:
        md += [f"Unavailable (not installed): {', '.join(missing)}", ""]
    for r in results:
        md += [table(r), ""]
    if lat:
        md += ["**onnxruntime inference latency** (ms, median of "
               f"{args.latency_runs} runs, 1 thread, before -> after our passes)", "",
               "| model | passes | optimizations disabled | ORT_ENABLE_ALL (default) |", "|---|---|---|---|"]
        for name, v in lat.items():
            if "error" in v:
                md.append(f"| {name} | | {v['error']} | |")
                continue
            d, e = v["ORT_DISABLE_ALL"], v["ORT_ENABLE_ALL"]
            md.append(f"| {name} | `{models.PASSES[name]}` | {d['before']:.1f} -> {d['after']:.1f} "
                      f"({d['before'] / d['after']:.2f}x) | {e['before']:.1f} -> {e['after']:.1f} ({e['before'] / e['after']:.2f}x) |")
        md.append("")
    md += [f"**import onnx_normfix**: {imports['total_ms']:.0f} ms (median of 3; torch imported: "
           f"{'yes' if imports['torch'] else 'no'}, onnxruntime imported: {'yes' if imports['onnxruntime'] else 'no'}); "
           "largest: " + ", ".join(f"{n} {ms:.0f} ms" for n, ms in imports["top_ms"]), "",
           f"Benchmark wall time: {time.perf_counter() - started:.0f} s"]
    text = "\n".join(md)
    print("\n" + text)
    OUT.mkdir(exist_ok=True)
    (OUT / "results.md").write_text(text + "\n")
    (OUT / "results.json").write_text(json.dumps({"machine": header, "models": results, "latency": lat,
                                                  "import": imports}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
