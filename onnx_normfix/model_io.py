"""Reading and writing model files: hostile-input checks, safe external data, atomic output.

Loading checks everything a broken or hostile file can do before any tensor is used:
missing, empty, unreadable or non-ONNX files; opsets newer than the installed onnx knows;
tensors whose stored bytes do not match their declared shape and type (onnx.checker only
catches data that is too short); and external-data references that leave the model's folder
(`../../etc/passwd`, absolute paths, symlinks pointing out): those are refused before any
file they name is opened. Tensors are looked for everywhere: initializers, sparse
initializers, node attributes, subgraphs and model-local functions.

Saving writes to a temporary name in the destination folder (`.<name>.<random>.tmp`, or a
`.<name>.<random>` staging folder for external data), fsyncs, then renames over the target.
A crash or SIGKILL at any moment leaves the target either absent/old or new and complete;
at worst a hidden temporary is left behind, never a partial file under the final name.
Models over protobuf's 2 GB limit are written with their tensors in a data file beside the
`.onnx`; when the target already exists and uses that data file (IN == OUT, or re-running
into the same output), the new data goes to the alternate name, so the old `.onnx` never
points at new data (see `_data_name`).
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from google.protobuf.message import EncodeError
from onnx import external_data_helper, numpy_helper

from .errors import NormfixError

# protobuf cannot serialize a message of 2 GiB or more; keep a margin for the graph itself.
PROTOBUF_LIMIT = (2 << 30) - (64 << 20)

_PACKED_BITS = {"INT4": 4, "UINT4": 4, "FLOAT4E2M1": 4, "INT2": 2, "UINT2": 2}
# Per-tensor lookups done once: `DataType.values()` builds a list on every call, which cost
# 1 s per 166k tensors (a third of loading a 100k-node graph).
_VALID_TYPES = frozenset(onnx.TensorProto.DataType.values()) - {onnx.TensorProto.UNDEFINED}
_TYPE_NAMES = {v: onnx.TensorProto.DataType.Name(v) for v in _VALID_TYPES}


def _item_size(data_type: int) -> int | None:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).itemsize
    except Exception:  # types numpy cannot represent
        return None


_ITEM_SIZES = {v: size for v in _VALID_TYPES if (size := _item_size(v)) is not None}
_KNOWN_DOMAINS = {"": onnx.defs.onnx_opset_version(), "ai.onnx": onnx.defs.onnx_opset_version(),
                  "ai.onnx.ml": max(row[3] for row in onnx.helper.VERSION_TABLE)}


# ---- loading -------------------------------------------------------------------------
def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX file (and its external data, if any) or raise NormfixError."""
    p = Path(path)
    try:
        if not p.exists():
            raise NormfixError(f"input file not found: {p}")
        if not p.is_file():  # folders, FIFOs, devices: never read from those
            raise NormfixError(f"input is not a regular file: {p}")
        if p.stat().st_size == 0:
            raise NormfixError(f"input file is empty: {p}")
        with open(p, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise NormfixError(f"cannot read input file {p}: {exc.strerror or exc}") from None
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as exc:  # DecodeError, or protobuf's own errors on garbage bytes
        raise NormfixError(f"not a valid ONNX file: {p} ({_first_line(exc)})") from None
    del data
    if not model.HasField("graph") or model.ir_version <= 0 or not model.opset_import:
        raise NormfixError(f"not a valid ONNX model: {p} (no graph, IR version or opset)")
    _check_opsets(model, p)
    _check_structure(model.graph, p)
    for vi in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        _check_value_type(vi.type, f"{p}: value {vi.name!r}")
    base = p.resolve().parent
    external = []
    for tensor, where in _all_tensors(model):
        _check_data_type(tensor, f"{p}: {where}")
        if _is_external(tensor):
            _check_external(tensor, base, p)
            external.append((tensor, where))
        else:
            _check_size(tensor, f"{p}: {where}")
    for tensor, where in external:
        try:
            external_data_helper.load_external_data_for_tensor(tensor, str(base))
        except Exception as exc:
            raise NormfixError(f"cannot read external data of {p}: {_first_line(exc)}") from None
        if _expected_bytes(tensor) is None:  # sizes of the others were checked on disk
            _check_size(tensor, f"{p}: {where}")
    return model


def _check_opsets(model: onnx.ModelProto, p: Path) -> None:
    for op in model.opset_import:
        newest = _KNOWN_DOMAINS.get(op.domain)
        if newest is not None and op.version > newest:
            raise NormfixError(
                f"{p}: opset {op.domain or 'ai.onnx'} {op.version} is newer than the installed onnx "
                f"{onnx.__version__} knows ({newest}); upgrade onnx or re-export with an older opset")
        if op.version < 1:
            raise NormfixError(f"{p}: invalid opset version {op.version} for domain {op.domain or 'ai.onnx'!r}")


def _check_structure(graph: onnx.GraphProto, p: Path) -> None:
    """Names are assigned once and every node reads only what exists before it. onnx.checker
    checks this too, but it is skipped with --no-validate and over 2 GB, and a pass run on a
    cyclic or dangling graph silently drops nodes; this sweep is linear and cheap."""
    known: set[str] = set()
    for kind, names in (("graph input", [i.name for i in graph.input]),
                        ("initializer", [t.name for t in graph.initializer]
                         + [s.values.name for s in graph.sparse_initializer])):
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise NormfixError(f"invalid ONNX model {p}: {kind} name {name!r} is used twice")
            seen.add(name)
        known |= seen
    produced: set[str] = set()
    for node in graph.node:
        for name in node.input:
            if name and name not in known:
                raise NormfixError(
                    f"invalid ONNX model {p}: node {node.name or node.op_type!r} reads {name!r}, which is no graph "
                    "input, initializer or output of an earlier node (dangling input, cycle or unsorted graph)")
        for name in node.output:
            if name and (name in produced or name in known):
                raise NormfixError(f"invalid ONNX model {p}: tensor {name!r} is assigned twice "
                                   f"(by node {node.name or node.op_type!r})")
            if name:
                produced.add(name)
        known.update(n for n in node.output if n)  # per node: linear, not quadratic
    for o in graph.output:
        if o.name not in known:
            raise NormfixError(f"invalid ONNX model {p}: graph output {o.name!r} is not computed by the graph")


def _check_value_type(tp: onnx.TypeProto, where: str) -> None:
    kind = tp.WhichOneof("value")
    if kind in ("tensor_type", "sparse_tensor_type"):
        elem = getattr(tp, kind).elem_type
        if elem not in onnx.TensorProto.DataType.values():
            raise NormfixError(f"{where}: unknown element type {elem}")
    elif kind in ("sequence_type", "optional_type"):
        _check_value_type(getattr(tp, kind).elem_type, where)
    elif kind == "map_type":
        _check_value_type(tp.map_type.value_type, where)


def _all_tensors(model: onnx.ModelProto) -> Iterator[tuple[onnx.TensorProto, str]]:
    """Every TensorProto in the model with a short description of where it sits.
    (onnx's own iterator skips sparse tensors and model-local functions.)"""
    yield from _graph_tensors(model.graph, "")
    for f in model.functions:
        yield from _node_tensors(f.node, f"function {f.domain}:{f.name} ")


def _graph_tensors(graph: onnx.GraphProto, scope: str) -> Iterator[tuple[onnx.TensorProto, str]]:
    for t in graph.initializer:
        yield t, f"{scope}initializer {t.name!r}"
    for s in graph.sparse_initializer:
        yield s.values, f"{scope}sparse initializer {s.values.name!r} (values)"
        yield s.indices, f"{scope}sparse initializer {s.values.name!r} (indices)"
    yield from _node_tensors(graph.node, scope)


def _node_tensors(nodes, scope: str) -> Iterator[tuple[onnx.TensorProto, str]]:
    for node in nodes:
        here = f"{scope}node {node.name or node.op_type!r} attribute"
        for a in node.attribute:
            for t in ([a.t] if a.HasField("t") else []) + list(a.tensors):
                yield t, f"{here} {a.name!r}" + (f" (tensor {t.name!r})" if t.name else "")
            for s in ([a.sparse_tensor] if a.HasField("sparse_tensor") else []) + list(a.sparse_tensors):
                yield s.values, f"{here} {a.name!r} (sparse values)"
                yield s.indices, f"{here} {a.name!r} (sparse indices)"
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from _graph_tensors(g, f"{here} {a.name!r} subgraph: ")


def _is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data) > 0


def _check_data_type(tensor: onnx.TensorProto, where: str) -> None:
    if tensor.data_type not in _VALID_TYPES:
        raise NormfixError(f"{where}: unknown tensor data type {tensor.data_type}")
    if any(d < 0 for d in tensor.dims):
        raise NormfixError(f"{where}: negative dimension in {list(tensor.dims)}")


def _check_size(tensor: onnx.TensorProto, where: str) -> None:
    """The stored data must hold exactly the declared number of elements: onnx.checker
    only rejects data that is too short, and numpy then fails deep inside a pass."""
    count = math.prod(tensor.dims)
    type_name = _TYPE_NAMES[tensor.data_type]
    if tensor.HasField("raw_data") and type_name != "STRING":
        if type_name in _PACKED_BITS:
            expected = (count * _PACKED_BITS[type_name] + 7) // 8
        elif type_name.startswith("FLOAT6") or tensor.data_type not in _ITEM_SIZES:
            expected = None  # packing not pinned down by the spec: fall through to numpy
        else:
            expected = count * _ITEM_SIZES[tensor.data_type]
        if expected is not None:
            if len(tensor.raw_data) != expected:
                raise NormfixError(f"{where}: holds {len(tensor.raw_data)} bytes of data, but shape "
                                   f"{list(tensor.dims)} of {type_name} needs {expected}")
            return
    if count > (1 << 26):  # typed fields of this size do not occur in real files; do not convert
        return
    try:
        numpy_helper.to_array(tensor)
    except Exception as exc:
        raise NormfixError(f"{where}: data does not match shape {list(tensor.dims)} of {type_name} "
                           f"({_first_line(exc)})") from None


def _expected_bytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes that raw_data must hold for the declared shape and type (None: not a fixed size)."""
    count = math.prod(tensor.dims)
    type_name = onnx.TensorProto.DataType.Name(tensor.data_type)
    if type_name in _PACKED_BITS:
        return (count * _PACKED_BITS[type_name] + 7) // 8
    if type_name == "STRING" or type_name.startswith("FLOAT6"):  # FLOAT6 packing: left to numpy
        return None
    return count * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


def _check_external(tensor: onnx.TensorProto, base: Path, model_path: Path) -> None:
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    where = f"{model_path}: tensor {tensor.name!r} external data {location!r}"
    # Refuse on the string alone first, so nothing outside the folder is ever stat'ed or opened.
    if (not location or "\0" in location or os.path.isabs(location) or location.startswith("\\")
            or ".." in Path(location).parts or ".." in location.replace("\\", "/").split("/")):
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
    expected, stored = _expected_bytes(tensor), (size - offset if length is None else length)
    if expected is not None and stored != expected:
        raise NormfixError(f"{where}: holds {stored} bytes, but shape {list(tensor.dims)} of "
                           f"{onnx.TensorProto.DataType.Name(tensor.data_type)} needs {expected}")


def external_files(path: str | os.PathLike) -> set[Path]:
    """The external data files an existing model file refers to (resolved), or an empty set
    if it is not a readable ONNX file."""
    p = Path(path)
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception:
        return set()
    base = p.resolve().parent
    found = set()
    for tensor, _ in _all_tensors(model):
        if _is_external(tensor):
            location = {e.key: e.value for e in tensor.external_data}.get("location")
            if location and "\0" not in location:
                found.add((base / location).resolve())
    return found


# ---- saving --------------------------------------------------------------------------
def needs_external_data(model: onnx.ModelProto) -> bool:
    """True if `model` cannot be serialized in one piece. Under upb, `ByteSize()` costs as
    much as serializing (0.4 s on a 100 MB model), so it is only asked near the limit: the
    tensor payload, counted from shapes, is most of any real model."""
    payload = _payload_bytes(model)
    if payload >= PROTOBUF_LIMIT:
        return True
    if payload < PROTOBUF_LIMIT - (512 << 20):  # no real graph has 512 MB of structure
        return False
    return model.ByteSize() >= PROTOBUF_LIMIT


def serialize(model: onnx.ModelProto) -> bytes | None:
    """The model's bytes, or None if it only fits with external data. One serialization,
    no separate size check."""
    if _payload_bytes(model) >= PROTOBUF_LIMIT:
        return None  # a doomed attempt would cost seconds
    try:
        data = model.SerializeToString()
    except EncodeError:  # upb refuses messages over 2 GB
        return None
    return data if len(data) < PROTOBUF_LIMIT else None


def _payload_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the main graph's initializers and Constant tensors, from their shapes."""
    total = 0
    for t in model.graph.initializer:
        total += math.prod(t.dims) * _ITEM_SIZES.get(t.data_type, 1)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.HasField("t"):
                    total += math.prod(a.t.dims) * _ITEM_SIZES.get(a.t.data_type, 1)
    return total


def check_output_path(path: str | os.PathLike) -> Path:
    out = Path(path)
    if out.is_dir():
        raise NormfixError(f"output path is a folder: {out}")
    if not out.parent.exists() and str(out.parent) not in ("", "."):
        raise NormfixError(f"output folder does not exist: {out.parent}")
    return out


def save_model(model: onnx.ModelProto, path: str | os.PathLike, serialized: bytes | None = None) -> None:
    """Write `model` to `path` atomically. Models over protobuf's 2 GB limit are written
    with their tensors in a data file beside the `.onnx` (data first, the .onnx renamed last)."""
    out = check_output_path(path)
    folder = out.parent if str(out.parent) else Path(".")
    try:
        data = serialized if serialized is not None else serialize(model)
        if data is None:
            _save_external(model, out, folder)
            return
        _atomic_write(folder, out, data)
    except OSError as exc:
        raise NormfixError(f"cannot write {out}: {exc.strerror or exc}") from None


def _atomic_write(folder: Path, out: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        remove_quietly(tmp)
        raise
    _fsync_dir(folder)


def _data_name(out: Path) -> tuple[str, Path | None]:
    """The data file name for a new external-data save of `out`, and the old data file that
    becomes unused once the new `.onnx` is in place (to delete then), if any.

    Overwriting the data file the current `out` uses would leave, between the two renames,
    an old graph pointing at new bytes; so alternate between two names instead."""
    names = [f"{out.name}.data", f"{out.name}.alt.data"]
    in_use = external_files(out) if out.is_file() else set()
    folder = out.parent.resolve()
    for name, other in (names, names[::-1]):
        if (folder / name) not in in_use:
            stale = folder / other
            return name, (stale if stale in in_use else None)
    raise NormfixError(f"{out} uses both {names[0]} and {names[1]}: cannot overwrite it safely")


def _save_external(model: onnx.ModelProto, out: Path, folder: Path) -> None:
    location, stale = _data_name(out)
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=f".{out.name}."))
    try:
        try:
            onnx.save_model(model, str(staging / out.name), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=location, size_threshold=1024)
        finally:
            # save_model moved the tensors out of `model`; bring them back so the caller's
            # in-memory model stays complete (also if the disk filled up half way).
            _reload_moved(model, staging, location)
        for name in (location, out.name):
            _fsync_file(staging / name)
        os.replace(staging / location, folder / location)
        os.replace(staging / out.name, out)
        _fsync_dir(folder)
    finally:
        for leftover in staging.iterdir():
            remove_quietly(leftover)
        staging.rmdir()
    if stale is not None and stale not in external_files(out):
        remove_quietly(stale)


def _reload_moved(model: onnx.ModelProto, staging: Path, location: str) -> None:
    for tensor, _ in _all_tensors(model):
        if _is_external(tensor) and {e.key: e.value for e in tensor.external_data}.get("location") == location:
            if tensor.HasField("raw_data"):  # marked for moving but not written yet
                tensor.data_location = onnx.TensorProto.DEFAULT
                del tensor.external_data[:]
            else:
                external_data_helper.load_external_data_for_tensor(tensor, str(staging))


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a folder; the rename itself is still atomic
    finally:
        os.close(fd)


def remove_quietly(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
