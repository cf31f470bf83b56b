"""The validator: re-run each stage on onnxruntime and compare it with the previous stage.

Every stage runs on the same seeded feeds, with onnxruntime's graph optimizations disabled
(an optimized reference would hide the very bugs we look for). Outputs are compared by name,
shape, dtype and value. An output passes when

    max|new - old| <= atol + rtol * max|old|          (per output tensor)

i.e. the tolerance scales with the output's largest magnitude; near-zero elements of a large
output do not fail on cancellation noise. `max_rel_diff` reports max|new - old| / max|old|.

Random ops are never compared blindly: onnxruntime seeds unseeded random kernels once per
process, so two runs of a random model may agree by accident or disagree for no reason.
Random nodes that both stages share are cut out of the new stage and fed with what the old
stage actually drew; inputs a pass created are fed through its `InputBinding`s.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .errors import NormfixError
from .graph import RANDOM_OPS
from . import model_io
from .model_io import _first_line

# (rtol, atol) by output element type. fp16 keeps ~3 decimal digits and a fold rounds its
# weights once more, so a per-layer relative error of ~1e-3 is expected there.
TOLERANCES = {
    onnx.TensorProto.FLOAT: (1e-4, 1e-5),
    onnx.TensorProto.DOUBLE: (1e-9, 1e-12),
    onnx.TensorProto.FLOAT16: (1e-2, 1e-3),
    onnx.TensorProto.BFLOAT16: (5e-2, 1e-2),
}


# Generated test data stays below this many elements per input (1 GiB of float32).
MAX_FEED_ELEMENTS = 1 << 28


class RuntimeUnavailable(Exception):
    """onnxruntime cannot load this model (a custom-domain op, say)."""


@dataclass
class Options:
    seed: int = 0
    rtol: float | None = None
    atol: float | None = None
    shapes: dict | None = None
    inputs: dict | None = None


# ---- feeds ---------------------------------------------------------------------------
def real_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def input_shape(vi: onnx.ValueInfoProto, shapes: dict | None) -> list[int]:
    """Concrete shape for an input: `shapes[input name]` if given, else each dim's value,
    `shapes[dim_param]` for a named symbolic dim, and 1 for any other symbolic dim."""
    shapes = shapes or {}
    if vi.name in shapes:
        return [int(d) for d in np.ravel(shapes[vi.name])]
    dims = []
    for d in vi.type.tensor_type.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(d.dim_value)
        elif d.HasField("dim_param") and d.dim_param in shapes:
            dims.append(int(np.ravel(shapes[d.dim_param])[0]))
        else:
            dims.append(1)
    return dims


def make_feeds(model: onnx.ModelProto, seed: int = 0, shapes: dict | None = None,
               inputs: dict | None = None) -> dict[str, np.ndarray]:
    """Seeded feeds for every real graph input; `inputs` (e.g. from --inputs) take precedence."""
    rng = np.random.default_rng(seed)
    inputs = inputs or {}
    feeds: dict[str, np.ndarray] = {}
    noise_names: set[str] = set()
    try:
        from .noise import noise_feeds, noise_inputs

        noise_names = set(noise_inputs(model))
    except ImportError:  # noise support not installed in this build
        noise_feeds = None
    for vi in real_inputs(model):
        if vi.name in inputs:
            feeds[vi.name] = np.asarray(inputs[vi.name])
            continue
        if vi.name in noise_names:
            continue
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type") or tt.elem_type in (0, onnx.TensorProto.STRING):
            raise NormfixError(f"cannot make test data for input {vi.name!r} (not a numeric tensor); "
                               "pass --inputs FILE.npz or --no-validate")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        shape = input_shape(vi, shapes)
        if np.prod(shape, dtype=np.float64) > MAX_FEED_ELEMENTS:
            raise NormfixError(f"input {vi.name!r} of shape {shape} is too large to make test data for; "
                               "give a smaller --input-shape, real --inputs, or --no-validate")
        if np.issubdtype(dtype, np.floating) or tt.elem_type == onnx.TensorProto.BFLOAT16:
            value = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            value = rng.random(shape) < 0.5
        else:  # integer inputs are often indices or lengths: keep them small and valid
            value = rng.integers(0, 2, size=shape).astype(dtype)
        feeds[vi.name] = value
    extra = set(inputs) - {vi.name for vi in real_inputs(model)}
    if extra:
        raise NormfixError(f"--inputs names tensors that are not graph inputs: {', '.join(sorted(extra))}")
    if noise_names and noise_feeds is not None:
        feeds.update({k: v for k, v in noise_feeds(model, seed=seed, shapes=_known_dims(model, feeds, shapes)).items()
                      if k not in feeds})
    return feeds


def _known_dims(model: onnx.ModelProto, feeds: dict, shapes: dict | None) -> dict:
    """dim_param -> value as fixed by the feeds chosen so far (so noise shares the batch)."""
    known = dict(shapes or {})
    for vi in real_inputs(model):
        if vi.name in feeds:
            for d, n in zip(vi.type.tensor_type.shape.dim, feeds[vi.name].shape):
                if d.HasField("dim_param"):
                    known.setdefault(d.dim_param, n)
    return known


# ---- running -------------------------------------------------------------------------
class RuntimeCrashed(RuntimeUnavailable):
    """onnxruntime died (a signal) on this model; the worker is restarted for the next one."""


class OrtWorker:
    """onnxruntime in a child process (`_ort_server.py`), started once and reused.

    A subprocess started by file path, not multiprocessing: the child never re-imports the
    user's script, and imports only numpy and onnxruntime."""

    def __init__(self):
        self._proc = None

    def start(self) -> None:
        """Start the child now (it imports onnxruntime while the parent loads the model)."""
        if self._proc is None or self._proc.poll() is not None:
            import subprocess
            import sys
            from pathlib import Path

            server = Path(__file__).with_name("_ort_server.py")
            self._proc = subprocess.Popen([sys.executable, "-u", str(server)], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

    def run(self, source, feeds: dict) -> dict:
        from . import _ort_server as wire

        self.start()
        spill = None
        if isinstance(source, bytes) and len(source) > SPILL_BYTES:
            # a big model goes by file (tmpfs where there is one): piping and pickling
            # 100 MB costs more than writing it once and letting onnxruntime read it
            spill = _spill(source)
            source = spill
        try:
            wire._write(self._proc.stdin, (source, feeds))
            reply = wire._read(self._proc.stdout)
        except (BrokenPipeError, OSError):
            reply = None
        finally:
            if spill is not None:
                model_io.remove_quietly(spill)
        if reply is None:
            code = self._proc.wait()
            self._proc = None
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            raise RuntimeCrashed(f"onnxruntime crashed on this model ({how})")
        kind, payload = reply
        if kind == "unavailable":
            raise RuntimeUnavailable(payload)
        if kind == "failed":
            raise NormfixError(f"onnxruntime failed to run the model: {payload}")
        return payload

    def close(self) -> None:
        if self._proc is not None:
            try:
                self._proc.stdin.close()
                self._proc.wait(timeout=10)
            except Exception:
                self._proc.kill()
            self._proc = None


_WORKER = OrtWorker()
SPILL_BYTES = 8 << 20


SPILL_DIRS = ("/dev/shm", None)  # tmpfs first; None: the disk temp folder (tempfile's default)


def _spill(data: bytes) -> str:
    """`data` in a temporary file, tmpfs where there is room (64 MB in default containers),
    else the disk temp folder; a failed attempt leaves no partial file behind."""
    import os
    import tempfile

    reason = None
    for folder in SPILL_DIRS:
        if folder is not None and not (os.path.isdir(folder) and os.access(folder, os.W_OK)):
            continue
        try:
            fd, path = tempfile.mkstemp(prefix="onnx_normfix_", suffix=".onnx", dir=folder)
        except OSError as exc:
            reason = exc
            continue
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return path
        except OSError as exc:  # full tmpfs (ENOSPC): try the next folder
            model_io.remove_quietly(path)
            reason = exc
    raise NormfixError(f"cannot write a temporary copy of the model for onnxruntime "
                       f"({getattr(reason, 'strerror', None) or reason}); free space in {tempfile.gettempdir()} "
                       "or set TMPDIR")


def _close_worker() -> None:
    _WORKER.close()


import atexit  # noqa: E402  (registered next to the worker it closes)

atexit.register(_close_worker)


def start_worker() -> None:
    _WORKER.start()


class Staged:
    """`model` written to a temporary folder as `.onnx` + external data, for onnxruntime and
    onnx.checker when it has no bytes of its own (over 2 GB, or still reading external data
    by absolute path, which both refuse). Unchanged tensors are copied file to file by the
    kernel (no memory in this process); tensors held in memory are written once. Not hard
    links: onnx refuses to load a data file with several links ("hardlink attack"), so a
    killed run would leave the user's own model unloadable; not symbolic links or absolute
    paths: onnxruntime and onnx.checker refuse both. Use as a context manager; the folder is
    removed on exit."""

    def __init__(self, model: onnx.ModelProto):
        import tempfile
        from pathlib import Path

        self._dir = tempfile.TemporaryDirectory(prefix="onnx_normfix_")
        try:
            model_io.write_external(model, Path(self._dir.name), "model.onnx", "model.onnx.data")
        except BaseException:
            self._dir.cleanup()
            raise
        self.path = f"{self._dir.name}/model.onnx"

    def check(self, full_check: bool = False) -> None:
        """onnx.checker on the staged model (raises what it raises; it does not read tensor
        data, so this costs what checking the small `.onnx` costs)."""
        onnx.checker.check_model(self.path, full_check=full_check)

    def cleanup(self) -> None:
        self._dir.cleanup()

    def __enter__(self) -> "Staged":
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()


def with_outputs(model: onnx.ModelProto, names) -> onnx.ModelProto:
    """A copy of `model` that also outputs the tensors `names` (for capturing intermediates)."""
    names = [n for n in names if n not in {o.name for o in model.graph.output}]
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    return m


def run_model(model: onnx.ModelProto, feeds: dict, extra_outputs=(), serialized: bytes | None = None,
              path: str | None = None) -> dict:
    """Run on onnxruntime (optimizations disabled, in the worker process); returns
    {output name: array}. `serialized` (the model's bytes) or `path` (a `Staged` file of it)
    save a serialization. Raises RuntimeUnavailable if onnxruntime cannot load the model
    (RuntimeCrashed if it died on it), NormfixError if the feeds do not fit it."""
    if extra_outputs:
        model, serialized, path = with_outputs(model, extra_outputs), None, None
    if path is not None:
        return _WORKER.run(str(path), feeds)
    if serialized is not None and model is not None and model_io.references_files(serialized, model):
        serialized = None  # raw SerializeToString of a model reading external data by absolute path
    if serialized is None:
        serialized = model_io.serialize(model)
        if serialized is None:  # over 2 GB or external data: onnxruntime reads it from files
            with Staged(model) as staged:
                return _WORKER.run(staged.path, feeds)
    return _WORKER.run(serialized, feeds)


def cut_random(model: onnx.ModelProto, draws: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy where the random nodes producing `draws` are removed and those tensors become
    graph inputs, so the caller can feed them the draws the previous stage made."""
    names = set(draws)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    keep = [n for n in m.graph.node if not (n.op_type in RANDOM_OPS and set(n.output) & names)]
    del m.graph.node[:]
    m.graph.node.extend(keep)
    m.graph.input.extend(
        onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(draws[n].dtype), draws[n].shape)
        for n in sorted(names))
    return m


def random_nodes(model: onnx.ModelProto) -> dict[str, bytes]:
    """{output name: the random node's definition (op, inputs, sorted attributes)}: a
    random op is the same across two stages only if its definition is."""
    found = {}
    for n in model.graph.node:
        if n.op_type in RANDOM_OPS and n.domain in ("", "ai.onnx"):
            d = onnx.NodeProto(op_type=n.op_type, domain=n.domain, input=n.input)
            d.attribute.extend(sorted(n.attribute, key=lambda a: a.name))
            found.update({o: d.SerializeToString() for o in n.output if o})
    return found


# ---- comparing -----------------------------------------------------------------------
def compare(old: dict, new: dict, rtol: float | None = None, atol: float | None = None) -> dict:
    """Per-output figures and the overall verdict."""
    outputs = {}
    ok = True
    worst_abs = worst_rel = 0.0
    for name in old:
        a = np.asarray(old[name])
        entry: dict = {"shape": list(a.shape), "dtype": str(a.dtype)}
        if name not in new:
            entry.update(ok=False, reason="output missing after the pass")
        else:
            b = np.asarray(new[name])
            entry.update(_compare_one(a, b, rtol, atol))
        outputs[name] = entry
        ok &= entry["ok"]
        # an output that could not be compared at all (missing, reshaped) counts as infinite
        worst_abs = max(worst_abs, _or_inf(entry.get("max_abs_diff")))
        worst_rel = max(worst_rel, _or_inf(entry.get("max_rel_diff")))
    for name in set(new) - set(old):
        outputs[name] = {"ok": False, "reason": "output appeared after the pass"}
        ok = False
    return {"ok": ok, "max_abs_diff": worst_abs, "max_rel_diff": worst_rel, "outputs": outputs}


def _or_inf(x) -> float:
    return float("inf") if x is None else float(x)


def _compare_one(a: np.ndarray, b: np.ndarray, rtol, atol) -> dict:
    if a.shape != b.shape:
        return {"ok": False, "reason": f"shape {list(a.shape)} became {list(b.shape)}",
                "max_abs_diff": None, "max_rel_diff": None}
    if a.dtype != b.dtype:
        return {"ok": False, "reason": f"dtype {a.dtype} became {b.dtype}", "max_abs_diff": None, "max_rel_diff": None}
    if a.size == 0:
        return {"ok": True, "max_abs_diff": 0.0, "max_rel_diff": 0.0}
    if not (np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16"):
        diff = int(np.count_nonzero(a != b))
        return {"ok": diff == 0, "max_abs_diff": float(diff and np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))),
                "max_rel_diff": float(diff / a.size), **({"reason": f"{diff} elements differ"} if diff else {})}
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    nan_a, nan_b = np.isnan(a64), np.isnan(b64)
    if not np.array_equal(nan_a, nan_b):
        return {"ok": False, "reason": "NaN pattern differs", "max_abs_diff": float("nan"), "max_rel_diff": float("nan")}
    if not np.isfinite(a64).any() and not np.isfinite(b64).any():
        # e.g. all-NaN --inputs: equal patterns prove nothing about the pass
        return {"ok": False, "reason": "no finite values: nothing was compared (check --inputs)",
                "max_abs_diff": None, "max_rel_diff": None}
    finite = ~nan_a
    inf_same = np.array_equal(np.isinf(a64), np.isinf(b64)) and np.array_equal(a64[np.isinf(a64)], b64[np.isinf(b64)])
    both = finite & np.isfinite(a64) & np.isfinite(b64)
    diff = np.abs(a64[both] - b64[both])
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(a64[both]).max()) if diff.size else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    default_rtol, default_atol = TOLERANCES.get(onnx.helper.np_dtype_to_tensor_dtype(a.dtype), (1e-4, 1e-5))
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    ok = inf_same and max_abs <= atol + rtol * scale
    out = {"ok": bool(ok), "max_abs_diff": max_abs, "max_rel_diff": max_rel, "rtol": rtol, "atol": atol}
    if not inf_same:
        out["reason"] = "Inf pattern differs"
    elif not ok:
        out["reason"] = f"max abs diff {max_abs:.3g} > atol {atol:g} + rtol {rtol:g} * max|ref| {scale:.3g}"
    return out



# ---- site-local checks ---------------------------------------------------------------
def extract_region(model: onnx.ModelProto, index, inputs: list[str], outputs: list[str],
                   max_nodes: int, value_type=None, position: dict | None = None) -> onnx.ModelProto | None:
    """The nodes computing `outputs` from `inputs` and constants, as a small model whose
    inputs are `inputs` (typed by `value_type`, default `index.value_type`). None if the
    region reaches a graph input not listed, is larger than `max_nodes`, or a type is unknown.
    `position` ({id(node): index in the graph}) keeps node order; pass it when extracting
    many regions of one model, so each costs time linear in its own size."""
    value_type = value_type or index.value_type
    stop = set(inputs) - set(outputs)
    nodes, seen, taken, todo = [], set(), set(), list(outputs)
    while todo:
        name = todo.pop()
        if name in seen or name in stop:
            continue
        seen.add(name)
        node = index.producer.get(name)
        if node is None:
            if name in index.initializers and name not in index.graph_inputs:
                continue
            return None  # a real graph input the site did not declare
        if id(node) in taken:
            continue
        taken.add(id(node))
        nodes.append(node)
        if len(nodes) > max_nodes:
            return None
        todo.extend(i for i in node.input if i)
    if position is None:
        position = {id(n): k for k, n in enumerate(model.graph.node)}
    nodes.sort(key=lambda n: position[id(n)])  # graph order is a topological order
    used = {i for n in nodes for i in n.input}
    g = onnx.helper.make_graph(nodes, "site", [], [onnx.helper.make_empty_tensor_value_info(o) for o in outputs],
                               [index.initializers[n] for n in used if n in index.initializers])
    for name in inputs:
        if name not in stop:
            continue
        t = value_type(name)
        if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
            return None
        vi = onnx.ValueInfoProto(name=name)
        vi.type.CopyFrom(t)
        g.input.append(vi)
    m = onnx.helper.make_model(g, opset_imports=list(model.opset_import))
    m.ir_version = model.ir_version
    m.functions.extend(model.functions)
    return m


def check_sites(before: onnx.ModelProto, after: onnx.ModelProto, sites, options: Options,
                max_nodes: int = 64, batch_sites: int = 500) -> dict:
    """Compare `before` and `after` only around the rewrite sites.

    `sites` is a list of (input tensor names, output tensor names) that exist in both
    models. Inputs get seeded data of their inferred shapes (symbolic dims as in
    `make_feeds`). Sites are checked `batch_sites` at a time, one session per model and
    batch: onnxruntime's session set-up grows faster than linearly with the graph (1 s at
    10k nodes, 135 s at 100k), so bounded batches keep the whole check linear. Returns the
    comparison plus how many sites were checked."""
    from .graph import GraphIndex

    sites = list(sites)
    if not any(site_out for _, site_out in sites):
        return {"ok": True, "sites": 0, "outputs": {}, "max_abs_diff": 0.0, "max_rel_diff": 0.0}
    bi, ai = GraphIndex(before), GraphIndex(after)
    # Site inputs exist in both models with the same types: infer shapes once, on the
    # smaller model.
    types = (ai if len(after.graph.node) <= len(before.graph.node) else bi).value_type
    result = {"ok": True, "sites": 0, "outputs": {}, "max_abs_diff": 0.0, "max_rel_diff": 0.0}
    pos_before = {id(n): k for k, n in enumerate(before.graph.node)}
    pos_after = {id(n): k for k, n in enumerate(after.graph.node)}
    for start in range(0, len(sites), batch_sites):
        batch = sites[start:start + batch_sites]
        # dicts as ordered sets: first-seen order, linear time
        ins = list(dict.fromkeys(n for site_in, _ in batch for n in site_in))
        outs = list(dict.fromkeys(n for _, site_out in batch for n in site_out))
        if not outs:
            continue
        limit = max_nodes * len(batch)
        sub_before = extract_region(before, bi, ins, outs, limit, types, pos_before)
        sub_after = extract_region(after, ai, ins, outs, limit, types, pos_after)
        if sub_before is None or sub_after is None:
            return {"ok": None, "sites": 0, "reason": "rewrite sites could not be isolated"}
        feeds = make_feeds(sub_before, options.seed + start, options.shapes)
        cmp = compare(run_model(sub_before, feeds), run_model(sub_after, feeds), options.rtol, options.atol)
        result["ok"] = result["ok"] and cmp["ok"]
        result["outputs"].update(cmp["outputs"])
        result["max_abs_diff"] = max(result["max_abs_diff"], cmp["max_abs_diff"])
        result["max_rel_diff"] = max(result["max_rel_diff"], cmp["max_rel_diff"])
        result["sites"] += len(batch)
    return result
