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
    dropout        Dropout(training_mode=True), seeded or not: a random op     replace_random / validator
    dense tail     Flatten -> MatMul(W) [-> Add(c)] -> BN | Gemm(transB, alpha, beta, C?) -> BN
                   or, must decline: a 1-D MatMul input (+ an Add that makes it 2-D, sometimes
                   under a value_info claiming rank 2), or an Add constant that broadcasts up
Conv biases are sometimes the dynamo optimize=False zero bias, a constant made of dtype and
shape reads only (CastLike(Constant, x), Expand(Shape(W)[0:1]); Cast/ConstantOfShape before
opset 15): those must fold. Some cases list BN parameters or weights as graph inputs (IR >= 4:
overridable initializers): the sites that read them must decline, graph inputs must stay
exactly as they were, and the outputs must agree when the caller overrides them. Some cases
declare their outputs without a shape (the tool fills them from inference).

with a random opset (7..23; every block uses ops that exist from opset 7), sometimes IR 3 (initializers
listed as graph inputs), sometimes float16 throughout. The generator records how many BNs
fold_bn must fold and how many patterns fix_inorm must collapse; the runner applies every
applicable pass through `onnx_normfix.optimize(validate=False)` and checks, independently of
the tool's validator: the rewrite counts, onnx.checker, graph input/output names, and
onnxruntime outputs against the original (random cases go through the tool's validator,
which feeds both stages the same draws, and must report "passed").

One refusal counts as the right outcome ("refused", not "failed"): the tool's validator
stops an fp16 run at fold_bn AND `fp16_fold_loses_precision` proves, independently of the
validator, that the fold is right but less precise than the original in this model: at every
fold site (the BN outputs) the folded model's worst error is within 8x of the original's
worst distance from a float32 computation of the original (so the fold is not wrong), while
at some graph output element it is more than 8x further than the original's own rounding
there (the validator's criterion, on the harness's own 8 draws; a downstream InstanceNorm/LayerNorm amplifies the rounding of
the folded fp16 weights, which onnxruntime's float32 execution of Conv -> BN does not have).
A wrong fold (a planted bug) fails the first half and still counts as failed.
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
    overridable: list[str] = field(default_factory=list)  # initializers also listed as graph inputs
    strict: bool = True  # False: a value_info lies on purpose, so strict shape inference fails
    shapeless_outputs: bool = False
    dropout: str | None = None  # "seeded" / "unseeded" training-mode Dropout
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
        self.value_info: list[onnx.ValueInfoProto] = []
        self.sites: list[tuple[str, set]] = []  # ("fold" | "collapse", initializer names it needs)
        self.last_bn: set = set()
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
        self.last_bn = set() if as_node else set(names)
        attrs = {"epsilon": float(r.choice([1e-5, 1e-3, 0.1]))}
        if self.opset < 9:
            attrs["spatial"] = 1
        return self.node("BatchNormalization", [x, *names], "bn", **attrs)

    def weight(self, shape, fan_in: int) -> np.ndarray:
        return self.rng.standard_normal(shape) / np.sqrt(max(fan_in, 1))


    def fold_site(self, *deps) -> None:
        self.sites.append(("fold", {d for d in deps if d} | self.last_bn))

    def zero_bias(self, w: str, cout: int, x: str) -> str:
        """dynamo optimize=False: the zero bias of a Conv without one, read off dtype and shape."""
        if self.opset >= 15:
            n = self.node("Expand", [self.node("Shape", [w], "wshape", start=0, end=1),
                                     self.const(np.array([1], np.int64), "one")], "n")
            zero = self.name("zero")
            self.nodes.append(helper.make_node("Constant", [], [zero], value=numpy_helper.from_array(np.array(0.0), zero)))
            return self.node("Expand", [self.node("CastLike", [zero, x], "zcast"), n], "zbias")
        n = self.node("Gather", [self.node("Shape", [w], "wshape"), self.const(np.array([0], np.int64), "idx")], "n", axis=0)
        zeros = self.node("ConstantOfShape", [n], "zeros", value=numpy_helper.from_array(np.array([0.0], np.float32)))
        return self.node("Cast", [zeros], "zbias", to=helper.np_dtype_to_tensor_dtype(np.dtype(self.dtype)))


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
    if len(inputs) == 2 and b.opset >= 9 and r.random() < 0.5:
        inputs.append(b.zero_bias(w, cout, x))
    pad = dil * (k // 2)
    y = b.node("Conv", inputs, "conv", group=groups, pads=[pad] * 4, dilations=[dil, dil], kernel_shape=[k, k])
    y = b.bn(y, cout)
    b.fold_site(*inputs[1:])
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
    y = b.bn(y, cout)
    b.fold_site(*inputs[1:])
    return y, cout, 1, 0


def shared_conv(b: _Builder, x: str, c: int):
    w = b.const(b.weight((c, c, 3, 3), c * 9), "shared_w")
    y1 = b.bn(b.node("Conv", [x, w], "conv", pads=[1, 1, 1, 1]), c)
    b.fold_site(w)
    y2 = b.bn(b.node("Conv", [x, w], "conv", pads=[1, 1, 1, 1]), c)
    b.fold_site(w)
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
    y = b.bn(b.node("Conv", [x, w], "conv"), c, as_node=True)
    b.fold_site()
    return y, c, 1, 0


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
    b.sites.append(("collapse", set(names)))
    return back, c, 0, 1


def noise(b: _Builder, x: str, c: int):
    drawn = b.node("RandomNormalLike", [x], "noise")
    return b.node("Add", [x, b.node("Mul", [drawn, b.const(np.array(0.1), "noise_scale")])]), c, 0, 0


def dropout(b: _Builder, x: str, c: int):
    """Dropout in training mode (opset 12+: training_mode is an input): a random op."""
    ratio = b.const(np.array(float(b.rng.choice([0.1, 0.5]))), "ratio")
    on = b.const(np.array(True), "training")
    seeded = b.rng.random() < 0.5
    y = b.node("Dropout", [x, ratio, on], "drop", **({"seed": 7} if seeded else {}))
    return y, c, 0, 0


def dense_tail(b: _Builder, x: str, c: int, hw: int, n: int):
    r = b.rng
    feats, out = c * hw * hw, int(r.choice([3, 5, 8]))
    flat = b.node("Flatten", [x], "flat")
    odd = r.random()
    if odd < 0.2:  # a 1-D MatMul input: no Gemm form
        vec = b.node("Reshape", [flat, b.const(np.array([-1], np.int64), "flat1d")], "vec")
        mm = b.node("MatMul", [vec, b.const(b.weight((n * feats, out), n * feats), "fc_w")], "mm")
        if r.random() < 0.5:  # a wrong claim: the MatMul output is 2-D
            b.value_info.append(helper.make_tensor_value_info(mm, helper.np_dtype_to_tensor_dtype(np.dtype(b.dtype)),
                                                              [1, out]))
        y = b.node("Add", [mm, b.const(r.standard_normal((1, out)) * 0.1, "fc_b")], "mm_add")
        return b.bn(y, out), out, 0, 0
    if odd < 0.3 and n == 1:  # the Add constant broadcasts [1, out] up to [2, out]
        mm = b.node("MatMul", [flat, b.const(b.weight((feats, out), feats), "fc_w")], "mm")
        y = b.node("Add", [mm, b.const(r.standard_normal((2, out)) * 0.1, "fc_b")], "mm_add")
        return b.bn(y, out), out, 0, 0
    if r.random() < 0.5:
        deps = [b.const(b.weight((feats, out), feats), "fc_w")]
        y = b.node("MatMul", [flat, deps[0]], "mm")
        if r.random() < 0.5:
            deps.append(b.const(r.standard_normal(out) * 0.1, "fc_b"))
            y = b.node("Add", [y, deps[-1]], "mm_add")
    else:
        trans_b = int(r.integers(0, 2))
        w = b.weight((out, feats) if trans_b else (feats, out), feats)
        inputs = [flat, b.const(w, "gemm_w")]
        if r.random() < 0.7 or b.opset < 11:  # C optional from opset 11
            inputs.append(b.const(r.standard_normal(out if r.random() < 0.7 else 1) * 0.1, "gemm_c"))
        y = b.node("Gemm", inputs, "gemm", transB=trans_b, alpha=float(r.choice([1.0, 0.5])),
                   beta=float(r.choice([1.0, 2.0])))
        deps = inputs[1:]
    y = b.bn(y, out)
    b.fold_site(*deps)
    return y, out, 1, 0


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
          "noise": (noise, 1), "dropout": (dropout, 0.5), "norm": (norm, 1), "norm_shared": (norm_shared, 1)}


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
    if opset < 12:  # Dropout takes training_mode as an input from opset 12 on
        weights[names.index("dropout")] = 0
    for _ in range(int(rng.integers(1, 6))):
        kind = names[rng.choice(len(names), p=weights / weights.sum())]
        fn = BLOCKS[kind][0]
        x, c, folds, collapses = fn(b, x, c, n, hw) if kind == "tiled_inorm" else fn(b, x, c)
        case.folds += folds
        case.collapses += collapses
        case.random |= kind == "noise"
        if kind == "dropout":
            seeded = any(a.name == "seed" for a in b.nodes[-1].attribute)
            case.dropout = "unseeded" if not seeded or case.dropout == "unseeded" else "seeded"
        case.blocks.append(kind)
    if rng.random() < 0.5:
        x, c, folds, _ = dense_tail(b, x, c, hw, n)
        case.folds += folds
        case.blocks.append("dense")
    assert case.folds == sum(k == "fold" for k, _ in b.sites) and case.collapses == sum(k == "collapse" for k, _ in b.sites)
    y = b.node("Identity", [x], "y")
    outputs = [helper.make_tensor_value_info(name, elem, None) for name in [y, *b.outputs]]  # shapes: below
    inputs = [helper.make_tensor_value_info("x", elem, [n, c0, hw, hw])]
    graph = helper.make_graph(b.nodes, f"fuzz{seed}", inputs, outputs, b.inits, value_info=b.value_info)
    case.strict = not b.value_info
    ir3 = opset <= 8 and rng.random() < 0.5
    if ir3:  # IR 3 lists every initializer as a graph input too
        graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in b.inits)
    elif rng.random() < 0.15:  # overridable initializers: parameters a caller may feed
        init_names = {t.name for t in b.inits}
        candidates = sorted({d for _, deps in b.sites for d in deps if d in init_names})
        if candidates:
            picked = set(rng.choice(candidates, size=min(len(candidates), int(rng.integers(1, 4))), replace=False))
            case.overridable = [t.name for t in b.inits if t.name in picked]
            graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                               for t in b.inits if t.name in picked)
            case.folds = sum(k == "fold" and not deps & picked for k, deps in b.sites)
            case.collapses = sum(k == "collapse" and not deps & picked for k, deps in b.sites)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="fuzz")
    model.ir_version = 3 if ir3 else max(onnx.helper.find_min_ir_version_for([helper.make_opsetid("", opset)]), 4)
    case.shapeless_outputs = rng.random() < 0.1
    if not case.shapeless_outputs:
        _declare_output_shapes(model)
    case.model = model
    case.fuses = getattr(b, "fuses", 0)
    return case


def _declare_output_shapes(model: onnx.ModelProto) -> None:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.value_info[:]  # a lying value_info must not leak into the outputs
    full = onnx.shape_inference.infer_shapes(probe).graph
    inferred = {v.name: v.type for v in list(full.value_info) + list(full.output) if v.type.tensor_type.HasField("shape")}
    for o in model.graph.output:
        if o.name in inferred:
            o.type.CopyFrom(inferred[o.name])


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


def _overrides(model: onnx.ModelProto, names: list[str]) -> dict:
    """Values a caller might feed for overridable initializers: not their defaults."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n: (inits[n].astype(np.float64) * 1.5 + 0.1).astype(inits[n].dtype) for n in names}


def validator_controls_dropout() -> bool:
    """Does the tool's validator treat training-mode Dropout as a random op (issue 10,
    validator side)? Until it does, unseeded-Dropout cases cannot be proven: skipped."""
    from onnx_normfix import validate as V

    probe = helper.make_model(helper.make_graph(
        [helper.make_node("Dropout", ["x", "r", "t"], ["y"])], "p", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(np.array(0.5, np.float32), "r"), numpy_helper.from_array(np.array(True), "t")]),
        opset_imports=[helper.make_opsetid("", 13)])
    return bool(V.random_nodes(probe))


PRECISION_FACTOR = 8.0  # as the validator's OWN_ROUNDING_FACTOR
PROOF_DRAWS = 8


def fp16_fold_loses_precision(model: onnx.ModelProto, seed: int) -> str | None:
    """The proof described in the module docstring: figures if the fp16 fold_bn of `model`
    is right at its sites but further from float32 at a graph output, else None."""
    import onnx_normfix as nf
    from onnx_normfix.graph import RANDOM_OPS
    from onnx_normfix.validation.compare import float32_copy

    if model.graph.input[0].type.tensor_type.elem_type != TensorProto.FLOAT16:
        return None
    base = model
    if any(n.op_type in RANDOM_OPS for n in base.graph.node):  # noise becomes inputs, fed fixed draws
        base = nf.optimize(base, passes=["replace_random"], validate=False).model
    if any(n.op_type in RANDOM_OPS or n.op_type == "Dropout" for n in base.graph.node):
        return None
    folded = nf.optimize(base, passes=["fold_bn"], validate=False).model
    sites = [n.output[0] for n in base.graph.node if n.op_type == "BatchNormalization"
             and n.output[0] not in {m.output[0] for m in folded.graph.node if m.op_type == "BatchNormalization"}]
    if not sites:
        return None
    outputs = [o.name for o in base.graph.output]

    def run(m, feeds):
        m2 = onnx.ModelProto()
        m2.CopyFrom(m)
        m2.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in sites
                               if n not in outputs)
        sess = _session(m2)
        return {o.name: v.astype(np.float64) for o, v in zip(sess.get_outputs(), sess.run(None, feeds))}

    ref_model = float32_copy(base)
    lost = None
    for k in range(PROOF_DRAWS):  # the validator's draws are not the harness's: several
        feeds = _feeds(base, seed + k)
        ref = run(ref_model, {n: (v.astype(np.float32) if v.dtype == np.float16 else v) for n, v in feeds.items()})
        old, new = run(base, feeds), run(folded, feeds)
        for name in sites:  # locally as precise as the original: a right fold
            e_old, e_new = np.abs(old[name] - ref[name]), np.abs(new[name] - ref[name])
            if e_new.max() > PRECISION_FACTOR * max(e_old.max(), 2.0 ** -11 * np.abs(ref[name]).max()):
                return None
        for name in outputs:  # some element further than 8x the original's own rounding
            e_old, e_new = np.abs(old[name] - ref[name]), np.abs(new[name] - ref[name])
            own = np.maximum(np.maximum(e_old, np.sqrt(np.mean(e_old ** 2))), 2.0 ** -11 * np.abs(ref[name]))
            ratio = float(np.max(e_new / own))
            if ratio > PRECISION_FACTOR and lost is None:
                at = np.unravel_index(int(np.argmax(e_new / own)), e_new.shape)
                lost = (f"output {name}, draw {k}: an element {e_new[at]:.3g} from float32, {ratio:.0f}x the "
                        f"original's own rounding; fold sites within {PRECISION_FACTOR:g}x")
    return lost


def _refused(case: Case, exc: Exception) -> str:
    """"refused: ..." if `exc` is the tool's validator stopping a proven fp16 precision loss
    at fold_bn (module docstring); else re-raise."""
    from onnx_normfix import ValidationError

    if isinstance(exc, ValidationError) and exc.stage == "fold_bn":
        proof = fp16_fold_loses_precision(case.model, case.seed)
        if proof:
            return f"refused: fold_bn in fp16 loses precision here ({proof})"
    raise exc


def check_case(case: Case) -> str:
    """Run one case; returns "ok" or "skipped: ..."; raises AssertionError on a bug."""
    import onnx_normfix as nf

    model = case.model
    shaped = onnx.ModelProto()
    shaped.CopyFrom(model)
    if case.shapeless_outputs:
        _declare_output_shapes(shaped)
    onnx.checker.check_model(shaped, full_check=case.strict)  # the generator must make valid graphs
    feeds = _feeds(model, case.seed)
    overridden = {**feeds, **_overrides(model, case.overridable)}
    if case.dropout == "unseeded" and not validator_controls_dropout():
        raise Skip("the validator does not control training-mode Dropout yet")
    try:
        sess = _session(model)
        names = [o.name for o in sess.get_outputs()]
        want = dict(zip(names, sess.run(None, feeds)))
        want_overridden = dict(zip(names, sess.run(None, overridden))) if case.overridable else {}
    except Exception as exc:
        raise Skip(f"onnxruntime cannot run the original: {str(exc).splitlines()[0][:120]}") from None

    # plain InstanceNorms have no stats here: fix_inorm must leave them (and say so), with no
    # flag needed (issue 11 item 10; --allow-partial without stats is an error since)
    options = {}
    random = case.random or case.dropout == "unseeded"
    if random or case.shapeless_outputs:  # the tool's own validator: it controls the draws, checks the outputs
        try:
            result = nf.optimize(model, passes=case.passes, **options)
        except nf.ValidationError as exc:
            return _refused(case, exc)
        statuses = {p["name"]: p["validation"]["status"] for p in result.report["passes"]}
        bad = {k: v for k, v in statuses.items() if v not in ("passed", "skipped")}
        assert not bad, f"validation statuses {statuses}"
        if case.random:
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
    onnx.checker.check_model(out, full_check=case.strict)  # output shapes declared (filled if they were not)
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    if model.ir_version >= 4:  # graph inputs never change (IR 3: initializer-inputs are constants)
        before = [i.name for i in model.graph.input]  # replace_random appends its noise inputs
        after = [i.name for i in out.graph.input]
        assert after[: len(before)] == before and all(n.startswith("noise__") for n in after[len(before):]), after
    else:
        real = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
        assert [i.name for i in out.graph.input][: len(real)] == real
    bns_left = sum(n.op_type == "BatchNormalization" for n in out.graph.node)
    bns_before = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
    assert bns_left == bns_before - case.folds, (bns_left, bns_before, case.folds)
    if random:
        return "ok"
    fp16 = model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    rtol, atol = (2e-2, 2e-3) if fp16 else (1e-4, 1e-5)
    new = _session(out)
    for feed, expected in ((feeds, want), (overridden, want_overridden)):
        got = dict(zip([o.name for o in new.get_outputs()], new.run(None, feed)))
        for name, ref in expected.items():
            a, b = ref.astype(np.float64), got[name].astype(np.float64)
            assert a.shape == b.shape and ref.dtype == got[name].dtype, (name, ref.shape, got[name].shape)
            scale = np.abs(a).max() if a.size else 0.0
            err = np.abs(a - b).max() if a.size else 0.0
            what = "with overridden initializers " if feed is overridden else ""
            if err > atol + rtol * scale and fp16 and not what:  # the tool's validator must refuse it
                try:
                    nf.optimize(model, passes=case.passes, **options)
                except nf.ValidationError as exc:
                    return _refused(case, exc)
            assert err <= atol + rtol * scale, f"output {name} {what}: max abs diff {err:.3g} (max |ref| {scale:.3g})"
    return "ok"


def run(cases: int, seed: int = 0, stop: bool = False, out=sys.stdout) -> dict:
    counts = {"ok": 0, "skipped": 0, "failed": 0}
    failures = []
    t = time.perf_counter()
    for k in range(seed, seed + cases):
        case = make_case(k)
        try:
            verdict = check_case(case)
            counts["ok"] += 1
            if verdict.startswith("refused"):
                counts["refused"] = counts.get("refused", 0) + 1
                print(f"REFUSED seed={k}: {verdict}", file=out)
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
