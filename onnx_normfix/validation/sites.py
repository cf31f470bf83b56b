"""Site-local checks for graphs too large for a whole-model onnxruntime session.

The region around every rewrite site is extracted before and after the pass and run on
seeded draws of its real shapes; the sites of a stage share one small session per batch.
"""

from __future__ import annotations

import onnx

from ..errors import NormfixError
from . import feeds as feeds_mod
from .compare import compare_many, input_scale
from .feeds import Options
from .worker import run_draws


def extract_region(model: onnx.ModelProto, index, inputs: list[str], outputs: list[str],
                   max_nodes: int, value_type=None, position: dict | None = None) -> onnx.ModelProto | None:
    """The nodes computing `outputs` from `inputs` and constants, as a small model whose
    inputs are `inputs` (typed by `value_type`, default `index.value_type`). None if the
    region reaches a graph input not listed, is larger than `max_nodes`, or a type is unknown.
    `position` ({id(node): index in the graph}) keeps node order; pass it when extracting
    many regions of one model, so each costs time linear in its own size."""
    value_type = value_type or index.value_type
    stop = set(inputs) - set(outputs)
    nodes, seen, taken, todo = [], set(), set(), list(outputs)
    while todo:
        name = todo.pop()
        if name in seen or name in stop:
            continue
        seen.add(name)
        node = index.producer.get(name)
        if node is None:
            if name in index.initializers and name not in index.graph_inputs:
                continue
            return None  # a real graph input the site did not declare
        if id(node) in taken:
            continue
        taken.add(id(node))
        nodes.append(node)
        if len(nodes) > max_nodes:
            return None
        todo.extend(i for i in node.input if i)
    if position is None:
        position = {id(n): k for k, n in enumerate(model.graph.node)}
    nodes.sort(key=lambda n: position[id(n)])  # graph order is a topological order
    used = {i for n in nodes for i in n.input}
    g = onnx.helper.make_graph(nodes, "site", [], [onnx.helper.make_empty_tensor_value_info(o) for o in outputs],
                               [index.initializers[n] for n in used if n in index.initializers])
    for name in inputs:
        if name not in stop:
            continue
        t = value_type(name)
        if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
            return None
        vi = onnx.ValueInfoProto(name=name)
        vi.type.CopyFrom(t)
        g.input.append(vi)
    m = onnx.helper.make_model(g, opset_imports=list(model.opset_import))
    m.ir_version = model.ir_version
    m.functions.extend(model.functions)
    return m


def check_sites(before: onnx.ModelProto, after: onnx.ModelProto, sites, options: Options,
                max_nodes: int = 64, batch_sites: int = 500, dims: dict | None = None) -> dict:
    """Compare `before` and `after` only around the rewrite sites.

    `sites` is a list of (input tensor names, output tensor names) that exist in both
    models. Inputs get seeded draws of their inferred shapes (`dims`: the values the
    whole-model plan gave named symbolic dims; others as in `feeds.plan_shapes`), every draw
    in the one session of the batch. Sites are checked `batch_sites` at a time, one session per model and
    batch: onnxruntime's session set-up grows faster than linearly with the graph (1 s at
    10k nodes, 135 s at 100k), so bounded batches keep the whole check linear. Returns the
    comparison plus how many sites were checked."""
    from ..graph import GraphIndex

    sites = list(sites)
    if not any(site_out for _, site_out in sites):
        return {"ok": True, "sites": 0, "outputs": {}, "max_abs_diff": 0.0, "max_rel_diff": 0.0}
    bi, ai = GraphIndex(before), GraphIndex(after)
    # Site inputs exist in both models with the same types: infer shapes once, on the
    # smaller model.
    types = (ai if len(after.graph.node) <= len(before.graph.node) else bi).value_type
    result = {"ok": True, "sites": 0, "outputs": {}, "max_abs_diff": 0.0, "max_rel_diff": 0.0}
    pos_before = {id(n): k for k, n in enumerate(before.graph.node)}
    pos_after = {id(n): k for k, n in enumerate(after.graph.node)}
    for start in range(0, len(sites), batch_sites):
        batch = sites[start:start + batch_sites]
        # dicts as ordered sets: first-seen order, linear time
        ins = list(dict.fromkeys(n for site_in, _ in batch for n in site_in))
        outs = list(dict.fromkeys(n for _, site_out in batch for n in site_out))
        if not outs:
            continue
        limit = max_nodes * len(batch)
        sub_before = extract_region(before, bi, ins, outs, limit, types, pos_before)
        sub_after = extract_region(after, ai, ins, outs, limit, types, pos_after)
        if sub_before is None or sub_after is None:
            return {"ok": None, "sites": 0, "reason": "rewrite sites could not be isolated"}
        names = set(feeds_mod.symbolic_names(sub_before))
        site_dims = {k: v for k, v in {**(dims or {}), **(options.shapes or {})}.items() if k in names}
        # site inputs usually have static inferred shapes: nothing to choose or search
        candidates = feeds_mod.shape_candidates(sub_before, site_dims) if names else [feeds_mod.plan_shapes(sub_before)]
        for k, plan in enumerate(candidates):
            draws = feeds_mod.make_draws(sub_before, plan, options.seed + start, None, options.draws)
            try:
                old = run_draws(sub_before, draws)
                break
            except NormfixError:
                if k == len(candidates) - 1:
                    raise
        cmp = compare_many(old, run_draws(sub_after, draws), options.rtol, options.atol,
                           scales=[input_scale(d) for d in draws])
        result["ok"] = result["ok"] and cmp["ok"]
        result["outputs"].update(cmp["outputs"])
        result["max_abs_diff"] = max(result["max_abs_diff"], cmp["max_abs_diff"])
        result["max_rel_diff"] = max(result["max_rel_diff"], cmp["max_rel_diff"])
        result["sites"] += len(batch)
    return result
