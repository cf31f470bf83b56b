"""The run report (`--report FILE.json`) and the summary the CLI prints from it.

One schema for every run that got past argument parsing, however it ended:

    schema        1 (bumped on an incompatible change)
    status        "ok" | "validation_failed" | "error"
    exit_code     0 | 1 | 2 | 3 | 130
    error         null, or {kind: usage|validation|internal|interrupted, message, stage, details}
    tool          {name, version, onnx, onnxruntime}
    input, output paths (output: null unless OUT was written)
    options       every option of the run (passes, validate, seed, rtol, atol, input_shapes, ...)
    feeds         {seed, input_shapes (as given), shapes (used: {input: dims}), inputs (file)}
    files         {input, output: {path, bytes, data_files: {path: bytes}, total_bytes},
                   replaced, removed, kept (data files no longer used but not deleted),
                   noise_feeds}
    nodes_before, nodes_after, seconds, load_seconds
    passes        [{name, rewrites, notes, nodes_before, nodes_after, seconds, details,
                    validation: {status, checks, max_abs_diff, max_rel_diff, outputs, reason}}]
    validation    {summary, whole_model, rewrite_sites, batch, skipped, ...}
    leftovers     [{op, kind, count, nodes, reason, hint}]  (leftovers.py)
    noise_inputs  [{input, distribution, shape, dtype, node}]
    notes         run-level notes; `reference` when --reference was given

Keys the pipeline or validator add to their own report (say `validation.feed_shapes`) are
kept. Fields that a failed run could not learn are null or empty, never missing.
"""

from __future__ import annotations

import json
import math
import time

REPORT_SCHEMA = 1


def build_report(run, status: str, exit_code: int, error: BaseException | None = None) -> dict:
    from . import __version__

    args = run.args
    base = dict(run.pipeline_report or {})
    passes = [dict(p) for p in base.get("passes", [])]
    err = _error(error, exit_code)
    if err and err["stage"] and err["stage"] not in {p["name"] for p in passes} and err["stage"] != "reference":
        passes.append({"name": err["stage"], "rewrites": None, "notes": [], "nodes_before": None,
                       "nodes_after": None, "seconds": None,
                       "validation": {"status": "failed", "reason": err["message"], **(err["details"] or {})}})
    model = run.result.model if run.result is not None and status == "ok" else None
    feeds = _feeds(run, base, passes, model)
    report = {
        "schema": REPORT_SCHEMA,
        "status": status,
        "exit_code": exit_code,
        "error": err,
        "tool": {"name": "onnx-normfix", "version": __version__, "onnx": _dist_version("onnx"),
                 "onnxruntime": _dist_version("onnxruntime")},
        "input": args.input,
        "output": str(args.output) if run.output_written else None,
        "options": _options(run),
        "feeds": feeds,
        "files": run.files,
        "nodes_before": base.get("nodes_before"),
        "nodes_after": base.get("nodes_after") if status == "ok" else None,
        "seconds": round(time.perf_counter() - run.started, 3),
        "load_seconds": base.get("load_seconds"),
        "passes": passes,
        "validation": _coverage(base.get("validation"), passes, args.no_validate, feeds),
        "leftovers": _leftovers(model, passes) if model is not None else [],
        "noise_inputs": _noise(model) if model is not None else [],
        "notes": list(base.get("notes", [])),
    }
    for key, value in base.items():  # anything newer the pipeline records
        report.setdefault(key, value)
    return report


def _dist_version(name: str) -> str | None:
    """An installed package's version, without importing it (onnxruntime costs 0.3 s)."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _error(error: BaseException | None, exit_code: int) -> dict | None:
    if error is None:
        return None
    from .errors import NormfixError, ValidationError

    if isinstance(error, KeyboardInterrupt):
        kind = "interrupted"
    elif isinstance(error, ValidationError):
        kind = "validation"
    elif isinstance(error, NormfixError):
        kind = "usage"
    else:
        kind = "internal"
    message = " ".join(str(error).split()) or type(error).__name__
    if kind == "internal":
        message = f"{type(error).__name__}: {message}"
    return {"kind": kind, "message": message, "stage": getattr(error, "stage", None),
            "details": getattr(error, "details", None) or None}


def _options(run) -> dict:
    args = run.args
    opts = {k: v for k, v in run.opts.items() if k != "progress"}
    opts.update({"passes": run.names or [n.strip() for n in args.passes.split(",") if n.strip()],
                 "validate": not args.no_validate,
                 "external_data": {None: "auto", True: True, False: False}[args.external_data],
                 "external_data_threshold": args.external_data_threshold,
                 "noise_feeds": args.noise_feeds, "report": args.report})
    for name in ("seed", "rtol", "atol", "full_validation", "inputs", "reference"):
        opts.setdefault(name, getattr(args, name))
    return opts


def _feeds(run, base: dict, passes: list[dict], model) -> dict:
    """The feeds the validator used: its own record if it keeps one, else their shapes as
    `make_feeds` derives them (--inputs arrays, --input-shape, declared dims, 1 per free dim)."""
    args = run.args
    shapes = None
    validation = base.get("validation")
    if isinstance(validation, dict):
        shapes = validation.get("feed_shapes")
    for p in passes:
        v = p.get("validation")
        if shapes is None and isinstance(v, dict):
            shapes = v.get("feed_shapes")
    if shapes is None and model is not None and not args.no_validate:
        shapes = _derived_shapes(model, run.opts.get("input_shapes"), args.inputs)
    return {"seed": args.seed, "input_shapes": run.opts.get("input_shapes"), "shapes": shapes,
            "inputs": args.inputs}


def _derived_shapes(model, shapes: dict | None, inputs_file) -> dict:
    """The shapes the validator plans for `model` (when it recorded none itself)."""
    import numpy as np

    from .noise import noise_inputs
    from .validation.feeds import plan_shapes

    given = dict(shapes or {})
    if inputs_file:
        try:
            with np.load(inputs_file, allow_pickle=False) as data:
                given.update({k: list(data[k].shape) for k in data.files})
        except Exception:
            pass
    try:
        planned = plan_shapes(model, given).shapes
    except Exception:  # a report is written whatever the input: no shapes rather than no report
        return {}
    noise = set(noise_inputs(model))
    return {name: list(shape) for name, shape in planned.items() if name not in noise}


def _coverage(recorded, passes: list[dict], no_validate: bool, feeds: dict) -> dict:
    """What validation covered, from each stage's `checks`, in one sentence and as figures."""
    cover = dict(recorded) if isinstance(recorded, dict) else {}
    if no_validate:
        cover.update({"summary": "not validated (--no-validate)", "whole_model": [], "rewrite_sites": 0,
                      "batch": [], "skipped": {}})
        return cover
    whole, sites, batch, skipped, draws, second = [], 0, [], {}, None, None
    for p in passes:
        v = p.get("validation") or {}
        draws = draws or v.get("draws")
        second = second or v.get("second_shape")
        for check in v.get("checks") or []:
            if check == "whole model":
                whole.append(p["name"])
            elif check.endswith("rewrite sites"):
                sites += int(check.split()[0])
            elif check.startswith("batch "):
                batch.append(f"{p['name']} at batch {check.split()[1]}")
        if v.get("status") == "skipped" and v.get("reason") != "nothing rewritten":
            skipped[p["name"]] = v.get("reason")
    parts = []
    if whole:
        shapes = feeds.get("shapes")
        at = (" at " + ", ".join(f"{k}:{'x'.join(map(str, d))}" for k, d in shapes.items())) if shapes else ""
        drawn = f", {draws} draws" if draws else ""
        if second:  # one more draw at other sizes of the symbolic dims
            drawn += ", and 1 at " + ", ".join(f"{k}:{'x'.join(map(str, d))}" for k, d in second.items())
        parts.append(f"whole model{at} (seed {feeds.get('seed')}{drawn}) after {', '.join(whole)}")
    if sites:
        parts.append(f"{sites} rewrite sites")
    if batch:
        parts.append("also " + ", ".join(batch))
    for name, reason in skipped.items():
        parts.append(f"{name} not compared ({reason})")
    if not parts:
        parts.append("nothing to compare (no pass rewrote anything)" if passes else "no stage ran")
    cover.update({"summary": "; ".join(parts), "whole_model": whole, "rewrite_sites": sites, "batch": batch,
                  "skipped": skipped})
    return cover


def _leftovers(model, passes: list[dict]) -> list[dict]:
    from .leftovers import find_leftovers
    from .registry import PASSES

    return find_leftovers(model, [p["name"] for p in passes], {p["name"]: p.get("notes", []) for p in passes},
                          available=set(PASSES))


def _noise(model) -> list[dict]:
    from .leftovers import noise_inputs_summary

    return noise_inputs_summary(model)


# ---- JSON --------------------------------------------------------------------------
def dumps(report: dict) -> str:
    return json.dumps(_finite(report), indent=2, default=_json_default) + "\n"


def _finite(value):
    """JSON has no Infinity/NaN: write them as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _json_default(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


# ---- the printed summary -------------------------------------------------------------
def _num(x) -> str:
    return "n/a" if x is None else (f"{x:.3g}" if isinstance(x, (int, float)) else str(x))


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def print_summary(report: dict, verbose: bool, out, cap: int = 20) -> None:
    print(f"{report['input']} -> {report['output']}: nodes {report['nodes_before']} -> {report['nodes_after']}"
          f" in {report['seconds']:.2f} s", file=out)
    for e in report["passes"]:
        v = e["validation"]
        figure = f" (max abs diff {_num(v['max_abs_diff'])})" if v.get("max_abs_diff") is not None and v["status"] != "skipped" else ""
        reason = f" ({v['reason']})" if v["status"] == "skipped" else ""
        print(f"  {e['name']:<15} {e['rewrites']:>5} rewrites  nodes {e['nodes_before']} -> {e['nodes_after']}"
              f"  validation {v['status']}{figure}{reason}  {e['seconds']:.2f} s", file=out)
        if verbose:
            _capped([f"      {note}" for note in e["notes"]], cap, out, "notes")
            what = "tensor" if any(str(c).endswith("rewrite sites") for c in v.get("checks") or []) else "output"
            _capped([f"      {what} {name}: max abs diff {_num(o.get('max_abs_diff'))}, max rel diff "
                     f"{_num(o.get('max_rel_diff'))}" for name, o in (v.get("outputs") or {}).items()],
                    cap, out, f"{what}s")
    if "reference" in report:
        r = report["reference"]
        print(f"  reference: {r['status']} (max abs diff {_num(r['max_abs_diff'])})", file=out)
    print(f"  validation: {report['validation']['summary']}", file=out)
    for left in report.get("leftovers", []):
        hint = f"; {left['hint']}" if left.get("hint") else ""
        print(f"  left: {left['count']} {left['op']} ({left['kind']}): {left['reason']}{hint}", file=out)
    noise = report.get("noise_inputs", [])
    if noise:
        names = ", ".join(f"{n['input']} ({n['distribution']}, {n['dtype']}, shape {n['shape']})" for n in noise[:cap])
        more = f" and {len(noise) - cap} more" if len(noise) > cap else ""
        print(f"  new inputs: {names}{more}: feed standard noise of that shape, e.g. --noise-feeds FILE.npz "
              "or onnx_normfix.noise_feeds(model, seed)", file=out)
    files = report.get("files") or {}
    if files.get("output"):
        o = files["output"]
        data = "".join(f" + {name.rsplit('/', 1)[-1]} ({_size(b)})" for name, b in o["data_files"].items())
        print(f"  wrote {o['path']} ({_size(o['bytes'])}){data}", file=out)
    for path in files.get("removed", []):
        print(f"  removed {path} (no longer used by the output)", file=out)
    for path in files.get("kept", []):
        print(f"  kept {path}: no longer used by the output, but not named after it (other models may read it)", file=out)


def _capped(lines: list[str], cap: int, out, what: str) -> None:
    for line in lines[:cap]:
        print(line, file=out)
    if len(lines) > cap:
        print(f"      ... {len(lines) - cap} more {what} (all of them in --report)", file=out)
