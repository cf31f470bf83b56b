"""Command line: `onnx-normfix IN.onnx OUT.onnx --passes fold_bn,fix_inorm`.

Exit codes: 0 success; 1 validation failed (nothing written); 2 usage error or bad input;
3 internal error (a bug: please report it with --debug output); 130 interrupted.
Every failure is one line on stderr; --debug adds the traceback.

Every path the run will write (OUT, --report, --noise-feeds) and every file it will read
besides the model (--stats, --calibration-data, --inputs, --reference) is checked before the
model is loaded. Side files are staged next to their target and renamed in only once OUT is
written; OUT is never left behind by a failed run. `--report` is written on every run that
got past argument parsing (schema: `report.py`). `main(argv)` is callable in-process.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

EXIT_OK, EXIT_VALIDATION, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
# Per-site notes and per-output figures printed by -v, per pass (the report keeps them all).
VERBOSE_LINES = 20

EPILOG = """\
exit codes:
  0    success: OUT written (and --report, --noise-feeds)
  1    validation failed: a pass changed what it must not; nothing written
  2    usage error, or an unreadable/invalid input; nothing written
  3    internal error (a bug: rerun with --debug and report it); nothing written
  130  interrupted (Ctrl-C); nothing written
--report FILE.json is written in every case but a command-line syntax error
(or a report path that cannot be written).
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors: one line, exit 2
        self.exit(EXIT_USAGE, f"onnx-normfix: error: {message} (see --help)\n")


def _seed(text: str) -> int:
    from .core_options import check_seed
    from .errors import NormfixError

    try:
        return check_seed(int(text))
    except (ValueError, NormfixError):
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 4294967295, got {text!r}") from None


def _tolerance(text: str) -> float:
    from .core_options import check_tolerance
    from .errors import NormfixError

    try:
        return check_tolerance("tolerance", float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    except NormfixError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("tolerance must", "must")) from None


def _bytes(text: str) -> int:
    try:
        value = int(text)
        if value < 0:
            raise ValueError
        return value
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of bytes >= 0, got {text!r}") from None


def _version() -> str:
    from . import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="onnx-normfix", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                description=("Repair and optimize an exported ONNX file; every pass is re-run on onnxruntime "
                             "and compared with the previous stage."))
    p.add_argument("input", nargs="?", help="input .onnx file (never modified)")
    p.add_argument("output", nargs="?", help="output .onnx file (written atomically; may equal input)")
    p.add_argument("--passes", default="fold_bn",
                   help="comma list of passes (default: fold_bn; fold-bn and FOLD_BN work too); see --list-passes")
    p.add_argument("--list-passes", action="store_true", help="print the passes with a one-line summary and exit")
    p.add_argument("--version", action="version", version=f"onnx-normfix {_version()}")
    p.add_argument("--initializer-inputs-as-constants", action="store_true", help="treat initializers that are also graph inputs (IR>=4: overridable defaults) as constants, removing them from the inputs")
    g = p.add_argument_group("validation")
    g.add_argument("--no-validate", action="store_true", help="skip onnx.checker and onnxruntime comparisons")
    g.add_argument("--full-validation", action="store_true",
                   help="always compare the whole model (large graphs are otherwise checked site by site)")
    g.add_argument("--rtol", type=_tolerance, help="relative tolerance, finite >= 0 (default by dtype: fp32 1e-4, fp16 1e-2)")
    g.add_argument("--atol", type=_tolerance, help="absolute tolerance, finite >= 0 (default by dtype: fp32 1e-5, fp16 1e-3)")
    g.add_argument("--input-shape", action="append", default=[], metavar="NAME:1x3x224x224",
                   help="shape of an input (NAME:1x3x224x224 or NAME:1,3,224,224), or NAME:N for a named "
                        "symbolic dim (repeatable; other symbolic dims: batch 2, others large enough for every "
                        "conv to see more than its kernel centre)")
    g.add_argument("--inputs", metavar="FILE.npz", help="validate on these input arrays (keys: input names)")
    g.add_argument("--reference", metavar="FILE.npz",
                   help="expected outputs for --inputs (e.g. from PyTorch); the final model must match them")
    g.add_argument("--seed", type=_seed, default=0, help="seed for generated feeds and constant noise, 0..2**32-1 (default 0)")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE_OR_FILE.py",
                   help="import a module that registers passes (repeatable); installed packages can also "
                        "declare an 'onnx_normfix.passes' entry point")
    from .pass_flags import add_pass_arguments

    add_pass_arguments(p)  # one group per registered pass, from the pass's own options
    o = p.add_argument_group("output")
    x = o.add_mutually_exclusive_group()
    x.add_argument("--external-data", dest="external_data", action="store_const", const=True, default=None,
                   help="write tensors to OUT.data beside OUT (default: only if the input had external data or OUT is over 2 GB)")
    x.add_argument("--no-external-data", dest="external_data", action="store_const", const=False,
                   help="write one self-contained file (an error over protobuf's 2 GB limit)")
    o.add_argument("--external-data-threshold", type=_bytes, metavar="BYTES",
                   help="with external data: tensors of at least this many bytes go to OUT.data (default 1024)")
    o.add_argument("--report", metavar="FILE.json", help="write the JSON report here (on success and on failure)")
    o.add_argument("--html", metavar="FILE.html",
                   help="write the report as one self-contained HTML page (on success and on failure)")
    o.add_argument("--noise-feeds", metavar="FILE.npz",
                   help="also write seeded feeds for the output model's noise inputs (made by replace_random)")
    v = o.add_mutually_exclusive_group()
    v.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    v.add_argument("-v", "--verbose", action="store_true",
                   help=f"also print per-site notes and per-output figures (up to {VERBOSE_LINES} per pass)")
    o.add_argument("--debug", action="store_true", help="show a traceback on errors")
    return p


def _pass_names(text: str) -> list[str]:
    """Canonical pass names: `fold-bn`, `FOLD_BN` and ` fold_bn ` all name fold_bn."""
    from .registry import canonical_pass_name

    return [canonical_pass_name(raw) for raw in text.split(",") if raw.strip()]


def _shapes(items: list[str]) -> dict:
    from .errors import NormfixError

    shapes = {}
    for item in items:
        name, sep, dims = item.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            values = [int(d) for d in dims.lower().replace(",", "x").split("x")]
            if any(v <= 0 for v in values):
                raise ValueError
        except ValueError:
            raise NormfixError(f"--input-shape {item!r}: expected NAME:1x3x224x224, NAME:1,3,224,224 "
                               "or DIM_NAME:N") from None
        shapes[name] = values
    return shapes


def _options(args, names: list[str]) -> dict:
    from .errors import NormfixError

    opts: dict = {"seed": args.seed, "rtol": args.rtol, "atol": args.atol, "inputs": args.inputs,
                  "reference": args.reference, "full_validation": args.full_validation,
                  "initializer_inputs_as_constants": args.initializer_inputs_as_constants}
    shapes = _shapes(args.input_shape)
    if shapes:
        opts["input_shapes"] = {k: (v[0] if len(v) == 1 else v) for k, v in shapes.items()}
    from .pass_flags import pass_options_from_args

    opts.update(pass_options_from_args(args, set(names)))
    return opts


_TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".safetensors")


def _check_input_kind(path: str) -> None:
    """A PyTorch file given as the model gets a sentence, not 'not a valid ONNX file'."""
    from .errors import NormfixError

    p = Path(path)
    if not p.is_file():  # never open a FIFO or device: load_model refuses those
        return
    try:
        with open(p, "rb") as f:
            head = f.read(4)
    except OSError:
        return  # load_model reports missing/unreadable files
    # torch.save writes a zip archive (PK..) or, with the legacy format, a pickle (0x80 proto);
    # a serialized ModelProto starts with another byte (0x08: ir_version). The suffix counts
    # only when the bytes do not look like ONNX.
    zipped_or_pickled = head[:4] == b"PK\x03\x04" or head[:1] == b"\x80"
    if zipped_or_pickled or (p.suffix.lower() in _TORCH_SUFFIXES and head[:1] not in (b"\x08", b"")):
        raise NormfixError(f"{p} is a PyTorch (or other non-ONNX) file, not an ONNX model: export it to ONNX "
                           "first (torch.onnx.export); checkpoints go to --stats")


def _check_paths(args, out: Path) -> None:
    """Every path the run reads besides the model, and writes, checked before any loading."""
    from .errors import NormfixError
    from .model_io import check_output_path

    from .pass_flags import file_arguments

    for flag, value in [*file_arguments(args), ("--inputs", args.inputs), ("--reference", args.reference)]:
        if value is not None:
            p = Path(value)
            if not p.exists():
                raise NormfixError(f"{flag}: file not found: {p}")
            if not p.is_file():
                raise NormfixError(f"{flag}: not a regular file: {p}")
    written = {out.resolve(): "OUT"}
    for flag, value in (("--report", args.report), ("--noise-feeds", args.noise_feeds)):
        if value is None:
            continue
        check_output_path(value, what=f"{flag} file")
        target = Path(value).resolve()
        if target in written:
            raise NormfixError(f"{flag} {value} is the same file as {written[target]}")
        if target == Path(args.input).resolve():
            raise NormfixError(f"{flag} {value} is the input model")
        written[target] = flag


def _check_data_file(args, out: Path) -> None:
    """With external data, `OUT.data` must not be another model's file: refused up front when
    the layout is known to be external (the save checks again in every case)."""
    from .model_io import check_data_path, data_file_name, external_files

    if args.external_data is False or not (out.parent / data_file_name(out)).exists():
        return
    sources = external_files(args.input)
    if args.external_data or sources:
        check_data_path(out, sources)


# Over this size a .onnx is not parsed a second time to list its data files (a file that
# big holds its tensors itself: external data exists to keep the .onnx small).
_LIST_DATA_BELOW = 256 << 20


def _sizes(path, data_files=None) -> dict | None:
    """{path, bytes, data_files: {path: bytes}, total_bytes} of a model file on disk;
    `data_files`: the data files if known (else read from the file, if it is small)."""
    from .model_io import external_files

    p = Path(path)
    if not p.is_file():
        return None
    if data_files is None:
        data_files = external_files(p) if p.stat().st_size < _LIST_DATA_BELOW else ()
    data = {str(f): f.stat().st_size for f in sorted(data_files) if f.is_file()}
    return {"path": str(p), "bytes": p.stat().st_size, "data_files": data,
            "total_bytes": p.stat().st_size + sum(data.values())}


class _Run:
    """What one run has learned so far, so a report can be written however it ends."""

    def __init__(self, args):
        self.args = args
        self.started = time.perf_counter()
        self.names: list[str] = []
        self.opts: dict = {}
        self.result = None
        self.pipeline_report: dict | None = None
        self.files: dict = {"input": None, "output": None, "replaced": [], "removed": [], "kept": [],
                            "noise_feeds": None}
        self.output_written = False
        self.final_report: dict | None = None
        self.report_ready = False  # the report path was checked: a failure report may go there
        self.html_ready = False  # likewise for --html

    def progress(self, message: str) -> None:
        # progress on a terminal (or with -v); a script reading stderr gets the error line alone
        if not self.args.quiet and (self.args.verbose or _stderr_is_terminal()):
            print(f"[{time.perf_counter() - self.started:6.1f}s] {message}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        from .pass_flags import load_plugins

        load_plugins(argv)  # before the parser: plugin passes bring their own flags
    except Exception as exc:
        print(f"onnx-normfix: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from . import zoo  # IN_DIR OUT_DIR, merge-reports, manifest (see zoo.py)

    if zoo.wants(argv):
        return zoo.main(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.list_passes and (not args.input or not args.output):
        parser.error("IN.onnx and OUT.onnx are required")
    run = _Run(args)
    error = None
    try:
        code = _main(args, run)
    except KeyboardInterrupt as exc:
        print("onnx-normfix: interrupted; nothing written", file=sys.stderr)
        code, error = EXIT_INTERRUPTED, exc
    except Exception as exc:
        from .errors import NormfixError

        if args.debug:
            import traceback

            traceback.print_exc()
        if isinstance(exc, NormfixError):
            print(f"onnx-normfix: error: {_one_line(exc)}", file=sys.stderr)
            code = exc.exit_code
        else:
            stage = getattr(exc, "stage", None)  # set by the pipeline when a pass raised
            where = f" in pass {stage}" if stage else ""
            whose = "a bug in that pass" if stage else "a bug"
            print(f"onnx-normfix: internal error{where}: {type(exc).__name__}: {_one_line(exc)}"
                  f"{getattr(exc, 'hint', '')} ({whose}; rerun with --debug and report it)", file=sys.stderr)
            code = EXIT_INTERNAL
        error = exc
    if error is not None:
        _failure_report(run, code, error)
    return code


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _one_line(exc: BaseException) -> str:
    """The whole message on one line (onnxruntime's later lines hold the facts)."""
    return " ".join(str(exc).split())


def _main(args, run: _Run) -> int:
    import onnx_normfix
    from .errors import NormfixError
    from .model_io import check_output_path, external_files

    if args.list_passes:
        from .registry import order_passes

        for p in order_passes(onnx_normfix.PASSES.values()):
            print(f"{p.name:<15} {p.summary} [{_outputs_label(p)}]")
        return EXIT_OK
    if args.report:  # first: a report is written however the run ends from here on
        check_output_path(args.report, what="--report file")
        if Path(args.report).resolve() in {Path(args.input).resolve(), Path(args.output).resolve()}:
            raise NormfixError(f"--report {args.report} is the same file as IN or OUT")
        run.report_ready = True
    if args.html:
        check_output_path(args.html, what="--html file")
        if Path(args.html).resolve() in {Path(args.input).resolve(), Path(args.output).resolve()}:
            raise NormfixError(f"--html {args.html} is the same file as IN or OUT")
        run.html_ready = True
    run.files["input"] = _sizes(args.input)
    out = check_output_path(args.output)
    run.names = _pass_names(args.passes)
    run.opts = _options(args, run.names)
    _check_paths(args, out)
    _check_input_kind(args.input)
    # external data lives inside the input's folder (load_model enforces it): only an
    # existing file there can be one, and only then is the input parsed a second time
    if (out.exists() and Path(args.input).resolve().parent in out.resolve().parents
            and out.resolve() in external_files(args.input)):
        raise NormfixError(f"output {out} is an external data file of the input; choose another output path")
    _check_data_file(args, out)

    result = onnx_normfix.optimize(args.input, passes=run.names, validate=not args.no_validate,
                                   progress=run.progress, **run.opts)
    run.result = result
    run.pipeline_report = result.report
    _write_outputs(args, run, out)
    if not args.quiet:
        from .report import print_summary

        print_summary(run.final_report, args.verbose, sys.stdout, VERBOSE_LINES)
    return EXIT_OK


def _outputs_label(p) -> str:
    note = getattr(p, "outputs_note", None)
    if note:
        return note
    return "preserves outputs" if p.preserves_outputs else "changes outputs"


def _write_outputs(args, run: _Run, out: Path) -> None:
    """Noise feeds staged, OUT written, side files renamed in, report written; OUT is
    removed again (if new) when a later step fails."""
    from .model_io import external_files, remove_quietly, save_model, write_file_atomically
    from .report import build_report, dumps

    result = run.result
    noise_bytes = None
    if args.noise_feeds:
        import io

        import numpy as np

        from .noise import noise_feeds

        buffer = io.BytesIO()
        np.savez(buffer, **noise_feeds(result.model, seed=args.seed, shapes=run.opts.get("input_shapes")))
        noise_bytes = buffer.getvalue()
    existed = out.exists()
    protect = result.input_data_files(out)
    external = args.external_data if args.external_data is not None else (result.external_data or None)
    # nothing touched result.model since validation serialized it: write those bytes
    serialized = result.serialized if args.external_data is not True else None
    info = save_model(result.model, out, serialized=serialized, external=external,
                      threshold=args.external_data_threshold, protect=protect)
    run.output_written = True
    result.report["output"] = str(out)
    for key in ("replaced", "removed", "kept"):
        run.files[key] = info.get(key, [])
    run.files["output"] = _sizes(out, [out.parent / info["data_file"]] if info.get("data_file") else [])
    try:
        if noise_bytes is not None:
            write_file_atomically(args.noise_feeds, noise_bytes, "--noise-feeds file")
            run.files["noise_feeds"] = args.noise_feeds
        run.final_report = build_report(run, status="ok", exit_code=EXIT_OK)
        if args.report:
            write_file_atomically(args.report, dumps(run.final_report).encode(), "report")
        if args.html:
            from .html_report import write_single

            write_single(args.html, run.final_report, args.input, out, EXIT_OK)
    except BaseException:
        if not existed:  # a failed run leaves no OUT behind
            for path in external_files(out) if out.is_file() else ():
                if path.name == f"{out.name}.data":
                    remove_quietly(path)
            remove_quietly(out)
            run.output_written = False
        raise


def _failure_report(run: _Run, code: int, error: BaseException) -> None:
    """On any failure after argument parsing: the report (status validation_failed or error),
    if --report was given and its path was checked."""
    args = run.args
    report_to = args.report if run.report_ready else None
    html_to = args.html if run.html_ready else None
    if not report_to and not html_to:
        return
    from .errors import NormfixError
    from .model_io import write_file_atomically
    from .report import build_report, dumps

    if run.pipeline_report is None:
        run.pipeline_report = getattr(error, "report", None)
    status = "validation_failed" if code == EXIT_VALIDATION else "error"
    try:
        report = build_report(run, status=status, exit_code=code, error=error)
        if report_to:
            write_file_atomically(report_to, dumps(report).encode(), "report")
        if html_to:
            from .html_report import write_single

            write_single(html_to, report, args.input, None, code)
    except NormfixError as exc:
        print(f"onnx-normfix: error: {_one_line(exc)}", file=sys.stderr)
    except Exception as exc:  # the report must never hide the error that ended the run
        print(f"onnx-normfix: internal error writing the report: {type(exc).__name__}: {_one_line(exc)}",
              file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
