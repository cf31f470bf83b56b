"""Noise inputs made by `replace_random`: where they are recorded and how to feed them.

`replace_random` turns each random op into a graph input carrying *standard* noise (normal:
N(0, 1); uniform: U[0, 1)) and records what the input means in the model's metadata under
`NOISE_METADATA_KEY`, as a JSON list with one entry per replaced op:

    {"input": "noise__RandomNormalLike",   # graph input (null in modes constant/mean)
     "mode": "input",                      # input | constant | mean
     "distribution": "normal",             # of the input: normal N(0,1) or uniform U[0,1)
     "node": "/RandomNormalLike", "op_type": "RandomNormalLike", "output": "...",
     "seed": null,                         # the op's own seed attribute, if it had one
     "dtype": "float32", "shape": ["batch", 3],
     "mean": 0.0, "scale": 1.0}            # normal; uniform: "low"/"high";
                                           # Bernoulli: "p" (tensor), "output_dtype"

`noise_feeds` reads those entries and draws the noise; a deployment script that feeds it
reproduces a run exactly. Each input has its own generator, seeded from (seed, input name),
so adding or removing one random op does not change the noise of the others.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Mapping

import numpy as np
import onnx

from .errors import NormfixError

NOISE_METADATA_KEY = "onnx_normfix.noise"


def read_noise_entries(model: onnx.ModelProto) -> list[dict]:
    """The entries recorded under `NOISE_METADATA_KEY` (empty if none)."""
    for prop in model.metadata_props:
        if prop.key == NOISE_METADATA_KEY:
            try:
                entries = json.loads(prop.value)
            except json.JSONDecodeError as e:
                raise NormfixError(f"metadata {NOISE_METADATA_KEY!r} is not valid JSON: {e}") from None
            if not isinstance(entries, list):
                raise NormfixError(f"metadata {NOISE_METADATA_KEY!r} must hold a JSON list")
            return entries
    return []


def write_noise_entries(model: onnx.ModelProto, new_entries: list[dict]) -> None:
    """Append `new_entries`, keeping existing ones (an entry for the same input is replaced)."""
    if not new_entries:
        return
    replaced = {e.get("input") for e in new_entries if e.get("input")}
    entries = [e for e in read_noise_entries(model) if not (e.get("input") in replaced)]
    entries.extend(new_entries)
    value = json.dumps(entries, sort_keys=True)
    for prop in model.metadata_props:
        if prop.key == NOISE_METADATA_KEY:
            prop.value = value
            return
    model.metadata_props.add(key=NOISE_METADATA_KEY, value=value)


def draw_standard_noise(distribution: str, shape, dtype, seed: int, name: str) -> np.ndarray:
    """Standard noise for input `name`: N(0, 1) or U[0, 1) in `dtype`, seeded by (seed, name)."""
    if int(seed) < 0:
        raise NormfixError(f"seed must be >= 0, got {seed}")
    rng = np.random.default_rng([int(seed), zlib.crc32(name.encode())])
    dtype = np.dtype(dtype)
    shape = tuple(int(d) for d in shape)
    if distribution == "normal":
        return rng.standard_normal(shape).astype(dtype)
    if distribution == "uniform":
        u = rng.random(shape).astype(dtype)
        # Rounding to a narrower dtype can turn 1 - 2**-53 into 1.0; keep the interval open.
        return np.minimum(u, np.nextafter(dtype.type(1), dtype.type(0)))
    raise NormfixError(f"unknown noise distribution {distribution!r}")


def _load(model) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (str, os.PathLike)):
        try:
            return onnx.load(os.fspath(model), load_external_data=False)
        except Exception as e:
            raise NormfixError(f"cannot read {os.fspath(model)}: {e}") from None
    raise NormfixError(f"expected an onnx.ModelProto or a path, got {type(model).__name__}")


def _dims(vi: onnx.ValueInfoProto) -> list:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in vi.type.tensor_type.shape.dim]


def noise_inputs(model) -> list[str]:
    """Names of the graph inputs that carry noise made by `replace_random`, in record order."""
    model = _load(model)
    present = {vi.name for vi in model.graph.input}
    return [e["input"] for e in read_noise_entries(model)
            if e.get("mode", "input") == "input" and e.get("input") in present]


def noise_feeds(model, seed: int = 0, shapes: Mapping | None = None) -> dict[str, np.ndarray]:
    """Draw the noise for every noise input of a model rewritten by `replace_random`.

    `shapes` sets symbolic dims: {dim_param: int} or {input name: shape}. A dim_param shared
    with another input whose shape is given takes its value from there (feeding x of shape
    (3, 4) makes a noise input of shape ["batch", 3] come out as (3, 3)). Unset dims are 1.
    Same model, seed and shapes give identical arrays.
    """
    model = _load(model)
    shapes = dict(shapes or {})
    inputs = {vi.name: vi for vi in model.graph.input}
    dim_values: dict[str, int] = {k: int(v) for k, v in shapes.items() if np.ndim(v) == 0 and k not in inputs}
    for name, shape in shapes.items():
        if name in inputs and np.ndim(shape) == 1:
            dims = _dims(inputs[name])
            if len(dims) != len(shape):
                raise NormfixError(f"shape {tuple(shape)} for input {name!r} does not match its rank {len(dims)}")
            for d, v in zip(dims, shape):
                if isinstance(d, str):
                    dim_values.setdefault(d, int(v))
    feeds = {}
    for entry in read_noise_entries(model):
        name = entry.get("input")
        if entry.get("mode", "input") != "input" or name not in inputs:
            continue
        vi = inputs[name]
        if name in shapes:
            shape = tuple(int(v) for v in shapes[name])
        else:
            shape = tuple(d if isinstance(d, int) else dim_values.get(d, 1) for d in _dims(vi))
        dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        feeds[name] = draw_standard_noise(entry["distribution"], shape, dtype, seed, name)
    return feeds


def save_noise_feeds(model, path, seed: int = 0, shapes: Mapping | None = None) -> dict[str, np.ndarray]:
    """Write `noise_feeds(model, seed, shapes)` to an .npz file (one array per input name)."""
    feeds = noise_feeds(model, seed=seed, shapes=shapes)
    np.savez(os.fspath(path), **feeds)
    return feeds
