"""Small shared helpers for the tests: run a model on onnxruntime, build feeds."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort


def ort_run(model: onnx.ModelProto, feeds: dict, outputs=None) -> dict:
    """Run `model` with every onnxruntime graph optimization disabled (an optimized
    reference would hide bugs in our rewrites)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = outputs or [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def assert_close(got: dict, want: dict, rtol=1e-4, atol=1e-5):
    assert set(got) == set(want), (sorted(got), sorted(want))
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=atol, err_msg=k)


def count_ops(model: onnx.ModelProto) -> dict:
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


# ---- helpers for testing any pass ------------------------------------------------------
# The house tolerances, by output dtype: float32 1e-4/1e-5 (a fold reorders a few roundings),
# float16 1e-2/1e-3 (about 3 decimal digits, rounded once more by a fold).
HOUSE_TOLERANCES = {np.dtype(np.float32): (1e-4, 1e-5), np.dtype(np.float64): (1e-9, 1e-12),
                    np.dtype(np.float16): (1e-2, 1e-3)}


def seeded_feeds(model: onnx.ModelProto, seed: int = 0, dims: int = 2) -> dict:
    """Feeds for every real graph input: N(0,1) floats, small non-negative integers, bools;
    symbolic dims get `dims`."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else dims for d in tt.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[vi.name] = rng.random(shape) < 0.5
        else:
            feeds[vi.name] = rng.integers(0, 3, size=shape).astype(dtype)
    return feeds


def assert_outputs_match(before: onnx.ModelProto, after: onnx.ModelProto, feeds: dict | None = None,
                         rtol: float | None = None, atol: float | None = None) -> None:
    """`after` computes what `before` computes on onnxruntime (optimizations disabled), within
    the house tolerance of each output's dtype (or the given one), element by element."""
    feeds = seeded_feeds(before) if feeds is None else feeds
    want, got = ort_run(before, feeds), ort_run(after, feeds)
    assert set(got) == set(want), (sorted(got), sorted(want))
    for k, w in want.items():
        r, a = HOUSE_TOLERANCES.get(np.asarray(w).dtype, (1e-4, 1e-5))
        np.testing.assert_allclose(got[k], w, rtol=r if rtol is None else rtol, atol=a if atol is None else atol,
                                   err_msg=k)


def _stage(pass_, model, options):
    import onnx_normfix as nf

    result = nf.optimize(model, passes=[pass_], **(options or {}))
    (stage,) = [s for s in result.report["passes"] if s["name"] == getattr(pass_, "name", pass_)]
    return result, stage


def assert_rewrites(pass_, model: onnx.ModelProto, rewrites: int | None = None, ops: dict | None = None,
                    options: dict | None = None, feeds: dict | None = None):
    """Run `pass_` (a name or a `Pass`, registered or not) alone through `optimize` with
    validation, then check: the rewrite count, the op counts of the result (`ops`: {op: n},
    0 for "none left"), and the outputs against the input model on onnxruntime, independently
    of the validator. Returns the `Result`."""
    result, stage = _stage(pass_, model, options)
    if rewrites is not None:
        assert stage["rewrites"] == rewrites, (stage["rewrites"], stage["notes"])
    else:
        assert stage["rewrites"] > 0, stage["notes"]
    counts = count_ops(result.model)
    for op, n in (ops or {}).items():
        assert counts.get(op, 0) == n, (op, counts)
    assert stage["validation"]["status"] in ("passed", "changed", "skipped"), stage["validation"]
    assert_outputs_match(model, result.model, feeds)
    return result


def assert_declines(pass_, model: onnx.ModelProto, why: str, options: dict | None = None):
    """`pass_` rewrites nothing on `model`, leaves its ops as they were, and says why in a note
    matching the regex `why`. Returns the `Result`."""
    import re

    result, stage = _stage(pass_, model, options)
    assert stage["rewrites"] == 0, stage["notes"]
    assert any(re.search(why, n) for n in stage["notes"]), (why, stage["notes"])
    assert count_ops(result.model) == count_ops(model)
    return result
