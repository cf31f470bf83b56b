"""The pipeline: load once, run the passes in order, validate after each, save once.

    optimize(model, passes=["fix_inorm", "fold_bn"], validate=True, **options) -> Result

Passes run in their registered order (replace_random, fix_inorm, fold_bn, then user passes),
whatever order they are named in, so BatchNormalizations made by fix_inorm are still folded.
After each pass that rewrote something: `onnx.checker` (full check, unless the input itself
fails strict shape inference), then onnxruntime on the same seeded feeds as the previous
stage. A pass that preserves outputs must agree within tolerance, else `ValidationError`;
a pass that changes outputs on purpose is reported as `changed`, with the size of the change.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from . import model_io, validate as V
from .errors import NormfixError, ValidationError
from .registry import PASSES, Pass, PassContext, PassResult, resolve_passes

CORE_OPTIONS = {"seed": 0, "rtol": None, "atol": None, "input_shapes": None, "inputs": None,
                "reference": None, "progress": None, "full_validation": False}
# Above this many nodes, creating an onnxruntime session for the whole model costs more than
# the pass itself (1 s at 10k nodes, 135 s at 100k): stages whose pass names its rewrite
# sites are then checked site by site, unless full_validation is asked for.
WHOLE_MODEL_NODES = 5000


@dataclass
class Result:
    model: onnx.ModelProto
    report: dict = field(default_factory=dict)
    # The bytes of `model` as the last validated stage serialized them (None without
    # validation, over 2 GB or with external data). Stale once `model` is modified; `save`
    # does not use them.
    serialized: bytes | None = field(default=None, repr=False)
    # The input kept (some of) its tensors in external data: so does the output, even once
    # every external tensor has been rewritten (no serialization of the whole model).
    external_data: bool = False

    def save(self, path: str | os.PathLike) -> None:
        """Write the model atomically; with external data beside it if the input had some or
        it is over 2 GB. Until saved, `model`'s unchanged external tensors point at the
        input's data files by absolute path (onnx's own reader refuses those: read them with
        `onnx_normfix.graph.array_of`, or save first); after saving, at the new data file."""
        model_io.save_model(self.model, path, external=self.external_data or None)
        self.report["output"] = str(path)


def optimize(model: str | os.PathLike | onnx.ModelProto, passes=("fold_bn",), validate: bool = True,
             **options: Any) -> Result:
    """Run `passes` on `model` (a path or an `onnx.ModelProto`, never modified) and return a
    `Result`. Options: seed, rtol, atol, input_shapes ({input or dim name: shape/size}),
    inputs ({name: array} or .npz path), reference ({output: array}, .npz path, or a callable
    feeds -> outputs), progress (callable taking a message), plus each pass's own options
    (see `PASSES[name].options`). Raises NormfixError / ValidationError."""
    selected = resolve_passes(passes)
    if options.get("target_opset") is not None:
        # the opset conversion fuse_norms' target_opset asks for: a stage of its own, validated on its own
        from onnx_normfix.passes.raise_opset import PASS as raise_opset

        selected = resolve_passes([*selected, raise_opset])
    opts = _merge_options(selected, options)
    say: Callable[[str], None] = opts["progress"] or (lambda message: None)

    t0 = time.perf_counter()
    if validate:
        V.start_worker()  # onnxruntime starts in its process while the model loads
    if isinstance(model, onnx.ModelProto):
        source = "<ModelProto>"
        work = onnx.ModelProto()
        work.CopyFrom(model)
        external = model_io.has_external(work)
    else:
        source = str(model)
        say(f"loading {source}")
        found: dict = {}
        work = model_io.load_model(model, found)
        external = found["external_tensors"] > 0
    # a model with external data is never serialized whole, even once its external tensors
    # are all rewritten: that copy would double the peak memory (see model_io)
    data = model_io.serialize(work) if validate and not external else None
    # no bytes (external data, or over 2 GB): onnx.checker and onnxruntime read a staged copy
    staged = V.Staged(work) if validate and data is None else None
    try:
        full_check, check_note = _check_input(data, staged) if validate else (False, None)
        report: dict = {"input": source, "output": None, "nodes_before": len(work.graph.node),
                        "nodes_after": None, "passes": [], "load_seconds": round(time.perf_counter() - t0, 3)}
        if check_note:
            report["notes"] = [check_note]

        inputs = _load_arrays(opts["inputs"], "--inputs")
        stage = _Stages(work, V.Options(seed=opts["seed"], rtol=opts["rtol"], atol=opts["atol"],
                                        shapes=opts["input_shapes"], inputs=inputs),
                        _Snapshot(work, data), opts["full_validation"], staged and staged.path,
                        external) if validate else None
    finally:
        if staged is not None:
            staged.cleanup()
    for k, p in enumerate(selected, 1):
        say(f"[{k}/{len(selected)}] {p.name}: running on {len(work.graph.node)} nodes")
        t = time.perf_counter()
        pass_opts = {name: opts[name] for name in p.options}
        pass_opts["seed"] = opts["seed"]
        if p.prepare is not None:
            pass_opts = p.prepare(work, pass_opts)
        nodes_before = len(work.graph.node)
        result = p.run(work, PassContext(options=pass_opts, log=say))
        if not isinstance(result, PassResult):
            raise NormfixError(f"pass {p.name} returned {type(result).__name__}, not a PassResult")
        entry = {"name": p.name, "rewrites": result.rewrites, "notes": list(result.notes),
                 "nodes_before": nodes_before, "nodes_after": len(work.graph.node),
                 "seconds": round(time.perf_counter() - t, 3)}
        if result.details:
            entry["details"] = result.details
        if stage is None:
            entry["validation"] = {"status": "skipped", "reason": "validation disabled (--no-validate)"}
        else:
            tv = time.perf_counter()
            entry["validation"] = stage.check(p, result, work, full_check)
            entry["validation"]["seconds"] = round(time.perf_counter() - tv, 3)
        report["passes"].append(entry)
        say(_stage_line(entry))

    report["nodes_after"] = len(work.graph.node)
    if opts["reference"] is not None:
        report["reference"] = _check_reference(work, opts, inputs)
    report["seconds"] = round(time.perf_counter() - t0, 3)
    current = stage.prev.data if stage is not None and stage.current else None
    return Result(model=work, report=report, serialized=current, external_data=external)


def _merge_options(selected: list[Pass], options: dict) -> dict:
    known = dict(CORE_OPTIONS)
    owners: dict[str, str] = {}
    for p in PASSES.values():
        for name in p.options:
            owners.setdefault(name, p.name)
    for p in selected:
        known.update(p.options)
    merged = dict(known)
    for name, value in options.items():
        if name not in known:
            if name in owners:
                raise NormfixError(f"option {name!r} belongs to pass {owners[name]!r}, which was not requested")
            raise NormfixError(f"unknown option {name!r}; known: {', '.join(sorted(known))}")
        merged[name] = value
    return merged


def _check_input(data: bytes | None, staged: V.Staged | None = None) -> tuple[bool, str | None]:
    """The input must pass onnx.checker; strict shape inference is used later only if it
    passes that too (an exporter's harmless shape quirk must not block a fold). Without
    bytes, the checker reads the staged copy."""
    if data is None and staged is None:
        return False, "model over 2 GB: onnx.checker skipped (it cannot check such a model in memory)"
    try:
        _run_checker(data if data is not None else staged, full_check=True)
        return True, None
    except Exception as strict:
        try:
            _run_checker(data if data is not None else staged)
        except Exception as exc:
            raise NormfixError(f"invalid ONNX model: {V._first_line(exc)}") from None
        return False, f"input fails strict shape inference, later stages checked without it: {V._first_line(strict)}"


def _run_checker(source: bytes | V.Staged, full_check: bool = False) -> None:
    if isinstance(source, V.Staged):
        source.check(full_check)
    else:
        onnx.checker.check_model(source, full_check=full_check)


def _load_arrays(value, what: str):
    if value is None or isinstance(value, dict):
        return value
    path = Path(value)
    if not path.is_file():
        raise NormfixError(f"{what}: file not found: {path}")
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("a single array, not an .npz archive of named arrays")
        with data:
            arrays = {k: data[k] for k in data.files}
    except Exception as exc:
        raise NormfixError(f"{what}: cannot read {path} as .npz: {V._first_line(exc)}") from None
    for k, v in arrays.items():
        if not isinstance(v, np.ndarray) or v.dtype.kind not in "biufc":
            raise NormfixError(f"{what}: {path}: entry {k!r} is not a numeric array")
    return arrays


def _check_reference(model: onnx.ModelProto, opts: dict, inputs) -> dict:
    ref = opts["reference"]
    feeds = V.make_feeds(model, opts["seed"], opts["input_shapes"], inputs)
    if callable(ref):
        expected = {k: np.asarray(v) for k, v in ref(feeds).items()}
    else:
        if inputs is None:
            raise NormfixError("a reference needs the inputs it was computed from (--inputs)")
        expected = _load_arrays(ref, "--reference")
    try:
        got = V.run_model(model, feeds)
    except V.RuntimeUnavailable as exc:
        raise NormfixError(f"cannot compare with the reference: onnxruntime cannot run the model ({exc})") from None
    missing = set(expected) - set(got)
    if missing:
        raise NormfixError(f"reference names outputs the model does not have: {', '.join(sorted(missing))}")
    cmp = V.compare(expected, {k: got[k] for k in expected}, opts["rtol"], opts["atol"])
    status = "passed" if cmp["ok"] else "failed"
    figures = {"status": status, "max_abs_diff": cmp["max_abs_diff"], "max_rel_diff": cmp["max_rel_diff"],
               "outputs": cmp["outputs"]}
    if not cmp["ok"]:
        bad = next(n for n, e in cmp["outputs"].items() if not e["ok"])
        raise ValidationError(f"output {bad!r} differs from the reference: {cmp['outputs'][bad].get('reason')}",
                              stage="reference", details=figures)
    return figures


def _stage_line(entry: dict) -> str:
    v = entry["validation"]
    figure = ""
    if v.get("max_abs_diff") is not None and v["status"] in ("passed", "changed"):
        figure = f", max abs diff {v['max_abs_diff']:.3g}"
    return (f"  {entry['name']}: {entry['rewrites']} rewrites, nodes {entry['nodes_before']} -> "
            f"{entry['nodes_after']}, validation {v['status']}{figure}, {entry['seconds']:.2f} s")


class _Snapshot:
    """A stage's model as bytes (none over 2 GB or with external data), parsed back only when
    a check needs it, plus the little the checks read of it directly."""

    def __init__(self, model: onnx.ModelProto, data: bytes | None):
        # Over 2 GB or with external data there are no bytes, and a copy would double the
        # peak memory: such a stage is compared through its cached outputs only.
        self.data = data
        self._model = None
        self.random = V.random_nodes(model)
        self.inputs = [copy.deepcopy(vi) for vi in V.real_inputs(model)]
        self.output_names = {o.name for o in model.graph.output}
        self.node_count = len(model.graph.node)

    @property
    def model(self) -> onnx.ModelProto | None:
        if self._model is None and self.data is not None:
            self._model = onnx.ModelProto.FromString(self.data)
        return self._model


class _Stages:
    """Carries the previous stage (bytes and outputs) from one pass to the next, so each stage
    costs one serialization and one onnxruntime session (two where random draws are captured)."""

    def __init__(self, model: onnx.ModelProto, options: V.Options, first: _Snapshot, full: bool = False,
                 path: str | None = None, external: bool = False):
        self.options = options
        self.full = full
        self.external = external  # stages are staged as files, never serialized whole
        self.feeds = V.make_feeds(model, options.seed, options.shapes, options.inputs)
        self.prev = first
        self.current = True  # self.prev.data are the bytes of the model as it is now
        self.outputs: dict | None = None  # outputs of the previous stage on self.feeds
        # the staged copy of the stage being checked, when it has no bytes (see V.Staged)
        self.staged: V.Staged | None = None
        self.path: str | None = None
        # Random draws are captured by the stage that needs them; a graph over
        # WHOLE_MODEL_NODES is checked at its rewrite sites, never as a whole session.
        if not first.random and (full or first.node_count <= WHOLE_MODEL_NODES):
            self.outputs = self._run_input(model, first.data, path)

    def _run_input(self, model: onnx.ModelProto, data: bytes | None, path: str | None = None) -> dict | None:
        """Run the input once. If onnxruntime cannot load a model made of standard ops only,
        the input is broken (or newer than onnxruntime): stop and say so. Custom-domain
        models and models that crash onnxruntime are compared by no stage (`skipped`)."""
        try:
            return V.run_model(model, self.feeds, serialized=data, path=path)
        except V.RuntimeCrashed:
            return None
        except V.RuntimeUnavailable as exc:
            custom = {n.domain for n in model.graph.node} - {"", "ai.onnx", "ai.onnx.ml"}
            if custom or model.functions:
                return None
            raise NormfixError(f"onnxruntime cannot load the input model: {exc} "
                               "(use --no-validate to skip validation)") from None

    def check(self, p: Pass, result: PassResult, after: onnx.ModelProto, full_check: bool) -> dict:
        try:
            return self._check(p, result, after, full_check)
        finally:
            if self.staged is not None:
                self.staged.cleanup()
                self.staged, self.path = None, None

    def _check(self, p: Pass, result: PassResult, after: onnx.ModelProto, full_check: bool) -> dict:
        preserving = p.preserves_outputs and not result.changes_outputs
        if result.rewrites == 0 and not result.input_bindings:
            self.current = False  # a pass may still have swept dead code: bytes are stale
            return {"status": "skipped", "reason": "nothing rewritten", "max_abs_diff": 0.0, "max_rel_diff": 0.0}
        self.current = True
        before, data = self.prev, (None if self.external else model_io.serialize(after))
        self.prev = _Snapshot(after, data)
        if data is None:  # written once, read by the checker and every onnxruntime run below
            self.staged = V.Staged(after)
            self.path = self.staged.path
        self._checker(p, data if data is not None else self.staged, full_check)
        if (preserving and result.sites and not result.input_bindings and not self.full
                and before.node_count > WHOLE_MODEL_NODES and before.data is not None):
            return self._check_sites(p, result, before.model, after)
        now_random = V.random_nodes(after)
        shared = {o for o, d in now_random.items() if before.random.get(o) == d}
        needs = {n for b in result.input_bindings.values() for n in b.needs}
        extras = shared | needs
        if before.data is None and (extras or self.outputs is None or before.random):
            return {"status": "skipped", "reason": "previous stage (external data or over 2 GB) was not kept "
                    "(its outputs could not be computed, or random draws would have to be captured)"}
        try:
            # A model with random ops is re-run: its cached outputs are draws, not values.
            if extras or self.outputs is None or before.random:
                old = (V.run_model(before.model, self.feeds, extra_outputs=sorted(extras)) if extras
                       else V.run_model(None, self.feeds, serialized=before.data))
            else:
                old = dict(self.outputs)
        except V.RuntimeUnavailable as exc:
            return {"status": "skipped", "reason": f"onnxruntime cannot run this model ({exc}); outputs not compared"}
        try:
            missing = extras - set(old)
            if missing:
                raise NormfixError(f"cannot capture {', '.join(sorted(missing))} from the previous stage")
            captured = {n: old[n] for n in extras}
            for n in extras - before.output_names:
                del old[n]
            feeds = {**self.feeds, **{n: captured[n] for n in shared}}
            for name, binding in result.input_bindings.items():
                feeds[name] = binding.make_feed({n: captured[n] for n in binding.needs})
            if shared:
                new = V.run_model(V.cut_random(after, {n: captured[n] for n in shared}), feeds)
            else:
                new = V.run_model(after, feeds, serialized=data, path=self.path)
        except V.RuntimeUnavailable as exc:  # the previous stage ran: the pass broke the model
            raise ValidationError(f"after pass {p.name}, onnxruntime cannot load the model: {exc}", stage=p.name) from None
        except NormfixError as exc:
            raise ValidationError(f"after pass {p.name}: {exc}", stage=p.name) from None
        uncontrolled = set(now_random) - shared
        cmp = V.compare(old, new, self.options.rtol, self.options.atol)
        self.feeds = {**self.feeds, **{k: feeds[k] for k in result.input_bindings}}
        self.outputs = new if not uncontrolled else None
        verdict = {"max_abs_diff": cmp["max_abs_diff"], "max_rel_diff": cmp["max_rel_diff"], "outputs": cmp["outputs"]}
        if uncontrolled:
            return {"status": "skipped", "reason": f"random ops not controlled: {', '.join(sorted(uncontrolled))}", **verdict}
        if preserving and not cmp["ok"]:
            bad = next(n for n, e in cmp["outputs"].items() if not e["ok"])
            e = cmp["outputs"][bad]
            raise ValidationError(
                f"pass {p.name} changed output {bad!r}: {e.get('reason')} "
                f"(max abs diff {_fmt(e.get('max_abs_diff'))}, max rel diff {_fmt(e.get('max_rel_diff'))})",
                stage=p.name, details=verdict)
        structural = [n for n, e in cmp["outputs"].items() if not e["ok"] and e.get("max_abs_diff") is None]
        if structural:
            raise ValidationError(f"pass {p.name} changed output {structural[0]!r}: "
                                  f"{cmp['outputs'][structural[0]].get('reason')}", stage=p.name, details=verdict)
        checks = ["checker", "whole model"]
        batch = self._batch_check(p, before, after, feeds, new, data)
        if batch is not None:
            checks.append(f"batch {batch}")
        return {"status": "passed" if preserving else "changed", "checks": checks, **verdict}

    def _batch_check(self, p: Pass, before: _Snapshot, after, feeds: dict, new: dict, data) -> int | None:
        """Where the pass made a fixed batch axis symbolic, run the new model at twice the
        batch (the feeds stacked on themselves): every batched output must be its stage
        output stacked likewise. Returns the batch size checked, or None if not needed."""
        fixed = {i.name for i in before.inputs if _leading_dim(i) == "fixed"}
        grown = [i.name for i in V.real_inputs(after) if i.name in fixed and _leading_dim(i) == "symbolic"]
        if not grown:
            return None
        doubled = {k: (np.concatenate([v, v]) if k in grown else v) for k, v in feeds.items()}
        try:
            got = V.run_model(after, doubled, serialized=data, path=self.path)
        except (V.RuntimeUnavailable, NormfixError) as exc:
            raise ValidationError(f"pass {p.name} made the batch symbolic, but the model fails at batch "
                                  f"{len(doubled[grown[0]])}: {exc}", stage=p.name) from None
        want = {k: (np.concatenate([v, v]) if got[k].shape[:1] == (2 * v.shape[0],) else v)
                for k, v in new.items() if v.ndim}
        cmp = V.compare(want, {k: got[k] for k in want}, self.options.rtol, self.options.atol)
        if not cmp["ok"]:
            bad = next(n for n, e in cmp["outputs"].items() if not e["ok"])
            raise ValidationError(f"pass {p.name}: at batch {len(doubled[grown[0]])} output {bad!r} is not "
                                  f"the stacked batch-{len(feeds[grown[0]])} output: {cmp['outputs'][bad].get('reason')}",
                                  stage=p.name, details=cmp)
        return len(doubled[grown[0]])

    def _check_sites(self, p: Pass, result: PassResult, before, after) -> dict:
        self.outputs = None  # the whole model was not run: nothing to reuse next stage
        try:
            cmp = V.check_sites(before, after, result.sites, self.options)
        except V.RuntimeUnavailable as exc:
            return {"status": "skipped", "reason": f"onnxruntime cannot run the rewrite sites ({exc})"}
        if cmp["ok"] is None:
            return {"status": "skipped", "reason": cmp["reason"], "checks": ["checker"]}
        verdict = {"max_abs_diff": cmp["max_abs_diff"], "max_rel_diff": cmp["max_rel_diff"],
                   "outputs": cmp["outputs"], "checks": ["checker", f"{cmp['sites']} rewrite sites"]}
        if not cmp["ok"]:
            bad = next(n for n, e in cmp["outputs"].items() if not e["ok"])
            raise ValidationError(f"pass {p.name} changed tensor {bad!r} at its rewrite site: "
                                  f"{cmp['outputs'][bad].get('reason')}", stage=p.name, details=verdict)
        return {"status": "passed", **verdict}

    @staticmethod
    def _checker(p: Pass, data: bytes | V.Staged | None, full_check: bool) -> None:
        """`data`: the model's bytes, or its staged copy."""
        if data is None:
            return
        try:
            _run_checker(data, full_check=full_check)
        except Exception as exc:
            raise ValidationError(f"pass {p.name} produced an invalid model: {V._first_line(exc)}", stage=p.name) from None


def _leading_dim(vi: onnx.ValueInfoProto) -> str | None:
    dims = vi.type.tensor_type.shape.dim
    if not dims:
        return None
    return "fixed" if dims[0].HasField("dim_value") else "symbolic"


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3g}"
