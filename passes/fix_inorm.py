"""fix_inorm: give InstanceNorm(track_running_stats=True) its running statistics back.

In eval mode such a norm is a per-channel affine map, i.e. a BatchNormalization over C:
    y = (x - running_mean[c]) / sqrt(running_var[c] + eps) * weight[c] + bias[c]

1. Old style (torch <= 1.9, or a track_running_stats=False twin): the stats are gone.

       x -> InstanceNormalization(scale, B)    =>    x -> BatchNormalization(scale, B, mean, var)

   Same epsilon; mean/var come from `stats` (a checkpoint, read by `prepare`) matched to each
   node by initializer name, scope, weight values or, for affine=False, order (see
   onnx_normfix/stats_match.py), or are estimated from `calibration_data`. This CHANGES the
   outputs on purpose (they now match PyTorch eval). Declines, with an error listing the nodes
   and nothing rewritten, when a node has no stats, ambiguous ones or the wrong channel count
   (`allow_partial` fixes the others and notes the rest).

2. Exporter patterns (no stats needed, outputs preserved):

       x[N,C,*] -> Reshape[1,N*C,*] -> BatchNormalization(N*C) -> Reshape[N,C,*]
                                        ^ scale/B/mean/var tiled N times: TorchScript
                                          Constant/ConstantOfShape/Expand/Tile chains,
                                          dynamo pre-tiled initializers or Shape -> Tile
       =>  x[N,C,*] -> BatchNormalization(C)

   The last Reshape may be missing at N=1. Declines (noted) when a tiled parameter is not N
   identical copies, the Reshapes do not merge exactly N and C, or the BN is in training mode.
   `dynamic_batch` then makes the batch axis of inputs and outputs symbolic; it is an error
   when another node still fixes the batch size (e.g. a Reshape to [2, ...]).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import onnx

from onnx_normfix.errors import NormfixError
from onnx_normfix.graph import GraphIndex, without_weights, opset_of, set_attr, stamp
from onnx_normfix.registry import Declined, Option, Pass, PassContext, PassResult, register_pass
from onnx_normfix.stats_match import HOW_TO_DISAMBIGUATE, match_modules, norm_nodes, scope_paths

from ._fix_inorm_patterns import TiledNorm, find_tiled_norm

NAME = "fix_inorm"
BATCH_DIM = "batch"
# an ambiguous affine=False matching is searched against a reference up to this many
# assignments (each costs one onnxruntime session on the whole model)
MAX_ASSIGNMENTS = 120


# A checkpoint without any running statistics: its InstanceNorms are correct as exported.
class _NoStats(tuple):
    pass


NO_STATS = _NoStats()
PER_INSTANCE = ("correct as exported if the module had track_running_stats=False (PyTorch's default: "
                "statistics of each instance); if it had running stats, give --stats CKPT or --calibration-data FILE.npz")


class CalibratedStats(dict):
    """{InstanceNormalization input: (mean, var)} estimated by `prepare` from sample inputs."""


def _prepare(model: onnx.ModelProto, options: dict) -> dict:
    """Read the checkpoint and run the calibration (file I/O and onnxruntime live here)."""
    from onnx_normfix.stats import estimate_stats, load_stats, stats_from_arrays

    from onnx_normfix.stats import NoRunningStats

    opts = dict(options)
    stats = opts.get("stats")
    try:
        if isinstance(stats, (str, os.PathLike)):
            opts["stats"] = load_stats(stats, key=opts.get("stats_key"))
        elif isinstance(stats, Mapping):
            opts["stats"] = stats_from_arrays(dict(stats), key=opts.get("stats_key"))
    except NoRunningStats:  # InstanceNorm(track_running_stats=False): nothing to restore
        opts["stats"] = NO_STATS
    data = opts.get("calibration_data")
    if data is not None and not isinstance(data, CalibratedStats):
        tensors = [n.input[0] for n in model.graph.node if n.op_type == "InstanceNormalization"]
        if isinstance(data, (str, os.PathLike)):
            try:
                with np.load(data, allow_pickle=False) as archive:
                    data = {k: archive[k] for k in archive.files}
            except Exception as exc:
                raise NormfixError(f"--calibration-data {data}: cannot read as .npz ({exc})") from None
        opts["calibration_data"] = CalibratedStats(estimate_stats(model, data, tensors) if tensors else {})
    if opts.get("stats") and opts.get("reference") is not None and opts.get("inputs") is not None:
        opts["inorm_search"] = _search_assignments(model, opts)
    return opts


def _modules_option(value) -> dict:
    """inorm_modules: {node: module}, or ["NODE=MODULE", ...] as the CLI gives it."""
    if not value:
        return {}
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    mapping = {}
    for item in [value] if isinstance(value, str) else value:
        node, sep, module = str(item).rpartition("=")
        if not sep or not node or not module:
            raise NormfixError(f"--inorm-module {item!r}: expected NODE=MODULE (a node name and a checkpoint module)")
        mapping[node] = module
    return mapping


def _search_assignments(model: onnx.ModelProto, opts: dict) -> dict:
    """Settle ambiguous affine=False matches against the caller's reference: run every
    assignment of the ambiguous modules (bounded) and keep the one that reproduces it.
    Returns {"decided": {label: module}, "tried": n, "note": str}."""
    import itertools

    from onnx_normfix import validate as V
    from onnx_normfix.pipeline import _load_arrays

    ix = GraphIndex(model)
    nodes = norm_nodes(ix)
    matched, _, groups = match_modules(ix, nodes, list(opts["stats"]), _modules_option(opts.get("inorm_modules")))
    if not groups:
        return {}
    choices = [list(itertools.permutations(g.modules, len(g.nodes))) for g in groups]
    total = int(np.prod([len(c) for c in choices]))
    described = "; ".join(g.describe() for g in groups)
    if total > MAX_ASSIGNMENTS:
        return {"note": f"{total} assignments for {described}: more than {MAX_ASSIGNMENTS} to try against the reference"}
    if V.random_nodes(model):
        return {"note": "the model draws random numbers: assignments cannot be compared with the reference"}
    inputs = _load_arrays(opts["inputs"], "--inputs")
    feeds = V.make_feeds(model, opts.get("seed", 0), None, inputs)
    ref = opts["reference"]
    expected = {k: np.asarray(v) for k, v in (ref(feeds) if callable(ref) else _load_arrays(ref, "--reference")).items()}
    fits, best = [], None
    for combo in itertools.product(*choices):
        decided = {n.label: m.name for g, mods in zip(groups, combo) for n, m in zip(g.nodes, mods)}
        trial = onnx.ModelProto()
        trial.CopyFrom(model)
        _run(trial, PassContext(options={**opts, "inorm_decided": decided, "allow_partial": True, "dynamic_batch": False}))
        try:
            got = V.run_model(trial, feeds)
        except V.RuntimeUnavailable as exc:
            return {"note": f"onnxruntime cannot run the candidates ({exc})"}
        if not set(expected) <= set(got):
            return {"note": "the reference names outputs the model does not have"}
        cmp = V.compare(expected, {k: got[k] for k in expected})
        best = cmp["max_abs_diff"] if best is None else min(best, cmp["max_abs_diff"])
        if cmp["ok"]:
            fits.append(decided)
    by_name = {m.name: m for m in opts["stats"]}

    def stats_of(decided):
        return [(by_name[decided[k]].running_mean.tobytes(), by_name[decided[k]].running_var.tobytes()) for k in sorted(decided)]

    if fits and all(stats_of(f) == stats_of(fits[0]) for f in fits):  # one model, however reached
        return {"decided": fits[0], "tried": total}
    if fits:
        return {"note": f"{len(fits)} of {total} assignments reproduce the reference for {described}"}
    return {"note": f"none of the {total} assignments for {described} reproduces the reference "
                    f"(closest: max abs diff {best:.3g})"}


def _run(model: onnx.ModelProto, ctx: PassContext) -> PassResult:
    opts = ctx.options
    ix = GraphIndex(model)
    result = PassResult(details={"norms": [], "patterns": []})
    old_style = _plan_old_style(ix, opts, result)
    patterns = []
    for bn in [n for n in model.graph.node if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx")]:
        found = find_tiled_norm(ix, bn)
        if isinstance(found, Declined):
            result.decline(found, bn.name or "BatchNormalization")
        elif found is not None:
            patterns.append(found)

    # all decisions made: now rewrite (queued; one commit, which sweeps only if something changed)
    for n, stem, mean, var in old_style:
        _to_batchnorm(ix, n.node, stem, mean, var)
    for site in patterns:
        _collapse(ix, site)
        result.details["patterns"].append({"node": site.bn.name, "exporter": site.exporter,
                                           "channels": site.channels, "batch": site.batch})
    ix.commit()  # nothing rewritten: the graph stays as it came
    result.rewrites = len(old_style) + len(patterns)
    result.changes_outputs = bool(old_style)
    if patterns:
        result.notes.append(f"collapsed {len(patterns)} exported InstanceNorm pattern(s) into BatchNormalization over C")
    if opts.get("dynamic_batch"):
        result.details["dynamic_batch"] = _make_batch_dynamic(model)
        result.notes.append(result.details["dynamic_batch"])
    return result


def _plan_old_style(ix: GraphIndex, opts, result: PassResult) -> list:
    """[(NormNode, module name or None, mean, var)] for every InstanceNormalization, or NormfixError."""
    nodes = norm_nodes(ix)
    if not nodes:
        if opts.get("stats") is not None or opts.get("calibration_data") is not None:
            result.notes.append("stats/calibration data unused: no InstanceNormalization node lost its statistics")
        return []
    stats, calibrated = opts.get("stats"), opts.get("calibration_data")
    if isinstance(stats, (str, os.PathLike)) or (calibrated is not None and not isinstance(calibrated, CalibratedStats)):
        raise NormfixError("fix_inorm: files are read by the pass's prepare step; run it through onnx_normfix.optimize")
    if isinstance(stats, Mapping):
        from onnx_normfix.stats import NoRunningStats, stats_from_arrays

        try:
            stats = stats_from_arrays(dict(stats), key=opts.get("stats_key"))
        except NoRunningStats:
            stats = NO_STATS
    listing = ", ".join(n.label for n in nodes[:10]) + (" ..." if len(nodes) > 10 else "")
    if stats is None and calibrated is None:
        if opts.get("allow_partial"):
            raise NormfixError("fix_inorm: --allow-partial needs --stats or --calibration-data to match against")
        result.notes.append(f"left {len(nodes)} InstanceNormalization node(s) without running stats ({listing}): "
                            f"{PER_INSTANCE}")
        return []
    if stats is NO_STATS and calibrated is None:
        result.notes.append(f"left {len(nodes)} InstanceNormalization node(s) as exported ({listing}): the checkpoint "
                            "holds no running statistics, so its norms had track_running_stats=False and normalize "
                            "per instance: nothing to restore")
        return []
    search = opts.get("inorm_search") or {}
    decided = opts.get("inorm_decided") or search.get("decided")
    matched, reasons, _ = match_modules(ix, nodes, list(stats or []), _modules_option(opts.get("inorm_modules")), decided)
    if search.get("note"):
        reasons = {k: (f"{v} (tried against the reference: {search['note']})" if v.startswith("ambiguous") else v)
                   for k, v in reasons.items()}
    plain = getattr(stats, "without_stats", frozenset())
    plan, unmatched, per_instance = [], {}, []
    for n in nodes:
        if n.label not in matched and not (calibrated and n.node.input[0] in calibrated) and (
                {*scope_paths(n.node), n.node.input[1].rsplit(".", 1)[0]} & plain):
            per_instance.append(n.label)  # the checkpoint has its weights, no running stats
        elif n.label in matched:
            module, method = matched[n.label]
            plan.append((n, module.name, module.running_mean, module.running_var))
            if method == "reference":
                method = f"reference ({search.get('tried', 1)} assignments tried, one reproduces it)"
            result.details["norms"].append({"node": n.label, "module": module.name, "method": method, "channels": n.channels})
        elif calibrated and n.node.input[0] in calibrated:
            plan.append((n, None, *calibrated[n.node.input[0]]))
            result.details["norms"].append({"node": n.label, "module": None, "method": "calibration (estimate)",
                                            "channels": n.channels})
        else:
            unmatched[n.label] = reasons.get(n.label, "no stats given") if stats is not None else "no stats given"
    if per_instance:
        result.details["per_instance"] = per_instance
        result.notes.append(f"left {len(per_instance)} InstanceNormalization node(s) as exported "
                            f"({', '.join(per_instance[:10])}{' ...' if len(per_instance) > 10 else ''}): the checkpoint "
                            "holds their weights but no running statistics (track_running_stats=False): nothing to restore")
    if unmatched:
        by_reason: dict = {}
        for label, why in unmatched.items():  # a group of ambiguous nodes shares one reason
            by_reason.setdefault(why, []).append(label)
        listing = "; ".join(f"{', '.join(labels)}: {why}" for why, labels in by_reason.items())
        if any(why.startswith("ambiguous") for why in by_reason):
            listing += (". Checkpoint order is no evidence (modules register in another order than they run; "
                        f".safetensors sorts keys by name): {HOW_TO_DISAMBIGUATE}")
        result.details["unmatched"] = unmatched
        if opts.get("allow_partial") and not plan:
            raise NormfixError(f"fix_inorm: --allow-partial, but none of the {len(unmatched)} InstanceNormalization "
                               f"node(s) matched the given statistics: {listing}")
        if not opts.get("allow_partial"):
            ambiguous = any(why.startswith("ambiguous") for why in by_reason)
            hint = " (are these stats from another model?)" if not matched and stats and not ambiguous else ""
            raise NormfixError(f"fix_inorm: no usable running statistics for {len(unmatched)} of {len(nodes)} "
                               f"InstanceNormalization node(s){hint}: {listing}. Nothing was rewritten; "
                               "--allow-partial fixes the others")
        result.notes.append(f"left {len(unmatched)} InstanceNormalization node(s) without stats: {listing}")
    return plan


def _dtype(ix: GraphIndex, name: str):
    value = ix.constant(name)
    return value.dtype if value is not None else np.float32


def _to_batchnorm(ix: GraphIndex, node: onnx.NodeProto, stem: str | None, mean, var) -> None:
    """A BatchNormalization takes the InstanceNormalization's place: same inputs and output,
    same epsilon and scope metadata; mean/var named after the module."""
    dtype = _dtype(ix, node.input[1])
    base = node.name.replace("InstanceNormalization", "BatchNormalization") if node.name else "BatchNormalization"
    stem = stem or base
    mean_name = ix.add_initializer(np.asarray(mean).reshape(-1).astype(dtype), f"{stem}.running_mean")
    var_name = ix.add_initializer(np.asarray(var).reshape(-1).astype(dtype), f"{stem}.running_var")
    bn = _like(node, "BatchNormalization", [*node.input, mean_name, var_name], node.output, ix.unique_name(base),
               keep=lambda a: True)
    if opset_of(ix.model) < 7:
        set_attr(bn, "is_test", 1)  # BN-6 and older default to training mode
    ix.replace(node, [bn])


def _collapse(ix: GraphIndex, site: TiledNorm) -> None:
    """One BatchNormalization over C replaces Reshape -> BN(N*C) -> Reshape; parameters
    reuse the tensors the chains tiled where there is one (names like "norm.weight")."""
    base = next(iter(scope_paths(site.bn)), site.bn.name or "instance_norm")
    names = [src or ix.add_initializer(value.astype(_dtype(ix, site.bn.input[1 + k])), f"{base}.{role}")
             for k, (role, value, src) in enumerate(zip(("weight", "bias", "running_mean", "running_var"),
                                                        site.params, site.sources))]
    bn = _like(site.bn, "BatchNormalization", [site.x, *names], [site.out], site.bn.name,
               keep=lambda a: a.name in ("epsilon", "momentum"))
    ix.replace(site.bn, [bn])
    if site.tail is not None:
        ix.remove(site.tail)  # the Reshape before dies in the sweep unless something else reads it


def _like(node: onnx.NodeProto, op_type: str, inputs, outputs, name: str, keep) -> onnx.NodeProto:
    """A new `op_type` node with `node`'s domain, the attributes `keep` accepts and its
    metadata (dynamo's scope), stamped as fix_inorm's."""
    new = onnx.helper.make_node(op_type, list(inputs), list(outputs), name=name, domain=node.domain)
    new.attribute.extend(a for a in node.attribute if keep(a))
    new.metadata_props.extend(node.metadata_props)
    return stamp(new, NAME)


def _make_batch_dynamic(model: onnx.ModelProto) -> str:
    """Symbolic batch axis on inputs and outputs, or NormfixError naming what still fixes it."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    inputs = [i for i in g.input if i.name not in inits]
    dims0 = [i.type.tensor_type.shape.dim[0] if i.type.tensor_type.shape.dim else None for i in inputs]
    if all(d is not None and not d.HasField("dim_value") for d in dims0):
        return "dynamic batch: the batch axis is already symbolic"
    sizes = {d.dim_value for d in dims0 if d is not None and d.HasField("dim_value")}
    if None in dims0 or len(sizes) != 1:
        raise NormfixError(f"--dynamic-batch: cannot tell the batch axis; the inputs' first dims are {sorted(sizes)}")
    batch = sizes.pop()
    probe = without_weights(model)
    for vi in probe.graph.input:
        if vi.name not in inits:
            vi.type.tensor_type.shape.dim[0].dim_param = BATCH_DIM
    for vi in probe.graph.output:
        vi.type.tensor_type.ClearField("shape")
    del probe.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, data_prop=True).graph
    except Exception as exc:
        raise NormfixError(f"--dynamic-batch: shape inference fails with a symbolic batch ({exc})") from None
    types = {vi.name: vi.type.tensor_type for vi in (*inferred.input, *inferred.value_info, *inferred.output)}

    def batched(name):
        t = types.get(name)
        return t is not None and t.HasField("shape") and len(t.shape.dim) > 0 and t.shape.dim[0].dim_param == BATCH_DIM

    ix = GraphIndex(model)
    blockers = [n.name or n.op_type for n in g.node if n.op_type == "Reshape" and batched(n.input[0])
                and (shape := ix.constant(n.input[1])) is not None and shape.size and shape.reshape(-1)[0] > 0]
    blockers += [f"output {o.name}" for o in g.output if not batched(o.name)]
    if blockers:
        raise NormfixError(f"--dynamic-batch: the batch size {batch} is still fixed by {', '.join(blockers[:5])}"
                           f"{' ...' if len(blockers) > 5 else ''}; left static (drop --dynamic-batch)")
    input_names = {i.name for i in inputs}
    for vi in [*inputs, *g.output, *g.value_info]:
        dims = vi.type.tensor_type.shape.dim
        if dims and (vi.name in input_names or batched(vi.name)):
            dims[0].dim_param = BATCH_DIM
    return f"dynamic batch: the batch axis (was {batch}) is now '{BATCH_DIM}' on {len(inputs)} input(s) and {len(g.output)} output(s)"


PASS = register_pass(Pass(
    name=NAME,
    summary="restore InstanceNorm running stats (old-style exports) and collapse the exporters' "
            "Reshape/BatchNormalization(N*C)/Reshape patterns into BatchNormalization over C",
    preserves_outputs=True,  # the pattern collapse does; an old-style repair sets changes_outputs
    run=_run,
    options=[
        Option("stats", None, str, "checkpoint with the InstanceNorm running stats (.pt/.pth/.ckpt/.npz/.safetensors)",
               metavar="CKPT", file=True),
        Option("stats_key", None, str, "which part of the checkpoint holds the model (e.g. G, or a/b/G)", metavar="KEY"),
        Option("calibration_data", None, str, "estimate running stats from sample inputs (no checkpoint)",
               metavar="FILE.npz", file=True),
        Option("allow_partial", False, bool, "fix the norms that match, leave the rest (noted in the report)"),
        Option("dynamic_batch", False, bool, "make the batch dimension symbolic again where norms fixed it"),
        Option("inorm_modules", None, str, "take this checkpoint module's stats for this InstanceNormalization node "
               "(repeatable); settles norms that channel counts cannot tell apart", metavar="NODE=MODULE",
               flag="--inorm-module", repeatable=True),
    ],
    # the caller's inputs/reference (core options) settle ambiguous affine=False matches
    reads={"inputs", "reference"},
    prepare=_prepare,
    # BatchNormalizations it makes are folded by fold_bn; InstanceNormalizations other passes
    # make (fuse_norms) reach it; random ops are replaced first, so calibration is deterministic
    creates={"BatchNormalization"},
    runs_after_creators_of={"InstanceNormalization"},
    runs_after={"replace_random"},
    outputs_note="changes outputs when it restores running stats (old style, on purpose); "
                 "preserves them when it collapses exporter patterns",
))
