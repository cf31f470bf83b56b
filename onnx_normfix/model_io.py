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

External data stays on disk. `load_model` checks every external reference, then leaves the
bytes where they are and rewrites each `location` to the absolute path of its (verified)
file, so a tensor's value is read only when a pass asks for it (`graph.array_of`). A pass that
changes such a tensor puts the new bytes in `raw_data` and drops the external fields. onnx
and onnxruntime refuse absolute locations, so a model in this state is never handed to them
as is: `serialize` returns None for it, and `write_external` (used by `save_model` and by the
validator) writes the `.onnx` plus a data file, copying unchanged tensors range by range from
their source files (kernel-side, no copy in this process) and appending changed ones.

The output uses external data when the model still references external files, when the
caller says so (`external=True`: the pipeline does for every input that had external data,
even once every external tensor has been rewritten; `--external-data`), or when it is over
protobuf's 2 GB limit; `external=False` (`--no-external-data`) forces one file. The data file
is always `<OUT name>.data` beside the `.onnx` (a stable name deploy scripts can copy). It
never overwrites a file of that name that the existing OUT does not read (another model may:
refused, see `check_data_path`), and the data the existing OUT reads is never overwritten
before a new OUT that does not read it is in place (see `_save_external`). Written files get
the mode the umask gives, or keep the mode of the file they replace. After a successful save,
the in-memory model's external tensors point at the file just written (absolute path).
"""

from __future__ import annotations

import math
import os
import stat
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
def load_model(path: str | os.PathLike, found: dict | None = None) -> onnx.ModelProto:
    """Load an ONNX file or raise NormfixError. External data is checked but stays on disk,
    referenced by absolute path (see the module docstring). `found`, if given, receives
    `external_tensors`: how many tensors the file keeps in external data (the walk that
    checks them counts them for free; `has_external` costs 0.1 s on a 100k-node graph)."""
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
    count = _resolve_external(model, p.resolve().parent, p, allow_absolute=False)
    if found is not None:
        found["external_tensors"] = count
    return model


def adopt_proto(model: onnx.ModelProto, base_dir: str | os.PathLike | None) -> int:
    """Make an in-memory model's external data readable the way `load_model` leaves it:
    every relative location is checked against `base_dir` (the folder of the .onnx it came
    from) and made absolute. Returns how many tensors are external. Without `base_dir`, a
    model with relative locations is refused: resolving them against the current directory
    would read whatever same-named file happens to be there."""
    relative = [t for t, _ in _all_tensors(model) if _is_external(t) and not os.path.isabs(_external_info(t)[0])]
    if relative and base_dir is None:
        raise NormfixError(
            f"the model keeps {len(relative)} tensor(s) in external data (e.g. {relative[0].name!r} in "
            f"{_external_info(relative[0])[0]!r}) relative to a folder an in-memory ModelProto does not know: "
            "pass base_dir=<folder of the .onnx file>, or pass the file's path instead of the proto")
    if base_dir is None:
        return sum(1 for t, _ in _all_tensors(model) if _is_external(t))
    base = Path(os.fspath(base_dir))
    if not base.is_dir():
        raise NormfixError(f"base_dir {base}: not a folder")
    return _resolve_external(model, base.resolve(), Path("<ModelProto>"), allow_absolute=True)


def _resolve_external(model: onnx.ModelProto, base: Path, p: Path, allow_absolute: bool) -> int:
    """Check every external reference of `model` against folder `base` and point it at its
    verified absolute path. A file's absolute locations are refused; an in-memory proto's
    (`allow_absolute`: the tool's own result, already verified) are left as they are."""
    external, absolute = [], 0
    for tensor, where in _all_tensors(model):
        _check_data_type(tensor, f"{p}: {where}")
        if _is_external(tensor):
            if allow_absolute and os.path.isabs(_external_info(tensor)[0]):
                absolute += 1
                continue
            _check_external(tensor, base, p)
            external.append((tensor, where))
        else:
            _check_size(tensor, f"{p}: {where}")
    for tensor, where in external:
        if _expected_bytes(tensor) is None:  # sizes of the others were checked on disk
            # strings and FLOAT6 have no fixed size to check on disk: load (rare and small)
            try:
                external_data_helper.load_external_data_for_tensor(tensor, str(base))
            except Exception as exc:
                raise NormfixError(f"cannot read external data of {p}: {_first_line(exc)}") from None
            _check_size(tensor, f"{p}: {where}")
        else:  # stays on disk, read lazily through its verified absolute path
            _set_location(tensor, str(_resolved_location(tensor, base)))
    return len(external) + absolute


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
    # onnx's own loader refuses these (link attacks); the data is read lazily by us, so check here
    if (base / location).is_symlink():
        raise NormfixError(f"{where}: is a symbolic link (refused, as onnx does)")
    if target.stat().st_nlink > 1:
        raise NormfixError(f"{where}: has several hard links (refused, as onnx does)")
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


def _external_info(tensor: onnx.TensorProto) -> tuple[str, int, int | None]:
    info = {e.key: e.value for e in tensor.external_data}
    return (info.get("location", ""), int(info.get("offset", 0) or 0),
            int(info["length"]) if "length" in info else None)


def _resolved_location(tensor: onnx.TensorProto, base: Path) -> Path:
    return (base / _external_info(tensor)[0]).resolve()


def _set_location(tensor: onnx.TensorProto, location: str) -> None:
    for e in tensor.external_data:
        if e.key == "location":
            e.value = location


def _set_external(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)


def external_bytes(tensor: onnx.TensorProto, base_dir: str | os.PathLike | None = None, into=None):
    """The stored bytes of an external tensor (absolute location, or relative to `base_dir`),
    or, with `into` (a writable buffer of the tensor's length), read into it and return it."""
    location, offset, length = _external_info(tensor)
    if not os.path.isabs(location) and not base_dir:  # never against the current directory
        raise NormfixError(f"tensor {tensor.name!r} keeps its data in {location!r}, relative to a folder not "
                           "given: load the model with onnx_normfix.model_io.load_model, or pass base_dir")
    path = Path(location) if os.path.isabs(location) else Path(base_dir) / location
    with open(path, "rb") as f:
        f.seek(offset)
        if into is not None:
            view = memoryview(into).cast("B")
            got = f.readinto(view)
            length = view.nbytes if length is None else length
            data = into
        else:
            data = f.read() if length is None else f.read(length)
            got = len(data)
    if length is not None and got != length:
        raise NormfixError(f"external data of tensor {tensor.name!r} in {path} is shorter than declared "
                           "(file changed since it was loaded?)")
    return data


def has_external(model: onnx.ModelProto) -> bool:
    """True if any tensor of `model` keeps its data in an external file. (A walk without the
    descriptions `_all_tensors` formats: 20x faster on a 100k-node graph.)"""
    return _graph_has_external(model.graph) or any(_nodes_have_external(f.node) for f in model.functions)


def _graph_has_external(graph: onnx.GraphProto) -> bool:
    return (any(_is_external(t) for t in graph.initializer)
            or any(_is_external(s.values) or _is_external(s.indices) for s in graph.sparse_initializer)
            or _nodes_have_external(graph.node))


_TENSOR_ATTRIBUTES = {onnx.AttributeProto.TENSOR, onnx.AttributeProto.TENSORS, onnx.AttributeProto.SPARSE_TENSOR,
                      onnx.AttributeProto.SPARSE_TENSORS, onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS}


def _nodes_have_external(nodes) -> bool:
    for node in nodes:
        for a in node.attribute:
            if a.type not in _TENSOR_ATTRIBUTES:
                continue
            tensors = ([a.t] if a.HasField("t") else []) + list(a.tensors)
            sparse = ([a.sparse_tensor] if a.HasField("sparse_tensor") else []) + list(a.sparse_tensors)
            graphs = ([a.g] if a.HasField("g") else []) + list(a.graphs)
            if (any(_is_external(t) for t in tensors) or any(_is_external(s.values) or _is_external(s.indices)
                                                             for s in sparse)
                    or any(_graph_has_external(g) for g in graphs)):
                return True
    return False


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
def serialize(model: onnx.ModelProto) -> bytes | None:
    """The model's bytes, or None if it only fits with external data or still references
    external files (see the module docstring: such bytes would be useless to onnxruntime and
    onnx.checker). One serialization, no separate size check."""
    if _payload_bytes(model) >= PROTOBUF_LIMIT:
        return None  # a doomed attempt would cost seconds
    try:
        data = model.SerializeToString()
    except EncodeError:  # upb refuses messages over 2 GB
        return None
    # the key of an external_data entry, as serialized; a linear scan of the bytes is far
    # cheaper than walking every tensor, and a (rare) false hit is settled by the walk
    if references_files(data, model):
        return None
    return data if len(data) < PROTOBUF_LIMIT else None


def references_files(data: bytes, model: onnx.ModelProto) -> bool:
    """True if `data`, the bytes of `model`, leave tensors in external files."""
    return _LOCATION_KEY in data and has_external(model)


_LOCATION_KEY = onnx.StringStringEntryProto(key="location").SerializeToString()


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


def check_output_path(path: str | os.PathLike, what: str = "output") -> Path:
    """`path` as a Path, or NormfixError if nothing can be written there: a folder, a special
    file, a missing folder, or one this process cannot create files in (probed by creating
    and removing a hidden file: permission bits say nothing for root or on read-only mounts)."""
    out = Path(path)
    if out.is_dir():
        raise NormfixError(f"{what} path is a folder: {out}")
    if out.exists() and not out.is_file():
        raise NormfixError(f"{what} path is not a regular file: {out}")
    folder = _folder(out)
    if not folder.exists():
        raise NormfixError(f"{what} folder does not exist: {folder}")
    if not folder.is_dir():
        raise NormfixError(f"{what} folder is not a folder: {folder}")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".{out.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise NormfixError(f"cannot write the {what} into {folder}: {exc.strerror or exc}") from None
    return out


def _folder(out: Path) -> Path:
    return out.parent if str(out.parent) else Path(".")


def data_file_name(out: str | os.PathLike) -> str:
    """The external-data file name of an output: always `<OUT name>.data` (stable)."""
    return f"{Path(out).name}.data"


def _staged_data(out: Path, path: Path) -> bool:
    """A hidden data file a run killed while replacing `out` leaves the model reading."""
    return path.name.startswith(f".{out.name}.data.") and path.name.endswith(".staged")


def check_data_path(out: str | os.PathLike, sources=frozenset()) -> None:
    """NormfixError if writing `out` with external data would overwrite a file that is not
    the existing `out`'s own data file (another model may read it: say one moved away from
    `out` with `mv`, or the input itself). `sources`: data files the model reads."""
    out = Path(out)
    target = (_folder(out) / data_file_name(out)).resolve() if _folder(out).exists() else None
    if target is None or not target.exists():
        return
    in_use = external_files(out) if out.is_file() else set()
    if target in in_use or any(_staged_data(out, p) for p in in_use):
        return  # ours: the existing OUT's data, or the stable file of a run killed mid-replace
    if target in {Path(s).resolve() for s in sources}:
        whose = "the input model reads it"
    else:
        readers = _readers(target)
        whose = (f"{', '.join(readers)} read{'s' * (len(readers) == 1)} it" if readers else
                 f"{'the existing ' + out.name + ' does not use it' if out.is_file() else out.name + ' does not exist'}"
                 " and no model in that folder reads it (left by an interrupted run? then delete it)")
    raise NormfixError(f"refusing to overwrite {target.name} in {target.parent}: {whose}; it is not the data of "
                       f"{out.name}: move that file away or choose another output name")


def _readers(data: Path, limit: int = 200) -> list[str]:
    """Names of up to 3 `.onnx` files beside `data` that read it (each small file parsed
    without its tensors; over 64 MB a file holds its tensors itself and is skipped)."""
    found = []
    for k, p in enumerate(sorted(data.parent.glob("*.onnx"))):
        if k >= limit or len(found) == 3:
            break
        try:
            if p.is_file() and p.stat().st_size < (64 << 20) and data in external_files(p):
                found.append(p.name)
        except OSError:
            continue
    return found


def save_model(model: onnx.ModelProto, path: str | os.PathLike, serialized: bytes | None = None,
               external: bool | None = None, threshold: int | None = None, protect=frozenset()) -> dict:
    """Write `model` to `path` atomically and return what happened to the files:
    `{"data_file": name or None, "replaced": [...], "removed": [...], "kept": [...]}`.

    `external`: None decides (external data if the model still references external files or
    is over protobuf's 2 GB limit), True forces the `.onnx` + `<name>.data` layout, False
    forces one self-contained file (NormfixError over 2 GB). `threshold`: tensors of at
    least this many bytes go to the data file (default `EXTERNAL_THRESHOLD`). The written
    files get the mode the umask gives, or keep the mode of the file they replace. See the
    module docstring for the order of the writes. Data files the old `path` read and the new
    one does not are deleted if named after it, never if in `protect` (say, the input's)."""
    out = check_output_path(path)
    folder = _folder(out)
    try:
        if external is False:
            data = serialized if serialized is not None else _inline_bytes(model, out)
        else:
            data = None if external else (serialized if serialized is not None else serialize(model))
        if data is None:
            return _save_external(model, out, folder, EXTERNAL_THRESHOLD if threshold is None else threshold,
                                  protect)
        existed = out.is_file()
        stale = external_files(out) if existed else set()
        _atomic_write(folder, out, data)
        return {"data_file": None, "replaced": [str(out)] if existed else [], **_retire(out, stale, set(), protect)}
    except OSError as exc:
        raise NormfixError(f"cannot write {out}: {exc.strerror or exc}") from None


def _inline_bytes(model: onnx.ModelProto, out: Path) -> bytes:
    """The model as one self-contained file: external tensors are read into memory (the
    model is modified so: its tensors no longer read the source files)."""
    if _payload_bytes(model) >= PROTOBUF_LIMIT:
        raise NormfixError(f"cannot write {out} without external data: the model's tensors are over protobuf's "
                           "2 GB limit (drop --no-external-data)")
    inline_external(model)
    data = serialize(model)
    if data is None:
        raise NormfixError(f"cannot write {out} without external data: it is over protobuf's 2 GB limit "
                           "(drop --no-external-data)")
    return data


def external_payload(model: onnx.ModelProto) -> int:
    """Bytes the model's tensors keep in external data files."""
    return sum(_external_info(t)[2] or _expected_bytes(t) or 0 for t, _ in _all_tensors(model) if _is_external(t))


def inline_external(model: onnx.ModelProto) -> int:
    """Read every external tensor into memory (the model no longer reads the data files);
    returns the bytes read."""
    total = 0
    for tensor, _ in _all_tensors(model):
        if _is_external(tensor):
            raw = bytes(external_bytes(tensor))
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
            tensor.raw_data = raw
            total += len(raw)
    return total


def file_mode(target: str | os.PathLike) -> int:
    """The permission bits a file written to `target` gets: those of the file it replaces,
    else what the umask gives a new file (0644 under umask 022). mkstemp makes 0600 files,
    which a service running as another user cannot read."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


def _atomic_write(folder: Path, out: Path, data: bytes, mode: int | None = None) -> None:
    mode = file_mode(out) if mode is None else mode
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{out.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        remove_quietly(tmp)
        raise
    _fsync_dir(folder)


def write_file_atomically(path: str | os.PathLike, data: bytes, what: str = "file") -> None:
    """A side file (report, noise feeds): temp file in the same folder, fsync, rename; mode
    as `file_mode`. NormfixError naming `what` if it cannot be written."""
    out = Path(path)
    try:
        _atomic_write(_folder(out), out, data)
    except OSError as exc:
        raise NormfixError(f"cannot write {what} {out}: {exc.strerror or exc}") from None


def _retire(out: Path, old: set[Path], new: set[Path], protect=frozenset()) -> dict:
    """Delete data files the replaced `out` read and the new one does not, if they are
    `out`'s own (named `<out name>.*`, e.g. an older version's `.alt.data`, or a hidden staged
    file); others may be shared with other models: they are kept, and listed."""
    removed, kept = [], []
    protect = {Path(p).resolve() for p in protect}
    for path in sorted(old - new):
        if not path.exists():
            continue
        if path not in protect and path.parent == out.parent.resolve() and (path.name.startswith(f"{out.name}.") or _staged_data(out, path)):
            remove_quietly(path)
            removed.append(str(path))
        else:
            kept.append(str(path))
    return {"removed": removed, "kept": kept}


def _save_external(model: onnx.ModelProto, out: Path, folder: Path, threshold: int, protect=frozenset()) -> dict:
    """Write `out` + `<out name>.data` so that at every instant `out` is either the old model
    with its old data or the new model with its new data:

    * `out.data` is not used by the existing `out`: write the data and the `.onnx` in a hidden
      staging folder, rename the data in, then the `.onnx` (a crash in between leaves an unused
      new data file; the old `out` never read it).
    * the existing `out` reads `out.data` (re-running into the same OUT, IN == OUT): the new
      data goes to a hidden `.<out>.data.XXXX.staged` first and a `.onnx` reading it replaces
      `out`; only then is `out.data` overwritten (a copy of the staged file, kernel-side), the
      final `.onnx` renamed over `out` and the staged file deleted. A crash in between leaves
      `out` reading the staged file: complete and consistent; the next run restores the name.
    """
    location = data_file_name(out)
    sources = {Path(_external_info(t)[0]).resolve() for t, _ in _all_tensors(model) if _is_external(t)}
    check_data_path(out, sources)
    target = (folder / location).resolve()
    old = external_files(out) if out.is_file() else set()
    conflict = target in old
    # named as the caller named OUT (the data file beside it), not one relative and one absolute
    replaced = [str(p) for p, there in ((out, out.is_file()), (folder / location, target.exists())) if there]
    data_mode = file_mode(target)
    onnx_mode = file_mode(out)
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=f".{out.name}."))
    staged: Path | None = None
    try:
        if not conflict or not _any_external(model, threshold):
            moved = write_external(model, staging, out.name, location, threshold)
            if not moved:  # every tensor under the threshold: one self-contained file
                _finish(staging / out.name, onnx_mode)
                os.replace(staging / out.name, out)
                _fsync_dir(folder)
                return {"data_file": None, "replaced": replaced[:1] if out in map(Path, replaced) else [],
                        **_retire(out, old, set(), set(protect) | (sources - old))}
            _finish(staging / location, data_mode)
            _finish(staging / out.name, onnx_mode)
            os.replace(staging / location, folder / location)
            os.replace(staging / out.name, out)
            _fsync_dir(folder)
        else:
            fd, name = tempfile.mkstemp(dir=folder, prefix=f".{out.name}.data.", suffix=".staged")
            os.close(fd)
            staged = Path(name)
            moved = write_external(model, staging, out.name, staged.name, threshold)
            os.replace(staging / staged.name, staged)
            _finish(staged, data_mode)
            _finish(staging / out.name, onnx_mode)
            os.replace(staging / out.name, out)  # the new model is in place, reading the staged data
            _fsync_dir(folder)
            with open(staging / location, "wb") as copy:
                _copy_range(staged, 0, staged.stat().st_size, copy)
            _finish(staging / location, data_mode)
            os.replace(staging / location, folder / location)
            _fsync_dir(folder)
            final = _lean_copy_with_location(out, staged.name, location)
            _atomic_write(folder, out, final, onnx_mode)
            remove_quietly(staged)
            staged = None
    finally:
        for leftover in staging.iterdir():
            remove_quietly(leftover)
        staging.rmdir()
        if staged is not None and staged.resolve() not in external_files(out):
            remove_quietly(staged)  # failed before the model read it
    # the model now reads from the file just written, not from a source the save may delete
    for tensor, written in moved:
        _, offset, length = _external_info(written)
        _set_external(tensor, str(target), offset, length)
    return {"data_file": location, "replaced": replaced, **_retire(out, old, {target}, set(protect) | (sources - old))}


def _any_external(model: onnx.ModelProto, threshold: int) -> bool:
    """Whether `write_external` would put any tensor in the data file."""
    return any(_is_external(t) or (t.HasField("raw_data") and _raw_size(t) >= threshold)
               for t, _ in _all_tensors(model))


def _finish(path: Path, mode: int) -> None:
    os.chmod(path, mode)
    _fsync_file(path)


def _lean_copy_with_location(out: Path, old: str, new: str) -> bytes:
    """The bytes of the (small) `.onnx` at `out` with every external location `old` -> `new`."""
    model = onnx.load(str(out), load_external_data=False)
    for tensor, _ in _all_tensors(model):
        for e in tensor.external_data:
            if e.key == "location" and e.value == old:
                e.value = new
    return model.SerializeToString()


# Tensors of at least this many bytes go to the data file; smaller ones stay in the .onnx.
EXTERNAL_THRESHOLD = 1024
# Offsets of tensors of 1 MB and more are page-aligned (onnxruntime can then map them).
_PAGE, _BIG = 4096, 1 << 20


def write_external(model: onnx.ModelProto, folder: Path, onnx_name: str, data_name: str,
                   threshold: int = EXTERNAL_THRESHOLD) -> list[tuple[onnx.TensorProto, onnx.TensorProto]]:
    """Write `model` as `folder/onnx_name` plus `folder/data_name` without holding a second
    copy of its tensors: the `.onnx` is a copy of the model whose big tensors are references.
    Tensors that still reference source files are copied range by range, in the kernel;
    tensors of `EXTERNAL_THRESHOLD` bytes or more held in memory are appended one at a time.
    Returns (model tensor, written tensor) for each tensor now in `data_name`. Nothing is
    fsynced (the caller decides)."""
    skeleton = _lean_copy(model, threshold)
    moved = []
    with open(folder / data_name, "wb") as data:
        for (tensor, _), (written, _) in zip(_all_tensors(model), _all_tensors(skeleton)):
            if _is_external(tensor):
                location, offset, length = _external_info(tensor)
                src = Path(location)
                if length is None:
                    length = src.stat().st_size - offset
                position = _pad(data, length)
                _copy_range(src, offset, length, data)
            elif tensor.HasField("raw_data") and (length := _raw_size(tensor)) >= threshold:
                position = _pad(data, length)
                data.write(tensor.raw_data)  # one tensor's bytes at a time
            else:
                continue
            _set_external(written, data_name, position, length)
            moved.append((tensor, written))
        data.flush()
    with open(folder / onnx_name, "wb") as f:
        f.write(skeleton.SerializeToString())
    return moved


def _raw_size(tensor: onnx.TensorProto) -> int:
    expected = _expected_bytes(tensor)
    return expected if expected is not None else len(tensor.raw_data)


def _pad(data, size: int) -> int:
    position = data.tell()
    gap = (-position) % (_PAGE if size >= _BIG else 64)
    if gap:
        data.write(b"\0" * gap)
    return position + gap


def _copy_range(src: Path, offset: int, length: int, data) -> None:
    """Append `length` bytes of `src` from `offset` to the open file `data`, in the kernel
    where it can (copy_file_range: no bytes pass through this process)."""
    data.flush()
    start = data.tell()
    with open(src, "rb") as f:
        done = 0
        try:
            while done < length:
                n = os.copy_file_range(f.fileno(), data.fileno(), length - done, offset + done, start + done)
                if n == 0:
                    break
                done += n
        except (AttributeError, OSError):  # old kernel, other file system kinds
            pass
        f.seek(offset + done)
        data.seek(start + done)
        while done < length:
            chunk = f.read(min(16 << 20, length - done))
            if not chunk:
                break
            data.write(chunk)
            done += len(chunk)
    if done != length:
        raise NormfixError(f"external data file {src} is shorter than its tensors declare (changed since loading?)")
    data.seek(start + length)


def _lean_copy(model: onnx.ModelProto, threshold: int = EXTERNAL_THRESHOLD) -> onnx.ModelProto:
    """A copy of `model` whose main-graph initializers leave out raw data of
    `EXTERNAL_THRESHOLD` bytes or more (the bulk of any model, written to the data file
    instead). Tensors elsewhere (Constant nodes, subgraphs, functions) are copied whole."""
    skeleton = onnx.ModelProto()
    for fd, value in model.ListFields():
        if fd.name != "graph":
            _copy_field(skeleton, fd, value)
    graph = skeleton.graph
    for fd, value in model.graph.ListFields():
        if fd.name == "initializer":
            graph.initializer.extend(_lean_tensor(t, threshold) for t in value)
        else:
            _copy_field(graph, fd, value)
    return skeleton


def _lean_tensor(tensor: onnx.TensorProto, threshold: int = EXTERNAL_THRESHOLD) -> onnx.TensorProto:
    if not tensor.HasField("raw_data") or _raw_size(tensor) < threshold:
        return tensor
    stub = onnx.TensorProto()
    for fd in _TENSOR_FIELDS:  # not ListFields(): it would copy raw_data out of the arena
        if _is_repeated(fd):
            if len(getattr(tensor, fd.name)):
                getattr(stub, fd.name).extend(getattr(tensor, fd.name))
        elif tensor.HasField(fd.name):
            _copy_field(stub, fd, getattr(tensor, fd.name))
    return stub


_TENSOR_FIELDS = [fd for fd in onnx.TensorProto.DESCRIPTOR.fields if fd.name != "raw_data"]


def _is_repeated(fd) -> bool:
    repeated = getattr(fd, "is_repeated", None)
    return repeated if repeated is not None else fd.label == fd.LABEL_REPEATED


def _copy_field(message, fd, value) -> None:
    if _is_repeated(fd):
        getattr(message, fd.name).extend(value)
    elif fd.message_type is not None:
        getattr(message, fd.name).CopyFrom(value)
    else:
        setattr(message, fd.name, value)


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
