"""Command line: `onnx-normfix IN.onnx OUT.onnx --passes fold_bn,fix_inorm`.

Exit codes: 0 success; 1 validation failed (nothing written); 2 usage error or bad input;
3 internal error (a bug: please report it with --debug output); 130 interrupted.
Every failure is one line on stderr; --debug adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

EXIT_OK, EXIT_VALIDATION, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors: one line, exit 2
        self.exit(EXIT_USAGE, f"onnx-normfix: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="onnx-normfix", description=(
        "Repair and optimize an exported ONNX file; every pass is re-run on onnxruntime and "
        "compared with the previous stage."))
    p.add_argument("input", nargs="?", help="input .onnx file (never modified)")
    p.add_argument("output", nargs="?", help="output .onnx file (written atomically; may equal input)")
    p.add_argument("--passes", default="fold_bn", help="comma list of passes (default: fold_bn); see --list-passes")
    p.add_argument("--list-passes", action="store_true", help="print the passes with a one-line summary and exit")
    g = p.add_argument_group("validation")
    g.add_argument("--no-validate", action="store_true", help="skip onnx.checker and onnxruntime comparisons")
    g.add_argument("--full-validation", action="store_true",
                   help="always compare the whole model (large graphs are otherwise checked site by site)")
    g.add_argument("--rtol", type=float, help="relative tolerance (default by dtype: fp32 1e-4, fp16 1e-2)")
    g.add_argument("--atol", type=float, help="absolute tolerance (default by dtype: fp32 1e-5, fp16 1e-3)")
    g.add_argument("--input-shape", action="append", default=[], metavar="NAME:1x3x224x224",
                   help="shape of an input, or NAME:N for a named symbolic dim (repeatable; other symbolic dims: 1)")
    g.add_argument("--inputs", metavar="FILE.npz", help="validate on these input arrays (keys: input names)")
    g.add_argument("--reference", metavar="FILE.npz",
                   help="expected outputs for --inputs (e.g. from PyTorch); the final model must match them")
    g.add_argument("--seed", type=int, default=0, help="seed for generated feeds and constant noise (default 0)")
    f = p.add_argument_group("fix_inorm")
    f.add_argument("--stats", metavar="CKPT", help="checkpoint with the InstanceNorm running stats (.pt/.pth/.ckpt/.npz/.safetensors)")
    f.add_argument("--stats-key", metavar="KEY", help="which part of the checkpoint holds the model (e.g. G, or a/b/G)")
    f.add_argument("--calibration-data", metavar="FILE.npz", help="estimate running stats from sample inputs (no checkpoint)")
    f.add_argument("--allow-partial", action="store_true", help="fix the norms that match, leave the rest (noted in the report)")
    f.add_argument("--dynamic-batch", action="store_true", help="make the batch dimension symbolic again where norms fixed it")
    r = p.add_argument_group("replace_random")
    r.add_argument("--random-mode", choices=["input", "constant", "mean"], help="noise as a graph input (default), a seeded constant, or the mean")
    r.add_argument("--noise-feeds", metavar="FILE.npz", help="also write seeded noise feeds for the output model's noise inputs")
    n = p.add_argument_group("fuse_norms")
    n.add_argument("--target-opset", type=int, metavar="N",
                   help="first raise the default-domain opset to N (onnx.version_converter, its own validated stage); "
                        "LayerNormalization needs 17, GroupNormalization 21, RMSNormalization 23")
    n.add_argument("--group-norm", choices=["op", "instance"],
                   help="GroupNorm as GroupNormalization (op, default; opset >= 21) or Reshape/InstanceNormalization/Reshape")
    o = p.add_argument_group("output")
    o.add_argument("--report", metavar="FILE.json", help="write the JSON report here")
    o.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    o.add_argument("-v", "--verbose", action="store_true", help="also print per-site notes and per-output figures")
    o.add_argument("--debug", action="store_true", help="show a traceback on errors")
    return p


def _shapes(items: list[str]) -> dict:
    from .errors import NormfixError

    shapes = {}
    for item in items:
        name, sep, dims = item.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            values = [int(d) for d in dims.lower().split("x")]
            if any(v <= 0 for v in values):
                raise ValueError
        except ValueError:
            raise NormfixError(f"--input-shape {item!r}: expected NAME:1x3x224x224 or DIM_NAME:N") from None
        shapes[name] = values
    return shapes


def _options(args) -> dict:
    names = [n.strip() for n in args.passes.split(",") if n.strip()]
    opts: dict = {"seed": args.seed, "rtol": args.rtol, "atol": args.atol, "inputs": args.inputs,
                  "reference": args.reference, "full_validation": args.full_validation}
    shapes = _shapes(args.input_shape)
    if shapes:
        opts["input_shapes"] = {k: (v[0] if len(v) == 1 else v) for k, v in shapes.items()}
    pass_flags = {"fix_inorm": {"stats": args.stats, "calibration_data": args.calibration_data,
                                "stats_key": args.stats_key, "allow_partial": args.allow_partial or None, "dynamic_batch": args.dynamic_batch or None},
                  "replace_random": {"random_mode": args.random_mode},
                  "fuse_norms": {"target_opset": args.target_opset, "group_norm": args.group_norm}}
    from .errors import NormfixError

    for pass_name, flags in pass_flags.items():
        given = {k: v for k, v in flags.items() if v is not None}
        if given and pass_name not in names:
            flag = "--" + next(iter(given)).replace("_", "-")
            raise NormfixError(f"{flag} applies to pass {pass_name}, which is not in --passes")
        opts.update(given)
    return opts


def _print_summary(report: dict, verbose: bool, out) -> None:
    print(f"{report['input']} -> {report['output']}: nodes {report['nodes_before']} -> {report['nodes_after']}"
          f" in {report['seconds']:.2f} s", file=out)
    for e in report["passes"]:
        v = e["validation"]
        figure = f" (max abs diff {v['max_abs_diff']:.3g})" if v.get("max_abs_diff") is not None and v["status"] != "skipped" else ""
        reason = f" ({v['reason']})" if v["status"] == "skipped" else ""
        print(f"  {e['name']:<15} {e['rewrites']:>5} rewrites  nodes {e['nodes_before']} -> {e['nodes_after']}"
              f"  validation {v['status']}{figure}{reason}  {e['seconds']:.2f} s", file=out)
        if verbose:
            for note in e["notes"]:
                print(f"      {note}", file=out)
            for name, o in (v.get("outputs") or {}).items():
                print(f"      output {name}: max abs {o.get('max_abs_diff')}, max rel {o.get('max_rel_diff')}", file=out)
    if "reference" in report:
        r = report["reference"]
        print(f"  reference: {r['status']} (max abs diff {r['max_abs_diff']:.3g})", file=out)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _main(args, parser)
    except KeyboardInterrupt:
        print("onnx-normfix: interrupted; nothing written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        from .errors import NormfixError

        if args.debug:
            import traceback

            traceback.print_exc()
        if isinstance(exc, NormfixError):
            print(f"onnx-normfix: error: {exc}", file=sys.stderr)
            return exc.exit_code
        print(f"onnx-normfix: internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
              " (a bug; rerun with --debug and report it)", file=sys.stderr)
        return EXIT_INTERNAL


def _main(args, parser) -> int:
    import onnx_normfix
    from .errors import NormfixError, ValidationError
    from .model_io import check_output_path, external_files, save_model

    if args.list_passes:
        for p in sorted(onnx_normfix.PASSES.values(), key=lambda p: p.order):
            kind = "preserves outputs" if p.preserves_outputs else "changes outputs"
            print(f"{p.name:<15} {p.summary} [{kind}]")
        return EXIT_OK
    if not args.input or not args.output:
        parser.error("IN.onnx and OUT.onnx are required")
    out = check_output_path(args.output)
    # external data lives inside the input's folder (load_model enforces it): only an
    # existing file there can be one, and only then is the input parsed a second time
    if (out.exists() and Path(args.input).resolve().parent in out.resolve().parents
            and out.resolve() in external_files(args.input)):
        raise NormfixError(f"output {out} is an external data file of the input; choose another output path")
    opts = _options(args)
    verbose_progress = not args.quiet
    started = time.perf_counter()

    def progress(message: str) -> None:
        if verbose_progress:
            print(f"[{time.perf_counter() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    try:
        result = onnx_normfix.optimize(args.input, passes=args.passes, validate=not args.no_validate,
                                       progress=progress, **opts)
    except ValidationError as exc:
        if args.report:
            _write_report(args.report, {"input": args.input, "output": None, "error": str(exc),
                                        "stage": exc.stage, "details": exc.details})
        raise
    # nothing touched result.model since validation serialized it: write those bytes
    save_model(result.model, out, serialized=result.serialized, external=result.external_data or None)
    result.report["output"] = str(out)
    if args.noise_feeds:
        from .noise import noise_feeds
        import numpy as np

        np.savez(args.noise_feeds, **noise_feeds(result.model, seed=args.seed, shapes=opts.get("input_shapes")))
    if args.report:
        _write_report(args.report, result.report)
    if not args.quiet:
        _print_summary(result.report, args.verbose, sys.stdout)
    return EXIT_OK


def _write_report(path: str, report: dict) -> None:
    from .errors import NormfixError

    try:
        Path(path).write_text(json.dumps(_finite(report), indent=2, default=_json_default) + "\n")
    except OSError as exc:
        raise NormfixError(f"cannot write report {path}: {exc.strerror}") from None


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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
