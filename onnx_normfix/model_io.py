"""Reading and writing model files: safe external data, atomic output.

Loading checks everything a hostile or broken file can do before onnx touches it: missing,
empty or non-ONNX files, and external-data references that point outside the model's folder.
Saving writes a temporary file in the destination folder and renames it over the target, so
a crash or Ctrl-C never leaves a partial output and IN == OUT is safe.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
from onnx import external_data_helper

from .errors import NormfixError

# protobuf cannot serialize a message of 2 GiB or more; keep a margin for the graph itself.
PROTOBUF_LIMIT = (2 << 30) - (64 << 20)


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX file (and its external data, if any) or raise NormfixError."""
    p = Path(path)
    if not p.exists():
        raise NormfixError(f"input file not found: {p}")
    if not p.is_file():
        raise NormfixError(f"input is not a file: {p}")
    if p.stat().st_size == 0:
        raise NormfixError(f"input file is empty: {p}")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # DecodeError, or protobuf's own errors on garbage bytes
        raise NormfixError(f"not a valid ONNX file: {p} ({_first_line(exc)})") from None
    if not model.HasField("graph") or model.ir_version <= 0 or not model.opset_import:
        raise NormfixError(f"not a valid ONNX model: {p} (no graph, IR version or opset)")
    base = p.resolve().parent
    external = [t for t in external_data_helper._get_all_tensors(model)
                if external_data_helper.uses_external_data(t)]
    for tensor in external:
        _check_external(tensor, base, p)
    if external:
        try:
            external_data_helper.load_external_data_for_model(model, str(base))
        except Exception as exc:
            raise NormfixError(f"cannot read external data of {p}: {_first_line(exc)}") from None
    return model


def _check_external(tensor: onnx.TensorProto, base: Path, model_path: Path) -> None:
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    where = f"{model_path}: tensor {tensor.name!r} external data {location!r}"
    if not location or os.path.isabs(location) or ".." in Path(location).parts:
        raise NormfixError(f"{where}: must be a relative path inside the model's folder")
    target = (base / location).resolve()
    if base not in target.parents:
        raise NormfixError(f"{where}: resolves outside the model's folder")
    if not target.is_file():
        raise NormfixError(f"{where}: file not found")
    try:
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else None
    except ValueError:
        raise NormfixError(f"{where}: offset/length are not integers") from None
    size = target.stat().st_size
    if offset < 0 or offset > size or (length is not None and (length < 0 or offset + length > size)):
        raise NormfixError(f"{where}: offset/length run past the end of the file ({size} bytes)")


def needs_external_data(model: onnx.ModelProto) -> bool:
    return model.ByteSize() >= PROTOBUF_LIMIT


def check_output_path(path: str | os.PathLike) -> Path:
    out = Path(path)
    if out.is_dir():
        raise NormfixError(f"output path is a folder: {out}")
    if not out.parent.exists() and str(out.parent) not in ("", "."):
        raise NormfixError(f"output folder does not exist: {out.parent}")
    return out


def save_model(model: onnx.ModelProto, path: str | os.PathLike, serialized: bytes | None = None) -> None:
    """Write `model` to `path` atomically. Models over protobuf's 2 GB limit are written
    with their tensors in `<name>.data` beside the file (data first, the .onnx renamed last)."""
    out = check_output_path(path)
    folder = out.parent if str(out.parent) else Path(".")
    if serialized is None and needs_external_data(model):
        _save_external(model, out, folder)
        return
    data = serialized if serialized is not None else model.SerializeToString()
    _atomic_write(folder, out, data)


def _atomic_write(folder: Path, out: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        _unlink(tmp)
        raise


def _save_external(model: onnx.ModelProto, out: Path, folder: Path) -> None:
    location = f"{out.name}.data"
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=f".{out.name}."))
    try:
        onnx.save_model(model, str(staging / out.name), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=location, size_threshold=1024)
        # save_model moved the tensors out of `model`; bring them back so the caller's
        # in-memory model stays complete.
        external_data_helper.load_external_data_for_model(model, str(staging))
        os.replace(staging / location, folder / location)
        os.replace(staging / out.name, out)
    finally:
        for leftover in staging.iterdir():
            _unlink(leftover)
        staging.rmdir()


def _unlink(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
