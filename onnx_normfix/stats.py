"""Normalization running statistics: read them from checkpoints, or estimate them from data.

`load_stats(path)` reads every module that holds running statistics (`P.running_mean` and
`P.running_var`, with `P.weight` / `P.bias` when affine) from

- a PyTorch checkpoint (`.pt .pth .ckpt .bin`), read with
  `torch.load(map_location="cpu", weights_only=True)` only: a pickle that would import
  anything but tensors and containers is refused, never executed;
- a `.npz` archive (`allow_pickle=False`: object arrays are refused);
- a `.safetensors` file (needs the `safetensors` package).

The state_dict may be bare or nested under wrapper keys (`state_dict`, `model`, `G`,
`netG`, `ema`, ...) up to three levels deep; `module.` (DataParallel/DDP) and `_orig_mod.`
(torch.compile) prefixes are stripped. When several sub-dicts hold different statistics
(a GAN checkpoint with `G` and `D`), the caller picks one with `key=`.

torch is imported only inside `load_stats`, for PyTorch checkpoints; onnxruntime only inside
`estimate_stats`.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .errors import NormfixError

TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
MAX_NESTING = 3
_STAT_SUFFIXES = (".running_mean", ".running_var")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class ModuleStats:
    """One module with running statistics found in a checkpoint."""

    name: str  # module path, wrapper prefixes and nesting keys stripped: "main.1"
    running_mean: np.ndarray  # as stored (bfloat16 widened to float32), shape [C]
    running_var: np.ndarray
    weight: np.ndarray | None  # affine scale ("<name>.weight") if present
    bias: np.ndarray | None

    @property
    def channels(self) -> int:
        return int(self.running_mean.shape[0])


def load_stats(path, key: str | None = None) -> list[ModuleStats]:
    """Read the modules with running statistics from a checkpoint file, in file order.

    `key` chooses the sub-dict when several hold statistics: a nesting path such as `"G"` or
    `"checkpoint/ema"`, or a module-name prefix such as `"generator"`.
    Raises NormfixError (one line, naming the file) for anything unreadable or invalid.
    """
    path = Path(os.fspath(path))
    if not path.exists():
        raise NormfixError(f"stats file {path}: no such file")
    if path.is_dir():
        raise NormfixError(f"stats file {path}: is a directory, not a checkpoint file")
    if path.stat().st_size == 0:
        raise NormfixError(f"stats file {path}: file is empty")
    suffix = path.suffix.lower()
    if suffix in TORCH_SUFFIXES:
        payload = _read_torch(path)
    elif suffix == ".npz":
        payload = _read_npz(path)
    elif suffix == ".safetensors":
        payload = _read_safetensors(path)
    else:
        raise NormfixError(
            f"stats file {path}: unknown extension {suffix or '(none)'!r}; expected one of "
            f"{', '.join(TORCH_SUFFIXES)}, .npz, .safetensors"
        )
    return _stats_from_payload(payload, key, str(path))


def stats_from_arrays(mapping: dict, key: str | None = None) -> list[ModuleStats]:
    """The same as `load_stats` for an in-memory state_dict-like dict of numpy arrays or
    torch tensors (possibly nested, e.g. the result of a `torch.load`)."""
    return _stats_from_payload(mapping, key, "stats")


# ---------------------------------------------------------------------------------------------
# File readers: each returns a dict, or raises NormfixError naming the file.


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_torch(path: Path) -> dict:
    try:
        import torch
    except ImportError:
        raise NormfixError(
            f"stats file {path}: reading PyTorch checkpoints needs torch; "
            "pip install 'onnx-normfix[torch]' (or convert the state_dict to .npz)"
        ) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises a zoo of types for bad files; all are user errors
        raise NormfixError(f"stats file {path}: {_torch_reason(exc)}") from None
    if not isinstance(payload, Mapping):
        raise NormfixError(
            f"stats file {path}: holds a {type(payload).__name__}, not a dict of tensors "
            "(save model.state_dict())"
        )
    return payload


def _torch_reason(exc: Exception) -> str:
    text = str(exc)
    if "Weights only load failed" in text:
        found = re.search(r"(?:Unsupported global: |unsupported )GLOBAL (\S+)", text)
        if found:
            return (
                f"refused to unpickle: it references {found.group(1)}, which a plain weights "
                "file does not need (read with torch.load(weights_only=True); if it is a whole "
                "pickled model from a trusted source, re-save model.state_dict())"
            )
        opcode = re.search(r"Unsupported operand (\d+)", text)
        detail = f"pickle opcode {opcode.group(1)}" if opcode else "pickle content"
        return (
            f"refused: not a weights checkpoint (unsupported {detail} under "
            "torch.load(weights_only=True); nothing was executed)"
        )
    if isinstance(exc, EOFError):
        return "truncated or not a PyTorch checkpoint (unexpected end of file)"
    if "zip archive" in text or "central directory" in text:
        return "corrupt or truncated checkpoint (bad zip archive)"
    if isinstance(exc, (KeyError, ValueError)) or "magic number" in text or "pickle" in text:
        return f"not a PyTorch checkpoint (unrecognized format: {type(exc).__name__} {_one_line(text, 60)})"
    return f"cannot read checkpoint ({type(exc).__name__}: {_one_line(text)})"


def _read_npz(path: Path) -> dict:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise NormfixError(f"stats file {path}: a single .npy array, not a .npz archive")
            payload = {}
            for name in archive.files:
                try:
                    payload[name] = archive[name]
                except ValueError as exc:
                    if "allow_pickle" in str(exc):
                        raise NormfixError(
                            f"stats file {path}: array {name!r} is an object array; refused "
                            "(loading it would unpickle Python objects)"
                        ) from None
                    raise
            return payload
    except NormfixError:
        raise
    except AttributeError:
        # np.load returns a bare ndarray (no context manager) for .npy content
        raise NormfixError(f"stats file {path}: a single .npy array, not a .npz archive") from None
    except Exception as exc:
        if "allow_pickle" in str(exc):
            reason = "a pickle, not a .npz archive; refused (allow_pickle=False)"
        else:
            reason = f"corrupt or not a .npz archive ({type(exc).__name__}: {_one_line(exc, 80)})"
        raise NormfixError(f"stats file {path}: {reason}") from None


def _read_safetensors(path: Path) -> dict:
    try:
        from safetensors.numpy import load_file
    except ImportError:
        raise NormfixError(
            f"stats file {path}: reading .safetensors needs the safetensors package; "
            "pip install 'onnx-normfix[safetensors]'"
        ) from None
    try:
        payload = load_file(str(path))
    except Exception as exc:
        raise NormfixError(
            f"stats file {path}: corrupt or unreadable safetensors file "
            f"({type(exc).__name__}: {_one_line(exc, 100)})"
        ) from None
    # safetensors stores tensors sorted by dtype and name, not in module order; a natural
    # sort ("main.2" before "main.10") restores registration order for Sequential models.
    return dict(sorted(payload.items(), key=lambda item: _natural_key(item[0])))


def _natural_key(name: str):
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[.]", name)]


# ---------------------------------------------------------------------------------------------
# Choosing the state_dict inside a checkpoint and collecting its modules.


def _is_stat_key(k) -> bool:
    return isinstance(k, str) and (k.endswith(_STAT_SUFFIXES) or k in ("running_mean", "running_var"))


def _candidates(payload: Mapping) -> list[tuple[str, Mapping]]:
    """Every dict, up to MAX_NESTING levels down, that directly holds a running stat."""
    found, stack = [], [("", payload, 0)]
    while stack:
        where, node, depth = stack.pop(0)
        if any(_is_stat_key(k) and not isinstance(v, Mapping) for k, v in node.items()):
            found.append((where, node))
        if depth < MAX_NESTING:
            stack.extend(
                (f"{where}/{k}" if where else str(k), v, depth + 1)
                for k, v in node.items()
                if isinstance(v, Mapping)
            )
    return found


def _label(where: str) -> str:
    return repr(where) if where else "(top level)"


def _strip_wrappers(entries: dict) -> dict:
    names = list(entries)
    stripped = True
    while names and stripped:  # any nesting of the wrappers: module._orig_mod., _orig_mod.module.
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if all(n.startswith(prefix) for n in names):
                names, stripped = [n[len(prefix):] for n in names], True
    names = [n.replace("._orig_mod.", ".") for n in names]  # a compiled submodule
    return dict(zip(names, entries.values()))


def _entries(node: Mapping) -> dict:
    return _strip_wrappers({k: v for k, v in node.items() if isinstance(k, str) and not isinstance(v, Mapping)})


def _stats_from_payload(payload, key: str | None, source: str) -> list[ModuleStats]:
    if not isinstance(payload, Mapping):
        raise NormfixError(f"{source}: expected a dict of arrays, got {type(payload).__name__}")
    if key is not None:
        return _collect(_select_key(payload, key, source), source)
    candidates = _candidates(payload)
    if not candidates:
        seen = ", ".join(map(str, list(payload)[:8])) + (", ..." if len(payload) > 8 else "")
        raise (NoRunningStats if not _any_stats(payload) else NormfixError)(
            f"{source}: no running statistics (<module>.running_mean/.running_var) found "
            f"within {MAX_NESTING} levels; top-level keys: {seen or '(none)'}"
        )
    results = [(where, _collect(_entries(node), source, where)) for where, node in candidates]
    first = results[0][1]
    different = [(w, r) for w, r in results[1:] if not _same_stats(first, r)]
    if different:
        listed = ", ".join(
            f"{_label(w)} ({len(r)} module{'s' * (len(r) != 1)})" for w, r in [results[0], *different]
        )
        raise NormfixError(
            f"{source}: several parts hold different running statistics: {listed}; "
            "choose one with key= (e.g. key='G')"
        )
    return first


def _select_key(payload: Mapping, key: str, source: str) -> dict:
    node = payload
    for part in key.split("/"):
        if not isinstance(node, Mapping) or part not in node:
            break
        node = node[part]
    else:
        if not isinstance(node, Mapping):
            raise NormfixError(f"{source}: key {key!r} holds a {type(node).__name__}, not a dict")
        return _entries(node)
    # Not a nesting path: a module-name prefix within a flat state_dict ("generator.main.1...").
    matches = []
    for where, node in _candidates(payload):
        picked = {n[len(key) + 1:]: v for n, v in _entries(node).items() if n.startswith(key + ".")}
        if picked:
            matches.append((where, _strip_wrappers(picked)))
    if len(matches) == 1:
        return matches[0][1]
    listed = ", ".join(_label(w) for w, _ in _candidates(payload)) or "none"
    raise NormfixError(
        f"{source}: key {key!r} is neither a nested dict nor a module prefix with running "
        f"statistics ({'ambiguous' if matches else 'not found'}); parts with statistics: {listed}"
    )


class StatsList(list):
    """The modules with running stats (`ModuleStats`), plus `without_stats`: names of modules
    the checkpoint holds weights for but no running statistics."""

    without_stats: set = frozenset()


class NoRunningStats(NormfixError):
    """The checkpoint holds no running statistics at any depth: its norms, if any, were
    trained with track_running_stats=False, so there is nothing to restore."""


def _any_stats(node, depth: int = 0) -> bool:
    """True if any key at any depth (up to 16) names a running_mean/running_var."""
    if not isinstance(node, Mapping) or depth > 16:
        return False
    return any((isinstance(k, str) and k.rsplit(".", 1)[-1] in ("running_mean", "running_var"))
               or _any_stats(v, depth + 1) for k, v in node.items())


def _same_stats(a: list[ModuleStats], b: list[ModuleStats]) -> bool:
    return len(a) == len(b) and all(
        x.name == y.name
        and np.array_equal(x.running_mean, y.running_mean)
        and np.array_equal(x.running_var, y.running_var)
        for x, y in zip(a, b)
    )


def _collect(entries: dict, source: str, where: str = "") -> list[ModuleStats]:
    at = f" (under {where!r})" if where else ""
    prefixes: dict[str, None] = {}  # insertion-ordered set: checkpoint order
    for name in entries:
        for suffix in ("running_mean", "running_var"):
            if name == suffix or name.endswith("." + suffix):
                prefixes.setdefault(name[: -len(suffix)].rstrip("."), None)
    if not prefixes:
        raise NormfixError(f"{source}{at}: no running statistics (<module>.running_mean) found")
    modules = []
    for prefix in prefixes:
        dot = prefix + "." if prefix else ""
        keys = {part: dot + part for part in ("running_mean", "running_var", "weight", "bias")}
        for part in ("running_mean", "running_var"):
            if keys[part] not in entries:
                other = "running_var" if part == "running_mean" else "running_mean"
                raise NormfixError(f"{source}{at}: {keys[other]!r} has no matching {keys[part]!r}")
        mean = _as_vector(entries[keys["running_mean"]], keys["running_mean"], source)
        var = _as_vector(entries[keys["running_var"]], keys["running_var"], source)
        if mean.shape != var.shape:
            raise NormfixError(
                f"{source}{at}: {keys['running_mean']!r} has {mean.shape[0]} channels but "
                f"{keys['running_var']!r} has {var.shape[0]}"
            )
        if (var < 0).any():
            worst = float(var.min())
            raise NormfixError(f"{source}{at}: {keys['running_var']!r} has a negative variance ({worst:g})")
        affine = {}
        for part in ("weight", "bias"):
            if keys[part] in entries:
                arr = _as_vector(entries[keys[part]], keys[part], source)
                if arr.shape != mean.shape:
                    raise NormfixError(
                        f"{source}{at}: {keys[part]!r} has shape {list(arr.shape)}, "
                        f"expected [{mean.shape[0]}] like its running_mean"
                    )
                affine[part] = arr
        modules.append(ModuleStats(prefix, mean, var, affine.get("weight"), affine.get("bias")))
    found = StatsList(modules)
    # modules with a weight but no running stats (e.g. InstanceNorm(track_running_stats=False)
    # beside BatchNorms): fix_inorm leaves the norms they match, there is nothing to restore
    found.without_stats = {name.rsplit(".", 1)[0] for name in entries
                           if name.endswith(".weight") and name.rsplit(".", 1)[0] not in prefixes}
    return found


def _as_vector(value, key: str, source: str) -> np.ndarray:
    arr = _to_numpy(value, key, source)
    if arr.ndim != 1 or arr.shape[0] == 0:
        raise NormfixError(f"{source}: {key!r} has shape {list(arr.shape)}; expected a 1-D [C] vector")
    if arr.dtype.kind != "f":
        raise NormfixError(f"{source}: {key!r} has dtype {arr.dtype}; expected floating point")
    if not np.isfinite(arr).all():
        bad = "NaN" if np.isnan(arr).any() else "Inf"
        raise NormfixError(f"{source}: {key!r} contains {bad}")
    return arr


def _to_numpy(value, key: str, source: str) -> np.ndarray:
    try:
        if hasattr(value, "detach") and type(value).__module__.startswith("torch"):
            tensor = value.detach().cpu()
            if str(tensor.dtype) == "torch.bfloat16":  # numpy has no bfloat16
                tensor = tensor.float()
            return np.array(tensor.numpy(), copy=True)
        arr = np.array(value, copy=True)
    except Exception as exc:
        raise NormfixError(f"{source}: {key!r} is not an array ({type(exc).__name__}: {_one_line(exc, 80)})") from None
    if arr.dtype == object:
        raise NormfixError(f"{source}: {key!r} is not a numeric array")
    return arr


# ---------------------------------------------------------------------------------------------
# Estimating statistics from sample inputs (when the checkpoint is lost).


def estimate_stats(
    model: onnx.ModelProto, data: dict[str, np.ndarray], tensors: list[str]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Estimate per-channel running statistics of `tensors` ([N, C, *spatial] activations,
    typically the inputs of InstanceNormalization nodes) from sample inputs.

    `data` maps each graph input to an array whose leading axis enumerates samples. The model
    runs on onnxruntime with graph optimizations disabled: in batches of the model's batch
    size when it is fixed (the sample count must then be a multiple of it), else all at once.
    For every instance (n, c) it takes the mean over the spatial axes and the unbiased
    variance (ddof=1), then averages both over all instances:
        mean[c] = avg_n mean(x[n, c]),   var[c] = avg_n var(x[n, c], ddof=1)
    which is what one training step of InstanceNorm(track_running_stats=True) feeds into its
    running buffers. Returns {tensor: (mean[C], var[C])} as float32.

    This is an ESTIMATE, not the lost buffers: PyTorch's running stats are an exponential
    moving average (momentum, 0.1 by default) over the training batches, so they depend on the
    training data and the last steps of training; these are a plain average over `data`.
    Run it on the model *before* its InstanceNormalization nodes are replaced, so upstream
    norms use per-instance statistics as they did during training.
    """
    from . import model_io
    from .validate import Staged

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    graph = probe.graph
    initializer_names = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializer_names]
    _check_feeds(inputs, data)

    known = {i.name for i in graph.input} | initializer_names
    known.update(o for node in graph.node for o in node.output if o)
    missing = [t for t in tensors if t not in known]
    if missing:
        raise NormfixError(f"estimate_stats: tensors not in the graph: {', '.join(missing)}")
    types = _elem_types(probe)
    outputs = {o.name for o in graph.output}
    fallback = inputs[0].type.tensor_type.elem_type if inputs else onnx.TensorProto.FLOAT
    for name in dict.fromkeys(tensors):
        if name not in outputs:
            graph.output.append(onnx.helper.make_tensor_value_info(name, types.get(name, fallback), None))

    # bytes for an ordinary model; a model still reading external data (or over 2 GB) is
    # staged once as files for all the batches
    serialized = model_io.serialize(probe)
    feeds = {i.name: _cast_feed(data[i.name], i) for i in inputs}
    samples = next(iter(feeds.values())).shape[0] if feeds else 1
    batch = _fixed_batch(inputs) or samples
    if samples % batch:
        raise NormfixError(
            f"estimate_stats: {samples} samples is not a multiple of the model's fixed batch size {batch}"
        )

    wanted = list(dict.fromkeys(tensors))
    staged = Staged(probe) if serialized is None else None
    try:
        sums, counts = _accumulate(probe, feeds, wanted, batch, samples, serialized, staged)
    finally:
        if staged is not None:
            staged.cleanup()
    return {
        name: ((s[0] / counts[name]).astype(np.float32), (s[1] / counts[name]).astype(np.float32))
        for name, s in sums.items()
    }


def _accumulate(probe, feeds, wanted, batch, samples, serialized, staged):
    from .validate import RuntimeUnavailable, run_model

    sums = {t: None for t in wanted}
    counts = dict.fromkeys(wanted, 0)
    for start in range(0, samples, batch):
        chunk = {k: v[start : start + batch] for k, v in feeds.items()}
        try:  # in the validator's onnxruntime worker: a crash there cannot take us down
            out = run_model(probe, chunk, serialized=serialized, path=staged and staged.path)
        except RuntimeUnavailable as exc:
            raise NormfixError(f"estimate_stats: onnxruntime cannot load the model ({exc})") from None
        except NormfixError as exc:
            raise NormfixError(f"estimate_stats: onnxruntime failed on the samples ({exc})") from None
        values = [out[n] for n in wanted]
        for name, value in zip(wanted, values):
            mean, var = _instance_moments(np.asarray(value), name)
            if sums[name] is not None and sums[name][0].shape != mean.shape:
                raise NormfixError(f"estimate_stats: {name!r} changes channel count between batches")
            sums[name] = (mean, var) if sums[name] is None else (sums[name][0] + mean, sums[name][1] + var)
            counts[name] += value.shape[0]
    return sums, counts


def _instance_moments(value: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel sums over instances of the per-instance spatial mean and unbiased var."""
    if value.ndim < 3:
        raise NormfixError(f"estimate_stats: {name!r} has rank {value.ndim}; expected [N, C, *spatial]")
    spatial = int(np.prod(value.shape[2:]))
    if spatial < 2:
        raise NormfixError(f"estimate_stats: {name!r} has {spatial} spatial element(s); the unbiased variance needs 2")
    flat = value.reshape(value.shape[0], value.shape[1], spatial).astype(np.float64)
    return flat.mean(axis=2).sum(axis=0), flat.var(axis=2, ddof=1).sum(axis=0)


def _check_feeds(inputs, data: dict) -> None:
    names = [i.name for i in inputs]
    missing = [n for n in names if n not in data]
    extra = [n for n in data if n not in names]
    if missing or extra:
        raise NormfixError(
            "estimate_stats: calibration data must hold exactly the model inputs "
            f"{names}; missing {missing}, unknown {extra}"
        )
    lengths = {n: np.shape(data[n])[0] if np.ndim(data[n]) else None for n in names}
    if None in lengths.values() or len(set(lengths.values())) > 1 or 0 in lengths.values():
        raise NormfixError(f"estimate_stats: every input needs the same non-zero leading sample axis; got {lengths}")


def _fixed_batch(inputs) -> int | None:
    sizes = set()
    for i in inputs:
        dims = i.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            sizes.add(dims[0].dim_value)
        else:
            return None
    if len(sizes) > 1:
        raise NormfixError(f"estimate_stats: inputs disagree on the batch size: {sorted(sizes)}")
    return sizes.pop() if sizes else None


def _cast_feed(array, value_info) -> np.ndarray:
    array = np.asarray(array)
    want = onnx.helper.tensor_dtype_to_np_dtype(value_info.type.tensor_type.elem_type)
    if array.dtype != want and array.dtype.kind == "f" and np.dtype(want).kind == "f":
        array = array.astype(want)
    return array


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        inferred = model  # inference is a convenience here; unknown types fall back below
    g = inferred.graph
    types = {t.name: t.data_type for t in g.initializer}
    for vi in (*g.input, *g.value_info, *g.output):
        if vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    return types
