"""Stage tracking: carry the previous stage from one pass to the next and check each new one.

    stages = Stages(model, options, Snapshot(model, data))   # runs the input once
    verdict = stages.check(pass_, result, model, full_check)  # after every pass

Each check: `onnx.checker`; then the whole model (or, over `WHOLE_MODEL_NODES`, the rewrite
sites) on onnxruntime over every draw in one session, compared element-wise with the
previous stage's outputs (kept from its own check, so each stage costs one session);
random ops controlled (`randomness`); noise inputs of `replace_random` fed from the original
op and its output distribution checked; fp16/bf16 judged against a float32 reference when
needed; a freed batch axis checked with distinct samples run together and alone.

Where the validator chose symbolic dims, the last draw is at a second shape (batch 3, other
dims at the next size): a pass that bakes the feed shape into constants fails to run there
(a ValidationError naming the shape), or differs. That draw's job is the shape: its atol is
scaled by the previous stage's output RMS there too, since its many more elements would
otherwise meet the fp32 rounding of high-gain outputs; values are held strictly on the others.
"""

from __future__ import annotations

import copy
import re

import numpy as np
import onnx

from .. import model_io
from ..errors import NormfixError, ValidationError
from ..model_io import _first_line
from . import randomness as R
from .compare import (compare_draws, float32_copy, float32_draws, float64_copy, float64_reference, input_scale,
                      needs_reference)
from .feeds import (FeedPlan, FeedsUnavailable, Options, check_shape_names, make_draws, real_inputs, second_plan,
                    shape_candidates)
from .sites import check_sites
from .checker import run_checker  # noqa: F401  (stages check with the input's policy)
from .worker import RuntimeCrashed, RuntimeUnavailable, Staged, run_draws

# Above this many nodes, creating an onnxruntime session for the whole model costs more than
# the pass itself (1 s at 10k nodes, 135 s at 100k): stages whose pass names its rewrite
# sites are then checked site by site, unless full validation is asked for.
WHOLE_MODEL_NODES = 5000


class Snapshot:
    """A stage's model as bytes (none over 2 GB or with external data), parsed back only when
    a check needs it, plus the little the checks read of it directly."""

    def __init__(self, model: onnx.ModelProto, data: bytes | None):
        # Over 2 GB or with external data there are no bytes, and a copy would double the
        # peak memory: such a stage is compared through its cached outputs only.
        self.data = data
        self._model = None
        self.random = R.random_nodes(model)
        self.inputs = [copy.deepcopy(vi) for vi in real_inputs(model)]
        self.output_names = {o.name for o in model.graph.output}
        self.node_count = len(model.graph.node)

    @property
    def model(self) -> onnx.ModelProto | None:
        if self._model is None and self.data is not None:
            self._model = onnx.ModelProto.FromString(self.data)
        return self._model


class Stages:
    """Carries the previous stage (bytes and outputs on every draw) from one pass to the next."""

    def __init__(self, model: onnx.ModelProto, options: Options, first: Snapshot, full: bool = False,
                 path: str | None = None, external: bool = False, whole_model_nodes: int | None = None):
        self.options = options
        self.full = full
        self.whole_model_nodes = WHOLE_MODEL_NODES if whole_model_nodes is None else whole_model_nodes
        self.external = external  # stages are staged as files, never serialized whole
        self.prev = first
        self.current = True  # self.prev.data are the bytes of the model as it is now
        self.outputs: list | None = None  # outputs of the previous stage, one dict per draw
        self.staged: Staged | None = None
        self.path: str | None = None
        self.unavailable: str | None = None  # why no feeds can be made (a string input...)
        self.notes: list[str] = []  # about the feeds, repeated in every stage's verdict
        check_shape_names(model, options.shapes)
        self.candidates = shape_candidates(model, options.shapes, options.inputs)
        self.plan: FeedPlan = self.candidates[0]
        self.second: FeedPlan | None = None  # the extra draw's shapes (the last draw), if any
        self.primary = 0  # how many draws are at self.plan's shapes
        try:
            self.draws = self._make_draws(model, self.plan)
        except FeedsUnavailable as exc:
            self.unavailable, self.draws = str(exc), []
            return
        # Random draws are captured by the stage that needs them; a graph over
        # whole_model_nodes is checked at its rewrite sites, never as a whole session.
        if full or first.node_count <= self.whole_model_nodes:
            outputs = self._run_input(model, first.data, path)
            if not first.random:
                self.outputs = outputs

    # ---- the input ----------------------------------------------------------------------
    def _make_draws(self, model: onnx.ModelProto, plan: FeedPlan) -> list:
        """The draws at `plan`, plus one at a second shape where the validator chose
        symbolic dims: a pass that bakes the feed shape into constants fails there."""
        o = self.options
        draws = make_draws(model, plan, o.seed, o.inputs, o.draws)
        self.primary = len(draws)
        self.second = second_plan(model, plan, o.shapes, o.inputs)
        if self.second is not None:
            draws += make_draws(model, self.second, o.seed + 1, o.inputs, 1)
        return draws

    def _drop_second(self, why: str) -> None:
        self.notes.append(f"second shape {self.second.describe()} not used: {why}")
        self.draws, self.second = self.draws[:self.primary], None
        if self.outputs is not None:
            self.outputs = self.outputs[:self.primary]

    def _drop_failing(self, exc: NormfixError) -> bool:
        """A later draw fails on the input although the first runs (image-range floats cast
        to indices; the second shape): keep the draws the model accepts, and say so."""
        failed = re.match(r"onnxruntime failed to run the model: draw (\d+): (.*)", str(exc))
        if not failed:
            return False
        k = int(failed.group(1))
        if self.second is not None and k == self.primary:
            self._drop_second(f"the input model fails there ({failed.group(2)})")
        else:
            self.notes.append(f"draw {k} (and later) not used: the input model fails on it ({failed.group(2)})")
            self.draws = self.draws[:k] + self.draws[self.primary:]
            self.primary = k
        return True

    def _run_input(self, model: onnx.ModelProto, data: bytes | None, path: str | None = None) -> list | None:
        """Run the input on the first candidate shapes onnxruntime accepts. If onnxruntime
        cannot load a model made of standard ops only, the input is broken (or newer than
        onnxruntime): stop and say so. Custom-domain models and models that crash
        onnxruntime are compared by no stage (`skipped`)."""
        failures = []
        for k, plan in enumerate(self.candidates):
            if k:
                self.plan = plan
                self.draws = self._make_draws(model, plan)
            try:
                for _ in range(3):  # at most: a draw's values, then the second shape, dropped
                    try:
                        return run_draws(model, self.draws, serialized=data, path=path)
                    except NormfixError as exc:
                        if isinstance(exc, (RuntimeUnavailable, RuntimeCrashed)) or not self._drop_failing(exc):
                            raise
                return run_draws(model, self.draws, serialized=data, path=path)
            except RuntimeCrashed:
                return None
            except RuntimeUnavailable as exc:
                custom = {n.domain for n in model.graph.node} - {"", "ai.onnx", "ai.onnx.ml"}
                if custom or model.functions:
                    return None
                raise NormfixError(f"onnxruntime cannot load the input model: {exc} "
                                   "(use --no-validate to skip validation)") from None
            except NormfixError as exc:
                failures.append((plan, str(exc).removeprefix("onnxruntime failed to run the model: ")))
        tried = "; ".join(p.describe() for p, _ in failures)
        if self.plan.chosen:
            raise NormfixError(f"onnxruntime failed to run the model at every feed shape tried for the symbolic dims "
                               f"{', '.join(self.plan.chosen)} (tried: {tried}); last error: {failures[-1][1]}; give the "
                               "shapes with --input-shape NAME:1x3x224x224 or DIM:N")
        raise NormfixError(f"onnxruntime failed to run the model on feeds {tried}: {failures[-1][1]}; give other shapes "
                           "with --input-shape NAME:1x3x224x224, or real --inputs")

    def feeds_used(self) -> dict:
        used = {"feed_shapes": {n: list(s) for n, s in self.plan.shapes.items()}, "draws": self.primary}
        if self.second is not None:
            used["second_shape"] = {n: list(s) for n, s in self.second.shapes.items()}
        return {**used, "feed_notes": list(self.notes)} if self.notes else used

    # ---- one stage ----------------------------------------------------------------------
    def check(self, p, result, after: onnx.ModelProto, full_check: bool) -> dict:
        try:
            verdict = self._check(p, result, after, full_check)
            if self.draws and verdict.get("reason") != "nothing rewritten":
                verdict.update(self.feeds_used())
            return verdict
        finally:
            if self.staged is not None:
                self.staged.cleanup()
                self.staged, self.path = None, None

    def _check(self, p, result, after: onnx.ModelProto, full_check: bool) -> dict:
        preserving = p.preserves_outputs and not result.changes_outputs
        if result.rewrites == 0 and not result.input_bindings:
            self.current = False  # a pass may still have swept dead code: bytes are stale
            return {"status": "skipped", "reason": "nothing rewritten", "max_abs_diff": 0.0, "max_rel_diff": 0.0}
        self.current = True
        before, data = self.prev, (None if self.external else model_io.serialize(after))
        self.prev = Snapshot(after, data)
        if data is None:  # written once, read by the checker and every onnxruntime run below
            self.staged = Staged(after)
            self.path = self.staged.path
        self._checker(p, data if data is not None else self.staged, full_check)
        if self.unavailable:
            self.outputs = None
            return {"status": "skipped", "reason": self.unavailable, "checks": ["checker"]}
        if (preserving and result.sites and not result.input_bindings and not self.full
                and before.node_count > self.whole_model_nodes and before.data is not None):
            return self._check_sites(p, result, before.model, after)
        now_random = R.random_nodes(after)
        shared = {o for o, d in now_random.items() if before.random.get(o) == d}
        if self.second is not None and (shared or before.random or result.input_bindings):
            self._drop_second("random ops are compared on draws captured at the first shape")
        if before.data is None and (shared or result.input_bindings or self.outputs is None or before.random):
            return {"status": "skipped", "reason": "previous stage (external data or over 2 GB) was not kept "
                    "(its outputs could not be computed, or random draws would have to be captured)"}
        old_model = before.model if before.data is not None else None
        noise = self._noise_plan(old_model, after, result)
        captures = R.capture_names(old_model, shared) if shared else {}
        extras = set(captures.values()) | {n for need in noise.values() for n in need[1]}
        try:
            # A model with random ops is re-run: its cached outputs are draws, not values.
            if extras:
                old = run_draws(R.with_masks(old_model, shared), self.draws, extra_outputs=sorted(extras))
            elif self.outputs is None or before.random:
                old = run_draws(None, self.draws, serialized=before.data)
            else:
                old = [dict(o) for o in self.outputs]
        except RuntimeUnavailable as exc:
            self.outputs = None
            return {"status": "skipped", "reason": f"onnxruntime cannot run this model ({exc}); outputs not compared"}
        try:
            missing = extras - set(old[0])
            if missing:
                raise NormfixError(f"cannot capture {', '.join(sorted(missing))} from the previous stage")
            new_draws, captured_all, contradicted = [], [], []
            for k, out in enumerate(old):
                captured = {n: out[n] for n in extras}
                captured_all.append(captured)
                for n in extras - before.output_names:
                    del out[n]
                feeds = {**self.draws[k], **{captures[o]: captured[captures[o]] for o in shared}}
                for name, (node, needs, binding) in noise.items():
                    feeds[name] = self._noise_feed(name, node, binding, captured, after, k)
                    if node is not None and R.impossible(node, captured):
                        contradicted.append(k)
                new_draws.append(feeds)
            if shared:
                drops = R._dropouts(after, shared)
                cut = R.cut_random(after, {captures[o]: captured_all[0][captures[o]] for o in shared},
                                   masks={o: captures[o] for o in drops})
                new = run_draws(cut, new_draws)
            else:
                new = run_draws(after, new_draws, serialized=data, path=self.path)
        except RuntimeUnavailable as exc:  # the previous stage ran: the pass broke the model
            raise ValidationError(f"after pass {p.name}, onnxruntime cannot load the model: {exc}", stage=p.name) from None
        except NormfixError as exc:
            failed = re.match(r"onnxruntime failed to run the model: draw (\d+): (.*)", str(exc))
            if self.second is not None and failed and int(failed.group(1)) == self.primary:
                raise ValidationError(f"pass {p.name}: the model no longer runs at {self.second.describe()}, which the "
                                      f"previous stage accepts: {failed.group(2)}", stage=p.name) from None
            raise ValidationError(f"after pass {p.name}: {exc}", stage=p.name) from None
        uncontrolled = set(now_random) - shared
        # A draw the original made against the ONNX spec (onnxruntime's Bernoulli) cannot be
        # reproduced by a correct rewrite: compare the other draws, and say so.
        keep = [k for k in range(len(old)) if k not in contradicted]
        notes = ([f"draws {sorted(set(contradicted))} not compared: onnxruntime's Bernoulli drew values the ONNX spec "
                  "rules out (1 where p = 0, or 0 where p = 1)"] if contradicted else [])
        if not keep:
            self.outputs = None
            return {"status": "skipped", "reason": notes[0]}
        scales = [input_scale(new_draws[k]) for k in keep]
        if self.second is not None and self.primary in keep:  # its job is the shape (module docstring)
            j = keep.index(self.primary)
            scales[j] = max(scales[j], _output_rms(old[self.primary]))
        cmp = compare_draws([old[k] for k in keep], [new[k] for k in keep], self.options.rtol, self.options.atol,
                            scales=scales)
        # Random ops of the previous stage whose draws were captured (shared ones, and those
        # a noise input replaced) are cut out of the reference too and fed the same draws.
        controlled = {o: captures.get(o, o) for o in before.random if o in shared or o in extras}
        kinds = needs_reference(cmp)
        if kinds and len(controlled) == len(before.random) and old_model is not None:
            refs = self._reference(old_model, kinds, controlled, captured_all)
            if refs is not None:
                cmp = compare_draws([old[k] for k in keep], [new[k] for k in keep], self.options.rtol, self.options.atol,
                                    references=[refs[k] for k in keep], scales=scales)
        self.draws = [{**d, **{k: nd[k] for k in noise}} for d, nd in zip(self.draws, new_draws)]
        self.outputs = new if not uncontrolled and not shared else None
        verdict = {"max_abs_diff": cmp["max_abs_diff"], "max_rel_diff": cmp["max_rel_diff"], "outputs": cmp["outputs"]}
        if notes:
            verdict["notes"] = notes
        if uncontrolled:
            return {"status": "skipped", "reason": f"random ops not controlled: {', '.join(sorted(uncontrolled))}", **verdict}
        if preserving and not cmp["ok"]:
            bad = next(n for n, e in cmp["outputs"].items() if not e["ok"])
            e = cmp["outputs"][bad]
            raise ValidationError(
                f"pass {p.name} changed output {bad!r}{_draw(e)}: {e.get('reason')} "
                f"(max abs diff {_fmt(e.get('max_abs_diff'))}, max rel diff {_fmt(e.get('max_rel_diff'))})",
                stage=p.name, details=verdict)
        structural = [n for n, e in cmp["outputs"].items() if not e["ok"] and e.get("max_abs_diff") is None
                      and not e.get("inconclusive")]
        if structural:
            raise ValidationError(f"pass {p.name} changed output {structural[0]!r}: "
                                  f"{cmp['outputs'][structural[0]].get('reason')}", stage=p.name, details=verdict)
        checks = ["checker", "whole model"]
        if noise and preserving and any(node is not None for node, _, _ in noise.values()):
            dist = self._distribution_check(p, old_model, after, noise)
            verdict["distribution"] = dist
            if dist.get("runs"):
                checks.append(f"noise distribution over {dist['runs']} runs")
        # (with shared random ops the new stage ran cut: its own random ops would redraw)
        batch = (self._batch_check(p, before, after, new_draws[:self.primary], new[:self.primary], data)
                 if not shared else None)
        if batch is not None:
            checks.append(f"batch {batch}")
        return {"status": "passed" if preserving else "changed", "checks": checks, **verdict}

    # ---- noise inputs (replace_random) --------------------------------------------------
    def _noise_plan(self, old_model, after, result) -> dict:
        """{new input: (original random node or None, tensors to capture, binding)}. Inputs
        recorded as noise whose original op is found are fed from that op; any other
        binding (a user pass's own input) from its binding."""
        from ..noise import read_noise_entries

        entries = {e.get("input"): e for e in read_noise_entries(after) if e.get("input")}
        plan = {}
        for name, binding in result.input_bindings.items():
            node = R.original_node(old_model, entries[name]) if name in entries and old_model is not None else None
            plan[name] = (node, R.original_needs(node) if node is not None else tuple(binding.needs), binding)
        return plan

    def _noise_feed(self, name, node, binding, captured, after, k):
        if node is None:
            return binding.make_feed({n: captured[n] for n in binding.needs})
        vi = next(i for i in after.graph.input if i.name == name)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        value = R.noise_from_original(node, captured, dtype)
        if value is None:  # degenerate op: the output does not depend on the noise
            from ..noise import read_noise_entries, draw_standard_noise

            entry = next(e for e in read_noise_entries(after) if e.get("input") == name)
            shape = np.shape(captured[node.output[0]])
            value = draw_standard_noise(entry["distribution"], shape, dtype, self.options.seed + k, name)
        return value

    def _distribution_check(self, p, old_model, after, noise) -> dict:
        """Fresh standard noise through the rewritten model vs the original's own draws."""
        from ..noise import noise_feeds

        if any(node is not None and node.op_type == "Bernoulli" for node, _, _ in noise.values()):
            (probe,) = run_draws(R.bernoulli_probe_model(), [{"p": np.zeros(64, np.float32)}])
            if np.any(probe["t"]):
                return {"skipped": "onnxruntime's Bernoulli draws 1 with probability 1 - p, against the ONNX spec: "
                        "the original's distribution is not the one to reproduce"}
        runs = R.DISTRIBUTION_RUNS
        base = {k: v for k, v in self.draws[0].items() if k not in noise}
        old_runs = run_draws(old_model, [base] * runs)
        shapes = {n: np.shape(self.draws[0][n]) for n in noise}
        new_runs = run_draws(after, [{**base, **noise_feeds(after, seed=1000 + r, shapes=shapes)} for r in range(runs)])
        dist = R.distribution_check(old_runs, new_runs)
        if not dist["ok"]:
            raise ValidationError(f"pass {p.name}: fed fresh standard noise, the model does not reproduce the original's "
                                  f"output distribution: {dist['reason']}", stage=p.name, details=dist)
        return {"runs": runs, "outputs": dist["outputs"]}

    def _reference(self, old_model, kinds: set, controlled: dict, captured: list) -> list | None:
        """The previous stage on the same draws in a wider float: float32 on onnxruntime for
        fp16/bf16 outputs, float64 on onnx's reference evaluator for float32 outputs (when
        both are needed, float64 serves every output). `controlled` ({random output: captured tensor}, a Dropout's
        mask for a Dropout) are cut out and fed what the previous stage drew (`captured`,
        per draw), so the reference sees the same masks and noise; the cut is made on the
        widened copy, so a Dropout's 1 / (1 - ratio) is computed in the wider type."""
        draws = [{**d, **{t: c[t] for t in controlled.values()}} for d, c in zip(self.draws, captured)]
        base = R.with_masks(old_model, set(controlled)) if controlled else old_model
        refs = [{} for _ in draws]
        for kind in sorted(kinds):
            try:
                ref = (float32_copy if kind == "float32" else float64_copy)(base)
                if ref is None:
                    continue
                if controlled:
                    drops = R._dropouts(ref, controlled)
                    ref = R.cut_random(ref, {t: _widen(captured[0][t], kind) for t in controlled.values()},
                                       masks={o: controlled[o] for o in drops})
                runs = (run_draws(ref, float32_draws(draws)) if kind == "float32"
                        else float64_reference(ref, draws))
            except Exception:  # no reference: the plain element-wise verdict stands
                continue
            if runs is None:
                continue
            for r, run in zip(refs, runs):  # float64 (run last) is the better reference for any output
                r.update(run)
        return refs if any(refs) else None

    # ---- batch ----------------------------------------------------------------------------
    def _batch_check(self, p, before: Snapshot, after, draws: list, new: list, data) -> int | None:
        """Where the pass made a fixed batch axis symbolic, run N distinct samples (the
        draws, stacked on the batch axis) together: each output must be the outputs of the
        samples run alone, stacked likewise. Returns the batch size checked, or None."""
        fixed = {i.name for i in before.inputs if _leading_dim(i) == "fixed"}
        grown = [i.name for i in real_inputs(after) if i.name in fixed and _leading_dim(i) == "symbolic"]
        if not grown:
            return None
        draws, alone = list(draws), list(new)
        if len(draws) < 2:  # one draw (all inputs given): a second, distinct sample
            extra = make_draws(after, FeedPlan(shapes={k: np.shape(v) for k, v in draws[0].items()}),
                               self.options.seed + 7, None, 1)[0]
            draws.append({**draws[0], **{g: extra[g] for g in grown if g in extra}})
            alone.append(None)
        # the samples differ on the batched inputs only: the others are one value for all
        samples = [{**draws[0], **{g: d[g] for g in grown}} for d in draws]
        redo = [k for k, s in enumerate(samples) if alone[k] is None or any(
            not np.array_equal(s[n], draws[k][n]) for n in s if n not in grown)]
        if redo:
            got = run_draws(after, [samples[k] for k in redo], serialized=data, path=self.path)
            for k, g in zip(redo, got):
                alone[k] = g
        together = {k: (np.concatenate([s[k] for s in samples]) if k in grown else v) for k, v in samples[0].items()}
        size = len(together[grown[0]])
        try:
            (got,) = run_draws(after, [together], serialized=data, path=self.path)
        except (RuntimeUnavailable, NormfixError) as exc:
            raise ValidationError(f"pass {p.name} made the batch symbolic, but the model fails at batch {size}: {exc}",
                                  stage=p.name) from None
        one = len(samples[0][grown[0]])
        want = {k: (np.concatenate([a[k] for a in alone]) if np.ndim(v) and np.shape(got[k])[:1] == (len(samples) * np.shape(v)[0],)
                    else v) for k, v in alone[0].items() if np.ndim(v)}
        cmp = compare_draws([want], [{k: got[k] for k in want}], self.options.rtol, self.options.atol,
                            scales=[max(input_scale(s) for s in samples)])
        if not cmp["ok"]:
            bad = next(n for n, e in cmp["outputs"].items() if not e["ok"])
            raise ValidationError(f"pass {p.name}: at batch {size} ({len(samples)} distinct samples) output {bad!r} is not "
                                  f"the batch-{one} outputs of each sample stacked: {cmp['outputs'][bad].get('reason')}",
                                  stage=p.name, details=cmp)
        return size

    # ---- large graphs -----------------------------------------------------------------------
    def _check_sites(self, p, result, before, after) -> dict:
        self.outputs = None  # the whole model was not run: nothing to reuse next stage
        try:
            cmp = check_sites(before, after, result.sites, self.options, dims=self.plan.dims)
        except RuntimeUnavailable as exc:
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
    def _checker(p, data, full_check: bool) -> None:
        """`data`: the model's bytes, or its staged copy."""
        if data is None:
            return
        try:
            run_checker(data, full_check=full_check)
        except Exception as exc:
            raise ValidationError(f"pass {p.name} produced an invalid model: {_first_line(exc)}", stage=p.name) from None


def _output_rms(outputs: dict) -> float:
    """RMS of a draw's float outputs (1 if none): the atol scale of the second-shape draw."""
    values = [np.asarray(v, np.float64).ravel() for v in outputs.values()
              if isinstance(v, np.ndarray) and np.issubdtype(v.dtype, np.floating) and v.size]
    values = [v[np.isfinite(v)] for v in values]
    flat = np.concatenate(values) if values else np.zeros(0)
    return float(np.sqrt(np.mean(flat ** 2))) if flat.size else 1.0


def _widen(value, kind: str) -> np.ndarray:
    v = np.asarray(value)
    if v.dtype.kind == "f" or v.dtype.name == "bfloat16":
        return v.astype(np.float32 if kind == "float32" else np.float64)
    return v


def _leading_dim(vi: onnx.ValueInfoProto) -> str | None:
    dims = vi.type.tensor_type.shape.dim
    if not dims:
        return None
    return "fixed" if dims[0].HasField("dim_value") else "symbolic"


def _draw(e: dict) -> str:
    return f" on draw {e['draw']}" if e.get("draws") else ""


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3g}"
