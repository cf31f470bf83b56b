"""The onnxruntime worker: every model the validator runs goes through here.

onnxruntime runs in a child process (`_ort_server.py`), started once per process and reused,
with every graph optimization disabled: a model that crashes onnxruntime costs one
comparison, not the tool. `run_model` runs one feed dict; `run_draws` runs several draws in
one session (session set-up is what costs on a large model, not a run).
"""

from __future__ import annotations

import onnx

from .. import model_io
from ..errors import NormfixError


class RuntimeUnavailable(Exception):
    """onnxruntime cannot load this model (a custom-domain op, say)."""


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

    def run(self, source, feeds):
        """`feeds`: one feed dict (returns one output dict) or a list of them (all run in one
        session; returns a list)."""
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


def run_draws(model: onnx.ModelProto | None, draws: list[dict], extra_outputs=(), serialized: bytes | None = None,
              path: str | None = None) -> list[dict]:
    """`run_model` for several feed dicts in one session; returns one output dict per draw."""
    return run_model(model, list(draws), extra_outputs, serialized, path)


def run_model(model: onnx.ModelProto | None, feeds, extra_outputs=(), serialized: bytes | None = None,
              path: str | None = None):
    """Run on onnxruntime (optimizations disabled, in the worker process); returns
    {output name: array} (a list of them if `feeds` is a list of feed dicts). `serialized` (the model's bytes) or `path` (a `Staged` file of it)
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
