"""replace_random: each random op becomes a seeded noise input (or a constant / its mean)."""

from __future__ import annotations

import copy
import importlib.util
import json
import pathlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from helpers import assert_close, count_ops, ort_run
from onnx_normfix.errors import NormfixError
from onnx_normfix.noise import NOISE_METADATA_KEY, draw_standard_noise, noise_feeds, read_noise_entries, save_noise_feeds
from onnx_normfix.passes.replace_random import PASS
from onnx_normfix.registry import PassContext

FIXTURES = pathlib.Path(__file__).resolve().parent.parent / "fixtures"
RANDOM = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Bernoulli"}


def rewrite(model, **options):
    model = copy.deepcopy(model)
    return model, PASS.run(model, PassContext(options=options))


def with_outputs(model, names):
    """A copy of `model` that also outputs the tensors `names` (what the validator does)."""
    model = copy.deepcopy(model)
    have = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in have)
    return model


def replay(original, rewritten, result, feeds):
    """Run the original once, turn its draws into noise through the bindings, run the rewrite."""
    needs = [n for b in result.input_bindings.values() for n in b.needs]
    captured = ort_run(with_outputs(original, needs), feeds)
    new_feeds = dict(feeds, **{k: b.make_feed(captured) for k, b in result.input_bindings.items()})
    want = {o.name: captured[o.name] for o in original.graph.output}
    return ort_run(rewritten, new_feeds), want, new_feeds


# ---- tiny graphs, one per op --------------------------------------------------------------
# x[N,3] -> <random op> -> r (graph output) ; y = x * r (Bernoulli: y = x * Cast(r))
CASES = {
    "normal_like": ("RandomNormalLike", dict(mean=2.0, scale=3.0), "normal", True),
    "normal_like_trivial": ("RandomNormalLike", dict(), "normal", True),
    "normal": ("RandomNormal", dict(shape=[2, 3], mean=-1.0, scale=0.5, seed=7.0), "normal", False),
    "uniform_like_f64": ("RandomUniformLike", dict(low=-1.0, high=3.0, dtype=TensorProto.DOUBLE), "uniform", True),
    "uniform": ("RandomUniform", dict(shape=[2, 3]), "uniform", False),
    "bernoulli_int64": ("Bernoulli", dict(dtype=TensorProto.INT64), "bernoulli", True),
}


def tiny(case: str, batch="N", rank_known=True):
    op, attrs, _, like = CASES[case]
    shape = ([batch, 3] if like else [2, 3]) if rank_known else None
    r_type = attrs.get("dtype", TensorProto.FLOAT)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    nodes = []
    if op == "Bernoulli":
        nodes.append(helper.make_node("Sigmoid", ["x"], ["p"], name="/sig"))
    nodes.append(helper.make_node(op, ["p" if op == "Bernoulli" else "x"] if like else [], ["r"], name=f"/{op}", **attrs))
    nodes.append(helper.make_node("Cast", ["r"], ["rf"], to=TensorProto.FLOAT, name="/cast"))
    nodes.append(helper.make_node("Mul", ["x", "rf"], ["y"], name="/mul"))
    graph = helper.make_graph(nodes, case, [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape),
                                                 helper.make_tensor_value_info("r", r_type, shape)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def expected_r(case, noise, x):
    _, attrs, dist, _ = CASES[case]
    if dist == "normal":
        return attrs.get("mean", 0.0) + attrs.get("scale", 1.0) * noise.astype(np.float64)
    if dist == "uniform":
        low, high = attrs.get("low", 0.0), attrs.get("high", 1.0)
        return low + (high - low) * noise.astype(np.float64)
    return (noise < 1 / (1 + np.exp(-x))).astype(np.int64)


def x_of(n=2):
    return np.random.default_rng(1).standard_normal((n, 3)).astype(np.float32)


@pytest.mark.parametrize("case", CASES)
def test_input_mode_applies_the_distribution(case):
    model = tiny(case)
    new, res = rewrite(model)
    assert res.rewrites == 1 and not RANDOM & set(count_ops(new))
    (name,) = res.input_bindings
    entry = read_noise_entries(new)[0]
    assert entry["input"] == name == f"noise__{CASES[case][0]}"
    assert entry["op_type"] == CASES[case][0] and entry["node"] == f"/{CASES[case][0]}"
    noise_vi = {i.name: i for i in new.graph.input}[name]
    dims = [d.dim_param or d.dim_value for d in noise_vi.type.tensor_type.shape.dim]
    assert dims == ([2, 3] if not CASES[case][3] else ["N", 3])
    onnx.checker.check_model(new, full_check=True)
    x = x_of(2)
    feeds = dict(x=x, **noise_feeds(new, seed=3, shapes={"x": x.shape}))
    got = ort_run(new, feeds)
    tol = 1e-5
    np.testing.assert_allclose(got["r"].astype(np.float64), expected_r(case, feeds[name], x), rtol=tol, atol=tol)
    assert got["r"].dtype == ort_run(model, {"x": x})["r"].dtype
    # What the original drew, turned into noise, reproduces the original outputs.
    replayed, want, _ = replay(model, new, res, {"x": x})
    assert_close(replayed, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("case", ["normal", "uniform"])
def test_constant_mode_bakes_the_seeded_noise(case):
    model = tiny(case, batch=2)
    const, res = rewrite(model, random_mode="constant", seed=5)
    assert res.rewrites == 1 and res.changes_outputs is True and not res.input_bindings
    assert [i.name for i in const.graph.input] == ["x"] and not RANDOM & set(count_ops(const))
    fed, _ = rewrite(model, random_mode="input")
    x = x_of(2)
    a = ort_run(const, {"x": x})
    # The constant is exactly the noise noise_feeds(seed=5) gives the input in mode "input".
    assert_close(a, ort_run(fed, dict(x=x, **noise_feeds(fed, seed=5))), rtol=0, atol=0)
    other, _ = rewrite(model, random_mode="constant", seed=6)
    assert not np.array_equal(a["r"], ort_run(other, {"x": x})["r"])


@pytest.mark.parametrize("case", CASES)
def test_mean_mode(case):
    model = tiny(case)
    new, res = rewrite(model, random_mode="mean")
    assert res.rewrites == 1 and res.changes_outputs is True
    assert [i.name for i in new.graph.input] == ["x"] and not RANDOM & set(count_ops(new))
    _, attrs, dist, like = CASES[case]
    x = x_of(3 if like else 2)
    r = ort_run(new, {"x": x})["r"]
    want = {"normal": lambda: attrs.get("mean", 0.0),
            "uniform": lambda: (attrs.get("low", 0.0) + attrs.get("high", 1.0)) / 2,
            "bernoulli": lambda: (1 / (1 + np.exp(-x))).astype(np.int64)}[dist]()
    assert r.shape == ((3, 3) if like else (2, 3))
    np.testing.assert_allclose(r, np.broadcast_to(want, r.shape), rtol=1e-6)


def test_no_random_ops_is_a_clean_no_op():
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])]))
    new, res = rewrite(model)
    assert res.rewrites == 0 and res.notes == ["no random ops found"]
    assert new.SerializeToString() == model.SerializeToString()


def test_declines_with_a_note():
    # Multinomial is random but not handled; a *Like op on an input of unknown rank has no shape.
    multi = helper.make_graph(
        [helper.make_node("Multinomial", ["x"], ["y"], name="/multi", sample_size=2)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 2])])
    for model, expected in [(helper.make_model(multi), "skipped /multi: Multinomial is not handled"),
                            (tiny("normal_like", rank_known=False), "skipped /RandomNormalLike: rank of 'x' unknown")]:
        new, res = rewrite(model)
        assert res.rewrites == 0 and res.notes == [expected]
        assert new.SerializeToString() == model.SerializeToString()


def test_unknown_dims_get_named_dim_params():
    # x -> Reshape(x, s) -> RandomNormalLike: rank 2 is known from s, the sizes are not.
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "s"], ["h"], name="/reshape"),
         helper.make_node("RandomNormalLike", ["h"], ["r"], name="/rnl", mean=1.0),
         helper.make_node("Add", ["h", "r"], ["y"], name="/add")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("s", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    new, res = rewrite(model)
    assert res.rewrites == 1
    assert "noise__rnl: dims ['noise__rnl_d0', 'noise__rnl_d1'] not inferred" in res.notes[0]
    vi = {i.name: i for i in new.graph.input}["noise__rnl"]
    assert [d.dim_param for d in vi.type.tensor_type.shape.dim] == ["noise__rnl_d0", "noise__rnl_d1"]
    feeds = {"x": x_of(2), "s": np.array([3, 2], np.int64)}
    noise = noise_feeds(new, shapes={"noise__rnl_d0": 3, "noise__rnl_d1": 2})
    assert noise["noise__rnl"].shape == (3, 2)
    got = ort_run(new, {**feeds, **noise})["y"]
    np.testing.assert_allclose(got, feeds["x"].reshape(3, 2) + 1 + noise["noise__rnl"], rtol=1e-6)
    replayed, want, _ = replay(model, new, res, feeds)
    assert_close(replayed, want)


def test_random_op_in_a_subgraph_is_reported_not_touched():
    body = helper.make_graph([helper.make_node("RandomNormal", [], ["r"], shape=[2])], "then", [],
                             [helper.make_tensor_value_info("r", TensorProto.FLOAT, [2])])
    relu = helper.make_graph([helper.make_node("Relu", ["x"], ["z"])], "else", [],
                             [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])])
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], name="/if", then_branch=body, else_branch=relu)], "g",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, []), helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    new, res = rewrite(model)
    assert res.rewrites == 0 and res.notes == ["skipped random ops inside the subgraphs of /if: not handled"]
    assert new.SerializeToString() == model.SerializeToString()


def test_bad_options_and_constant_on_dynamic_shape_raise():
    model = tiny("normal_like")
    with pytest.raises(NormfixError, match=r"needs a static shape.*\['N', 3\]"):
        rewrite(model, random_mode="constant")
    with pytest.raises(NormfixError, match="unknown random_mode 'sample'"):
        rewrite(model, random_mode="sample")
    with pytest.raises(NormfixError, match="seed must be"):
        rewrite(model, seed=-1)


def test_metadata_merges_with_existing_entries():
    model = tiny("normal_like")
    model.metadata_props.add(key=NOISE_METADATA_KEY, value=json.dumps([{"input": "noise__earlier", "mode": "input"}]))
    new, _ = rewrite(model)
    assert [e["input"] for e in read_noise_entries(new)] == ["noise__earlier", "noise__RandomNormalLike"]
    again, res = rewrite(new)  # already rewritten: nothing random left
    assert res.rewrites == 0 and again.SerializeToString() == new.SerializeToString()


def test_noise_feeds(tmp_path):
    new, _ = rewrite(tiny("uniform_like_f64"))
    a, b = noise_feeds(new, seed=0, shapes={"x": (3, 3)}), noise_feeds(new, seed=0, shapes={"N": 3})
    (name,) = a
    assert a[name].shape == (3, 3) and a[name].dtype == np.float64
    np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a[name], noise_feeds(new, seed=1, shapes={"N": 3})[name])
    assert noise_feeds(new)[name].shape == (1, 3)  # unset symbolic dims are 1
    assert 0 <= a[name].min() and a[name].max() < 1
    saved = save_noise_feeds(new, tmp_path / "noise.npz", seed=0, shapes={"N": 3})
    np.testing.assert_array_equal(np.load(tmp_path / "noise.npz")[name], saved[name])
    np.testing.assert_array_equal(draw_standard_noise("uniform", (3, 3), np.float64, 0, name), a[name])
    # rounding to fp16 must not reach 1.0: the interval stays [0, 1)
    assert draw_standard_noise("uniform", (1 << 16,), np.float16, 0, name).max() < 1
    fp16 = noise_feeds(rewrite(load("vae_fp16", "ts"))[0], seed=0, shapes={"x": (3, 4)})
    assert [(v.dtype, v.shape) for v in fp16.values()] == [(np.float16, (3, 3))]


# ---- real exports ----------------------------------------------------------------------
def _fixture_module():
    spec = importlib.util.spec_from_file_location("_random_models", FIXTURES / "_random_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FIX = _fixture_module()
EXPORTS = [(name, exp) for name, spec in FIX.SPECS.items() for exp in spec[3]]
DRAWS = {"vae": 1, "vae_fp16": 1, "diffusion": 1, "diffusion_dyn": 1, "uniform": 2, "normal": 1,
         "bernoulli": 1, "bernoulli_op14": 1, "stack": 4}
# fp16: onnxruntime computes fp16 ops in fp32 internally, so the fp16 draw it exposes and the value
# it used differ by up to one fp16 ulp (4.9e-4 measured on vae_fp16_dyn); and torch's fp16 matmul
# rounds differently from onnxruntime's.
TOL = {"float32": dict(rtol=1e-4, atol=1e-5), "float16": dict(rtol=1e-2, atol=2e-3)}


def load(name, exporter):
    return onnx.load(str(FIX.path_of(FIXTURES, name, exporter)))


def x_for(name, batch):
    shape, dtype, _, _ = FIX.SPECS[name]
    return np.random.default_rng(2).standard_normal((batch, *shape[1:])).astype(dtype)


@pytest.mark.parametrize("name,exporter", EXPORTS)
def test_export_is_rewritten_and_replays_exactly(name, exporter):
    model = load(name, exporter)
    new, res = rewrite(model)
    assert res.rewrites == DRAWS[name] and len(res.input_bindings) == DRAWS[name]
    assert not RANDOM & set(count_ops(new)), count_ops(new)
    onnx.checker.check_model(new, full_check=True)
    x_vi = new.graph.input[0]
    dynamic = FIX.SPECS[name][2]
    batch_dim = x_vi.type.tensor_type.shape.dim[0]
    for vi in new.graph.input[1:]:
        assert vi.name.startswith("noise__")
        d0 = vi.type.tensor_type.shape.dim[0]
        assert (d0.dim_param == batch_dim.dim_param) if dynamic else d0.dim_value == 2
    out_names = [o.name for o in new.graph.output]
    assert out_names == [o.name for o in model.graph.output]
    replayed, want, _ = replay(model, new, res, {x_vi.name: x_for(name, 3 if dynamic else 2)})
    if FIX.SPECS[name][1] == "float32":
        for k in want:  # the same draws through the same kernels: bit-exact
            np.testing.assert_array_equal(replayed[k], want[k], err_msg=k)
    else:
        assert_close(replayed, want, **TOL["float16"])
    # the replay can fail: other noise gives other outputs
    other = ort_run(new, {x_vi.name: x_for(name, 3 if dynamic else 2), **noise_feeds(new, seed=9, shapes={x_vi.name: x_for(name, 3 if dynamic else 2).shape})})
    assert any(not np.array_equal(other[k], want[k]) for k in want)


@pytest.mark.parametrize("name,exporter", EXPORTS)
def test_matches_pytorch_given_the_same_noise(name, exporter, monkeypatch):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    new, _ = rewrite(load(name, exporter))
    module, _ = FIX.build(name)
    batches = (1, 3) if FIX.SPECS[name][2] else (2,)
    for batch in batches:  # a dynamic batch stays dynamic
        x = x_for(name, batch)
        feeds = noise_feeds(new, seed=batch, shapes={new.graph.input[0].name: x.shape})
        queue = [torch.from_numpy(feeds[e["input"]]) for e in read_noise_entries(new)]

        def take(shape):
            t = queue.pop(0)
            assert tuple(t.shape) == tuple(shape)
            return t

        monkeypatch.setattr(torch, "randn_like", lambda t, **k: take(t.shape))
        monkeypatch.setattr(torch, "rand_like", lambda t, **k: take(t.shape))
        monkeypatch.setattr(torch, "randn", lambda *s, **k: take(s[0] if len(s) == 1 else s))
        monkeypatch.setattr(torch, "rand", lambda *s, **k: take(s[0] if len(s) == 1 else s))
        monkeypatch.setattr(torch, "normal", lambda mean, std, **k: mean + std * take(mean.shape))
        monkeypatch.setattr(torch, "bernoulli", lambda p, **k: (take(p.shape) < p).to(p.dtype))
        with torch.no_grad():
            want = module(torch.from_numpy(x)).numpy()
        monkeypatch.undo()
        assert not queue
        got = ort_run(new, dict(feeds, **{new.graph.input[0].name: x}))
        (out,) = got.values()
        assert out.shape == want.shape
        np.testing.assert_allclose(out, want, **TOL[FIX.SPECS[name][1]])


def test_same_feeds_twice_give_identical_outputs():
    new, _ = rewrite(load("stack", "ts"))
    x = x_for("stack", 3)
    feeds = [dict(x=x, **noise_feeds(new, seed=4, shapes={"x": x.shape})) for _ in range(2)]
    a, b = ort_run(new, feeds[0]), ort_run(new, feeds[1])
    assert_close(a, b, rtol=0, atol=0)


def test_constant_mode_on_dynamic_export_raises_and_mean_mode_is_deterministic():
    model = load("vae", "dyn")
    with pytest.raises(NormfixError, match="needs a static shape"):
        rewrite(model, random_mode="constant")
    mean, res = rewrite(model, random_mode="mean")
    assert res.rewrites == 1 and [i.name for i in mean.graph.input] == ["x"]
    x = x_for("vae", 3)
    y = ort_run(mean, {"x": x})
    # VAE mean decode: z = mu, i.e. the noise input fed zeros
    fed, _ = rewrite(model)
    assert_close(y, ort_run(fed, {"x": x, "noise__node_randn_like": np.zeros((3, 3), np.float32)}))
    static, res = rewrite(load("diffusion", "ts"), random_mode="constant", seed=1)
    assert res.rewrites == 1 and [i.name for i in static.graph.input] == ["x"]


# ---- through the pipeline: the validator proves equivalence on the original's draws ------
def test_pipeline_validates_on_what_the_original_drew():
    from onnx_normfix import optimize

    for name, exporter, shapes in [("stack", "ts", {"batch": 3}), ("stack", "dyn", {"batch": 3}), ("uniform", "dynopt", None)]:
        result = optimize(str(FIX.path_of(FIXTURES, name, exporter)), passes=["replace_random"], input_shapes=shapes)
        (stage,) = result.report["passes"]
        assert stage["rewrites"] == DRAWS[name]
        v = stage["validation"]
        assert v["status"] == "passed" and v["max_abs_diff"] == 0.0, v
        assert not RANDOM & set(count_ops(result.model))


def test_pipeline_proof_does_not_use_the_pass_binding(monkeypatch):
    """The noise fed to the rewritten model comes from the original op's attributes, never
    from the binding the pass returns: a wrong binding changes nothing (the mutation suite
    holds the converse: a wrong rewrite whose binding hides it is caught)."""
    from onnx_normfix import optimize
    from onnx_normfix.passes import replace_random

    real = replace_random._make_feed
    monkeypatch.setattr(replace_random, "_make_feed", lambda p, out: (lambda c: real(p, out)(c) * np.float32(1.001)))
    v = optimize(str(FIX.path_of(FIXTURES, "vae", "ts")), passes=["replace_random"]).report["passes"][0]["validation"]
    assert v["status"] == "passed" and v["max_abs_diff"] == 0.0
    assert any(c.startswith("noise distribution over") for c in v["checks"])


def test_pipeline_modes_and_no_op(tmp_path):
    from onnx_normfix import optimize

    mean = optimize(str(FIX.path_of(FIXTURES, "vae", "dyn")), passes=["replace_random"], random_mode="mean")
    assert mean.report["passes"][0]["validation"]["status"] == "changed"
    with pytest.raises(NormfixError, match="needs a static shape"):
        optimize(str(FIX.path_of(FIXTURES, "vae", "dyn")), passes=["replace_random"], random_mode="constant")
    clean = optimize(mean.model, passes=["replace_random"])
    (stage,) = clean.report["passes"]
    assert stage["rewrites"] == 0 and stage["notes"] == ["no random ops found"]
    assert stage["validation"]["status"] == "skipped"


def test_cli_writes_noise_feeds(tmp_path):
    from onnx_normfix.cli import main

    out, npz = tmp_path / "vae.onnx", tmp_path / "noise.npz"
    code = main([str(FIX.path_of(FIXTURES, "vae", "ts")), str(out), "--passes", "replace_random",
                 "--noise-feeds", str(npz), "--seed", "4", "--input-shape", "x:3x4"])
    assert code == 0
    saved = np.load(npz)
    assert saved.files == ["noise__RandomNormalLike"]
    np.testing.assert_array_equal(saved["noise__RandomNormalLike"],
                                  noise_feeds(onnx.load(str(out)), seed=4, shapes={"x": (3, 4)})["noise__RandomNormalLike"])


def test_binding_of_a_degenerate_op_is_finite():
    """RandomUniformLike(low == high) and RandomNormalLike(scale 0) draw a constant: the
    pass's own binding must not divide by zero (it used to feed NaN)."""
    from onnx_normfix.passes.replace_random import _make_feed

    uniform = _make_feed(dict(op="RandomUniformLike", a=2.0, b=2.0, elem=TensorProto.FLOAT, dist="uniform"), "t")
    normal = _make_feed(dict(op="RandomNormalLike", a=1.0, b=0.0, elem=TensorProto.FLOAT, dist="normal"), "t")
    assert np.isfinite(uniform({"t": np.full(3, 2, np.float32)})).all()
    assert np.isfinite(normal({"t": np.ones(3, np.float32)})).all()
