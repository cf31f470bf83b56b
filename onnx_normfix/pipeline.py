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

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from . import model_io, validate as V
from .core_options import check_core_options
from .errors import NormfixError, ValidationError
from .registry import Pass, PassContext, PassResult, order_passes, resolve_passes, split_options
from .validation.checker import MISSING_SHAPE, CheckPolicy, run_checker, shapeless_io

CORE_OPTIONS = {"seed": 0, "rtol": None, "atol": None, "input_shapes": None, "inputs": None,
                "reference": None, "progress": None, "full_validation": False,
                # how the model is read: the folder an in-memory proto's external data is
                # relative to; whether IR >= 4 overridable initializers count as constants
                "base_dir": None, "initializer_inputs_as_constants": False}
# Above this many nodes, creating an onnxruntime session for the whole model costs more than
# the pass itself (1 s at 10k nodes, 135 s at 100k): stages whose pass names its rewrite
# sites are then checked site by site, unless full_validation is asked for.
WHOLE_MODEL_NODES = 5000
# External data up to this size is read into memory for validation (see optimize).
INLINE_EXTERNAL_BYTES = 256 << 20


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
    # the input's path (None for a ModelProto): its data files are never deleted by `save`
    source: str | None = None

    def save(self, path: str | os.PathLike) -> None:
        """Write the model atomically; with external data beside it if the input had some or
        it is over 2 GB. Until saved, `model`'s unchanged external tensors point at the
        input's data files by absolute path (onnx's own reader refuses those: read them with
        `onnx_normfix.graph.array_of`, or save first); after saving, at the new data file."""
        model_io.save_model(self.model, path, external=self.external_data or None,
                            protect=self.input_data_files(path))
        self.report["output"] = str(path)

    def input_data_files(self, path: str | os.PathLike) -> set:
        """The input's external data files, which a save to `path` must never delete (none when
        saving over the input itself, or for a ModelProto input)."""
        if self.source is None or not self.external_data or Path(self.source).resolve() == Path(path).resolve():
            return set()
        return model_io.external_files(self.source)


def optimize(model: str | os.PathLike | onnx.ModelProto, passes=("fold_bn",), validate: bool = True,
             **options: Any) -> Result:
    """Run `passes` on `model` (a path or an `onnx.ModelProto`, never modified) and return a
    `Result`. Options: seed, rtol, atol, input_shapes ({input or dim name: shape/size}),
    inputs ({name: array} or .npz path), reference ({output: array}, .npz path, or a callable
    feeds -> outputs), progress (callable taking a message), plus each pass's own options
    (see `PASSES[name].options`). Raises NormfixError / ValidationError; an exception raised
    once the model was loaded carries the report so far as `.report` (the stages that ran)."""
    partial: dict = {}
    try:
        return _optimize(model, passes, validate, partial, **options)
    except BaseException as exc:
        if "report" in partial and getattr(exc, "report", None) is None:
            try:
                exc.report = partial["report"]
            except AttributeError:  # exception types without a __dict__
                pass
        raise


def _optimize(model, passes, validate: bool, partial: dict, **options: Any) -> Result:
    selected = resolve_passes(passes)
    opts, pass_options = split_options(selected, options, CORE_OPTIONS)
    check_core_options(opts)
    # stages a pass brings with it, given its options (fuse_norms' target_opset: raise_opset)
    brought = [(q, q_opts) for p in selected if p.brings is not None for q, q_opts in p.brings(pass_options[p.name])]
    if brought:
        selected = order_passes([*selected, *(q for q, _ in brought)])
        pass_options.update({q.name: q_opts for q, q_opts in brought})
    say: Callable[[str], None] = opts["progress"] or (lambda message: None)

    t0 = time.perf_counter()
    if validate:
        V.start_worker()  # onnxruntime starts in its process while the model loads
    if isinstance(model, onnx.ModelProto):
        source = "<ModelProto>"
        work = onnx.ModelProto()
        work.CopyFrom(model)
        external = model_io.adopt_proto(work, opts["base_dir"]) > 0
    else:
        if opts["base_dir"] is not None:
            raise NormfixError("base_dir is for an in-memory ModelProto; a file's external data is read beside it")
        source = str(model)
        say(f"loading {source}")
        found: dict = {}
        work = model_io.load_model(model, found)
        external = found["external_tensors"] > 0
    load_notes = _repair_input(work)
    if opts["initializer_inputs_as_constants"]:
        load_notes.append(_initializer_inputs_to_constants(work))
    # A model with large external data is never serialized whole, even once its external
    # tensors are all rewritten: that copy would double the peak memory (see model_io). Small
    # external data (dynamo writes even kilobytes that way) is read into memory, so every
    # check (random draws, the replace_random proof) runs as on a one-file model; the output
    # keeps the external layout all the same.
    on_disk = external
    if validate and external and model_io.external_payload(work) <= INLINE_EXTERNAL_BYTES:
        model_io.inline_external(work)
        on_disk = False
    data = model_io.serialize(work) if validate and not on_disk else None
    # no bytes (external data, or over 2 GB): onnx.checker and onnxruntime read a staged copy
    staged = V.Staged(work) if validate and data is None else None
    try:
        full_check, check_note = _check_input(data, staged) if validate else (False, None)
        report: dict = {"input": source, "output": None, "nodes_before": len(work.graph.node),
                        "nodes_after": None, "passes": [], "load_seconds": round(time.perf_counter() - t0, 3)}
        partial["report"] = report
        notes = [n for n in [*load_notes, check_note] if n]
        if notes:
            report["notes"] = notes

        inputs = _load_arrays(opts["inputs"], "--inputs")
        finding = getattr(full_check, "tolerated", None)  # the input's own checker finding, if any
        try:
            stage = V.Stages(work, V.Options(seed=opts["seed"], rtol=opts["rtol"], atol=opts["atol"],
                                             shapes=opts["input_shapes"], inputs=inputs),
                             V.Snapshot(work, data), opts["full_validation"], staged and staged.path,
                             on_disk, WHOLE_MODEL_NODES) if validate else None
        except NormfixError as exc:
            if finding is None or isinstance(exc, ValidationError):
                raise
            # the checker's finding was only a note because onnxruntime might run the model
            raise NormfixError(f"invalid ONNX model: {finding} (and {exc})") from None
        if stage is not None and finding is not None and stage.outputs is None and stage.draws:
            try:  # the input was not run yet: a model with a checker finding must run to be accepted
                V.run_draws(work, stage.draws[:1], serialized=data, path=staged and staged.path)
            except (V.RuntimeUnavailable, V.RuntimeCrashed, NormfixError) as exc:
                raise NormfixError(f"invalid ONNX model: {finding} (and onnxruntime cannot run it: "
                                   f"{V._first_line(exc)})") from None
    finally:
        if staged is not None:
            staged.cleanup()
    for k, p in enumerate(selected, 1):
        say(f"[{k}/{len(selected)}] {p.name}: running on {len(work.graph.node)} nodes")
        t = time.perf_counter()
        # its own options, the seed, and the core options it declares it reads
        pass_opts = {**{k: opts[k] for k in p.reads if k in opts}, **pass_options[p.name], "seed": opts["seed"]}
        if p.prepare is not None:
            pass_opts = p.prepare(work, pass_opts)
        nodes_before = len(work.graph.node)
        try:
            result = p.apply(work, PassContext(options=pass_opts, log=say))
        except NormfixError:
            raise
        except Exception as exc:  # a bug in the pass: the report and the message name it
            _blame(exc, p.name)
            raise
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
    return Result(model=work, report=report, serialized=current, external_data=external,
                  source=None if isinstance(model, onnx.ModelProto) else str(model))


def _repair_input(model: onnx.ModelProto) -> list[str]:
    """Safe repairs of what onnx.checker objects to although onnxruntime runs the model: a
    graph output declared without a shape gets the shape inference gives it. Returns notes."""
    shapeless = [o for o in model.graph.output if o.type.HasField("tensor_type") and not o.type.tensor_type.HasField("shape")]
    if not shapeless:
        return []
    from .graph import GraphIndex

    index, filled = GraphIndex(model), []
    for out in shapeless:
        t = index.inferred_type(out.name)
        if t is not None and t.HasField("tensor_type") and t.tensor_type.HasField("shape"):
            out.type.tensor_type.shape.CopyFrom(t.tensor_type.shape)
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.tensor_type.shape.dim]
            filled.append(f"{out.name} {dims}")
    return [f"output(s) declared without a shape, filled from shape inference: {', '.join(filled)}"] if filled else []


def _initializer_inputs_to_constants(model: onnx.ModelProto) -> str:
    """initializer_inputs_as_constants: IR >= 4 initializers listed as graph inputs (defaults
    a caller may override) become plain constants, so they leave the graph inputs."""
    inits = {t.name for t in model.graph.initializer}
    if model.ir_version < 4:
        return "initializer_inputs_as_constants: IR 3 model, its initializer-inputs are constants already"
    moved = [i.name for i in model.graph.input if i.name in inits]
    if not moved:
        return "initializer_inputs_as_constants: no initializer is also a graph input"
    keep = [i for i in model.graph.input if i.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    listing = ", ".join(moved[:10]) + (" ..." if len(moved) > 10 else "")
    return (f"initializer_inputs_as_constants: {len(moved)} overridable initializer(s) treated as constants and "
            f"removed from the graph inputs: {listing}")


def _blame(exc: Exception, stage: str) -> None:
    """Mark an exception raised inside a pass with the pass's name (and a hint where the cause
    is known), for the CLI's message and the report's `error.stage`."""
    try:
        exc.stage = stage
        if "external" in str(exc) and "absolute path" in str(exc):
            exc.hint = ("; the pass read an external-data tensor with onnx's own reader, which refuses the absolute "
                        "paths the pipeline keeps them under: read weights with onnx_normfix.graph.array_of(tensor)")
    except AttributeError:  # exception types without a __dict__
        pass


def _check_input(data: bytes | None, staged: V.Staged | None = None) -> tuple[bool | CheckPolicy, str | None]:
    """The input must pass onnx.checker; strict shape inference is used later only if it
    passes that too (an exporter's harmless shape quirk must not block a fold). What the
    plain check finds on the input is a note, not a refusal (onnxruntime decides whether it
    runs): later stages are checked with that finding set aside (`CheckPolicy`). Without
    bytes, the checker reads the staged copy."""
    if data is None and staged is None:
        return False, "model over 2 GB: onnx.checker skipped (it cannot check such a model in memory)"
    source = data if data is not None else staged
    try:
        run_checker(source, full_check=True)
        return True, None
    except Exception as strict:
        try:
            run_checker(source)
        except Exception as exc:
            finding = V._first_line(exc)
            shapeless = shapeless_io(source) if MISSING_SHAPE in finding else frozenset()
            if shapeless:
                policy = CheckPolicy(False, shapeless)
                try:
                    run_checker(source, policy)
                except Exception as other:
                    return CheckPolicy(False, shapeless, V._first_line(other)), (
                        f"input fails onnx.checker ({V._first_line(other)}); later stages are checked for new findings")
                return policy, (f"onnx.checker: {', '.join(sorted(shapeless))} declared without a shape (onnxruntime "
                                "accepts any shape there); later stages are checked as if shaped")
            return CheckPolicy(False, tolerated=finding), (
                f"input fails onnx.checker ({finding}); later stages are checked for new findings")
        return False, f"input fails strict shape inference, later stages checked without it: {V._first_line(strict)}"


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
        if not isinstance(v, np.ndarray) or v.dtype.kind not in "biufcUS":  # strings too: inputs may be string tensors
            raise NormfixError(f"{what}: {path}: entry {k!r} is not a numeric or string array")
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


