"""Differential fuzzing: random valid graphs through every pass, checked on onnxruntime.

    python tests/fuzz_graphs.py --cases 2000 [--seed 0] [--stop]     # a long run
    FUZZ_CASES=2000 pytest tests/test_fuzz.py -m slow                 # the same through pytest

A case is a chain of random blocks on x[N, C, H, W] (then optionally a dense tail):

    conv_bn        Conv (groups, bias or not, 1x1/3x3, dilation) -> BN [-> Relu]     folds
    convT_bn       ConvTranspose (groups, bias or not)           -> BN                folds
    shared_conv    two Convs reading ONE weight, each -> BN, then Add           folds both (copies)
    multi_use      Conv -> BN, and the Conv output read again by Add            must decline
    graph_output   Conv -> BN where the Conv output is also a graph output       must decline
    bn_alone       Relu -> BN                                                    must decline
    const_params   Conv -> BN whose params come from Constant nodes / ConstantOfShape  folds
    instnorm       Relu -> InstanceNormalization (no stats: fix_inorm leaves it)  no rewrite
    tiled_inorm    Relu -> Reshape[1,N*C,H,W] -> BN(N*C tiled) -> Reshape[N,C,H,W]  fix_inorm collapses
    norm           decomposed InstanceNorm over H,W (LayerNorm over W at opset >= 17) + affine  fuse_norms fuses
    norm_shared    the same with the centered tensor also read by a graph output              must decline
    noise          Add(RandomNormalLike(t) * 0.1)                                replace_random
    dense tail     Flatten -> MatMul(W) [-> Add(c)] -> BN | Gemm(transB, alpha, beta, C?) -> BN

with a random opset (7..23; every block uses ops that exist from opset 7), sometimes IR 3 (initializers
listed as graph inputs), sometimes float16 throughout. The generator records how many BNs
fold_bn must fold and how many patterns fix_inorm must collapse; the runner applies every
applicable pass through `onnx_normfix.optimize(validate=False)` and checks, independently of
the tool's validator: the rewrite counts, onnx.checker, graph input/output names, and
onnxruntime outputs against the original (random cases go through the tool's validator,
which feeds both stages the same draws, and must report "passed").
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MIN_OPSET, MAX_OPSET = 7, 23


@dataclass
class Case:
    seed: int
    model: onnx.ModelProto
    folds: int = 0  # BNs fold_bn must fold
    collapses: int = 0  # exporter InstanceNorm patterns fix_inorm must collapse
    random: bool = False
    blocks: list[str] = field(default_factory=list)
    fuses: int = 0  # decomposed norms fuse_norms must fuse

    @property
    def passes(self) -> list[str]:
        names = ["fold_bn"]
        if self.collapses or any(b == "instnorm" for b in self.blocks):
            names.append("fix_inorm")
        if self.random:
            names.append("replace_random")
        if any(b.startswith("norm") for b in self.blocks):
            names.append("fuse_norms")
        return names


class _Builder:
    def __init__(self, rng: np.random.Generator, opset: int, dtype):
        self.rng, self.opset, self.dtype = rng, opset, dtype
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.outputs: list[str] = []
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}{self.count}"

    def const(self, value: np.ndarray, base: str, as_node=False) -> str:
        name = self.name(base)
        value = np.asarray(value).astype(self.dtype if value.dtype.kind == "f" else value.dtype)
        if as_node:
            self.nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name)))
        else:
            self.inits.append(numpy_helper.from_array(value, name))
        return name

    def node(self, op: str, inputs: list[str], base: str | None = None, n_out=1, **attrs) -> str:
        outs = [self.name(base or op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.name(f"/{op}_"), **attrs))
        return outs[0]

    def bn(self, x: str, c: int, as_node=False) -> str:
        r = self.rng
        params = [r.uniform(0.5, 1.5, c), r.standard_normal(c) * 0.5, r.standard_normal(c) * 0.5, r.uniform(0.3, 2.0, c)]
        names = [self.const(p, f"bn_{role}_", as_node) for p, role in zip(params, ("s", "b", "m", "v"))]
        attrs = {"epsilon": float(r.choice([1e-5, 1e-3, 0.1]))}
        if self.opset < 9:
            attrs["spatial"] = 1
        return self.node("BatchNormalization", [x, *names], "bn", **attrs)

    def weight(self, shape, fan_in: int) -> np.ndarray:
        return self.rng.standard_normal(shape) / np.sqrt(max(fan_in, 1))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# ---- blocks: (builder, x, channels) -> (y, channels, folds, collapses) ----------------------
def conv_bn(b: _Builder, x: str, c: int):
    r = b.rng
    cout = int(r.choice([2, 4, 6, 8]))
    groups = int(r.choice([g for g in _divisors(c) if cout % g == 0]))
    k = int(r.choice([1, 3]))
    dil = int(r.choice([1, 2])) if k == 3 else 1
    w = b.const(b.weight((cout, c // groups, k, k), c // groups * k * k), "conv_w")
    inputs = [x, w] + ([b.const(r.standard_normal(cout) * 0.1, "conv_b")] if r.random() < 0.5 else [])
    pad = dil * (k // 2)
    y = b.node("Conv", inputs, "conv", group=groups, pads=[pad] * 4, dilations=[dil, dil], kernel_shape=[k, k])
    y = b.bn(y, cout)
    if r.random() < 0.5:
        y = b.node("Relu", [y])
    return y, cout, 1, 0


def convT_bn(b: _Builder, x: str, c: int):
    r = b.rng
    cout = int(r.choice([2, 4, 6]))
    groups = int(r.choice([g for g in _divisors(c) if cout % g == 0]))
    w = b.const(b.weight((c, cout // groups, 3, 3), c * 9), "convT_w")
    inputs = [x, w] + ([b.const(r.standard_normal(cout) * 0.1, "convT_b")] if r.random() < 0.5 else [])
    y = b.node("ConvTranspose", inputs, "convT", group=groups, pads=[1, 1, 1, 1], kernel_shape=[3, 3])
    return b.bn(y, cout), cout, 1, 0


def shared_conv(b: _Builder, x: str, c: int):
    w = b.const(b.weight((c, c, 3, 3), c * 9), "shared_w")
    y1 = b.bn(b.node("Conv", [x, w], "conv", pads=[1, 1, 1, 1]), c)
    y2 = b.bn(b.node("Conv", [x, w], "conv", pads=[1, 1, 1, 1]), c)
    return b.node("Add", [y1, y2]), c, 2, 0


def multi_use(b: _Builder, x: str, c: int):
    w = b.const(b.weight((c, c, 1, 1), c), "mu_w")
    conv = b.node("Conv", [x, w], "conv")
    return b.node("Add", [b.bn(conv, c), conv]), c, 0, 0


def graph_output(b: _Builder, x: str, c: int):
    w = b.const(b.weight((c, c, 1, 1), c), "go_w")
    conv = b.node("Conv", [x, w], "conv")
    b.outputs.append(conv)
    return b.bn(conv, c), c, 0, 0


def bn_alone(b: _Builder, x: str, c: int):
    return b.bn(b.node("Relu", [x]), c), c, 0, 0


def const_params(b: _Builder, x: str, c: int):
    w = b.const(b.weight((c, c, 1, 1), c), "cp_w", as_node=True)
    return b.bn(b.node("Conv", [x, w], "conv"), c, as_node=True), c, 1, 0


def instnorm(b: _Builder, x: str, c: int):
    r = b.rng
    s, bias = b.const(r.uniform(0.5, 1.5, c), "in_s"), b.const(r.standard_normal(c) * 0.1, "in_b")
    return b.node("InstanceNormalization", [b.node("Relu", [x]), s, bias], "inorm", epsilon=1e-5), c, 0, 0


def tiled_inorm(b: _Builder, x: str, c: int, n: int, hw: int):
    """The TorchScript export of InstanceNorm(track_running_stats=True) in eval mode."""
    r = b.rng
    x = b.node("Relu", [x])
    merged = b.node("Reshape", [x, b.const(np.array([1, n * c, hw, hw], np.int64), "shape")], "merged")
    params = [np.tile(v, n) for v in (r.uniform(0.5, 1.5, c), r.standard_normal(c) * 0.1, r.standard_normal(c) * 0.3,
                                      r.uniform(0.5, 2.0, c))]
    names = [b.const(p, f"tin_{role}_") for p, role in zip(params, ("s", "b", "m", "v"))]
    attrs = {"epsilon": 1e-5} | ({"spatial": 1} if b.opset < 9 else {})
    normed = b.node("BatchNormalization", [merged, *names], "tbn", **attrs)
    back = b.node("Reshape", [normed, b.const(np.array([n, c, hw, hw], np.int64), "shape")], "unmerged")
    return back, c, 0, 1


def noise(b: _Builder, x: str, c: int):
    drawn = b.node("RandomNormalLike", [x], "noise")
    return b.node("Add", [x, b.node("Mul", [drawn, b.const(np.array(0.1), "noise_scale")])]), c, 0, 0


def dense_tail(b: _Builder, x: str, c: int, hw: int):
    r = b.rng
    feats, out = c * hw * hw, int(r.choice([3, 5, 8]))
    flat = b.node("Flatten", [x], "flat")
    if r.random() < 0.5:
        y = b.node("MatMul", [flat, b.const(b.weight((feats, out), feats), "fc_w")], "mm")
        if r.random() < 0.5:
            y = b.node("Add", [y, b.const(r.standard_normal(out) * 0.1, "fc_b")], "mm_add")
    else:
        trans_b = int(r.integers(0, 2))
        w = b.weight((out, feats) if trans_b else (feats, out), feats)
        inputs = [flat, b.const(w, "gemm_w")]
        if r.random() < 0.7 or b.opset < 11:  # C optional from opset 11
            inputs.append(b.const(r.standard_normal(out if r.random() < 0.7 else 1) * 0.1, "gemm_c"))
        y = b.node("Gemm", inputs, "gemm", transB=trans_b, alpha=float(r.choice([1.0, 0.5])),
                   beta=float(r.choice([1.0, 2.0])))
    return b.bn(y, out), out, 1, 0


def norm(b: _Builder, x: str, c: int, shared: bool = False):
    """decomposed InstanceNorm over H, W (or LayerNorm over W at opset >= 17) + affine; `shared`:
    the centered tensor is also a graph output's input, so fuse_norms must decline"""
    r = b.rng
    kind = "ln" if b.opset >= 17 and r.random() < 0.5 else "in"
    axes = [2, 3] if kind == "in" else [-1]

    def mean(t):
        if b.opset >= 18:
            return b.node("ReduceMean", [t, b.const(np.array(axes, np.int64), "axes")], "mean")
        return b.node("ReduceMean", [t], "mean", axes=axes)

    d = b.node("Sub", [x, mean(x)], "d")
    sq = b.node("Mul", [d, d], "sq") if r.random() < 0.5 else b.node("Pow", [d, b.const(np.array(2.0), "two")], "sq")
    std = b.node("Sqrt", [b.node("Add", [mean(sq), b.const(np.array(1e-5), "eps")], "v")], "std")
    y = b.node("Div", [d, std], "normed")
    if shared:
        b.outputs.append(b.node("Neg", [d], "leak"))
    shape = (c, 1, 1) if kind == "in" else (1,)  # (1,): the width may have changed upstream
    y = b.node("Mul", [y, b.const(r.uniform(0.5, 1.5, shape), "gamma")], "scaled")
    y = b.node("Add", [y, b.const(r.standard_normal(shape) * 0.3, "beta")], "shifted")
    b.fuses = getattr(b, "fuses", 0) + (0 if shared else 1)
    return y, c, 0, 0


def norm_shared(b: _Builder, x: str, c: int):
    return norm(b, x, c, shared=True)


BLOCKS = {"conv_bn": (conv_bn, 3), "convT_bn": (convT_bn, 1), "shared_conv": (shared_conv, 1),
          "multi_use": (multi_use, 1), "graph_output": (graph_output, 1), "bn_alone": (bn_alone, 1),
          "const_params": (const_params, 1), "instnorm": (instnorm, 1), "tiled_inorm": (tiled_inorm, 1),
          "noise": (noise, 1), "norm": (norm, 1), "norm_shared": (norm_shared, 1)}


def make_case(seed: int) -> Case:
    rng = np.random.default_rng(seed)
    opset = int(rng.integers(MIN_OPSET, MAX_OPSET + 1))
    fp16 = rng.random() < 0.2
    dtype = np.float16 if fp16 else np.float32
    elem = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    b = _Builder(rng, opset, dtype)
    n, c, hw = int(rng.choice([1, 2])), int(rng.choice([2, 3, 4])), int(rng.choice([4, 5]))
    c0 = c
    case = Case(seed, onnx.ModelProto())
    names = list(BLOCKS)
    weights = np.array([BLOCKS[k][1] for k in names], float)
    x = "x"
    for _ in range(int(rng.integers(1, 6))):
        kind = names[rng.choice(len(names), p=weights / weights.sum())]
        fn = BLOCKS[kind][0]
        x, c, folds, collapses = fn(b, x, c, n, hw) if kind == "tiled_inorm" else fn(b, x, c)
        case.folds += folds
        case.collapses += collapses
        case.random |= kind == "noise"
        case.blocks.append(kind)
    if rng.random() < 0.5:
        x, c, folds, _ = dense_tail(b, x, c, hw)
        case.folds += folds
        case.blocks.append("dense")
    y = b.node("Identity", [x], "y")
    outputs = [helper.make_tensor_value_info(name, elem, None) for name in [y, *b.outputs]]  # shapes: below
    inputs = [helper.make_tensor_value_info("x", elem, [n, c0, hw, hw])]
    graph = helper.make_graph(b.nodes, f"fuzz{seed}", inputs, outputs, b.inits)
    ir3 = opset <= 8 and rng.random() < 0.5
    if ir3:  # IR 3 lists every initializer as a graph input too
        graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="fuzz")
    model.ir_version = 3 if ir3 else max(onnx.helper.find_min_ir_version_for([helper.make_opsetid("", opset)]), 4)
    full = onnx.shape_inference.infer_shapes(model).graph
    inferred = {v.name: v.type for v in list(full.value_info) + list(full.output) if v.type.tensor_type.HasField("shape")}
    for o in model.graph.output:  # declare the inferred output shapes
        if o.name in inferred:
            o.type.CopyFrom(inferred[o.name])
    case.model = model
    case.fuses = getattr(b, "fuses", 0)
    return case


# ---- the differential runner ---------------------------------------------------------------
class Skip(Exception):
    """onnxruntime cannot run this (valid) original: no reference, the case does not count."""


def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 4
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _feeds(model: onnx.ModelProto, seed: int) -> dict:
    inits = {t.name for t in model.graph.initializer}
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        feeds[vi.name] = rng.standard_normal([d.dim_value for d in vi.type.tensor_type.shape.dim]).astype(dtype)
    return feeds


def check_case(case: Case) -> str:
    """Run one case; returns "ok" or "skipped: ..."; raises AssertionError on a bug."""
    import onnx_normfix as nf

    model = case.model
    onnx.checker.check_model(model, full_check=True)  # the generator must make valid graphs
    feeds = _feeds(model, case.seed)
    try:
        sess = _session(model)
        want = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    except Exception as exc:
        raise Skip(f"onnxruntime cannot run the original: {str(exc).splitlines()[0][:120]}") from None

    # plain InstanceNorms have no stats here: fix_inorm must leave them (and say so)
    options = {"allow_partial": True} if "fix_inorm" in case.passes else {}
    if case.random:  # the tool's own validator controls the draws; it must agree
        result = nf.optimize(model, passes=case.passes, **options)
        statuses = {p["name"]: p["validation"]["status"] for p in result.report["passes"]}
        bad = {k: v for k, v in statuses.items() if v not in ("passed", "skipped")}
        assert not bad, f"validation statuses {statuses}"
        assert statuses.get("replace_random") == "passed", statuses
    else:
        result = nf.optimize(model, passes=case.passes, validate=False, **options)
    rewrites = {p["name"]: p["rewrites"] for p in result.report["passes"]}
    notes = {p["name"]: p["notes"] for p in result.report["passes"]}
    assert rewrites["fold_bn"] == case.folds, f"fold_bn folded {rewrites['fold_bn']}, expected {case.folds}: {notes}"
    if "fix_inorm" in rewrites:
        assert rewrites["fix_inorm"] == case.collapses, f"fix_inorm {rewrites['fix_inorm']} != {case.collapses}: {notes}"
    if "fuse_norms" in rewrites:
        assert rewrites["fuse_norms"] == case.fuses, f"fuse_norms {rewrites['fuse_norms']} != {case.fuses}: {notes}"
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    real = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    assert [i.name for i in out.graph.input][: len(real)] == real or set(real) <= {i.name for i in out.graph.input}
    bns_left = sum(n.op_type == "BatchNormalization" for n in out.graph.node)
    bns_before = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
    assert bns_left == bns_before - case.folds, (bns_left, bns_before, case.folds)
    if case.random:
        return "ok"
    got = dict(zip([o.name for o in _session(out).get_outputs()], _session(out).run(None, feeds)))
    fp16 = model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    rtol, atol = (2e-2, 2e-3) if fp16 else (1e-4, 1e-5)
    for name, ref in want.items():
        a, b = ref.astype(np.float64), got[name].astype(np.float64)
        assert a.shape == b.shape and ref.dtype == got[name].dtype, (name, ref.shape, got[name].shape)
        scale = np.abs(a).max() if a.size else 0.0
        err = np.abs(a - b).max() if a.size else 0.0
        assert err <= atol + rtol * scale, f"output {name}: max abs diff {err:.3g} (max |ref| {scale:.3g})"
    return "ok"


def run(cases: int, seed: int = 0, stop: bool = False, out=sys.stdout) -> dict:
    counts = {"ok": 0, "skipped": 0, "failed": 0}
    failures = []
    t = time.perf_counter()
    for k in range(seed, seed + cases):
        case = make_case(k)
        try:
            check_case(case)
            counts["ok"] += 1
        except Skip:
            counts["skipped"] += 1
        except Exception as exc:  # AssertionError: a bug; anything else too
            counts["failed"] += 1
            failures.append((k, case.blocks, f"{type(exc).__name__}: {exc}"))
            print(f"FAIL seed={k} opset={case.model.opset_import[0].version} blocks={case.blocks}: "
                  f"{type(exc).__name__}: {str(exc)[:300]}", file=out)
            if stop:
                traceback.print_exc()
                break
    counts["seconds"] = round(time.perf_counter() - t, 1)
    counts["failures"] = failures
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=200)
    p.add_argument("--seed", type=int, default=0, help="first case seed (cases are seed, seed+1, ...)")
    p.add_argument("--stop", action="store_true", help="stop at the first failure with a traceback")
    p.add_argument("--show", type=int, help="print the blocks and graph of one case seed and exit")
    args = p.parse_args(argv)
    if args.show is not None:
        case = make_case(args.show)
        print(case.blocks, "folds", case.folds, "collapses", case.collapses, "passes", case.passes)
        print(onnx.printer.to_text(case.model))
        return 0
    counts = run(args.cases, args.seed, args.stop)
    print({k: v for k, v in counts.items() if k != "failures"})
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
