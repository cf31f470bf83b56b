"""fuse_norms against the peers on the norm fixtures (real PyTorch and tf2onnx exports).

    python fixtures/make_fixtures.py norm     # (the fixtures are committed; this regenerates them)
    python benchmarks/norms.py [--repeats 3] [--runs 200]

Tools, each given the same loaded model (in-process, imports excluded, median of --repeats):
  ours             onnx_normfix.optimize(passes=fuse_norms,fold_bn, target_opset=<the op's opset>, validate=False)
  ours+validate    the same with the validator (one onnxruntime session per stage)
  ours gn=instance the same with --group-norm instance (Reshape/InstanceNormalization/Reshape)
  onnxslim         onnxslim.slim(model)
  onnxscript       onnxscript.optimizer.optimize + rewriter.onnx_fusions.fuse
  ort-transformers onnxruntime.transformers.optimizer.optimize_model(model_type="bert", opt_level=0)
  ort-session      what an onnxruntime ORT_ENABLE_ALL session fuses (its optimized_model_filepath)
Per tool and fixture: decomposed norms left (ReduceMean/GlobalAveragePool of a square), fused
norm ops written, onnx.checker (full), output vs PyTorch/Keras (onnxruntime, optimizations
disabled; ok = max|diff| <= 1e-4 + 1e-4 * max|ref|), seconds, file size, and onnxruntime
latency (median of --runs, 1 thread) with ORT_DISABLE_ALL and ORT_ENABLE_ALL.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
FIXTURES = HERE.parent / "fixtures"
# fixture stem -> the opset its fused op needs (ours gets it as --target-opset)
CASES = {
    "norm_transformer_ts13": 17, "norm_transformer_ts16": 17, "norm_transformer_dynamo": 18,
    "norm_convnext_ts16": 17, "norm_convnext_dynamo": 18, "norm_dit_ts16": 17,
    "norm_llama_ts16": 23, "norm_llama_dynamo": 23, "norm_unet_ts16": 21, "norm_unet_dynamo": 21,
    "keras_layernorm_seq_op13": 17,
}
TOOLS = ("ours", "ours+validate", "ours gn=instance", "onnxslim", "onnxscript", "ort-transformers", "ort-session")
NORM_OPS = {"LayerNormalization", "RMSNormalization", "GroupNormalization", "InstanceNormalization",
            "SimplifiedLayerNormalization", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization"}


def load_case(stem: str):
    model = onnx.load(str(FIXTURES / f"{stem}.onnx"))
    if stem.startswith("keras"):
        io = np.load(FIXTURES / f"{stem}_io.npz")
        return model, {"x": io["x"]}, {str(io["output"]): io["y"]}
    with np.load(FIXTURES / f"{stem}_inputs.npz") as a, np.load(FIXTURES / f"{stem}_torch.npz") as b:
        return model, {k: a[k] for k in a.files}, {k: b[k] for k in b.files}


def run_tool(tool: str, model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    if tool.startswith("ours"):
        import onnx_normfix

        opts = {"target_opset": target} if target > max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) else {}
        if tool == "ours gn=instance":
            opts["group_norm"] = "instance"
        return onnx_normfix.optimize(copy, passes=["fuse_norms", "fold_bn"], validate=tool == "ours+validate", **opts).model
    if tool == "onnxslim":
        import onnxslim

        return onnxslim.slim(copy)
    if tool == "onnxscript":
        import onnx_ir as ir
        import onnxscript.optimizer
        from onnxscript.rewriter import onnx_fusions

        m = ir.serde.deserialize_model(copy)
        onnxscript.optimizer.optimize(m)
        onnx_fusions.fuse(m)
        return ir.serde.serialize_model(m)
    if tool == "ort-transformers":
        from onnxruntime.transformers import optimizer

        return optimizer.optimize_model(copy, model_type="bert", opt_level=0, use_gpu=False).model
    if tool == "ort-session":
        import onnxruntime as ort

        with tempfile.TemporaryDirectory() as tmp:
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            so.optimized_model_filepath = os.path.join(tmp, "opt.onnx")
            so.log_severity_level = 3
            ort.InferenceSession(copy.SerializeToString(), so, providers=["CPUExecutionProvider"])
            return onnx.load(so.optimized_model_filepath)
    raise ValueError(tool)


def decomposed_left(model: onnx.ModelProto) -> int:
    """Variance (or mean-square) reductions still in the graph: one per unfused norm."""
    producer = {o: n for n in model.graph.node for o in n.output}
    left = 0
    for n in model.graph.node:
        if n.op_type in ("ReduceMean", "GlobalAveragePool"):
            p = producer.get(n.input[0])
            while p is not None and p.op_type == "Cast":
                p = producer.get(p.input[0])
            if p is not None and (p.op_type == "Pow" or (p.op_type == "Mul" and p.input[0] == p.input[1])):
                left += 1
    return left


def session(model: onnx.ModelProto, level: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def latency_ms(model, feeds, level: str, runs: int) -> float | None:
    try:
        s = session(model, level)
    except Exception:
        return None
    for _ in range(5):
        s.run(None, feeds)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        s.run(None, feeds)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def check(model, feeds, ref) -> tuple[str, str]:
    try:
        onnx.checker.check_model(model, full_check=True)
        valid = "yes"
    except Exception as exc:
        valid = "no: " + str(exc).strip().splitlines()[0][:60]
    try:
        got = dict(zip([o.name for o in session(model, "ORT_DISABLE_ALL").get_outputs()],
                       session(model, "ORT_DISABLE_ALL").run(None, feeds)))
    except Exception as exc:
        return valid, "does not run: " + str(exc).strip().splitlines()[0][:60]
    worst, ok = 0.0, True
    for k, want in ref.items():
        if k not in got:
            return valid, f"output {k} missing"
        err = float(np.abs(got[k].astype(np.float64) - want.astype(np.float64)).max())
        ok &= err <= 1e-4 + 1e-4 * float(np.abs(want).max())
        worst = max(worst, err)
    return valid, f"{'yes' if ok else 'NO'} ({worst:.1e})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--runs", type=int, default=200, help="onnxruntime latency runs per model")
    ap.add_argument("--only", help="comma list of fixture stems")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    import onnxruntime

    import onnx_normfix  # noqa: F401  (imports outside the timings)

    for tool in TOOLS:  # warm up every tool's imports on a small case
        try:
            run_tool(tool, load_case("norm_transformer_ts16")[0], 17)
        except Exception as exc:
            print(f"# {tool}: unavailable ({exc})")
    print(f"# onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}, python {sys.version.split()[0]}, "
          f"{os.cpu_count()} cores; seconds: median of {args.repeats}, in-process; latency: median of {args.runs}, 1 thread\n")
    stems = args.only.split(",") if args.only else list(CASES)
    totals = {t: [0, 0, 0, 0.0] for t in TOOLS}  # norms left, wrong outputs, invalid files, seconds
    t_all = time.perf_counter()
    for stem in stems:
        model, feeds, ref = load_case(stem)
        before = decomposed_left(model)
        lat0 = (latency_ms(model, feeds, "ORT_DISABLE_ALL", args.runs), latency_ms(model, feeds, "ORT_ENABLE_ALL", args.runs))
        print(f"**{stem}** ({len(model.graph.node)} nodes, {model.ByteSize() / 1024:.1f} KiB, decomposed norms {before}, "
              f"ORT latency ms disabled/all {lat0[0]:.3f}/{lat0[1]:.3f})\n")
        print("| tool | norms left | norm ops written | checker | matches reference | s | KiB | ms ORT disabled | ms ORT all |")
        print("|---|---|---|---|---|---|---|---|---|")
        for tool in TOOLS:
            seconds, out = [], None
            try:
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    out = run_tool(tool, model, CASES[stem])
                    seconds.append(time.perf_counter() - t)
            except Exception as exc:
                print(f"| {tool} | failed: {str(exc).splitlines()[0][:70]} | | | | | | | |")
                continue
            left = decomposed_left(out)
            ops = {}
            for n in out.graph.node:
                if n.op_type in NORM_OPS:
                    key = n.op_type + ("(ms)" if n.domain == "com.microsoft" else "")
                    ops[key] = ops.get(key, 0) + 1
            valid, correct = check(out, feeds, ref)
            lat = (latency_ms(out, feeds, "ORT_DISABLE_ALL", args.runs), latency_ms(out, feeds, "ORT_ENABLE_ALL", args.runs))
            totals[tool][0] += left
            totals[tool][1] += not correct.startswith("yes")
            totals[tool][2] += valid != "yes"
            totals[tool][3] += statistics.median(seconds)
            fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
            print(f"| {tool} | {left} | {', '.join(f'{k} {v}' for k, v in sorted(ops.items())) or '–'} | {valid} | {correct} "
                  f"| {statistics.median(seconds):.3f} | {out.ByteSize() / 1024:.1f} | {fmt(lat[0])} | {fmt(lat[1])} |")
        print()
    print("**Summary** (all fixtures)\n")
    print("| tool | decomposed norms left | outputs wrong or not run | files failing onnx.checker | total s |")
    print("|---|---|---|---|---|")
    for tool, (left, wrong, invalid, secs) in totals.items():
        print(f"| {tool} | {left} | {wrong} | {invalid} | {secs:.2f} |")
    print(f"\nBenchmark wall time: {time.perf_counter() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
