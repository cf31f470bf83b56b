"""Directory mode: a folder of models in one command, in parallel, with one report per model.

    onnx-normfix IN_DIR OUT_DIR --passes fold_bn [single-model options] [--jobs N]
        [--manifest FILE.jsonl] [--force] [--reports DIR] [--html FILE] [--memory MB]
    onnx-normfix merge-reports OUT_INDEX.json REPORT_OR_INDEX... [--html FILE]
    onnx-normfix manifest IN_DIR            # one JSON line per model: a manifest to edit or split

Every `.onnx` under IN_DIR (recursively; hidden files and folders skipped, symlinked folders
not followed) is processed into the same relative path under OUT_DIR by the single-model CLI
(`cli.main`), run in-process in a worker process, so the per-model report is the CLI's own
report; this module adds a `zoo` object to it (input/output sha256, options key, tool
version, exit code, status, op counts and sizes, timings). External data is followed per model
(the CLI reads it beside each input and writes it beside each output).

Exit code: the worst over the models, ranked 130 (interrupted: the run is incomplete) >
3 (internal error: a bug) > 2 (usage error or bad input) > 1 (validation failed) > 0.
A model whose worker process dies (a crash, the OOM killer) counts as 3.

Workers are started with multiprocessing's `spawn` (fresh interpreters: nothing of the
caller's state, such as an onnxruntime worker already running, is inherited); each keeps its
onnxruntime worker across models, which is where the speed over separate runs comes from.
Memory: a model whose estimated peak (PEAK_FACTOR x its bytes, external data included) is
more than available memory / jobs runs alone. Nothing here starts at import.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from .errors import NormfixError

# exit code -> rank (higher is worse); unknown codes rank as internal errors
_RANK = {0: 0, 1: 1, 2: 2, 3: 3, 130: 4}
STATUS = {0: "ok", 1: "validation_failed", 2: "error", 3: "internal_error", 130: "interrupted"}
UP_TO_DATE = "up_to_date"
REPORTS_DIRNAME = "normfix-reports"
INDEX_NAME = "index.json"
INDEX_KIND = "onnx-normfix zoo index"
# peak memory of a run relative to the model's bytes (load, the previous stage's bytes, the
# onnxruntime session in the worker): 1.3x is measured without validation, ~3x with it
PEAK_FACTOR = 4
COMMANDS = ("merge-reports", "manifest")
MANIFEST_KEYS = {"path", "passes", "stats", "stats_key", "calibration_data", "inputs", "reference",
                 "input_shapes", "seed", "rtol", "atol", "args", "skip"}
_FILE_KEYS = ("stats", "calibration_data", "inputs", "reference")
_WRITTEN_FILE_FLAGS = {"--noise-feeds", "--report", "--html"}
# options of the single-model CLI that the zoo sets itself or that mean nothing per model
_NOT_FORWARDED = {"input", "output", "report", "html", "quiet", "verbose", "list_passes", "help",
                  "jobs", "manifest", "force", "reports", "memory", "timeout"}


def worst(codes) -> int:
    return max(codes, key=lambda c: _RANK.get(c, 3), default=0)


def _tool_version() -> str:
    from . import __version__

    return f"onnx-normfix {__version__}"


# ---- command line ----------------------------------------------------------------------
def wants(argv) -> bool:
    """True if `argv` is for this module: a report command, or IN_DIR is a folder."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS and not os.path.exists(argv[0]):
        return True
    if any(a in ("--version", "--list-passes") for a in argv):
        return False  # the single-model CLI answers these (parsing here would print them twice)
    if any(a in ("-h", "--help") for a in argv):  # directory mode's help when a folder is named
        words = [a for a in argv if not a.startswith("-")]
        return bool(words) and os.path.isdir(words[0])
    try:
        args, _ = _parser(raising=True).parse_known_args(argv)
        words = [w for w in (args.input, args.output) if w]
    except (_ArgError, SystemExit):  # zoo.main or the CLI will say why
        words = [a for a in argv if not a.startswith("-")][:2]
    if not words or not os.path.isdir(words[0]):
        return False
    # a folder given as IN.onnx with OUT.onnx: the single-model CLI says it is not a file
    return not (len(words) > 1 and words[1].lower().endswith(".onnx") and not os.path.isdir(words[1]))


class _ArgError(Exception):
    pass


def _parser(raising: bool = False) -> argparse.ArgumentParser:
    from .cli import build_parser

    p = build_parser()
    p.prog = "onnx-normfix IN_DIR OUT_DIR"
    p.description = ("Directory mode: every .onnx under IN_DIR into the same relative path under OUT_DIR, "
                     "with the single-model options below applied to each. Exit code: the worst over the models "
                     "(130 > 3 > 2 > 1 > 0).")
    z = p.add_argument_group("directory mode")
    z.add_argument("--jobs", type=_positive_int, default=None, metavar="N",
                   help="worker processes (default: the number of cores)")
    z.add_argument("--manifest", metavar="FILE.jsonl",
                   help="JSON Lines, one model per line: {\"path\": ..., \"passes\", \"stats\", \"input_shapes\", ...}; "
                        "only the listed models are processed")
    z.add_argument("--force", action="store_true", help="re-run models whose output is up to date")
    z.add_argument("--reports", metavar="DIR", help=f"per-model reports and {INDEX_NAME} (default OUT_DIR/{REPORTS_DIRNAME})")
    z.add_argument("--timeout", type=_positive_float, metavar="S",
                   help="stop a model still running S seconds after it started (exit 2 for that model)")
    z.add_argument("--memory", type=_positive_int, metavar="MB",
                   help="memory the run may use (default: available memory); a model needing more than "
                        "MB/jobs runs alone")
    if not any("--html" in a.option_strings for a in p._actions):
        p.add_argument("--html", metavar="FILE.html", help="write one self-contained HTML page of the run")
    if raising:
        def error(message):
            raise _ArgError(message)
        p.error = error
    return p


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        if argv and argv[0] == "merge-reports":
            return _merge_main(argv[1:])
        if argv and argv[0] == "manifest":
            return _manifest_main(argv[1:])
        parser = _parser()
        args = parser.parse_args(argv)
        return run(args, parser)
    except SystemExit as exc:  # argparse printed its one line (or --help)
        return exc.code if isinstance(exc.code, int) else 2
    except KeyboardInterrupt:
        print("onnx-normfix: interrupted", file=sys.stderr)
        return 130
    except NormfixError as exc:
        print(f"onnx-normfix: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:
        if debug:
            import traceback

            traceback.print_exc()
        print(f"onnx-normfix: internal error: {type(exc).__name__}: {_first_line(str(exc))}"
              " (a bug; rerun with --debug and report it)", file=sys.stderr)
        return 3


# ---- planning --------------------------------------------------------------------------
def discover(in_dir: Path, exclude=()) -> list[str]:
    """Relative POSIX paths of the .onnx files under in_dir, sorted; hidden entries skipped
    (the CLI's temporaries are hidden), folders in `exclude` (resolved) not entered."""
    excluded = {Path(e).resolve() for e in exclude}
    found = []
    for root, dirs, files in os.walk(in_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (Path(root) / d).resolve() not in excluded)
        for name in files:
            if name.lower().endswith(".onnx") and not name.startswith("."):
                found.append((Path(root) / name).relative_to(in_dir).as_posix())
    return sorted(found)


def load_manifest(path: Path, in_dir: Path) -> list[tuple[str, dict, int]]:
    """(model path relative to in_dir, entry, line number) per line of a JSON Lines manifest.
    Blank lines and lines starting with # are ignored. Any problem: NormfixError naming the line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise NormfixError(f"cannot read manifest {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise NormfixError(f"manifest {path} is not UTF-8 text (expected JSON Lines)") from None
    entries, seen = [], {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"manifest {path} line {n}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise NormfixError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(entry, dict):
            raise NormfixError(f"{where}: expected a JSON object like {{\"path\": \"a/model.onnx\"}}")
        unknown = sorted(set(entry) - MANIFEST_KEYS)
        if unknown:
            raise NormfixError(f"{where}: unknown key {unknown[0]!r}; known: {', '.join(sorted(MANIFEST_KEYS))}")
        rel = entry.get("path")
        if not isinstance(rel, str) or not rel:
            raise NormfixError(f"{where}: \"path\" (the model, relative to IN_DIR) is missing or not a string")
        parts = Path(rel).parts
        if Path(rel).is_absolute() or ".." in parts:
            raise NormfixError(f"{where}: path {rel!r} must be relative to IN_DIR, without '..'")
        rel = Path(rel).as_posix()
        if not (in_dir / rel).is_file():
            raise NormfixError(f"{where}: model {rel!r} not found in {in_dir}")
        if rel in seen:
            raise NormfixError(f"{where}: model {rel!r} is already listed on line {seen[rel]}")
        seen[rel] = n
        _check_entry_types(entry, where)
        entries.append((rel, entry, n))
    if not entries:
        raise NormfixError(f"manifest {path} lists no models")
    return entries


def _check_entry_types(entry: dict, where: str) -> None:
    for key in ("stats_key",) + _FILE_KEYS:
        if key in entry and not isinstance(entry[key], str):
            raise NormfixError(f"{where}: {key!r} must be a string")
    if "passes" in entry and not (isinstance(entry["passes"], str) or
                                  (isinstance(entry["passes"], list) and all(isinstance(p, str) for p in entry["passes"]))):
        raise NormfixError(f"{where}: 'passes' must be a string \"a,b\" or a list of names")
    if "seed" in entry and (not isinstance(entry["seed"], int) or isinstance(entry["seed"], bool)):
        raise NormfixError(f"{where}: 'seed' must be an integer")
    for key in ("rtol", "atol"):
        if key in entry and (not isinstance(entry[key], (int, float)) or isinstance(entry[key], bool) or entry[key] < 0):
            raise NormfixError(f"{where}: {key!r} must be a non-negative number")
    if "skip" in entry and not isinstance(entry["skip"], bool):
        raise NormfixError(f"{where}: 'skip' must be true or false")
    if "args" in entry and not (isinstance(entry["args"], list) and all(isinstance(a, str) for a in entry["args"])):
        raise NormfixError(f"{where}: 'args' must be a list of strings, e.g. [\"--random-mode\", \"mean\"]")
    shapes = entry.get("input_shapes")
    if shapes is not None:
        if not isinstance(shapes, dict):
            raise NormfixError(f"{where}: 'input_shapes' must be an object like {{\"x\": [1, 3, 224, 224]}}")
        for name, dims in shapes.items():
            _shape_text(name, dims, where)


def _shape_text(name: str, dims, where: str) -> str:
    if isinstance(dims, int) and not isinstance(dims, bool) and dims > 0:
        return str(dims)
    if isinstance(dims, list) and dims and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
        return "x".join(map(str, dims))
    if isinstance(dims, str) and dims:
        return dims
    raise NormfixError(f"{where}: input_shapes[{name!r}] must be a list of positive integers, "
                       "a positive integer (a named dim) or \"1x3x224x224\"")


def _apply_entry(base: argparse.Namespace, entry: dict, manifest_dir: Path, parser, where: str) -> argparse.Namespace:
    ns = copy.deepcopy(base)
    if "passes" in entry:
        p = entry["passes"]
        ns.passes = p if isinstance(p, str) else ",".join(p)
    for key in ("stats_key",) + _FILE_KEYS:
        if key in entry:
            value = entry[key]
            if key in _FILE_KEYS:
                value = str(manifest_dir / value) if not Path(value).is_absolute() else value
                if not Path(value).is_file():
                    raise NormfixError(f"{where}: {key} file not found: {value}")
            setattr(ns, key, value)
    if "input_shapes" in entry:
        ns.input_shape = [f"{k}:{_shape_text(k, v, where)}" for k, v in entry["input_shapes"].items()]
    for key in ("seed", "rtol", "atol"):
        if key in entry:
            setattr(ns, key, entry[key])
    if entry.get("args"):
        strict = _parser(raising=True)
        try:
            extra = strict.parse_args(entry["args"])
        except _ArgError as exc:
            raise NormfixError(f"{where}: args: {exc}") from None
        if extra.input or extra.output:
            raise NormfixError(f"{where}: args must be options only (got {extra.input or extra.output!r})")
        defaults = strict.parse_args([])
        for key, value in vars(extra).items():
            if value != getattr(defaults, key) and key not in _NOT_FORWARDED:
                setattr(ns, key, value)
    return ns


def forward_argv(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> list[str]:
    """The single-model CLI options that reproduce `ns` (those that differ from the defaults),
    built from the parser's own actions, so options the CLI adds later are forwarded too."""
    out: list[str] = []
    for action in parser._actions:
        if not action.option_strings or action.dest in _NOT_FORWARDED:
            continue
        value = getattr(ns, action.dest, action.default)
        # the passes always: a report must say which ran, whatever the CLI's default becomes
        if (value == action.default and action.dest != "passes") or value is None:
            continue
        flag = next((s for s in action.option_strings if s.startswith("--")), action.option_strings[0])
        if isinstance(action, argparse._StoreConstAction):  # store_true/store_false too
            if value == action.const:
                out.append(flag)
        elif isinstance(action, argparse.BooleanOptionalAction):
            out.append(flag if value else "--no-" + flag[2:])
        elif isinstance(action, argparse._CountAction):
            out += [flag] * int(value)
        elif isinstance(action, argparse._AppendConstAction):
            out += [flag] * sum(1 for v in value if v == action.const)
        elif isinstance(action, argparse._AppendAction):
            for v in value:
                out += [flag, str(v)]
        elif isinstance(action, argparse._StoreAction):
            if isinstance(value, (list, tuple)):
                out += [flag, *map(str, value)]
            else:
                out += [flag, str(value)]
        else:
            raise NormfixError(f"option {flag} is not supported in directory mode")
    return out


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def _default_jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def model_bytes(path: Path) -> int:
    """The model's size on disk: the .onnx plus the external data files it names (read
    from the graph only when the .onnx is small; a large .onnx is its own payload)."""
    try:
        size = path.stat().st_size
    except OSError:  # a dangling symlink: its worker says why it cannot be read
        return 0
    if size < (64 << 20):
        from .model_io import external_files

        for data in external_files(path):
            try:
                size += data.stat().st_size
            except OSError:
                pass
    return size


def plan_memory(tasks: list[dict], jobs: int, budget: int) -> None:
    """Mark the tasks whose estimated peak is over their share of `budget` bytes: they run alone."""
    share = budget / max(1, min(jobs, len(tasks)))
    for t in tasks:
        t["alone"] = jobs > 1 and t["bytes"] * PEAK_FACTOR > share


def _tasks(args, parser, in_dir: Path, out_dir: Path, reports: Path) -> list[dict]:
    if args.manifest:
        manifest = Path(args.manifest)
        listed = load_manifest(manifest, in_dir)
        base_dir = manifest.resolve().parent
    else:
        exclude = [reports]
        if out_dir.resolve() != in_dir.resolve():
            exclude.append(out_dir)
        listed = [(rel, {}, None) for rel in discover(in_dir, exclude)]
        base_dir = Path.cwd()
        if not listed:
            raise NormfixError(f"no .onnx files under {in_dir}")
    tasks = []
    for rel, entry, line in listed:
        if entry.get("skip"):
            continue
        where = f"manifest {args.manifest} line {line}"
        ns = _apply_entry(args, entry, base_dir, parser, where) if entry else args
        src = in_dir / rel
        tasks.append({"path": rel, "input": str(src), "output": str(out_dir / rel),
                      "report": str(reports / (rel + ".json")), "argv": forward_argv(parser, ns), "passes": ns.passes,
                      "force": bool(args.force), "bytes": model_bytes(src)})
    if not tasks:
        raise NormfixError(f"manifest {args.manifest}: every model is skipped")
    return tasks


def run(args: argparse.Namespace, parser) -> int:
    """A directory run from parsed arguments; returns the exit code."""
    if not args.input or not args.output:
        raise NormfixError("directory mode needs IN_DIR and OUT_DIR")
    in_dir, out_dir = Path(args.input), Path(args.output)
    if not in_dir.is_dir():
        raise NormfixError(f"input folder not found: {in_dir}")
    if out_dir.exists() and not out_dir.is_dir():
        raise NormfixError(f"OUT_DIR is a file, not a folder: {out_dir} (IN_DIR is a folder)")
    if getattr(args, "noise_feeds", None):
        raise NormfixError("--noise-feeds names one file: in directory mode give it per model, in a manifest entry's \"args\"")
    if getattr(args, "report", None):
        raise NormfixError("--report names one file: in directory mode every model gets its report under --reports DIR")
    if args.quiet and args.verbose:
        raise NormfixError("-q and -v contradict each other")
    if args.html and not Path(args.html).resolve().parent.is_dir():
        raise NormfixError(f"--html: folder does not exist: {Path(args.html).parent}")
    reports = Path(args.reports) if args.reports else out_dir / REPORTS_DIRNAME
    tasks = _tasks(args, parser, in_dir, out_dir, reports)
    jobs = args.jobs or _default_jobs()
    plan_memory(tasks, jobs, (args.memory << 20) if args.memory else _available_memory())
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        reports.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NormfixError(f"cannot create {exc.filename}: {exc.strerror}") from None

    started = time.time()
    progress = _Progress(len(tasks), sys.stderr, quiet=args.quiet, verbose=args.verbose)
    done, todo = check_up_to_date(tasks, progress)
    entries, interrupted = run_tasks(todo, jobs, progress, timeout=args.timeout) if todo else ([], False)
    progress.close()
    by_path = {e["zoo"]["path"]: e for e in done + entries}
    entries = [by_path[t["path"]] for t in tasks if t["path"] in by_path]
    index = build_index(entries, in_dir=str(in_dir), out_dir=str(out_dir), jobs=jobs,
                        seconds=time.time() - started, interrupted=interrupted)
    index_path = reports / INDEX_NAME
    write_json(index_path, index)
    if args.html:
        from . import html_report

        html_report.write_html(args.html, index["models"], title=f"onnx-normfix: {in_dir}", summary=index)
    if not args.quiet:  # -q: the failures only, one line each on stderr (as they happen)
        print_summary(index, sys.stdout, index_path=index_path, html=args.html)
    return index["exit_code"]


# ---- scheduling ------------------------------------------------------------------------
def check_up_to_date(tasks: list[dict], progress=None) -> tuple[list[dict], list[dict]]:
    """(reports of the models that are up to date, tasks to run). Done here, in the parent:
    a second run over an unchanged zoo starts no worker at all. Sets each task's
    input_sha256 and options_key, which the worker records."""
    done, todo = [], []
    file_shas: dict = {}
    for t in tasks:
        src, out = Path(t["input"]), Path(t["output"])
        try:
            t["input_sha256"] = content_digest(src)
        except OSError:
            todo.append(t)  # the worker reports why it cannot read it
            continue
        t["options_key"] = _options_key(t["argv"], file_shas)
        previous = read_json(Path(t["report"]))
        if not t.get("force") and _up_to_date(previous, t["input_sha256"], t["options_key"], src, out):
            previous["zoo"]["up_to_date"] = True
            previous["zoo"]["checked"] = time.time()
            previous["zoo"]["path"] = t["path"]
            done.append(previous)
            if progress:
                progress.finished(t, previous)
        else:
            todo.append(t)
    return done, todo


def run_tasks(tasks: list[dict], jobs: int, progress=None, target=None,
              timeout: float | None = None) -> tuple[list[dict], bool]:
    """Run every task in up to `jobs` worker processes, largest first; a task marked `alone`
    runs with no other task; a task still running `timeout` seconds after it was dispatched
    is stopped (exit 2). Returns (one per-model report per task, interrupted)."""
    import multiprocessing as mp
    from multiprocessing.connection import wait

    ctx = mp.get_context("spawn")
    target = target or _worker_main
    pending = sorted(tasks, key=lambda t: -t.get("bytes", 0))
    idle: list = []
    busy: dict = {}  # worker -> task
    results: dict[str, dict] = {}
    interrupted = False

    def spawn():
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=target, args=(child,), daemon=True)
        proc.start()
        child.close()
        return (proc, parent)

    workers_wanted = min(jobs, len(tasks))
    try:
        idle = [spawn() for _ in range(workers_wanted)]
        while pending or busy:
            alone_running = any(t.get("alone") for t in busy.values())
            while pending and idle and not alone_running:
                if pending[0].get("alone") and busy:
                    break
                task = pending.pop(0)
                w = idle.pop()
                task["started"] = time.time()
                w[1].send(task)
                busy[w] = task
                alone_running = bool(task.get("alone"))
                if progress:
                    progress.started(task)
            left = min(_deadline(t, timeout) for t in busy.values()) - time.time() if timeout else None
            ready = wait([w[1] for w in busy] + [w[0].sentinel for w in busy],
                         timeout=None if left is None else max(0.0, left))
            for w in list(busy):
                proc, conn = w
                if conn not in ready and proc.sentinel not in ready:
                    task = busy[w]
                    if timeout and time.time() >= _deadline(task, timeout):
                        del busy[w]
                        _end_worker(proc, conn)
                        report = _synthetic(task, 2, f"timed out after {timeout:g} s (--timeout); stopped")
                        results[task["path"]] = report
                        if progress:
                            progress.finished(task, report)
                        if pending:
                            idle.append(spawn())
                    continue
                try:
                    report = conn.recv() if conn.poll() else None
                except (EOFError, OSError):
                    report = None
                if isinstance(report, tuple) and report[:1] == ("started",):
                    busy[w].update(started=report[1], acked=True)  # the worker has it: its time starts now
                    continue
                task = busy.pop(w)
                if report is None:  # the worker died with the task
                    report = _synthetic(task, 3, f"worker process died ({_death(proc)}) while running this model")
                    conn.close()
                    if pending:
                        w = spawn()
                    else:
                        w = None
                elif task.get("alone") and pending:
                    # a big model leaves a big heap behind: its memory goes back with the process
                    conn.send(None)
                    proc.join(timeout=10)
                    if proc.is_alive():
                        proc.kill()
                    w = spawn()
                results[task["path"]] = report
                if progress:
                    progress.finished(task, report)
                if w is not None:
                    idle.append(w)
    except KeyboardInterrupt:
        interrupted = True
        _stop(busy, results)
        for task in pending:
            results[task["path"]] = _synthetic(task, 130, "not started: the run was interrupted")
    finally:
        for proc, conn in idle + list(busy):
            try:
                conn.send(None)
            except (OSError, ValueError):
                pass
        for proc, conn in idle + list(busy):
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return [results[t["path"]] for t in tasks if t["path"] in results], interrupted


# a worker still starting (imports on a loaded machine) is not yet running its model
STARTUP_GRACE = 120.0


def _deadline(task: dict, timeout: float) -> float:
    return task["started"] + timeout + (0.0 if task.get("acked") else STARTUP_GRACE)


def _end_worker(proc, conn) -> None:
    """Stop a worker mid-model: SIGINT first (the CLI then removes its temporaries), then kill."""
    import signal

    conn.close()
    try:
        os.kill(proc.pid, signal.SIGINT)
    except OSError:
        pass
    proc.join(timeout=5)
    if proc.is_alive():
        proc.kill()
        proc.join()


def _stop(busy: dict, results: dict) -> None:
    """Ctrl-C: the workers (same process group) got it too and their CLI runs clean up and
    report 130; give them a moment, then ask the ones still running, then kill."""
    import signal
    from multiprocessing.connection import wait

    deadline = time.time() + 3
    asked = False
    while busy:
        left = deadline - time.time()
        if left <= 0:
            if asked:
                break
            for proc, _ in busy:
                try:
                    os.kill(proc.pid, signal.SIGINT)
                except OSError:
                    pass
            asked, deadline = True, time.time() + 5
            continue
        try:
            ready = wait([c for _, c in busy] + [p.sentinel for p, _ in busy], timeout=left)
        except KeyboardInterrupt:
            continue
        for w in list(busy):
            proc, conn = w
            if conn in ready or proc.sentinel in ready:
                try:
                    report = conn.recv() if conn.poll() else None
                except (EOFError, OSError):
                    report = None
                if isinstance(report, tuple):  # the worker only now took its model
                    continue
                task = busy.pop(w)
                results[task["path"]] = report or _synthetic(task, 130, "interrupted")
    for w in list(busy):
        task = busy.pop(w)
        w[0].kill()
        results[task["path"]] = _synthetic(task, 130, "interrupted (worker stopped)")


def _death(proc) -> str:
    proc.join(timeout=5)
    code = proc.exitcode
    if code is not None and code < 0:
        import signal

        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return name + (": out of memory?" if -code == 9 else "")
    return f"exit code {code}"


def _synthetic(task: dict, code: int, error: str) -> dict:
    return {"input": task["input"], "output": None, "status": STATUS.get(code, "error"), "error": error,
            "passes": [], "zoo": {"path": task["path"], "exit_code": code, "status": STATUS.get(code, "error"),
                                  "error": error, "report": task.get("report"), "tool_version": _tool_version(),
                                  "options": task.get("argv"), "passes": task.get("passes")}}


# ---- in the worker ---------------------------------------------------------------------
def _worker_main(conn) -> None:
    try:
        while True:
            try:
                task = conn.recv()
            except EOFError:
                break
            if task is None:
                break
            task["started"] = time.time()
            conn.send(("started", task["started"]))
            try:
                report = run_model(task)
            except KeyboardInterrupt:
                report = _synthetic(task, 130, "interrupted")
            except BaseException as exc:  # a bug here must cost one model, not the run
                report = _synthetic(task, 3, f"{type(exc).__name__}: {_first_line(str(exc))}")
            conn.send(report)
    except (KeyboardInterrupt, BrokenPipeError):
        pass
    finally:
        try:
            from . import validate

            validate._close_worker()
        except Exception:
            pass


def run_model(task: dict) -> dict:
    """One model, in this process: up-to-date check, the single-model CLI, its report plus
    the `zoo` fields, written atomically to task['report']. Returns that report."""
    from contextlib import redirect_stderr, redirect_stdout

    from . import cli

    started = task.get("started") or time.time()
    t0 = time.perf_counter()
    src, out, report_path = Path(task["input"]), Path(task["output"]), Path(task["report"])
    input_sha = task.get("input_sha256")
    if input_sha is None:
        try:
            input_sha = content_digest(src)
        except OSError:
            pass  # the CLI says why it cannot read the file
    options_key = task.get("options_key") or _options_key(task["argv"])
    out.parent.mkdir(parents=True, exist_ok=True)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_report = tempfile.mkstemp(dir=report_path.parent, prefix=f".{report_path.name}.", suffix=".tmp")
    os.close(fd)
    os.unlink(tmp_report)  # the CLI writes it only if it gets that far
    argv = [str(src), str(out), *task["argv"], "-q", "--report", tmp_report]
    err = io.StringIO()
    try:
        with redirect_stdout(io.StringIO()), redirect_stderr(err):
            try:
                code = cli.main(argv)
            except SystemExit as exc:  # argparse
                code = exc.code if isinstance(exc.code, int) else 2
        report = read_json(Path(tmp_report))
    finally:
        try:
            os.unlink(tmp_report)
        except OSError:
            pass
    stderr = err.getvalue()
    error = _error_line(stderr) if code else None
    if not isinstance(report, dict):
        report = {"input": str(src), "output": None, "passes": []}
    if code and "error" not in report:
        report["error"] = error
    zoo = {"path": task["path"], "exit_code": code, "status": STATUS.get(code, "error"), "error": error,
           "up_to_date": False, "input_sha256": input_sha, "options_key": options_key,
           "options": task["argv"], "tool_version": _tool_version(), "report": str(report_path),
           "started": started, "seconds": round(time.perf_counter() - t0, 3), "worker": os.getpid(),
           "alone": bool(task.get("alone")), "passes": task.get("passes")}
    if stderr.strip():
        zoo["stderr"] = stderr[-4000:]
    from .html_report import model_facts

    before = model_facts(src)
    zoo["size_before"], zoo["ops_before"] = before.get("size"), before.get("ops")
    if code == 0 and out.is_file():
        after = model_facts(out)
        zoo["size_after"], zoo["ops_after"] = after.get("size"), after.get("ops")
        zoo["output_sha256"] = content_digest(out)
    zoo["finished"] = time.time()
    report["zoo"] = zoo
    write_json(report_path, report)
    return report


def _error_line(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("onnx-normfix:"):
            return line.split(":", 1)[1].strip().removeprefix("error:").strip()
    return lines[-1] if lines else "failed without a message"


def _up_to_date(previous, input_sha: str, options_key: str, src: Path, out: Path) -> bool:
    if not isinstance(previous, dict) or not isinstance(previous.get("zoo"), dict):
        return False
    z = previous["zoo"]
    if z.get("exit_code") != 0 or z.get("options_key") != options_key or z.get("tool_version") != _tool_version():
        return False
    if not out.is_file() or not z.get("output_sha256"):
        return False
    out_sha = content_digest(out)
    if out_sha != z["output_sha256"]:
        return False
    same_file = src.resolve() == out.resolve()
    return input_sha == z.get("input_sha256") or (same_file and input_sha == out_sha)


def _options_key(argv: list[str], cache: dict | None = None) -> str:
    """What decides the output besides the input: the options, and the bytes of every file
    an option names (a new checkpoint under the same name is a new option)."""
    cache = {} if cache is None else cache
    h = hashlib.sha256(json.dumps(argv).encode())
    for k, word in enumerate(argv):
        if k and argv[k - 1] in _WRITTEN_FILE_FLAGS:
            continue  # a file the run writes is not an input of it
        if not word.startswith("-") and os.path.isfile(word):
            if word not in cache:
                try:
                    cache[word] = _file_sha(Path(word))
                except OSError:  # unreadable: the CLI says so; the key just never matches
                    cache[word] = f"unreadable {time.time()}"
            h.update(b"\0file\0" + word.encode() + b"\0" + cache[word].encode())
    return h.hexdigest()


_MARKER = b"location"  # every external-data reference holds this key


def _file_sha(path: Path, marker: list | None = None) -> str:
    """sha256 of a file; `marker`, if given, gets True appended when the bytes contain _MARKER."""
    h = hashlib.sha256()
    tail, seen = b"", False
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            if marker is not None and not seen:
                seen = _MARKER in tail + chunk[: len(_MARKER)] or _MARKER in chunk
                tail = chunk[-len(_MARKER):]
    if seen and marker is not None:
        marker.append(True)
    return h.hexdigest()


def content_digest(path: Path) -> str:
    """sha256 of the model's bytes: the .onnx, then each external data file it names (the
    graph is parsed for those only if its bytes can hold an external-data reference)."""
    from .model_io import external_files

    marker: list = []
    h = hashlib.sha256(_file_sha(path, marker).encode())
    base = path.resolve().parent
    for data in sorted(external_files(path) if marker else ()):
        name = os.path.relpath(data, base)
        h.update(b"\0" + name.encode() + b"\0" + (_file_sha(data).encode() if data.is_file() else b"missing"))
    return h.hexdigest()


# ---- reports ---------------------------------------------------------------------------
def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_json(path, value) -> None:
    write_text(path, json.dumps(value, indent=2, default=str, allow_nan=True) + "\n")


def write_text(path, text: str) -> None:
    """Atomically, with the mode the umask gives a new file (mkstemp's is 0600)."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise NormfixError(f"cannot write {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise NormfixError(f"cannot write {path}: {exc.strerror}") from None
        raise


def entry_status(report: dict) -> str:
    z = report.get("zoo") if isinstance(report.get("zoo"), dict) else {}
    if z.get("up_to_date"):
        return UP_TO_DATE
    return z.get("status") or report.get("status") or ("ok" if report.get("output") else "error")


def entry_code(report: dict) -> int:
    z = report.get("zoo") if isinstance(report.get("zoo"), dict) else {}
    for code in (z.get("exit_code"), report.get("exit_code")):
        if isinstance(code, int) and not isinstance(code, bool):
            return code
    return {v: k for k, v in STATUS.items()}.get(report.get("status"), 0 if report.get("output") else 2)


def build_index(models: list[dict], **info) -> dict:
    counts: dict[str, int] = {}
    for m in models:
        s = entry_status(m)
        counts[s] = counts.get(s, 0) + 1
    code = worst(entry_code(m) for m in models)
    if info.pop("interrupted", False):
        code = worst([code, 130])
    return {"kind": INDEX_KIND, "schema": 1, "tool_version": _tool_version(), **info,
            "finished": time.time(), "exit_code": code, "counts": counts, "models": models}


def print_summary(index: dict, out, index_path=None, html=None) -> None:
    counts = index.get("counts", {})
    order = ["ok", UP_TO_DATE, "validation_failed", "error", "internal_error", "interrupted"]
    parts = [f"{counts[k]} {k.replace('_', ' ')}" for k in order + sorted(set(counts) - set(order)) if counts.get(k)]
    secs = index.get("seconds")
    timing = f" in {secs:.1f} s" if isinstance(secs, (int, float)) else ""
    jobs = f" ({index['jobs']} jobs)" if index.get("jobs") else ""
    print(f"{len(index.get('models', []))} models{timing}{jobs}: {', '.join(parts) or 'none'}; exit code {index.get('exit_code')}",
          file=out)
    failed = [m for m in index.get("models", []) if entry_code(m) != 0]
    for m in failed:
        z = m.get("zoo") or {}
        print(f"  FAILED {z.get('path') or m.get('input')}: exit {entry_code(m)} ({entry_status(m).replace('_', ' ')}): "
              f"{_first_line(str(z.get('error') or m.get('error') or 'no message'))}", file=out)
    if index_path:
        print(f"index: {index_path}", file=out)
    if html:
        print(f"html: {html}", file=out)


class _Progress:
    """A redrawn status line on a terminal; one plain line per finished model otherwise."""

    def __init__(self, total: int, stream, quiet: bool = False, verbose: bool = False):
        self.total, self.stream, self.quiet, self.verbose = total, stream, quiet, verbose
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.done = self.failed = 0
        self.running: list[str] = []

    def started(self, task: dict) -> None:
        self.running.append(task["path"])
        self._draw()

    def finished(self, task: dict, report: dict) -> None:
        if task["path"] in self.running:
            self.running.remove(task["path"])
        self.done += 1
        code = entry_code(report)
        self.failed += code != 0
        if self.quiet and not code:
            self._draw()
            return
        line = _model_line(report, f"[{self.done:>{len(str(self.total))}}/{self.total}]")
        if self.verbose:
            line += "".join("\n    " + _pass_line(p) for p in (report.get("passes") or []) if isinstance(p, dict))
        if self.tty:
            self.stream.write("\r\x1b[K" + line + "\n")
        elif not self.quiet or code:
            self.stream.write(line + "\n")
        self._draw()
        self.stream.flush()

    def _draw(self) -> None:
        if not self.tty or self.quiet:
            return
        width = 120
        try:
            width = os.get_terminal_size(self.stream.fileno()).columns or width  # 0: a pty nobody sized
        except (OSError, ValueError, AttributeError):
            pass
        line = (f"[{self.done}/{self.total}] {self.failed} failed | running: {', '.join(self.running) or '-'}")
        self.stream.write("\r\x1b[K" + line[: max(20, width - 1)])
        self.stream.flush()

    def close(self) -> None:
        if self.tty and not self.quiet:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def _model_line(report: dict, prefix: str) -> str:
    z = report.get("zoo") or {}
    status = entry_status(report)
    name = z.get("path") or report.get("input")
    if entry_code(report):
        return f"{prefix} FAILED {name}: exit {entry_code(report)}: {_first_line(str(z.get('error') or report.get('error')))}"
    passes = report.get("passes") if isinstance(report.get("passes"), list) else []
    rewrites = ", ".join(f"{p.get('name')} {p.get('rewrites')}" for p in passes if isinstance(p, dict))
    secs = z.get("seconds")
    timing = f" {secs:.2f} s" if isinstance(secs, (int, float)) and status != UP_TO_DATE else ""
    return f"{prefix} {status.replace('_', ' ')} {name}{timing}" + (f" (rewrites: {rewrites})" if rewrites else "")


def _pass_line(p: dict) -> str:
    v = p.get("validation") if isinstance(p.get("validation"), dict) else {}
    diff = v.get("max_abs_diff")
    figure = f", max abs diff {diff:.3g}" if isinstance(diff, (int, float)) and v.get("status") != "skipped" else ""
    reason = f" ({v.get('reason')})" if v.get("status") == "skipped" and v.get("reason") else ""
    return (f"{p.get('name')}: {p.get('rewrites')} rewrites, nodes {p.get('nodes_before')} -> {p.get('nodes_after')}, "
            f"validation {v.get('status')}{figure}{reason}")


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


# ---- merge and manifest commands -------------------------------------------------------
def merge_reports(inputs: list) -> dict:
    """One index from shard indexes and/or per-model reports; a model listed twice keeps
    the entry that finished last."""
    by_path: dict[str, dict] = {}
    info = {"seconds": 0.0, "sources": []}
    for src in inputs:
        data = read_json(Path(src))
        if data is None:
            raise NormfixError(f"cannot read {src} as JSON")
        if isinstance(data, dict) and isinstance(data.get("models"), list):
            models = data["models"]
            if isinstance(data.get("seconds"), (int, float)):
                info["seconds"] = max(info["seconds"], data["seconds"])
        elif isinstance(data, dict) and ("passes" in data or "zoo" in data or "input" in data):
            models = [data]
        else:
            raise NormfixError(f"{src}: neither an index ({INDEX_KIND}) nor a model report")
        info["sources"].append(str(src))
        for m in models:
            if not isinstance(m, dict):
                continue
            z = m.get("zoo") if isinstance(m.get("zoo"), dict) else {}
            key = z.get("path") or m.get("input") or f"{src}#{len(by_path)}"
            old = by_path.get(key)
            if old is None or ((z.get("finished") or 0) >= ((old.get("zoo") or {}).get("finished") or 0)):
                if old is not None:
                    print(f"onnx-normfix: note: {key} is in several reports; keeping the one that finished last",
                          file=sys.stderr)
                by_path[key] = m
    return build_index([by_path[k] for k in sorted(by_path)], **info)


def _merge_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="onnx-normfix merge-reports",
                                description="Merge shard indexes and/or per-model reports into one index "
                                            "(exit code: the worst over the models).")
    p.add_argument("out", metavar="OUT_INDEX.json")
    p.add_argument("reports", nargs="+", metavar="REPORT_OR_INDEX.json")
    p.add_argument("--html", metavar="FILE.html", help="also write the HTML page of the merged run")
    p.add_argument("-q", "--quiet", action="store_true")
    p.error = lambda message: (_ for _ in ()).throw(NormfixError(f"merge-reports: {message}"))
    args = p.parse_args(argv)
    index = merge_reports(args.reports)
    write_json(args.out, index)
    if args.html:
        from . import html_report

        html_report.write_html(args.html, index["models"], title="onnx-normfix: merged run", summary=index)
    if not args.quiet:
        print_summary(index, sys.stdout, index_path=args.out, html=args.html)
    return index["exit_code"]


def _manifest_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="onnx-normfix manifest",
                                description="Print a JSON Lines manifest of the .onnx files under IN_DIR "
                                            "(edit it, or split it into one slice per CI job).")
    p.add_argument("in_dir", metavar="IN_DIR")
    p.error = lambda message: (_ for _ in ()).throw(NormfixError(f"manifest: {message}"))
    args = p.parse_args(argv)
    in_dir = Path(args.in_dir)
    if not in_dir.is_dir():
        raise NormfixError(f"input folder not found: {in_dir}")
    for rel in discover(in_dir):
        print(json.dumps({"path": rel}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
