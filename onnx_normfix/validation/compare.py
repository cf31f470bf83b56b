"""Comparing two stages' outputs, element by element.

An element passes when (numpy `allclose` semantics, per element, per output)

    |new - old| <= atol + rtol * |old|

with (rtol, atol) by the output's dtype (`TOLERANCES`) unless the user set them. NaN must
stay NaN and +-Inf stay the same Inf, at the same places. There is no tolerance taken from a
whole tensor's maximum: small scores next to large boxes in one output are each held to
their own size. Each output reports its max abs and max rel error and where its worst
element is (draw, index, old and new value).

fp16/bf16 outputs are judged against their own rounding: a legitimate fold of an fp16 model
moves elements by a few fp16 ulps, more than a naive element-wise fp16 `allclose` allows
near zero-crossings. Elements that fail the plain test are then compared with a reference,
the *previous* stage computed in float32 on the same draws (`stages` runs it only when
needed): such an element is accepted when

    |new - ref| <= OWN_ROUNDING_FACTOR * max(|old - ref|, rms(old - ref), 2**-11 * |ref|)

i.e. the new stage is no further from the float32 truth than a small multiple of how far the
previous stage itself is (per element, or the output's typical rounding error, whichever is
larger). A fold whose weights underflow in fp16 is 10-100x further than that; a correct one
stays within it.

float32 outputs get the same judgment against a float64 reference (floor 2**-24 * |ref|):
a normalized output amplifies float32 rounding by 1 / std, so a legitimate LayerNorm fusion
of near-constant rows differs from the decomposition by ~1e-4, far past the plain atol, while
both are equally far from the float64 truth. onnxruntime's CPU kernels lack double for Conv
and others, so this reference runs on onnx's numpy reference evaluator, only when a float32
output failed the plain test and the model has at most REFERENCE64_NODES nodes and
REFERENCE64_ELEMENTS initializer elements (else the plain verdict stands). A refusal then
quotes the plain figures and the reference's. With random ops, the reference is cut and fed
the previous stage's draws and Dropout masks like the new stage (`randomness`); a random op
whose draws were not captured leaves no reference.

The default atol is for inputs of unit size. Rounding errors are absolute in the size of
what a kernel sums, and that grows with the inputs: a legitimate fold of a float32 ResNet
fed [0, 255] moves near-zero outputs by ~1e-4. So each draw's default atol is multiplied by
`input_scale(draw)` = max(1, root mean square of its float inputs): 1 for N(0, 1), ~147 for
U[0, 255]. rtol is never scaled, and an atol the user gives is used as given.

Integer, bool and string outputs must be equal. Sequence outputs (lists of tensors) are
compared item by item; their items may have different shapes.
"""

from __future__ import annotations

import numpy as np
import onnx

# (rtol, atol) by output element type. fp16 keeps ~3 decimal digits and a fold rounds its
# weights once more, so a per-layer relative error of ~1e-3 is expected there.
TOLERANCES = {
    onnx.TensorProto.FLOAT: (1e-4, 1e-5),
    onnx.TensorProto.DOUBLE: (1e-9, 1e-12),
    onnx.TensorProto.FLOAT16: (1e-2, 1e-3),
    onnx.TensorProto.BFLOAT16: (5e-2, 1e-2),
}
# See the module docstring: how much further from the float32 reference than the previous
# stage an fp16/bf16 element may be. Rounding errors of two equally good computations differ
# by a factor of ~3 in their tails; a fold that loses weights to underflow is off by 10x+.
OWN_ROUNDING_FACTOR = 8.0
LOW_PRECISION = ("float16", "bfloat16")


def _is_float(dtype) -> bool:
    return np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16"


def tolerances(dtype, rtol=None, atol=None) -> tuple[float, float]:
    try:
        elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    except Exception:
        elem = None
    default_rtol, default_atol = TOLERANCES.get(elem, (1e-4, 1e-5))
    return (default_rtol if rtol is None else rtol), (default_atol if atol is None else atol)


def compare(old: dict, new: dict, rtol: float | None = None, atol: float | None = None) -> dict:
    """Per-output figures and the overall verdict for one draw."""
    return compare_draws([old], [new], rtol, atol)


def input_scale(feeds: dict) -> float:
    """How large a draw's float inputs are: max(1, their root mean square). The default atol
    is multiplied by it (see the module docstring)."""
    total = count = 0.0
    for v in feeds.values():
        v = np.asarray(v) if not isinstance(v, list) else np.zeros(0)
        if v.size and (np.issubdtype(v.dtype, np.floating) or v.dtype.name == "bfloat16"):
            f = v.astype(np.float64, copy=False).ravel()
            square = float(np.dot(f, f))
            if not np.isfinite(square):  # NaN/Inf in real --inputs: the finite part's size
                f = f[np.isfinite(f)]
                square = float(np.dot(f, f))
            total += square
            count += f.size
    return max(1.0, float(np.sqrt(total / count))) if count else 1.0


def compare_draws(olds: list[dict], news: list[dict], rtol=None, atol=None, references: list[dict] | None = None,
                  scales: list[float] | None = None) -> dict:
    """Compare stage outputs over several draws: an output passes if it passes on every draw
    that could be compared. `references` (float32 runs of the old stage) judge fp16/bf16
    elements that fail the plain test; `scales` (`input_scale` of each draw) multiply the
    default atol (module docstring)."""
    outputs: dict = {}
    names = list(dict.fromkeys(n for o in olds for n in o))
    for name in names:
        entry = None
        for k, (old, new) in enumerate(zip(olds, news)):
            if name not in new:
                e = {"ok": False, "reason": "output missing after the pass", "max_abs_diff": None, "max_rel_diff": None}
            else:
                ref = references[k].get(name) if references else None
                scale = scales[k] if scales and atol is None else 1.0
                e = compare_value(old[name], new[name], rtol, atol, ref, scale)
            e["draw"] = k
            entry = e if entry is None else _worse(entry, e)
        if len(olds) > 1:
            entry["draws"] = len(olds)
        outputs[name] = entry
    for name in {n for o in news for n in o} - set(names):
        outputs[name] = {"ok": False, "reason": "output appeared after the pass", "max_abs_diff": None, "max_rel_diff": None}
    # an output that could not be compared at all (missing, reshaped) counts as infinite
    worst_abs = max((_or_inf(e.get("max_abs_diff")) for e in outputs.values()), default=0.0)
    worst_rel = max((_or_inf(e.get("max_rel_diff")) for e in outputs.values()), default=0.0)
    return {"ok": all(e["ok"] for e in outputs.values()), "max_abs_diff": worst_abs, "max_rel_diff": worst_rel,
            "outputs": outputs}


def _worse(a: dict, b: dict) -> dict:
    """Merge the figures of one output over two draws: the failing draw wins, else the larger
    error; an inconclusive draw (no finite values) never hides a conclusive one."""
    if a.get("inconclusive") and not b.get("inconclusive"):
        return b
    if b.get("inconclusive"):
        return a
    if a["ok"] != b["ok"]:
        return a if not a["ok"] else b
    keep = a if _or_inf(a.get("max_abs_diff")) >= _or_inf(b.get("max_abs_diff")) else b
    keep = dict(keep)
    keep["max_rel_diff"] = max(_or_inf(a.get("max_rel_diff")), _or_inf(b.get("max_rel_diff")))
    return keep


def needs_reference(cmp: dict) -> set:
    """The references ("float32" for fp16/bf16, "float64" for float32) that could still
    clear outputs which failed the plain test (empty: none)."""
    return {"float64" if e.get("dtype") == "float32" else "float32" for e in cmp["outputs"].values()
            if not e["ok"] and e.get("own_rounding") == "needed"}


def _or_inf(x) -> float:
    return float("inf") if x is None else float(x)


def compare_value(a, b, rtol, atol, ref=None, scale: float = 1.0) -> dict:
    """One output of one draw: a tensor, a sequence (list) of tensors, or None (an empty optional)."""
    if isinstance(a, list) or isinstance(b, list):
        if not (isinstance(a, list) and isinstance(b, list)):
            return {"ok": False, "reason": "a sequence output became a tensor (or back)", "max_abs_diff": None, "max_rel_diff": None}
        if len(a) != len(b):
            return {"ok": False, "reason": f"sequence of {len(a)} tensors became {len(b)}", "max_abs_diff": None,
                    "max_rel_diff": None, "kind": "sequence"}
        entry = {"ok": True, "max_abs_diff": 0.0, "max_rel_diff": 0.0, "kind": "sequence", "length": len(a)}
        refs = ref if isinstance(ref, list) and len(ref) == len(a) else [None] * len(a)
        for i, (x, y, r) in enumerate(zip(a, b, refs)):
            e = compare_value(x, y, rtol, atol, r, scale)
            if not e["ok"]:
                e = dict(e, reason=f"item {i}: {e.get('reason')}")
                return {**e, "kind": "sequence", "length": len(a)}
            entry["max_abs_diff"] = max(entry["max_abs_diff"], e.get("max_abs_diff") or 0.0)
            entry["max_rel_diff"] = max(entry["max_rel_diff"], e.get("max_rel_diff") or 0.0)
        return entry
    if a is None or b is None:
        same = a is None and b is None
        return {"ok": same, "max_abs_diff": 0.0 if same else None, "max_rel_diff": 0.0 if same else None,
                **({} if same else {"reason": "an empty optional output became a value (or back)"})}
    return _compare_tensor(np.asarray(a), np.asarray(b), rtol, atol, None if ref is None else np.asarray(ref), scale)


def _compare_tensor(a: np.ndarray, b: np.ndarray, rtol, atol, ref: np.ndarray | None, scale: float = 1.0) -> dict:
    base = {"shape": list(a.shape), "dtype": str(a.dtype)}
    if a.shape != b.shape:
        return {**base, "ok": False, "reason": f"shape {list(a.shape)} became {list(b.shape)}",
                "max_abs_diff": None, "max_rel_diff": None}
    if a.dtype != b.dtype:
        return {**base, "ok": False, "reason": f"dtype {a.dtype} became {b.dtype}", "max_abs_diff": None, "max_rel_diff": None}
    if a.size == 0:
        return {**base, "ok": True, "max_abs_diff": 0.0, "max_rel_diff": 0.0}
    if not _is_float(a.dtype):
        if a.dtype.kind in "OUS":  # strings: equal or not
            diff = int(np.count_nonzero(a != b))
            return {**base, "ok": diff == 0, "max_abs_diff": float(diff), "max_rel_diff": float(diff / a.size),
                    **({"reason": f"{diff} elements differ"} if diff else {})}
        bad = a != b
        diff = int(np.count_nonzero(bad))
        out = {**base, "ok": diff == 0, "max_abs_diff": float(diff and np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))),
               "max_rel_diff": float(diff / a.size)}
        if diff:
            at = np.unravel_index(int(np.argmax(bad)), a.shape)
            out["reason"] = f"{diff} elements differ (first at {list(map(int, at))}: {a[at]} became {b[at]})"
            out["worst"] = {"index": [int(i) for i in at], "old": a[at].item(), "new": b[at].item()}
        return out
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    nan_a, nan_b = np.isnan(a64), np.isnan(b64)
    if not np.array_equal(nan_a, nan_b):
        at = np.unravel_index(int(np.argmax(nan_a != nan_b)), a.shape)
        return {**base, "ok": False, "reason": f"NaN pattern differs (at {list(map(int, at))}: {a[at]} became {b[at]})",
                "max_abs_diff": float("nan"), "max_rel_diff": float("nan")}
    finite = np.isfinite(a64) & np.isfinite(b64)
    if not finite.any():
        # e.g. all-NaN --inputs: equal patterns prove nothing about the pass
        return {**base, "ok": False, "inconclusive": True, "reason": "no finite values: nothing was compared (check --inputs)",
                "max_abs_diff": None, "max_rel_diff": None}
    inf_a = np.isinf(a64)
    inf_same = np.array_equal(inf_a, np.isinf(b64)) and np.array_equal(a64[inf_a], b64[inf_a])
    rtol, atol = tolerances(a.dtype, rtol, atol)
    atol *= scale
    diff = np.where(finite, np.abs(a64 - b64), 0.0)
    allowed = atol + rtol * np.abs(np.where(finite, a64, 0.0))
    bad = diff > allowed
    max_abs = float(diff.max())
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(finite & (a64 != 0), diff / np.abs(a64), np.where(diff > 0, np.inf, 0.0))
        ratio = np.where(allowed > 0, diff / allowed, np.where(diff > 0, np.inf, 0.0))
    max_rel = float(rel.max())
    at = np.unravel_index(int(np.argmax(ratio)), a.shape)
    out = {**base, "ok": bool(inf_same and not bad.any()), "max_abs_diff": max_abs, "max_rel_diff": max_rel,
           "rtol": rtol, "atol": atol,
           "worst": {"index": [int(i) for i in at], "old": float(a64[at]), "new": float(b64[at])}}
    if not inf_same:
        out["reason"] = "Inf pattern differs"
        return out
    if bad.any():
        n = int(np.count_nonzero(bad))
        out["reason"] = (f"{n} of {a.size} elements outside atol {atol:g} + rtol {rtol:g} * |old|; worst at "
                         f"{list(map(int, at))}: {a64[at]:.6g} became {b64[at]:.6g}")
        if a.dtype.name in LOW_PRECISION or a.dtype == np.float32:
            floor = 2.0 ** -24 if a.dtype == np.float32 else 2.0 ** -11
            if ref is None or np.dtype(ref.dtype).itemsize <= a.dtype.itemsize:  # no wider reference
                out["own_rounding"] = "needed"
            else:
                plain = out["reason"]
                out.update(_own_rounding(a64, b64, ref.astype(np.float64), bad, finite, floor, str(ref.dtype)))
                if out["ok"]:
                    out.pop("reason", None)
                elif out.get("reason") and a.dtype == np.float32:  # the plain figures first, then the reference's
                    out["reason"] = f"{plain}; {out['reason']}"
    return out


def _own_rounding(a64, b64, ref, bad, finite, floor: float = 2.0 ** -11, wider: str = "float32") -> dict:
    """Clear the elements `bad` of a float output if each is within OWN_ROUNDING_FACTOR of
    the old stage's own distance from the wider reference (float32 for fp16/bf16, float64
    for float32)."""
    if ref.shape != a64.shape:
        return {"own_rounding": "reference shape differs"}
    ok_ref = finite & np.isfinite(ref)
    err_old = np.abs(a64 - ref)
    err_new = np.abs(b64 - ref)
    rms = float(np.sqrt(np.mean(err_old[ok_ref] ** 2))) if ok_ref.any() else 0.0
    scale = np.maximum(np.maximum(err_old, rms), floor * np.abs(ref))
    still = bad & ~(ok_ref & (err_new <= OWN_ROUNDING_FACTOR * scale))
    figures = {"own_rounding": "checked", "reference": wider, "old_vs_float32_max": float(err_old[ok_ref].max()) if ok_ref.any() else None,
               "new_vs_float32_max": float(err_new[ok_ref].max()) if ok_ref.any() else None}
    if not still.any():
        return {**figures, "ok": True}
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(still, err_new / scale, 0.0)
    at = np.unravel_index(int(np.argmax(ratio)), a64.shape)
    return {**figures, "reason": (f"{int(np.count_nonzero(still))} elements further from the {wider} reference than "
                                  f"{OWN_ROUNDING_FACTOR:g}x the previous stage's own rounding; worst at {list(map(int, at))}: "
                                  f"reference {ref[at]:.6g}, old {a64[at]:.6g}, new {b64[at]:.6g}"),
            "worst": {"index": [int(i) for i in at], "old": float(a64[at]), "new": float(b64[at]), "float32": float(ref[at])}}


_LOW = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def float32_copy(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """`model` computed in float32: every fp16/bf16 tensor (initializers, Constant values,
    inputs, outputs, value_info, Cast targets, dtype attributes) becomes float32. The
    reference that judges an fp16/bf16 stage against its own rounding. None if the model
    holds fp16 data this cannot convert (subgraphs, external data)."""
    return _widened_copy(model, _LOW, onnx.TensorProto.FLOAT)


def float64_copy(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """`model` computed in float64 (every fp16/bf16/float32 tensor becomes double): the
    reference that judges a float32 stage against its own rounding (run by
    `float64_reference`, onnxruntime's CPU kernels lack double for Conv and others)."""
    return _widened_copy(model, _LOW + (onnx.TensorProto.FLOAT,), onnx.TensorProto.DOUBLE)


# Above these sizes the numpy reference evaluator is too slow to be worth waiting for: the
# plain element-wise verdict stands (module docstring).
REFERENCE64_NODES = 2000
REFERENCE64_ELEMENTS = 4_000_000


def float64_reference(model: onnx.ModelProto, draws: list[dict]) -> list[dict] | None:
    """`model` run in float64 by onnx's numpy reference evaluator on `draws` (their floats
    widened), or None when it is too large or the evaluator cannot run it."""
    from onnx.reference import ReferenceEvaluator

    if len(model.graph.node) > REFERENCE64_NODES or sum(
            int(np.prod(t.dims)) for t in model.graph.initializer) > REFERENCE64_ELEMENTS:
        return None
    wide = float64_copy(model)
    if wide is None:
        return None
    names = [o.name for o in wide.graph.output]
    inputs = {i.name for i in wide.graph.input}
    ev = ReferenceEvaluator(wide)
    out = []
    with np.errstate(all="ignore"):
        for d in draws:
            feeds = {k: (np.asarray(v).astype(np.float64) if _is_float(np.asarray(v).dtype) else v)
                     for k, v in d.items() if k in inputs}
            out.append(dict(zip(names, ev.run(None, feeds))))
    return out


def _widened_copy(model: onnx.ModelProto, low: tuple, target: int) -> onnx.ModelProto | None:
    from onnx import numpy_helper

    wide = onnx.helper.tensor_dtype_to_np_dtype(target)

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph

    def fix_tensor(t: onnx.TensorProto) -> None:
        if t.data_type in low:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                raise ValueError("external data")
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(wide), t.name))

    for t in g.initializer:
        fix_tensor(t)
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.tensor_type.elem_type in low:
            vi.type.tensor_type.elem_type = target
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                fix_tensor(a.t)
            elif a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                return None
            elif a.name in ("to", "dtype") and a.type == onnx.AttributeProto.INT and a.i in low:
                a.i = target
    return m


def float32_draws(draws: list[dict]) -> list[dict]:
    return [{k: (np.asarray(v).astype(np.float32) if np.asarray(v).dtype.name in LOW_PRECISION else v)
             for k, v in d.items()} for d in draws]


def compare_many(olds: list[dict], news: list[dict], rtol=None, atol=None, scales: list[float] | None = None) -> dict:
    """`compare_draws` for many small outputs (the rewrite sites of a large graph): the same
    element-wise rule, evaluated on all float outputs of a draw at once; passing outputs get
    their max abs/rel error, any other output the full per-output figures."""
    outputs: dict = {}
    for k, (old, new) in enumerate(zip(olds, news)):
        scale = scales[k] if scales and atol is None else 1.0
        simple, rest = [], []
        for name, a in old.items():
            b = new.get(name)
            if (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape and a.dtype == b.dtype
                    and a.size and _is_float(a.dtype)):
                simple.append(name)
            else:
                rest.append(name)
        figures = {}
        if simple:
            a = np.concatenate([old[n].astype(np.float64).ravel() for n in simple])
            b = np.concatenate([new[n].astype(np.float64).ravel() for n in simple])
            sizes = np.array([old[n].size for n in simple])
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            tol = np.array([tolerances(old[n].dtype, rtol, atol) for n in simple])
            rt, at = np.repeat(tol[:, 0], sizes), np.repeat(tol[:, 1] * scale, sizes)
            finite = np.isfinite(a) & np.isfinite(b)
            diff = np.where(finite, np.abs(a - b), 0.0)
            absa = np.abs(np.where(finite, a, 0.0))
            bad = (diff > at + rt * absa) | ~finite
            with np.errstate(divide="ignore", invalid="ignore"):
                rel = np.where(absa > 0, diff / absa, np.where(diff > 0, np.inf, 0.0))
            any_bad = np.maximum.reduceat(bad, starts)
            max_abs = np.maximum.reduceat(diff, starts)
            max_rel = np.maximum.reduceat(rel, starts)
            for i, n in enumerate(simple):
                if any_bad[i]:
                    rest.append(n)  # NaN/Inf or out of tolerance: the full figures say where
                else:
                    figures[n] = {"shape": list(old[n].shape), "dtype": str(old[n].dtype), "ok": True,
                                  "max_abs_diff": float(max_abs[i]), "max_rel_diff": float(max_rel[i])}
        for n in rest:
            figures[n] = (compare_value(old[n], new[n], rtol, atol, None, scale) if n in new else
                          {"ok": False, "reason": "output missing after the pass", "max_abs_diff": None, "max_rel_diff": None})
        for n, e in figures.items():
            e["draw"] = k
            outputs[n] = e if n not in outputs else _worse(outputs[n], e)
    if len(olds) > 1:
        for e in outputs.values():
            e["draws"] = len(olds)
    worst_abs = max((_or_inf(e.get("max_abs_diff")) for e in outputs.values()), default=0.0)
    worst_rel = max((_or_inf(e.get("max_rel_diff")) for e in outputs.values()), default=0.0)
    return {"ok": all(e["ok"] for e in outputs.values()), "max_abs_diff": worst_abs, "max_rel_diff": worst_rel,
            "outputs": outputs}
