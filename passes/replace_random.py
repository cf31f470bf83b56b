"""replace_random: make random ops deterministic through a seeded noise input.

Before                                  After (random_mode="input")
    like                                    noise__<node>   (new graph input: N(0,1) / U[0,1))
     |                                           |
RandomNormalLike(mean m, scale s) ->  t     Mul(s) -> Add(m) -> t      (same output name t)
RandomUniformLike(low a, high b)  ->  t     Mul(b-a) -> Add(a) -> t
Bernoulli(p)                      ->  t     Less(noise, p) -> Cast(dtype) -> t

Formula: t = m + s * n (n ~ N(0,1)); t = a + (b-a) * u (u ~ U[0,1)); t = (u < p).
Trivial Mul/Add (s = 1, m = 0, a = 0, b = 1) are omitted. Also handled: RandomNormal and
RandomUniform (shape from the `shape` attribute). The noise has the op's dtype (attribute
`dtype`, else the input's) and shape; symbolic dims stay symbolic (unknown dims get fresh
names `<input>_d<i>`). Each input is recorded in `model.metadata_props` (see
`onnx_normfix.noise`), and an `InputBinding` turns what the original drew into the noise:
n = (t - m) / s, u = (t - a) / (b - a), Bernoulli: u = p/2 where t else (1+p)/2.

Modes: "constant" bakes seeded standard noise (option `seed`) in as an initializer, same Mul/Add
after it (a NormfixError if a shape is not static); "mean" puts the distribution's mean in
(normal: m, uniform: (a+b)/2, Bernoulli: p). Both change outputs on purpose.

Declines (with a note): op in a non-default domain or inside a subgraph, Multinomial, a *Like
input of unknown rank or dtype, "mean" below opset 9 (needs ConstantOfShape).
"""

from __future__ import annotations

import re

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnx_normfix.errors import NormfixError
from onnx_normfix.graph import GraphIndex, attr, opset_of, stamp, subgraph_inputs
from onnx_normfix.noise import draw_standard_noise, write_noise_entries
from onnx_normfix.registry import Declined, InputBinding, Option, Pass, PassContext, PassResult, register_pass

NAME = "replace_random"
HANDLED = ("RandomNormalLike", "RandomNormal", "RandomUniformLike", "RandomUniform", "Bernoulli")
MODES = ("input", "constant", "mean")


def _np(elem_type: int):
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))


def _resolve_shape(gi: GraphIndex, node, known_params: set[str]) -> list | None:
    """The op's output shape as ints / dim_params / None (unknown dims); None if rank unknown.
    GraphIndex infers with data propagation, which resolves ConstantOfShape(Concat(Shape(x)...))."""
    if node.op_type in ("RandomNormal", "RandomUniform"):
        return [int(d) for d in attr(node, "shape")]
    return _merge_dims(None, [gi.value_type(n) for n in (node.output[0], node.input[0])], known_params)


def _merge_dims(dims: list | None, candidates, known_params: set[str]) -> list | None:
    for t in candidates:
        if t is None or not t.tensor_type.HasField("shape"):
            continue
        shape = t.tensor_type.shape.dim
        dims = dims or [None] * len(shape)
        if len(shape) != len(dims):
            continue
        for i, d in enumerate(shape):
            # Shape inference names what it cannot infer "unk__N": that is no real dim.
            if d.HasField("dim_value") and not isinstance(dims[i], int):
                dims[i] = d.dim_value
            elif d.dim_param and dims[i] is None and (d.dim_param in known_params or not d.dim_param.startswith("unk__")):
                dims[i] = d.dim_param
    return dims


def _plan(gi: GraphIndex, node, mode: str, known_params: set[str]) -> dict | Declined:
    """Everything the rewrite needs, or why the op is skipped."""
    op = node.op_type
    like = op in ("RandomNormalLike", "RandomUniformLike", "Bernoulli")
    in_type = gi.value_type(node.input[0]) if like else None
    in_elem = in_type.tensor_type.elem_type if in_type is not None else 0
    out_elem = attr(node, "dtype", None if like else TensorProto.FLOAT) or in_elem
    if not out_elem or (op == "Bernoulli" and not in_elem):
        return Declined("dtype unknown (no dtype attribute and the input's type is not inferred)")
    shape = _resolve_shape(gi, node, known_params)
    if shape is None:
        return Declined(f"rank of {node.input[0]!r} unknown")
    if mode == "constant" and not all(isinstance(d, int) for d in shape):
        raise NormfixError(
            f"random_mode='constant' needs a static shape, but {node.name or op} has shape "
            f"{['?' if d is None else d for d in shape]}; use random_mode='input' or fix the input shape"
        )
    if mode == "mean" and opset_of(gi.model) < 9:
        return Declined("random_mode='mean' needs ConstantOfShape (opset >= 9)")
    p = dict(op=op, shape=shape, out_elem=out_elem, seed=attr(node, "seed"))
    if op == "Bernoulli":
        p.update(dist="uniform", elem=in_elem, a=0.0, b=1.0, p=node.input[0])
    elif op.startswith("RandomNormal"):
        p.update(dist="normal", elem=out_elem, a=float(attr(node, "mean", 0.0)), b=float(attr(node, "scale", 1.0)))
    else:
        p.update(dist="uniform", elem=out_elem, a=float(attr(node, "low", 0.0)), b=float(attr(node, "high", 1.0)))
    return p


def _make_feed(p: dict, out: str):
    a, b, dtype = p["a"], p["b"], _np(p["elem"])
    if p["op"] == "Bernoulli":
        def feed(captured):
            prob = np.asarray(captured[p["p"]]).astype(dtype)
            return np.where(np.asarray(captured[out]) != 0, prob / 2, (1 + prob) / 2).astype(dtype)
    elif p["dist"] == "normal":
        def feed(captured):
            if b == 0:  # scale 0: every draw is the mean, whatever the noise
                return np.zeros(np.shape(captured[out]), dtype)
            return ((np.asarray(captured[out], np.float64) - a) / b).astype(dtype)
    else:
        def feed(captured):
            if b == a:  # low == high: every draw is low, whatever the noise (not NaN)
                return np.full(np.shape(captured[out]), 0.5, dtype)
            u = ((np.asarray(captured[out], np.float64) - a) / (b - a)).astype(dtype)
            return np.clip(u, 0, np.nextafter(dtype.type(1), dtype.type(0)))
    return feed


def _rewrite(gi: GraphIndex, node, p: dict, mode: str, seed: int, noise: str) -> tuple[list, dict]:
    """New nodes replacing `node` (its output name kept) and the metadata entry."""
    out, dtype, new = node.output[0], _np(p["elem"]), []
    entry = {"mode": mode, "input": None, "distribution": p["dist"], "node": node.name, "op_type": p["op"],
             "output": out, "seed": p["seed"], "dtype": str(dtype), "shape": p["shape"]}
    entry.update({"p": p["p"], "output_dtype": str(_np(p["out_elem"]))} if p["op"] == "Bernoulli"
                 else {"mean": p["a"], "scale": p["b"]} if p["dist"] == "normal" else {"low": p["a"], "high": p["b"]})

    def emit(op_type, inputs, output, **attrs):
        new.append(stamp(helper.make_node(op_type, inputs, [output], name=gi.unique_name(f"{noise}/{op_type}"), **attrs), NAME))
        return output

    if mode == "mean":
        value = {"normal": p["a"], "uniform": (p["a"] + p["b"]) / 2}[p["dist"]]
        if p["op"] == "Bernoulli":
            emit("Cast", [p["p"]], out, to=p["out_elem"])
        else:
            if p["op"].endswith("Like"):
                shape = emit("Shape", [node.input[0]], gi.unique_name(f"{noise}_shape"))
            else:
                shape = gi.add_initializer(np.array(p["shape"], np.int64), f"{noise}_shape")
            fill = helper.make_tensor("value", p["elem"], [1], np.array([value], dtype).tobytes(), raw=True)
            emit("ConstantOfShape", [shape], out, value=fill)
        return new, entry

    if mode == "input":
        gi.graph.input.append(helper.make_tensor_value_info(noise, p["elem"], p["shape"]))
        entry["input"] = noise
    else:  # the very noise that noise_feeds(seed) would draw for this input in mode "input"
        gi.used_names.discard(noise)
        gi.add_initializer(draw_standard_noise(p["dist"], p["shape"], dtype, seed, noise), noise)
        entry.update(initializer=noise, noise_seed=seed)
    x = noise
    if p["op"] == "Bernoulli":
        x = emit("Less", [x, p["p"]], gi.unique_name(f"{noise}_less"))
        x = emit("Cast", [x], out, to=p["out_elem"])
    else:
        mul, add = (p["b"], p["a"]) if p["dist"] == "normal" else (p["b"] - p["a"], p["a"])
        steps = [("Mul", mul, 1.0), ("Add", add, 0.0)]
        steps = [(op_type, v) for op_type, v, neutral in steps if v != neutral]
        for k, (op_type, v) in enumerate(steps):
            const = gi.add_initializer(np.array(v, dtype), f"{noise}_{op_type.lower()}")
            x = emit(op_type, [x, const], out if k == len(steps) - 1 else gi.unique_name(f"{noise}_{op_type.lower()}ed"))
    if x != out:  # nothing to apply: consumers read the noise itself, graph outputs keep their name
        if out in gi.graph_outputs or any(out in subgraph_inputs(c) for c in gi.consumers[out]):
            emit("Identity", [x], out)
        else:
            for c in gi.consumers[out]:
                c.input[:] = [x if i == out else i for i in c.input]
    return new, entry


def run(model: onnx.ModelProto, ctx: PassContext) -> PassResult:
    mode, seed = ctx.options.get("random_mode", "input"), ctx.options.get("seed", 0)
    if mode not in MODES:
        raise NormfixError(f"unknown random_mode {mode!r}; valid: {', '.join(MODES)}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise NormfixError(f"seed must be a non-negative integer, got {seed!r}")
    gi, result = GraphIndex(model), PassResult()
    known = {d.dim_param for vi in list(model.graph.input) + list(model.graph.output)
             for d in vi.type.tensor_type.shape.dim if d.dim_param}
    plans = []
    for node in model.graph.node:
        where = node.name or node.output[0]
        if node.op_type in ("Multinomial",) and node.domain in ("", "ai.onnx"):
            result.decline("Multinomial is not handled", where)
        if _has_random_subgraph(node):
            result.decline("not handled", f"random ops inside the subgraphs of {where}")
        if node.op_type not in HANDLED or node.domain not in ("", "ai.onnx"):
            continue
        plan = _plan(gi, node, mode, known)
        if isinstance(plan, Declined):
            result.decline(plan, where)
        else:
            plans.append((node, plan))
    if not plans:
        if not result.notes:
            result.notes.append("no random ops found")
        return result

    entries = []
    for node, p in plans:
        noise = gi.unique_name("noise__" + (re.sub(r"[^0-9A-Za-z_]+", "_", node.name or node.output[0]).strip("_") or "random"))
        if None in p["shape"]:  # shape inference could not tell: name the dims so feeds can set them
            p["shape"] = [f"{noise}_d{i}" if d is None else d for i, d in enumerate(p["shape"])]
            result.notes.append(f"{noise}: dims {[d for d in p['shape'] if isinstance(d, str) and d.startswith(noise)]} "
                                "not inferred; pass their sizes to noise_feeds(shapes=...)")
        new, entry = _rewrite(gi, node, p, mode, seed, noise)
        gi.replace(node, new)
        entries.append(entry)
        if mode == "input":
            needs = (node.output[0], p["p"]) if p["op"] == "Bernoulli" else (node.output[0],)
            result.input_bindings[entry["input"]] = InputBinding(needs=needs, make_feed=_make_feed(p, node.output[0]))
        target = entry["input"] or entry.get("initializer") or "its mean"
        result.notes.append(f"replaced {node.name or node.output[0]} ({p['op']}) by {target} {p['shape']} {entry['dtype']}")
    gi.commit()
    write_noise_entries(model, entries)
    result.rewrites = len(plans)
    result.changes_outputs = True if mode != "input" else None
    result.details["noise_inputs" if mode == "input" else "replaced"] = [e["input"] or e["node"] for e in entries]
    return result


def _has_random_subgraph(node) -> bool:
    for a in node.attribute:
        for g in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
            if any(n.op_type in HANDLED or _has_random_subgraph(n) for n in g.node):
                return True
    return False


PASS = register_pass(
    Pass(
        name=NAME,
        summary="replace random ops by a seeded noise input (or a constant, or the mean)",
        preserves_outputs=True,
        run=run,
        options=[Option("random_mode", "input", str, "noise as a graph input (default), a seeded constant, or the mean",
                        choices=("input", "constant", "mean"))],
        # the noise it draws feeds every later pass's checks: run before the passes that rewrite
        runs_before={"fix_inorm", "fold_bn"},
        outputs_note="preserves outputs given the noise input (mode input, proven on the original's draws); "
                     "changes them in modes constant and mean",
    )
)
