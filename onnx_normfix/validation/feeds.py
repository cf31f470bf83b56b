"""What the validator feeds: shapes that run and exercise the model, and several seeded draws.

Shapes. Fixed dims are used as declared (a declared 0 stays 0). Symbolic dims:
  * given by the user (`input_shapes` / `--input-shape`: an input's whole shape, or a named
    dim's size; `inputs` arrays fix the dims of their inputs too) always win;
  * a *batch* dim (the leading dim of a rank >= 2 input, and every dim of the same name) is 2,
    so that the draws hold distinct samples and a pass that mixes samples shows;
  * every other dim (height, width, sequence) starts at 8 and is doubled until every
    Conv/ConvTranspose/pooling input is large enough that each kernel tap, not just the
    centre one, meets real data (read from shape inference on the chosen shapes);
  * if onnxruntime still rejects the shapes, the stage search doubles them again, then tries
    batch 1 (a model that only runs at batch 1 although its batch is declared free).
Named dims take one value across all inputs.

Values: `DRAWS` draws per stage, all run in one onnxruntime session. Floats: draw 0 is
N(0, 1), draw 1 is U[0, 255] (image-like: non-negative, wide, so clipping activations and
weights that lose precision show). Integers that index a `Gather`/`GatherElements` axis
cover that whole axis; other integers are drawn from {0, 1, 2, 3}. Bools: draw 0 at random,
draw 1 its negation (every element both ways, rank 0 too). Strings cannot be generated: the
stage is reported `skipped` with how to give real values (`--inputs`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from ..errors import NormfixError

# Generated test data stays below this many elements per input (1 GiB of float32).
MAX_FEED_ELEMENTS = 1 << 28
DRAWS = 2
BATCH = 2
EXTENT = 8            # first value of a non-batch symbolic dim
MAX_DOUBLINGS = 6     # 8 -> 512
IMAGE_RANGE = (0.0, 255.0)
SMALL_INT_RANGE = (0, 4)
# ops whose integer input passes through to what they feed unchanged in meaning
_PASS_THROUGH = {"Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Expand", "Transpose"}
_CONV_LIKE = {"Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool", "ConvInteger", "QLinearConv"}


@dataclass
class Options:
    seed: int = 0
    rtol: float | None = None
    atol: float | None = None
    shapes: dict | None = None
    inputs: dict | None = None
    draws: int = DRAWS


class FeedsUnavailable(NormfixError):
    """Test data cannot be generated for an input (a string tensor, a sequence): the
    comparison is reported `skipped` with this reason, it is not an error."""


@dataclass
class FeedPlan:
    """Concrete shapes for every real input, and the values of the symbolic dims."""

    shapes: dict[str, tuple]
    dims: dict[str, int] = field(default_factory=dict)
    chosen: list[str] = field(default_factory=list)  # symbolic dims the validator chose
    extent: int = EXTENT  # the value of the chosen non-batch dims
    batch: int = BATCH    # the value of the chosen batch dims

    def describe(self) -> str:
        return ", ".join(f"{n} {'x'.join(map(str, s)) or 'scalar'}" for n, s in self.shapes.items())


def real_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def declared_dims(vi: onnx.ValueInfoProto) -> list:
    """Each dim as an int (fixed, 0 included), a str (named) or None (unnamed / unknown)."""
    out = []
    for d in vi.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.dim_param:
            out.append(d.dim_param)
        else:
            out.append(None)
    return out


def _is_tensor(vi) -> bool:
    return vi.type.HasField("tensor_type")


def symbolic_names(model: onnx.ModelProto) -> list[str]:
    return list(dict.fromkeys(d for vi in real_inputs(model) if _is_tensor(vi)
                              for d in declared_dims(vi) if isinstance(d, str)))


def check_shape_names(model: onnx.ModelProto, shapes: dict | None) -> None:
    """Every key of `shapes` names a real input or one of their symbolic dims."""
    if not shapes:
        return
    inputs = {vi.name: vi for vi in real_inputs(model)}
    dims = symbolic_names(model)
    unknown = [k for k in shapes if k not in inputs and k not in dims]
    if unknown:
        listing = "; ".join(f"{n} [{', '.join('?' if d is None else str(d) for d in declared_dims(vi))}]"
                            for n, vi in inputs.items())
        raise NormfixError(f"--input-shape names {', '.join(map(repr, unknown))}, which is neither an input nor a "
                           f"symbolic dim; inputs: {listing or 'none'}; symbolic dims: {', '.join(dims) or 'none'}")
    for name, value in shapes.items():
        if name in inputs and _is_tensor(inputs[name]) and inputs[name].type.tensor_type.HasField("shape"):
            rank = len(inputs[name].type.tensor_type.shape.dim)
            if len(np.ravel(value)) != rank:
                raise NormfixError(f"--input-shape for {name!r} has {len(np.ravel(value))} dims, the input has rank {rank}")


def _batch_dims(inputs) -> set:
    found = set()
    for vi in inputs:
        dims = declared_dims(vi)
        if len(dims) >= 2 and not isinstance(dims[0], int):
            found.add(dims[0] if dims[0] is not None else (vi.name, 0))
    return found


def plan_shapes(model: onnx.ModelProto, shapes: dict | None = None, inputs: dict | None = None,
                extent: int = EXTENT, batch: int = BATCH) -> FeedPlan:
    """Shapes for every real tensor input (module docstring), with non-batch symbolic dims
    at `extent` and batch dims at `batch`."""
    shapes, inputs = dict(shapes or {}), dict(inputs or {})
    real = [vi for vi in real_inputs(model) if _is_tensor(vi)]
    given: dict = {}
    for vi in real:
        fixed = None
        if vi.name in inputs:
            fixed = np.shape(inputs[vi.name])
        elif vi.name in shapes:
            fixed = tuple(int(d) for d in np.ravel(shapes[vi.name]))
        if fixed is not None:
            for d, v in zip(declared_dims(vi), fixed):
                if isinstance(d, str):
                    given.setdefault(d, int(v))
    input_names = {vi.name for vi in real}
    for k, v in shapes.items():
        if k not in input_names and np.size(v) == 1:
            given.setdefault(k, int(np.ravel(v)[0]))
    batch_dims = _batch_dims(real)
    plan = FeedPlan(shapes={}, dims=dict(given), extent=extent, batch=batch)
    for vi in real:
        if vi.name in inputs:
            plan.shapes[vi.name] = tuple(np.shape(inputs[vi.name]))
            continue
        if vi.name in shapes:
            plan.shapes[vi.name] = tuple(int(d) for d in np.ravel(shapes[vi.name]))
            continue
        out = []
        for i, d in enumerate(declared_dims(vi)):
            if isinstance(d, int):
                out.append(d)
                continue
            key = d if d is not None else (vi.name, i)
            if key not in plan.dims:
                plan.dims[key] = batch if key in batch_dims else extent
                plan.chosen.append(d if d is not None else f"{vi.name}[{i}]")
            out.append(plan.dims[key])
        plan.shapes[vi.name] = tuple(out)
    plan.dims = {k: v for k, v in plan.dims.items() if isinstance(k, str)}
    return plan


def shape_candidates(model: onnx.ModelProto, shapes: dict | None = None, inputs: dict | None = None) -> list[FeedPlan]:
    """The shapes the validator tries, in order: the first plan whose convolutions all see
    more than their kernel centre, two larger ones, then that first one at batch 1."""
    first = plan_shapes(model, shapes, inputs)
    if not first.chosen:
        return [first]
    extents = [EXTENT]
    if plan_shapes(model, shapes, inputs, extent=EXTENT + 1).shapes != first.shapes:  # non-batch dims were chosen
        plans = {e: plan_shapes(model, shapes, inputs, extent=e) for e in (EXTENT << k for k in range(MAX_DOUBLINGS + 1))}
        sizes = [e for e, p in plans.items() if _fits(p)] or [EXTENT]
        start = next((i for i, e in enumerate(sizes) if _exercises(model, plans[e])), len(sizes) - 1)
        extents = sizes[start:start + 3]
    out, seen = [], set()
    for plan in [plan_shapes(model, shapes, inputs, extent=e) for e in extents] + \
            [plan_shapes(model, shapes, inputs, extent=extents[0], batch=1)]:
        key = tuple(sorted(plan.shapes.items()))
        if key not in seen:
            seen.add(key)
            out.append(plan)
    return out


SECOND_BATCH = 3  # batch of the second shape: odd, distinct from BATCH and from 1


def second_plan(model: onnx.ModelProto, plan: FeedPlan, shapes: dict | None = None,
                inputs: dict | None = None) -> FeedPlan | None:
    """The second shape each stage also runs at, when the validator chose symbolic dims:
    batch dims at 3, the other chosen dims at the next candidate size (twice `plan`'s), so
    that a pass that bakes the feed shape into constants shows. None when nothing was chosen
    (every dim fixed or given) or no other shape fits."""
    if not plan.chosen:
        return None
    batch = SECOND_BATCH if plan.batch != SECOND_BATCH else BATCH
    for extent in (plan.extent * 2, plan.extent):
        other = plan_shapes(model, shapes, inputs, extent=extent, batch=batch)
        if other.shapes != plan.shapes and _fits(other):
            return other
    return None


def _fits(plan: FeedPlan) -> bool:
    return all(np.prod(s, dtype=np.float64) <= MAX_FEED_ELEMENTS for s in plan.shapes.values())


def _exercises(model: onnx.ModelProto, plan: FeedPlan) -> bool:
    """Shape inference with `plan`'s shapes: does every conv/pool input reach past its kernel
    centre in every spatial dim? (True when shapes cannot be inferred: onnxruntime decides.)"""
    if not any(n.op_type in _CONV_LIKE for n in model.graph.node):
        return True
    from ..graph import attr, without_weights

    light = without_weights(model)
    for vi in light.graph.input:
        if vi.name in plan.shapes:
            shape = vi.type.tensor_type.shape
            for d, v in zip(shape.dim, plan.shapes[vi.name]):
                d.Clear()
                d.dim_value = int(v)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, data_prop=True)
    except Exception:
        return True
    known = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input):
        dims = vi.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            known[vi.name] = [d.dim_value for d in dims]
    for t in model.graph.initializer:
        known.setdefault(t.name, list(t.dims))
    for node in model.graph.node:
        if node.op_type not in _CONV_LIKE or not node.input or node.input[0] not in known:
            continue
        x = known[node.input[0]]
        if node.op_type.startswith("Conv") or node.op_type == "QLinearConv":
            w = known.get(node.input[3 if node.op_type == "QLinearConv" else 1])
            kernel = w[2:] if w else attr(node, "kernel_shape")
        else:
            kernel = attr(node, "kernel_shape")
        if not kernel:
            continue
        spatial = x[2:]
        dil = attr(node, "dilations") or [1] * len(kernel)
        pads = attr(node, "pads") or [0] * (2 * len(kernel))
        same = (attr(node, "auto_pad") or b"NOTSET") in (b"SAME_UPPER", b"SAME_LOWER", "SAME_UPPER", "SAME_LOWER")
        for i, (n, k) in enumerate(zip(spatial, kernel)):
            eff = (int(k) - 1) * int(dil[i] if i < len(dil) else 1) + 1
            if node.op_type == "ConvTranspose":
                continue  # every tap of a transposed conv meets every input element
            if same:
                if n < eff // 2 + 1:
                    return False
            elif eff > 1 and (n <= max(pads[i], pads[i + len(kernel)]) or n + pads[i] + pads[i + len(kernel)] < eff):
                return False
    return True


# ---- values ----------------------------------------------------------------------------
def _index_bounds(model: onnx.ModelProto, names: set[str]) -> dict[str, int]:
    """{integer input: size of the axis it indexes}, for inputs that reach a Gather's or a
    GatherElements' indices (through casts and reshapes) with a known axis size."""
    if not names:
        return {}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for k, i in enumerate(node.input):
            consumers.setdefault(i, []).append((node, k))
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    index = None
    bounds = {}
    for name in names:
        todo, seen, sizes = [name], set(), []
        while todo:
            t = todo.pop()
            if t in seen:
                continue
            seen.add(t)
            for node, k in consumers.get(t, []):
                if node.op_type in _PASS_THROUGH and k == 0:
                    todo.extend(node.output)
                elif node.op_type in ("Gather", "GatherElements") and k == 1:
                    from ..graph import GraphIndex, attr

                    axis = int(attr(node, "axis", 0))
                    dims = inits.get(node.input[0])
                    if dims is None:
                        index = index or GraphIndex(model)
                        ty = index.value_type(node.input[0])
                        if ty is not None and ty.tensor_type.HasField("shape"):
                            dims = [d.dim_value if d.HasField("dim_value") else None for d in ty.tensor_type.shape.dim]
                    if dims and -len(dims) <= axis < len(dims) and dims[axis]:
                        sizes.append(int(dims[axis]))
        if sizes:
            bounds[name] = min(sizes)
    return bounds


def make_draws(model: onnx.ModelProto, plan: FeedPlan, seed: int = 0, inputs: dict | None = None,
               count: int = DRAWS) -> list[dict[str, np.ndarray]]:
    """`count` seeded feed dicts for every real graph input (module docstring); `inputs`
    (e.g. from --inputs) are used as given in every draw. Only one draw when `inputs` gives
    every input: more draws of the same values prove nothing more."""
    from ..noise import noise_inputs, noise_feeds

    inputs = dict(inputs or {})
    extra = set(inputs) - {vi.name for vi in model.graph.input}
    if extra:
        raise NormfixError(f"--inputs names tensors that are not graph inputs: {', '.join(sorted(extra))}")
    noise_names = set(noise_inputs(model))
    real = real_inputs(model)
    generated = [vi for vi in real if vi.name not in inputs and vi.name not in noise_names]
    if not generated and not noise_names:
        count = 1
    for vi in generated:
        tt = vi.type.tensor_type
        if not _is_tensor(vi):
            kind = vi.type.WhichOneof("value")
            raise FeedsUnavailable(f"input {vi.name!r} is a {kind.replace('_type', '')}, not a tensor: test data cannot be "
                                   "generated; pass --inputs FILE.npz with its values or --no-validate")
        if tt.elem_type == onnx.TensorProto.STRING:
            raise FeedsUnavailable(f"input {vi.name!r} is a string tensor: test data cannot be generated; pass "
                                   "--inputs FILE.npz with its values (string arrays are accepted) or --no-validate")
        if tt.elem_type == 0:
            raise FeedsUnavailable(f"input {vi.name!r} has no element type: pass --inputs FILE.npz or --no-validate")
        shape = plan.shapes[vi.name]
        if np.prod(shape, dtype=np.float64) > MAX_FEED_ELEMENTS:
            raise NormfixError(f"input {vi.name!r} of shape {list(shape)} is too large to make test data for; "
                               "give a smaller --input-shape, real --inputs, or --no-validate")
    int_names = {vi.name for vi in generated
                 if np.issubdtype(onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type), np.integer)}
    bounds = _index_bounds(model, int_names)
    draws: list[dict] = []
    for k in range(count):
        rng = np.random.default_rng([int(seed), k])
        feeds: dict[str, np.ndarray] = {n: np.asarray(v) for n, v in inputs.items()}
        for vi in generated:
            elem = vi.type.tensor_type.elem_type
            dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
            shape = plan.shapes[vi.name]
            if np.issubdtype(dtype, np.floating) or elem == onnx.TensorProto.BFLOAT16:
                if k % 2 == 0:
                    value = rng.standard_normal(shape)
                else:
                    value = rng.uniform(*IMAGE_RANGE, size=shape)
                value = value.astype(dtype)
            elif dtype == np.bool_:
                value = ~draws[0][vi.name] if k == 1 else rng.random(shape) < 0.5
            elif np.issubdtype(dtype, np.integer):
                high = bounds.get(vi.name, SMALL_INT_RANGE[1])
                value = rng.integers(0, high, size=shape).astype(dtype)
            else:  # complex and friends
                value = rng.standard_normal(shape).astype(dtype)
            feeds[vi.name] = np.asarray(value)
        if noise_names:
            wanted = {n: plan.shapes[n] for n in noise_names if n in plan.shapes and n not in feeds}
            feeds.update(noise_feeds(model, seed=int(seed) + k, shapes=wanted))
        draws.append(feeds)
    return draws


def make_feeds(model: onnx.ModelProto, seed: int = 0, shapes: dict | None = None,
               inputs: dict | None = None) -> dict[str, np.ndarray]:
    """One seeded feed dict (draw 0 on the first candidate shapes): for callers that need
    a single run, e.g. the check against a `--reference`."""
    check_shape_names(model, shapes)
    return make_draws(model, shape_candidates(model, shapes, inputs)[0], seed, inputs, count=1)[0]
