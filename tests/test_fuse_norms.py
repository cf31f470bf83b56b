"""fuse_norms: every exporter variant fuses (numbers equal on onnxruntime), every unsafe twin declines.

Hand-built graphs (tests/norm_graphs.py) cover one variant each; real PyTorch exports
(fixtures/_norm_models.py, exported once per module) prove the end-to-end claim: after
`fuse_norms,fold_bn` no decomposed norm is left and the outputs match PyTorch.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto as T

import onnx_normfix
from conftest import FIXTURES
from helpers import count_ops, ort_run
from norm_graphs import build, reference
from onnx_normfix.errors import NormfixError
from onnx_normfix.passes.fuse_norms import PASS
from onnx_normfix.passes.raise_opset import PASS as RAISE
from onnx_normfix.registry import PassContext

NP = {T.FLOAT: np.float32, T.FLOAT16: np.float16, T.DOUBLE: np.float64}
TOL = {T.FLOAT: (1e-4, 1e-5), T.DOUBLE: (1e-6, 1e-7), T.FLOAT16: (1e-2, 4e-3)}  # fp16: 2 ulp at |y|~2
DECOMPOSED = {"ReduceMean", "Pow", "Sqrt", "Reciprocal", "Sub"}


def feeds_for(model, seed=0):
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in model.graph.input:
        shape = [d.dim_value for d in i.type.tensor_type.shape.dim]
        feeds[i.name] = (rng.standard_normal(shape) * 2 + 0.5).astype(NP[i.type.tensor_type.elem_type])
    if "eps" in feeds:
        feeds["eps"] = np.abs(feeds["eps"])
    return feeds


def run_pass(model, p=PASS, **options):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    result = p.run(out, PassContext(options={"target_opset": None, **options}))
    return out, result


def assert_fuses(model, ops, rewrites=1):
    after, result = run_pass(model)
    assert result.rewrites == rewrites, result.notes
    onnx.checker.check_model(after, full_check=True)
    assert count_ops(after) == ops
    assert [i.name for i in after.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in after.graph.output] == [o.name for o in model.graph.output]
    feeds = feeds_for(model)
    want, got = ort_run(model, feeds), ort_run(after, feeds)
    dtype = model.graph.input[0].type.tensor_type.elem_type
    rtol, atol = TOL[dtype]
    for k in want:
        np.testing.assert_allclose(got[k].astype(np.float64), want[k].astype(np.float64), rtol=rtol, atol=atol, err_msg=k)
    assert all(n.doc_string == "onnx_normfix:fuse_norms" for n in after.graph.node if n.op_type.endswith("Normalization"))
    return after, result


def assert_declines(model, why):
    after, result = run_pass(model)
    assert result.rewrites == 0
    assert any(why in note for note in result.notes), result.notes
    assert count_ops(after) == count_ops(model)
    return result


LN, RMS = {"LayerNormalization": 1}, {"RMSNormalization": 1}
FUSES = {  # name: (build kwargs, ops after)
    "layernorm": (dict(), LN),
    "layernorm_mul_square": (dict(square="mul"), LN),
    "layernorm_exp_double": (dict(exp_dtype=T.DOUBLE), LN),
    "layernorm_recip": (dict(normalize="recip"), LN),
    "layernorm_div_one": (dict(normalize="div1"), LN),
    "layernorm_pow_half": (dict(root="pow"), LN),
    "layernorm_pow_minus_half": (dict(normalize="rsqrt_pow"), LN),
    "layernorm_no_eps": (dict(eps=None), LN),
    "layernorm_w_first": (dict(affine="wx"), LN),
    "layernorm_bias_only": (dict(affine="bias"), LN),
    "layernorm_scale_only": (dict(affine="scale"), LN),
    "layernorm_no_affine": (dict(affine="none"), {"LayerNormalization": 1, "Identity": 1}),
    "layernorm_two_axes": (dict(shape=(2, 3, 4, 5), axes=[-2, -1]), LN),
    "layernorm_positive_axes": (dict(shape=(2, 3, 4, 5), axes=[2, 3]), LN),
    "layernorm_axes_input": (dict(opset=18), LN),
    "layernorm_axes_constant_node": (dict(opset=18, axes_mode="constant"), LN),
    "layernorm_axes_reshape_constant": (dict(opset=18, axes_mode="reshape_const"), LN),
    "layernorm_keepdims_explicit": (dict(keepdims=1), LN),
    "layernorm_duplicated_sub": (dict(opset=18, dup_sub=True), LN),
    "layernorm_fp16": (dict(dtype=T.FLOAT16, exp_dtype=T.FLOAT16), LN),
    "layernorm_double": (dict(dtype=T.DOUBLE), LN),
    "layernorm_fp16_double_casts": (dict(dtype=T.FLOAT16, casts="fp16_double"), LN),
    "layernorm_dead_leftover": (dict(dead_leftover=True), LN),
    "layernorm_dynamic_scale_kept": (dict(dynamic_scale=True), {"LayerNormalization": 1, "Mul": 1, "Add": 1}),
    "rmsnorm": (dict(kind="rms", opset=23), {"RMSNormalization": 1, "Add": 1}),  # no bias in RMSNormalization
    "rmsnorm_recip": (dict(kind="rms", opset=23, normalize="recip", affine="scale"), RMS),
    "rmsnorm_div_one": (dict(kind="rms", opset=23, normalize="div1", affine="wx"), {"RMSNormalization": 1, "Add": 1}),
    "rmsnorm_div": (dict(kind="rms", opset=23, affine="none"), {"RMSNormalization": 1, "Identity": 1}),
    "rmsnorm_hf_fp16_casts": (dict(kind="rms", opset=23, dtype=T.FLOAT16, casts="hf_float", affine="scale"), RMS),
    "rmsnorm_hf_cast_read_by_residual": (dict(kind="rms", opset=23, dtype=T.FLOAT16, casts="hf_float", affine="scale",
                                              extra_use="cast"), {"RMSNormalization": 1, "Cast": 1, "Neg": 1}),
    "rmsnorm_mul_square": (dict(kind="rms", opset=23, square="mul", affine="scale"), RMS),
    "instancenorm": (dict(kind="in", shape=(2, 3, 4, 4)), {"InstanceNormalization": 1}),
    "instancenorm_opset13": (dict(kind="in", shape=(2, 3, 4, 4), opset=13, normalize="recip"), {"InstanceNormalization": 1}),
    "instancenorm_1d_per_channel": (dict(kind="in", shape=(2, 3, 6), opset=13), {"InstanceNormalization": 1}),
    "instancenorm_3d": (dict(kind="in", shape=(1, 2, 3, 3, 3), affine="none"), {"InstanceNormalization": 1, "Identity": 1}),
    "groupnorm": (dict(kind="gn", shape=(2, 4, 3, 3), opset=21), {"GroupNormalization": 1}),
    "groupnorm_no_affine": (dict(kind="gn", shape=(2, 4, 3, 3), opset=21, affine="none"), {"GroupNormalization": 1, "Identity": 1}),
    "groupnorm_below_21": (dict(kind="gn", shape=(2, 4, 3, 3), opset=18),
                           {"Reshape": 2, "InstanceNormalization": 1, "Mul": 1, "Add": 1}),
}


@pytest.mark.parametrize("name", sorted(FUSES))
def test_fuses(name):
    kwargs, ops = FUSES[name]
    assert_fuses(build(**kwargs), ops)


DECLINES = {  # the must-not-fire twins: name: (build kwargs, note)
    "intermediate_read_elsewhere": (dict(extra_use="sub"), "is also read by /norm/Neg"),
    "variance_read_elsewhere": (dict(extra_use="var"), "is also read by"),
    "std_graph_output": (dict(graph_output_mid="std"), "is a graph output"),
    "eps_not_constant": (dict(eps_input=True), "epsilon is not a constant"),
    "keepdims_0": (dict(keepdims=0, shape=(3, 3, 3)), "keepdims=0"),
    "mean_and_variance_over_other_axes": (dict(shape=(2, 3, 4, 5), axes=[-1], mean_axes=[-2, -1]), "but variance over axes"),
    "channels_first_axis_1": (dict(axes=[1], shape=(2, 3, 4, 4)), "not the trailing axes"),
    "bfloat16": (dict(dtype=T.BFLOAT16), "dtype BFLOAT16"),
    "layernorm_opset16": (dict(opset=16), "--target-opset 17"),
    "rmsnorm_opset22": (dict(kind="rms", opset=22), "--target-opset 23"),
    "rms_not_trailing": (dict(kind="rms", opset=23, axes=[1], shape=(2, 3, 4)), "not the trailing axes"),
    "instancenorm_double": (dict(kind="in", shape=(2, 3, 4, 4), dtype=T.DOUBLE, opset=16), "double InstanceNormalization"),
}


@pytest.mark.parametrize("name", sorted(DECLINES))
def test_declines(name):
    kwargs, why = DECLINES[name]
    assert_declines(build(**kwargs), why)


def test_rank3_layernorm_below_17_is_not_an_instancenorm_over_the_sequence():
    # InstanceNormalization over [N, L, D] would be exact but tie its scale to L
    result = assert_declines(build(shape=(2, 5, 8), opset=13), "--target-opset 17")
    assert "LayerNorm" in result.notes[0]


def test_non_channel_affine_is_not_absorbed_into_instancenorm():
    model = build(kind="in", shape=(2, 3, 4, 4), opset=13)
    # make gamma vary along W: it must stay a Mul after the InstanceNormalization
    gamma = next(t for t in model.graph.initializer if t.name == "gamma")
    gamma.CopyFrom(onnx.numpy_helper.from_array(np.linspace(0.5, 1.5, 12).astype(np.float32).reshape(3, 1, 4), "gamma"))
    assert_fuses(model, {"InstanceNormalization": 1, "Mul": 1, "Add": 1})


def test_two_norms_in_a_row_and_names_unique():
    a = build(affine="xw")
    b = build(affine="xw", seed=1)
    # chain b after a: rename b's tensors and feed it a's output
    prefix = {n: f"b_{n}" for n in [o for node in b.graph.node for o in node.output] + [t.name for t in b.graph.initializer]}
    for node in b.graph.node:
        node.name = "b" + node.name
        node.input[:] = ["y_a" if i == "x" else prefix.get(i, i) for i in node.input]
        node.output[:] = [prefix.get(o, o) for o in node.output]
    for t in b.graph.initializer:
        t.name = prefix[t.name]
    for node in a.graph.node:
        node.output[:] = ["y_a" if o == "y" else o for o in node.output]
    a.graph.node.extend(b.graph.node)
    a.graph.initializer.extend(b.graph.initializer)
    a.graph.node[-1].output[0] = "y"
    after, _ = assert_fuses(a, {"LayerNormalization": 2}, rewrites=2)
    names = [n.name for n in after.graph.node]
    assert len(set(names)) == len(names)


def test_group_norm_instance_form_option():
    after, result = run_pass(build(kind="gn", shape=(2, 4, 3, 3), opset=21), group_norm="instance")
    assert result.rewrites == 1 and count_ops(after) == {"Reshape": 2, "InstanceNormalization": 1, "Mul": 1, "Add": 1}
    with pytest.raises(NormfixError, match="--group-norm"):
        run_pass(build(kind="gn", shape=(2, 4, 3, 3), opset=21), group_norm="fast")


def test_sites_and_details():
    _, result = run_pass(build(kind="gn", shape=(2, 4, 3, 3), opset=21))
    assert result.sites == [(["x"], ["y"])]
    assert result.details["fused"] == {"GroupNormalization": 1}


# ---- property test ---------------------------------------------------------------------------
@st.composite
def norm_configs(draw):
    kind = draw(st.sampled_from(["ln", "rms", "in", "gn"]))
    rank = draw(st.integers(3, 4)) if kind in ("in", "gn") else draw(st.integers(2, 4))
    shape = [draw(st.integers(1, 3))] + [draw(st.integers(2, 5)) for _ in range(rank - 1)]
    if kind == "gn":
        groups = draw(st.sampled_from([1, 2]))
        shape[1] = groups * draw(st.integers(1, 3))
    else:
        groups = 2
    k = draw(st.integers(1, rank - 1)) if kind in ("ln", "rms") else None
    axes = None if k is None else (list(range(-k, 0)) if draw(st.booleans()) else list(range(rank - k, rank)))
    dtype = draw(st.sampled_from([T.FLOAT, T.FLOAT, T.FLOAT16]))
    opset = draw(st.sampled_from({"ln": [17, 18, 23], "rms": [23], "in": [13, 18, 23], "gn": [18, 21, 23]}[kind]))
    return dict(kind=kind, shape=tuple(shape), axes=axes, groups=groups, dtype=dtype, opset=opset,
                eps=draw(st.sampled_from([None, 1e-12, 1e-5, 1e-3, 0.1])),
                square=draw(st.sampled_from(["pow", "mul"])),
                normalize=draw(st.sampled_from(["div", "recip", "div1", "rsqrt_pow"])),
                root=draw(st.sampled_from(["sqrt", "pow"])),
                affine=draw(st.sampled_from(["xw", "wx", "none", "bias", "scale"])),
                axes_mode=draw(st.sampled_from(["initializer", "constant", "reshape_const"])),
                keepdims=draw(st.sampled_from([None, 1])),
                seed=draw(st.integers(0, 1000)))


@settings(max_examples=int(os.environ.get("NORM_EXAMPLES", 80)), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(norm_configs())
def test_property_fused_equals_decomposed_and_formula(cfg):
    if cfg["kind"] == "in" and cfg["shape"][1] == 1:
        cfg["shape"] = (cfg["shape"][0], 2, *cfg["shape"][2:])
    model = build(**cfg)
    after, result = run_pass(model)
    if cfg["kind"] == "in" and len(cfg["shape"]) == 3 and cfg["affine"] == "none" and cfg["opset"] < 17:
        # [N, C, L] over L with no per-channel affine reads as a LayerNorm (see the rank-3 test)
        assert result.rewrites == 0 and "--target-opset 17" in result.notes[0]
        return
    assert result.rewrites == 1, (cfg, result.notes)
    assert not DECOMPOSED & set(count_ops(after)), count_ops(after)
    feeds = feeds_for(model, cfg["seed"])
    want, got = ort_run(model, feeds)["y"], ort_run(after, feeds)["y"]
    rtol, atol = TOL[cfg["dtype"]]
    np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=rtol, atol=atol * 4)
    if cfg["affine"] == "none":  # and both are the formula, computed in float64
        expected = reference(cfg["kind"], feeds["x"], cfg["axes"], cfg["eps"] or 0.0, cfg["groups"])
        np.testing.assert_allclose(got.astype(np.float64), expected, rtol=rtol * 10, atol=atol * 10)


# ---- real PyTorch exports ----------------------------------------------------------------------
sys.path.insert(0, str(FIXTURES))
_EXPORTS: dict = {}


def export(name, variant, **kw):
    key = (name, variant, tuple(sorted(kw.items())))
    if key not in _EXPORTS:
        import _norm_models

        # dynamo exports come from the committed fixtures (seconds each to export again)
        saved = None if kw or not variant.startswith("dynamo") else _norm_models.load(name, variant, FIXTURES)
        _EXPORTS[key] = saved or _norm_models.export(name, variant, **kw)
    return _EXPORTS[key]


REAL = [  # model, exporter, --target-opset, ops that must remain fused, decomposed ops allowed to stay
    ("transformer", "ts13", 17, {"LayerNormalization": 3}, {}),
    ("transformer", "ts16", 17, {"LayerNormalization": 3}, {}),
    ("transformer", "dynamo_noopt", None, {"LayerNormalization": 3}, {}),
    ("convnext", "ts13", 17, {"LayerNormalization": 1}, {"ReduceMean": 2, "Sub": 1, "Pow": 1, "Sqrt": 1}),
    ("convnext", "ts16", 17, {"LayerNormalization": 1}, {"ReduceMean": 2, "Sub": 1, "Pow": 1, "Sqrt": 1}),
    ("convnext", "dynamo", None, {"LayerNormalization": 1}, {"ReduceMean": 2, "Sub": 1, "Pow": 1, "Sqrt": 1}),
    ("llama", "ts16", 23, {"RMSNormalization": 3}, {}),
    ("llama", "dynamo", 23, {"RMSNormalization": 3}, {}),
    ("unet", "ts16", 21, {"GroupNormalization": 3, "InstanceNormalization": 1}, {}),
    ("unet", "ts16", None, {"InstanceNormalization": 4}, {}),
    ("unet", "dynamo", 21, {"GroupNormalization": 3, "InstanceNormalization": 1}, {}),
    ("dit", "ts16", 17, {"LayerNormalization": 1}, {}),
    ("transformer", "ts16_dyn", 17, {"LayerNormalization": 3}, {}),  # symbolic batch
    ("unet", "ts16_dyn", 21, {"GroupNormalization": 3, "InstanceNormalization": 1}, {}),
    ("llama", "ts16_dyn", 23, {"RMSNormalization": 3}, {}),
    ("transformer", "ts16_keepinit", 17, {"LayerNormalization": 3}, {}),  # initializers listed as inputs
    ("unet", "ts13_nofold", 21, {"GroupNormalization": 3, "InstanceNormalization": 1}, {}),  # no constant folding
    ("llama", "ts13_nofold", 23, {"RMSNormalization": 3}, {}),
]


@pytest.mark.parametrize("name,variant,target,fused,left", REAL, ids=[f"{r[0]}-{r[1]}-{r[2]}" for r in REAL])
def test_real_exports_match_pytorch(name, variant, target, fused, left):
    model, inputs, torch_out = export(name, variant)
    options = {"target_opset": target} if target else {}
    result = onnx_normfix.optimize(model, passes=["fuse_norms", "fold_bn"], inputs=inputs, reference=torch_out, **options)
    ops = count_ops(result.model)
    for op, n in fused.items():
        assert ops.get(op) == n, ops
    assert {op: ops[op] for op in DECOMPOSED if op in ops} == left, ops
    assert result.report["reference"]["status"] == "passed"
    stages = {e["name"]: e for e in result.report["passes"]}
    assert stages["fuse_norms"]["validation"]["status"] == ("passed" if stages["fuse_norms"]["rewrites"] else "skipped")
    if target:
        assert stages["raise_opset"]["validation"]["status"] == "passed"
        assert onnx_normfix.graph.opset_of(result.model) == target
    if name == "convnext":  # the channels-first LayerNorm over axis 1 is declined, with a note
        assert any("not the trailing axes" in n for n in stages["fuse_norms"]["notes"])
    if name == "dit":  # the modulation (input-dependent) stays after the fused norm
        assert ops.get("Mul", 0) >= 1 and ops.get("Add", 0) >= 2


def test_real_export_below_target_opset_declines_with_the_option_named():
    model, _, _ = export("llama", "ts16")
    result = onnx_normfix.optimize(model, passes=["fuse_norms"], validate=False)
    entry = result.report["passes"][0]
    assert entry["rewrites"] == 0 and len(entry["notes"]) == 3
    assert all("--target-opset 23" in n for n in entry["notes"])
    assert onnx_normfix.graph.opset_of(result.model) == 16  # never silently raised


def test_hf_rmsnorm_input_cast_shared_with_residual_stays():
    model, inputs, torch_out = export("llama", "ts16")
    result = onnx_normfix.optimize(model, passes=["fuse_norms"], target_opset=23, inputs=inputs, reference=torch_out)
    casts = [n for n in result.model.graph.node if n.op_type == "Cast"]
    # TorchScript keeps x.to(float32) as the tensor the residual adds to: those Casts stay
    assert len(casts) == 2
    assert all(any("Add" == c.op_type for c in result.model.graph.node if cast.output[0] in c.input) for cast in casts)


def test_fp16_large_activations():
    """nn.LayerNorm in fp16 at 400x activations: fused result finite and equal to PyTorch.

    The hand-written BERT LayerNorm (output y2) computes Pow(x - u, 2) in fp16: PyTorch CPU
    overflows there (its y2 degenerates to the bias), so does onnx's reference evaluator (a
    native-fp16 runtime); onnxruntime CPU runs the chain through float32 and does not show it.
    After fusion (stash_type float32) every runtime computes the true LayerNorm."""
    model, inputs, torch_out = export("transformer", "ts16", fp16=True, scale=400.0)
    result = onnx_normfix.optimize(model, passes=["fuse_norms"], target_opset=17, inputs=inputs)
    assert count_ops(result.model)["LayerNormalization"] == 3
    got = ort_run(result.model, inputs)
    before = ort_run(model, inputs)
    assert np.isfinite(got["y"]).all() and np.isfinite(got["y2"]).all()
    np.testing.assert_allclose(got["y"].astype(np.float32), torch_out["y"].astype(np.float32), rtol=1e-2, atol=4e-3)
    # y2 = the true LayerNorm (same parameters as y's formula, computed in float64)
    np.testing.assert_allclose(got["y2"].astype(np.float32), before["y2"].astype(np.float32), rtol=1e-2, atol=4e-3)
    from onnx.reference import ReferenceEvaluator

    native_before = ReferenceEvaluator(model).run(["y2"], inputs)[0]
    assert np.abs(native_before.astype(np.float32) - got["y2"]).max() > 0.5  # the fp16 overflow
    # (onnx's reference LayerNormalization ignores stash_type, so it is no witness for "after")


def test_raise_opset_never_lowers_and_rejects_bad_targets():
    model = build(opset=18)
    after, result = run_pass(model, RAISE, target_opset=17)
    assert result.rewrites == 0 and "never lowered" in result.notes[0]
    with pytest.raises(NormfixError, match="expected an opset"):
        run_pass(model, RAISE, target_opset=999)
    with pytest.raises(NormfixError, match="expected an opset"):
        run_pass(model, RAISE, target_opset="seventeen")
    after, result = run_pass(model, RAISE, target_opset=21)
    assert result.rewrites == 1 and onnx_normfix.graph.opset_of(after) == 21
    after, result = run_pass(model, RAISE, target_opset="21")  # as a flag without a type gives it
    assert result.rewrites == 1 and onnx_normfix.graph.opset_of(after) == 21
    assert "raise_opset" not in onnx_normfix.PASSES  # a stage, not a pass to name: one owner of the option


def test_cli_target_opset(tmp_path, capsys):
    from onnx_normfix.cli import main

    model, inputs, torch_out = export("transformer", "ts13")
    src, dst = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    np.savez(tmp_path / "in.npz", **inputs)
    np.savez(tmp_path / "ref.npz", **torch_out)
    code = main([str(src), str(dst), "--passes", "fuse_norms,fold_bn", "--target-opset", "17",
                 "--inputs", str(tmp_path / "in.npz"), "--reference", str(tmp_path / "ref.npz"), "-q"])
    assert code == 0
    assert count_ops(onnx.load(dst))["LayerNormalization"] == 3
    assert main([str(src), str(dst), "--passes", "fold_bn", "--target-opset", "17", "-q"]) == 2
    assert "applies to pass fuse_norms" in capsys.readouterr().err
    assert main(["--list-passes"]) == 0
    assert "fuse_norms" in capsys.readouterr().out


# ---- real tf2onnx exports (fixtures/_tf_models.py; tensorflow-cpu 2.21 + tf2onnx 1.17) ------------
def _keras(name):
    model = onnx.load(FIXTURES / f"{name}.onnx")
    io = np.load(FIXTURES / f"{name}_io.npz")
    return model, {"x": io["x"]}, {str(io["output"]): io["y"]}


def test_tf2onnx_keras_layernorm_fuses_and_matches_keras():
    # x * (gamma * rsqrt(var + eps)) + (beta - mean * ...) with GlobalAveragePool means, and the
    # center=False / scale=False forms
    model, inputs, ref = _keras("keras_layernorm_seq_op13")
    result = onnx_normfix.optimize(model, passes=["fuse_norms", "fold_bn"], target_opset=17, inputs=inputs, reference=ref)
    ops = count_ops(result.model)
    assert ops.get("LayerNormalization") == 3 and not {"GlobalAveragePool", "Neg", "Sqrt", "Sub"} & set(ops), ops
    assert result.report["reference"]["status"] == "passed"


def test_tf2onnx_keras_layernorm_with_dynamic_gamma_is_not_fused():
    model, inputs, _ = _keras("keras_layernorm_seq_op13")
    model = onnx.version_converter.convert_version(model, 17)
    recips = {n.output[0] for n in model.graph.node if n.op_type == "Reciprocal"}
    mul = next(n for n in model.graph.node if n.op_type == "Mul" and n.input[0] in recips and n.input[1] not in recips)
    gamma = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == mul.input[1]))
    model.graph.input.append(onnx.helper.make_tensor_value_info("gamma_in", T.FLOAT, list(gamma.shape)))
    mul.input[1] = "gamma_in"
    after, result = run_pass(model)
    assert result.rewrites == 2  # the other two still fuse
    feeds = {**inputs, "gamma_in": gamma}
    want, got = ort_run(model, feeds), ort_run(after, feeds)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-5)


def test_tf2onnx_nhwc_keras_layernorm_over_channels_declines():
    model, inputs, ref = _keras("keras_bn_dense_op13")
    result = onnx_normfix.optimize(model, passes=["fuse_norms"], target_opset=17, inputs=inputs, reference=ref)
    notes = result.report["passes"][-1]["notes"]
    assert result.report["passes"][-1]["rewrites"] == 0 and "not the trailing axes" in notes[0]


def test_reshape_back_to_another_shape_is_no_groupnorm():
    # x[N,C,H,W] -> [N,G,-1] -> norm -> [N,C,H*W]: not x's shape, so no GroupNormalization;
    # the core is still exactly an InstanceNorm of the reshaped tensor
    model = build(kind="gn", shape=(2, 4, 3, 3), opset=21, affine="none")
    target = next(t for t in model.graph.initializer if onnx.numpy_helper.to_array(t).tolist() == [2, 4, 3, 3])
    target.CopyFrom(onnx.numpy_helper.from_array(np.array([2, 4, 9], np.int64), target.name))
    model.graph.output[0].type.tensor_type.shape.dim.pop()
    model.graph.output[0].type.tensor_type.shape.dim[2].dim_value = 9
    assert_fuses(model, {"Reshape": 2, "InstanceNormalization": 1, "Identity": 1})


def test_match_parents():
    from onnx_normfix.graph import GraphIndex

    model = build()
    ix = GraphIndex(model)
    div = next(n for n in model.graph.node if n.op_type == "Div")
    chain = ix.match_parents(div, [("Sqrt", 1), ("Add", 0), ("ReduceMean", 0), (("Pow", "Mul"), 0)])
    assert [n.op_type for n in chain] == ["Sqrt", "Add", "ReduceMean", "Pow"]
    assert ix.match_parents(div, [("Sqrt", 1), ("Mul", 0)]) is None
    assert ix.match_parents(div, [("Sqrt", 5)]) is None


def test_cli_group_norm_form(tmp_path):
    from onnx_normfix.cli import main

    src, dst = tmp_path / "gn.onnx", tmp_path / "out.onnx"
    onnx.save(build(kind="gn", shape=(2, 4, 3, 3), opset=21), src)
    assert main([str(src), str(dst), "--passes", "fuse_norms", "--group-norm", "instance", "-q"]) == 0
    assert count_ops(onnx.load(dst)) == {"Reshape": 2, "InstanceNormalization": 1, "Mul": 1, "Add": 1}
    assert main([str(src), str(dst), "--passes", "fuse_norms", "-q"]) == 0
    assert count_ops(onnx.load(dst)) == {"GroupNormalization": 1}
