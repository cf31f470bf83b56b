"""Random ops under the validator's control, and the independent proof of `replace_random`.

onnxruntime seeds unseeded random kernels once per process, so two runs of a random model may
agree by accident or disagree for no reason: random ops are never compared blindly.

* Shared random ops (same definition in both stages) are cut out of the new stage and fed
  what the old stage actually drew. `Dropout` in training mode counts as a random op; only
  its *mask* is carried over and the new stage recomputes `y = mask * x / (1 - ratio)` from
  its own `x`, so a pass that changes what feeds the Dropout is still seen. The wider-float
  reference that judges fp16/fp32 rounding (`compare`) is cut the same way, on the widened
  copy, and fed the same draws and masks: without it every fp16 fold before a training-mode
  Dropout was held to the plain element-wise test (fuzz seeds 10331, 11155, 14133).
* A noise input that `replace_random` made is fed noise computed from the *original* op's
  attributes and inputs, read from the previous stage's model (never from the pass's
  `InputBinding`, which could invert the very mistake it made): n = (t - mean) / scale,
  u = (t - low) / (high - low), Bernoulli u = p/2 where t else (1 + p)/2. A degenerate op
  (scale 0, low == high) draws nothing the output depends on: it gets fresh standard noise.
* `distribution_check`: the rewritten model fed fresh standard noise must reproduce the
  original's output distribution. Both run `DISTRIBUTION_RUNS` times; for each output, the
  runs' element means and element standard deviations must agree within
  `DISTRIBUTION_Z` standard errors (Welch, runs as the samples, so correlated elements
  cannot make the test too strict) plus 1e-3 of the output's spread.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..graph import RANDOM_OPS, attr

DISTRIBUTION_RUNS = 24
DISTRIBUTION_Z = 6.0  # P(|t| > 6) with 23 degrees of freedom is ~4e-6: no false alarms
MASK_SUFFIX = "__normfix_mask"


def _dropout_is_random(node, constants: dict) -> bool:
    if node.op_type != "Dropout" or len(node.input) < 3 or not node.input[2]:
        return False  # inference Dropout (opset < 12 has no training mode input: is_test)
    value = constants.get(node.input[2])
    return value is None or bool(np.ravel(value)[0])


def _constants(model: onnx.ModelProto) -> dict:
    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
           if len(t.dims) <= 1 and not t.external_data and int(np.prod(t.dims)) <= 16}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].type == onnx.AttributeProto.TENSOR:
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return out


def is_random(node, constants: dict) -> bool:
    if node.domain not in ("", "ai.onnx"):
        return False
    return node.op_type in RANDOM_OPS or _dropout_is_random(node, constants)


def random_nodes(model: onnx.ModelProto) -> dict[str, bytes]:
    """{output name: the random node's definition (op, inputs, sorted attributes)}: a
    random op is the same across two stages only if its definition is. A training-mode
    Dropout is listed by its first output."""
    found = {}
    constants = None
    for n in model.graph.node:
        if n.op_type in RANDOM_OPS or n.op_type == "Dropout":
            constants = constants if constants is not None else _constants(model)
            if not is_random(n, constants):
                continue
            d = onnx.NodeProto(op_type=n.op_type, domain=n.domain, input=n.input)
            d.attribute.extend(sorted(n.attribute, key=lambda a: a.name))
            outs = n.output[:1] if n.op_type == "Dropout" else n.output
            found.update({o: d.SerializeToString() for o in outs if o})
    return found


def _dropouts(model: onnx.ModelProto, names) -> dict:
    names = set(names)
    return {n.output[0]: n for n in model.graph.node if n.op_type == "Dropout" and n.output and n.output[0] in names}


def capture_names(model: onnx.ModelProto, shared) -> dict[str, str]:
    """{shared random output: tensor to capture from the old stage}: itself, or for a
    Dropout its mask (named `<y>__normfix_mask` where the node does not output it)."""
    drops = _dropouts(model, shared)
    out = {}
    for name in shared:
        node = drops.get(name)
        out[name] = (node.output[1] if len(node.output) > 1 and node.output[1] else name + MASK_SUFFIX) if node else name
    return out


def with_masks(model: onnx.ModelProto, shared) -> onnx.ModelProto:
    """`model` with every shared Dropout outputting its mask (a copy if any is missing)."""
    drops = {y: n for y, n in _dropouts(model, shared).items() if len(n.output) < 2 or not n.output[1]}
    if not drops:
        return model
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for n in m.graph.node:
        if n.op_type == "Dropout" and n.output and n.output[0] in drops:
            if len(n.output) < 2:
                n.output.append(n.output[0] + MASK_SUFFIX)
            else:
                n.output[1] = n.output[0] + MASK_SUFFIX
    return m


def cut_random(model: onnx.ModelProto, draws: dict[str, np.ndarray], masks: dict[str, str] | None = None) -> onnx.ModelProto:
    """A copy where the random nodes producing `draws` are removed and those tensors become
    graph inputs, so the caller can feed what the previous stage drew. A shared Dropout
    (`masks`: {its first output: the draws' key holding its mask}) keeps computing from its
    own input, with the mask fed."""
    masks = dict(masks or {})
    constants = _constants(model) if masks else {}
    names = set(draws)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    kept, index = [], None
    for n in m.graph.node:
        if n.op_type == "Dropout" and n.output and n.output[0] in masks:
            if index is None:
                from ..graph import GraphIndex

                index = GraphIndex(model)
            mask = masks[n.output[0]]
            kept.extend(_dropout_from_mask(n, mask, constants, index))
            if len(n.output) > 1 and n.output[1] and n.output[1] != mask:
                kept.append(helper.make_node("Identity", [mask], [n.output[1]]))
            continue
        if n.op_type in RANDOM_OPS and set(n.output) & names:
            continue
        kept.append(n)
    del m.graph.node[:]
    m.graph.node.extend(kept)
    m.graph.input.extend(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(draws[name].dtype),
                                                       draws[name].shape) for name in sorted(names))
    return m


def _dropout_from_mask(node, mask: str, constants: dict, index) -> list:
    """y = Where(mask, x / (1 - ratio), 0): Dropout's training-mode output for a given mask."""
    x, y = node.input[0], node.output[0]
    t = index.value_type(x)
    elem = t.tensor_type.elem_type if t is not None and t.tensor_type.elem_type else onnx.TensorProto.FLOAT
    dtype = helper.tensor_dtype_to_np_dtype(elem)
    ratio = node.input[1] if len(node.input) > 1 and node.input[1] else None
    r = 0.5 if ratio is None else constants.get(ratio)
    nodes, base = [], f"{y}__normfix"
    if r is not None:
        keep = helper.make_tensor(f"{base}_scale", elem, [], [float(1.0 / (1.0 - float(np.ravel(r)[0])))]
                                  if float(np.ravel(r)[0]) < 1 else [0.0])
        nodes.append(helper.make_node("Constant", [], [f"{base}_scale"], value=keep))
        nodes.append(helper.make_node("Mul", [x, f"{base}_scale"], [f"{base}_scaled"]))
    else:
        rt = index.value_type(ratio)
        relem = rt.tensor_type.elem_type if rt is not None and rt.tensor_type.elem_type else onnx.TensorProto.FLOAT
        nodes.append(helper.make_node("Constant", [], [f"{base}_one"], value=helper.make_tensor("v", relem, [], [1.0])))
        nodes.append(helper.make_node("Sub", [f"{base}_one", ratio], [f"{base}_keep"]))
        nodes.append(helper.make_node("Cast", [f"{base}_keep"], [f"{base}_keep_t"], to=elem))
        nodes.append(helper.make_node("Div", [x, f"{base}_keep_t"], [f"{base}_scaled"]))
    nodes.append(helper.make_node("Constant", [], [f"{base}_zero"], value=helper.make_tensor("v", elem, [], np.zeros(1, dtype).tolist())))
    nodes.append(helper.make_node("Where", [mask, f"{base}_scaled", f"{base}_zero"], [y]))
    return nodes


# ---- replace_random, proven independently --------------------------------------------
def original_node(before: onnx.ModelProto, entry: dict):
    """The random op of the previous stage that a noise input replaced, or None."""
    out = entry.get("output")
    for n in before.graph.node:
        if out in n.output and n.op_type in ("RandomNormal", "RandomNormalLike", "RandomUniform",
                                              "RandomUniformLike", "Bernoulli"):
            return n
    return None


def original_needs(node) -> tuple[str, ...]:
    return (node.output[0], node.input[0]) if node.op_type == "Bernoulli" else (node.output[0],)


def noise_from_original(node, captured: dict, dtype) -> np.ndarray | None:
    """The standard noise that makes the rewritten model draw what `node` drew, from the
    node's own attributes; None for a degenerate op (its output ignores the noise)."""
    dtype = np.dtype(dtype)
    t = np.asarray(captured[node.output[0]])
    if node.op_type == "Bernoulli":
        p = np.asarray(captured[node.input[0]], np.float64)
        return np.where(t != 0, p / 2, (1 + p) / 2).astype(dtype)
    if node.op_type.startswith("RandomNormal"):
        mean, scale = float(attr(node, "mean", 0.0)), float(attr(node, "scale", 1.0))
        if scale == 0:
            return None
        return ((t.astype(np.float64) - mean) / scale).astype(dtype)
    low, high = float(attr(node, "low", 0.0)), float(attr(node, "high", 1.0))
    if high == low:
        return None
    u = ((t.astype(np.float64) - low) / (high - low)).astype(dtype)
    return np.clip(u, 0, np.nextafter(dtype.type(1), dtype.type(0)))


def impossible(node, captured: dict) -> int:
    """How many of a Bernoulli's captured draws the ONNX spec rules out (1 where p == 0, 0
    where p == 1). onnxruntime 1.32 draws 1 with probability 1 - p, so saturated p shows it."""
    if node.op_type != "Bernoulli":
        return 0
    t = np.asarray(captured[node.output[0]]) != 0
    p = np.asarray(captured[node.input[0]], np.float64)
    return int(np.count_nonzero((t & (p <= 0)) | (~t & (p >= 1))))


def bernoulli_probe_model() -> onnx.ModelProto:
    """Bernoulli(p = 0) on 64 elements: by the ONNX spec every output is 0."""
    g = helper.make_graph([helper.make_node("Bernoulli", ["p"], ["t"])], "probe",
                          [helper.make_tensor_value_info("p", onnx.TensorProto.FLOAT, [64])],
                          [helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, [64])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])
    m.ir_version = 8
    return m


def distribution_check(old_runs: list[dict], new_runs: list[dict]) -> dict:
    """Compare the output distributions of two lists of runs (module docstring)."""
    figures, ok, reason = {}, True, None
    for name in old_runs[0]:
        if name not in new_runs[0]:
            continue
        a = [np.asarray(r[name]) for r in old_runs]
        b = [np.asarray(r[name]) for r in new_runs]
        if any(x.dtype.kind not in "biuf" and x.dtype.name != "bfloat16" for x in a + b) or not a[0].size:
            continue
        if any(x.shape != a[0].shape for x in a + b):
            continue  # shapes are the element-wise check's job
        am = np.array([x.astype(np.float64).mean() for x in a])
        bm = np.array([x.astype(np.float64).mean() for x in b])
        spread = float(np.concatenate([x.astype(np.float64).ravel() for x in a]).std())
        entry = {"runs": len(a), "mean_old": float(am.mean()), "mean_new": float(bm.mean())}
        tests = [("mean", am, bm)]
        if a[0].size > 1:
            asd = np.array([x.astype(np.float64).std() for x in a])
            bsd = np.array([x.astype(np.float64).std() for x in b])
            entry.update(std_old=float(asd.mean()), std_new=float(bsd.mean()))
            tests.append(("std", asd, bsd))
        for what, x, y in tests:
            se = np.sqrt(x.var(ddof=1) / len(x) + y.var(ddof=1) / len(y))
            gap = abs(x.mean() - y.mean())
            if gap > DISTRIBUTION_Z * se + 1e-3 * spread + 1e-12:
                ok = False
                reason = reason or (f"output {name!r}: {what} over {len(x)} runs is {y.mean():.4g}, the original's "
                                    f"{x.mean():.4g} (more than {DISTRIBUTION_Z:g} standard errors {se:.3g} apart)")
        figures[name] = entry
    return {"ok": ok, "reason": reason, "outputs": figures}
