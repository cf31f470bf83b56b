"""onnx_normfix.stats: reading running statistics from checkpoints, refusing hostile or broken
files, and estimating statistics from calibration data."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnx_normfix.errors import NormfixError
from onnx_normfix.stats import ModuleStats, estimate_stats, load_stats, stats_from_arrays

# ---------------------------------------------------------------------------------------------
# A real PyTorch module with non-trivial stats: BN, affine IN and affine=False IN mixed.
#
#   x -> Conv -> BatchNorm2d(4) -> ReLU -> Conv -> InstanceNorm2d(5, affine) -> IN(5, no affine)
#   state_dict names: main.1 (BN), main.4 (IN affine), main.5 (IN affine=False)

EXPECTED_NAMES = ["main.1", "main.4", "main.5"]


@pytest.fixture(scope="module")
def generator():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    nn = torch.nn

    class Gen(nn.Module):
        def __init__(self):
            super().__init__()
            self.main = nn.Sequential(
                nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3),
                nn.InstanceNorm2d(5, affine=True, track_running_stats=True),
                nn.InstanceNorm2d(5, track_running_stats=True),
            )

        def forward(self, x):
            return self.main(x)

    net = Gen().train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(2, 3, 8, 8) * 3 + 1)
        net.main[4].weight.uniform_(0.5, 1.5)
        net.main[4].bias.uniform_(-1, 1)
    return net


def _state(net) -> OrderedDict:
    return net.state_dict()


def _check_modules(got: list[ModuleStats], net):
    sd = net.state_dict()
    assert [m.name for m in got] == EXPECTED_NAMES
    for m in got:
        np.testing.assert_array_equal(m.running_mean, sd[f"{m.name}.running_mean"].numpy())
        np.testing.assert_array_equal(m.running_var, sd[f"{m.name}.running_var"].numpy())
        assert m.running_mean.dtype == np.float32
    assert [m.channels for m in got] == [4, 5, 5]
    np.testing.assert_array_equal(got[0].weight, sd["main.1.weight"].numpy())
    np.testing.assert_array_equal(got[1].bias, sd["main.4.bias"].numpy())
    assert got[2].weight is None and got[2].bias is None
    # the stats are not the defaults (0 / 1): the fixture really trained them
    assert np.abs(got[1].running_mean).max() > 0.05 and np.abs(got[1].running_var - 1).max() > 0.05


def _assert_one_line_error(excinfo, path=None, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    if path is not None:
        assert str(path) in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


# ---------------------------------------------------------------------------------------------
# Checkpoint layouts


@pytest.mark.parametrize(
    "layout",
    [
        "bare",
        "state_dict",
        "lightning",  # {"state_dict": ..., "epoch", "optimizer_states": [...]} plus scalars
        "netG_in_checkpoint",  # two levels
        "three_levels",
        "model_and_identical_ema",  # same stats twice: not ambiguous
    ],
)
def test_nested_layouts(tmp_path, generator, layout):
    import torch

    sd = _state(generator)
    payload = {
        "bare": sd,
        "state_dict": {"state_dict": sd},
        "lightning": {"epoch": 7, "global_step": 100, "state_dict": sd,
                      "optimizer_states": [{"lr": 0.1}], "hparams": {"lr": 0.1}},
        "netG_in_checkpoint": {"checkpoint": {"netG": sd, "iter": 3}},
        "three_levels": {"a": {"b": {"G": sd}}},
        "model_and_identical_ema": {"model": sd, "ema": {k: v.clone() for k, v in sd.items()}},
    }[layout]
    path = tmp_path / "g.pth"
    torch.save(payload, path)
    _check_modules(load_stats(path), generator)
    _check_modules(stats_from_arrays(payload), generator)  # the in-memory twin


def test_deeper_than_three_levels_is_not_searched(generator):
    deep = {"a": {"b": {"c": {"G": _state(generator)}}}}
    with pytest.raises(NormfixError) as e:
        stats_from_arrays(deep)
    _assert_one_line_error(e, None, "no running statistics", "top-level keys: a")
    # ... but an explicit key reaches it
    _check_modules(stats_from_arrays(deep, key="a/b/c/G"), generator)


@pytest.mark.parametrize(
    "prefix", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."]
)
def test_wrapper_prefixes_are_stripped(tmp_path, generator, prefix):
    import torch

    sd = OrderedDict((prefix + k, v) for k, v in _state(generator).items())
    path = tmp_path / "ddp.pt"
    torch.save({"model_state_dict": sd}, path)
    _check_modules(load_stats(path), generator)


def test_real_dataparallel_and_compiled_submodule(generator):
    torch = pytest.importorskip("torch")
    _check_modules(stats_from_arrays(torch.nn.DataParallel(generator).state_dict()), generator)
    # a compiled submodule puts _orig_mod in the middle of the path
    sd = {k.replace("main.", "main._orig_mod.", 1): v for k, v in _state(generator).items()}
    _check_modules(stats_from_arrays(sd), generator)


def test_module_prefix_not_stripped_when_it_is_a_real_submodule():
    # must-not-fire twin: only some keys start with "module.", so it is a genuine attribute
    sd = {
        "module.bn.running_mean": np.zeros(2, np.float32), "module.bn.running_var": np.ones(2, np.float32),
        "head.bn.running_mean": np.zeros(3, np.float32), "head.bn.running_var": np.ones(3, np.float32),
    }
    assert [m.name for m in stats_from_arrays(sd)] == ["module.bn", "head.bn"]


def _two_models():
    def sd(seed, c):
        r = np.random.default_rng(seed)
        return {"n.running_mean": r.normal(size=c).astype(np.float32),
                "n.running_var": r.uniform(0.5, 2, c).astype(np.float32)}
    return sd(1, 3), sd(2, 4)


def test_several_different_candidates_need_a_key(tmp_path):
    import torch

    g, d = _two_models()
    payload = {"G": {k: torch.from_numpy(v) for k, v in g.items()},
               "D": {k: torch.from_numpy(v) for k, v in d.items()}}
    path = tmp_path / "gan.ckpt"
    torch.save(payload, path)
    with pytest.raises(NormfixError) as e:
        load_stats(path)
    _assert_one_line_error(e, path, "'G' (1 module)", "'D' (1 module)", "key=")
    np.testing.assert_array_equal(load_stats(path, key="G")[0].running_mean, g["n.running_mean"])
    np.testing.assert_array_equal(load_stats(path, key="D")[0].running_var, d["n.running_var"])
    with pytest.raises(NormfixError) as e:
        load_stats(path, key="netG")
    _assert_one_line_error(e, path, "'netG'", "not found", "'G'", "'D'")


def test_key_as_module_prefix_in_a_flat_state_dict():
    g, d = _two_models()
    flat = {**{"generator." + k: v for k, v in g.items()}, **{"discriminator." + k: v for k, v in d.items()}}
    # one flat dict: no ambiguity by nesting, both modules are returned with full names
    assert [m.name for m in stats_from_arrays(flat)] == ["generator.n", "discriminator.n"]
    picked = stats_from_arrays(flat, key="generator")
    assert [m.name for m in picked] == ["n"]
    np.testing.assert_array_equal(picked[0].running_mean, g["n.running_mean"])


def test_order_follows_checkpoint_and_extras_ignored():
    f = np.float32
    sd = OrderedDict([
        ("z.running_var", np.ones(2, f)), ("z.running_mean", np.zeros(2, f)),
        ("z.num_batches_tracked", np.array(5)),
        ("a.weight", np.ones(3, f)), ("a.running_mean", np.zeros(3, f)), ("a.running_var", np.ones(3, f)),
        ("conv.weight", np.ones((3, 3, 1, 1), f)),  # not a norm: no running stats, ignored
        ("running_mean", np.zeros(1, f)), ("running_var", np.ones(1, f)),  # a bare BN's own dict
    ])
    got = stats_from_arrays(sd)
    assert [m.name for m in got] == ["z", "a", ""]
    assert got[1].weight is not None and got[1].bias is None


def test_dtypes_kept_and_bfloat16_widened():
    torch = pytest.importorskip("torch")
    sd = {"h.running_mean": torch.zeros(2, dtype=torch.float16), "h.running_var": torch.ones(2, dtype=torch.float16),
          "b.running_mean": torch.full((2,), 0.5, dtype=torch.bfloat16), "b.running_var": torch.ones(2, dtype=torch.bfloat16),
          "d.running_mean": np.zeros(2), "d.running_var": np.ones(2)}
    h, b, d = stats_from_arrays(sd)
    assert h.running_mean.dtype == np.float16
    assert b.running_mean.dtype == np.float32 and b.running_mean[0] == 0.5
    assert d.running_var.dtype == np.float64


# ---------------------------------------------------------------------------------------------
# npz / safetensors


def test_npz_roundtrip_keeps_order(tmp_path, generator):
    path = tmp_path / "g.npz"
    np.savez(path, **{k: v.numpy() for k, v in _state(generator).items()})
    _check_modules(load_stats(path), generator)


def test_npz_object_array_refused(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, **{"n.running_mean": np.array([{"x": 1}], dtype=object), "n.running_var": np.ones(1)})
    with pytest.raises(NormfixError) as e:
        load_stats(path)
    _assert_one_line_error(e, path, "object array", "n.running_mean")


def test_npz_that_is_a_pickle_or_npy_refused(tmp_path):
    marker = tmp_path / "pwned"
    pkl = tmp_path / "evil.npz"
    pkl.write_bytes(pickle.dumps(_Evil(f"touch {marker}"), protocol=2))
    with pytest.raises(NormfixError) as e:
        load_stats(pkl)
    _assert_one_line_error(e, pkl, "refused")
    assert not marker.exists()
    npy = tmp_path / "single.npz"
    with open(npy, "wb") as f:
        np.save(f, np.ones(3))
    with pytest.raises(NormfixError) as e:
        load_stats(npy)
    _assert_one_line_error(e, npy, "not a .npz archive")


def test_safetensors_roundtrip_natural_order(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    f = np.float32
    sd = OrderedDict()
    for i in (2, 10, 5):  # registration order main.2, main.5, main.10 after natural sort
        sd[f"main.{i}.weight"] = np.full(3, i, f)
        sd[f"main.{i}.running_mean"] = np.full(3, i, f)
        sd[f"main.{i}.running_var"] = np.full(3, i + 1, f)
        sd[f"main.{i}.num_batches_tracked"] = np.array(1, np.int64)
    path = tmp_path / "g.safetensors"
    st.save_file(dict(sd), str(path))
    got = load_stats(path)
    assert [m.name for m in got] == ["main.2", "main.5", "main.10"]
    assert [float(m.running_var[0]) for m in got] == [3, 6, 11]
    assert got[0].weight is not None and got[0].bias is None
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(path.read_bytes()[:40])
    with pytest.raises(NormfixError) as e:
        load_stats(bad)
    _assert_one_line_error(e, bad, "safetensors")


# ---------------------------------------------------------------------------------------------
# Hostile and broken files


class _Evil:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _EvilOpen:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.mark.parametrize("variant", ["torch_zip", "torch_zip_nested", "raw_pickle_p2", "raw_pickle_p4", "open_builtin"])
def test_malicious_pickle_refused_without_running(tmp_path, variant):
    torch = pytest.importorskip("torch")
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    evil = _Evil(f"touch {marker}")
    if variant == "torch_zip":
        torch.save(evil, path)
    elif variant == "torch_zip_nested":
        torch.save({"state_dict": {"n.running_mean": torch.zeros(2), "n.running_var": torch.ones(2)}, "x": evil}, path)
    elif variant == "open_builtin":
        torch.save({"x": _EvilOpen(str(marker))}, path)
    else:
        path.write_bytes(pickle.dumps({"x": evil}, protocol=2 if variant.endswith("p2") else 4))
    # the payload really is live: a plain pickle.loads would run it (checked on a copy target)
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Evil(f"touch {probe}")))
    assert probe.exists()
    with pytest.raises(NormfixError) as e:
        load_stats(path)
    msg = _assert_one_line_error(e, path, "refused")
    assert not marker.exists()
    if variant in ("torch_zip", "raw_pickle_p2"):
        assert "system" in msg  # names what it would have imported


def test_whole_pickled_module_refused_with_hint(tmp_path, generator):
    import torch

    path = tmp_path / "full.pth"
    torch.save(generator.main, path)  # a Sequential: pickles by reference to torch classes
    with pytest.raises(NormfixError) as e:
        load_stats(path)
    _assert_one_line_error(e, path, "refused", "state_dict")


def _valid_pt(tmp_path):
    import torch

    path = tmp_path / "ok.pt"
    torch.save({"n.running_mean": torch.zeros(3), "n.running_var": torch.ones(3)}, path)
    return path


def test_truncated_at_many_offsets(tmp_path):
    pytest.importorskip("torch")
    data = _valid_pt(tmp_path).read_bytes()
    offsets = sorted({1, 2, 10, 64, 200, len(data) // 3, len(data) // 2, len(data) - 100, len(data) - 22, len(data) - 1})
    for off in offsets:
        path = tmp_path / f"trunc_{off}.pt"
        path.write_bytes(data[:off])
        with pytest.raises(NormfixError) as e:
            load_stats(path)
        _assert_one_line_error(e, path)


def test_corrupt_zip_directory(tmp_path):
    pytest.importorskip("torch")
    data = bytearray(_valid_pt(tmp_path).read_bytes())
    end = data.rfind(b"PK\x05\x06")  # end-of-central-directory record
    data[end : end + 4] = b"XXXX"
    path = tmp_path / "corrupt.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(NormfixError) as e:
        load_stats(path)
    _assert_one_line_error(e, path, "corrupt")


@pytest.mark.parametrize("case", ["empty", "missing", "directory", "text", "random", "tensor_payload", "list_payload", "unknown_ext"])
def test_unreadable_files(tmp_path, case):
    name = {"directory": "dir.pt", "unknown_ext": "stats.h5"}.get(case, f"{case}.pt")
    path = tmp_path / name
    if case == "empty":
        path.write_bytes(b"")
    elif case == "directory":
        path.mkdir()
    elif case == "text":
        path.write_text("these are not the weights you are looking for\n")
    elif case == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif case in ("tensor_payload", "list_payload"):
        torch = pytest.importorskip("torch")
        torch.save(torch.zeros(3) if case == "tensor_payload" else [torch.zeros(3)], path)
    elif case == "unknown_ext":
        path.write_bytes(b"\x89HDF\r\n")
    if case in ("text", "random"):
        pytest.importorskip("torch")
    with pytest.raises(NormfixError) as e:
        load_stats(path)
    msg = _assert_one_line_error(e, path)
    expected = {"empty": "empty", "missing": "no such file", "directory": "directory",
                "tensor_payload": "Tensor", "list_payload": "list", "unknown_ext": "extension"}
    if case in expected:
        assert expected[case] in msg


def test_torch_missing_gives_install_hint(tmp_path, monkeypatch):
    path = tmp_path / "g.pt"
    path.write_bytes(b"PK\x03\x04 something")
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(NormfixError) as e:
        load_stats(path)
    _assert_one_line_error(e, path, "pip install 'onnx-normfix[torch]'")


def test_import_does_not_pull_torch_or_onnxruntime():
    code = "import onnx_normfix.stats, sys; assert 'torch' not in sys.modules; assert 'onnxruntime' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ---------------------------------------------------------------------------------------------
# Invalid statistics


def _sd(**overrides):
    f = np.float32
    sd = {"main.1.weight": np.ones(3, f), "main.1.bias": np.zeros(3, f),
          "main.1.running_mean": np.array([0.1, -0.2, 0.3], f), "main.1.running_var": np.array([1.0, 2.0, 0.5], f)}
    for k, v in overrides.items():
        k = "main.1." + k
        if v is None:
            del sd[k]
        else:
            sd[k] = v
    return sd


@pytest.mark.parametrize(
    "overrides,words",
    [
        ({"running_mean": np.array([0.0, np.nan, 1.0], np.float32)}, ["'main.1.running_mean'", "NaN"]),
        ({"running_var": np.array([1.0, np.inf, 1.0], np.float32)}, ["'main.1.running_var'", "Inf"]),
        ({"running_var": np.array([1.0, -0.5, 1.0], np.float32)}, ["'main.1.running_var'", "negative", "-0.5"]),
        ({"running_var": np.ones(4, np.float32)}, ["3 channels", "has 4"]),
        ({"running_mean": np.zeros((3, 1), np.float32)}, ["'main.1.running_mean'", "[3, 1]"]),
        ({"running_mean": np.zeros(0, np.float32), "running_var": np.zeros(0, np.float32)}, ["[0]"]),
        ({"running_mean": np.zeros(3, np.int64)}, ["int64", "floating"]),
        ({"running_mean": np.array(["a", "b", "c"])}, ["floating"]),
        ({"weight": np.ones(4, np.float32)}, ["'main.1.weight'", "[4]", "expected [3]"]),
        ({"bias": np.ones((3, 3), np.float32)}, ["'main.1.bias'", "[3, 3]"]),
        ({"running_var": None}, ["'main.1.running_mean' has no matching 'main.1.running_var'"]),
        ({"running_mean": None}, ["'main.1.running_var' has no matching 'main.1.running_mean'"]),
    ],
    ids=["nan", "inf", "negative_var", "length_mismatch", "2d", "empty", "int", "strings",
         "weight_shape", "bias_shape", "no_var", "no_mean"],
)
def test_invalid_statistics(overrides, words):
    with pytest.raises(NormfixError) as e:
        stats_from_arrays(_sd(**overrides))
    _assert_one_line_error(e, None, *words)


def test_valid_twin_and_zero_variance_accepted():
    (m,) = stats_from_arrays(_sd(running_var=np.array([0.0, 1.0, 2.0], np.float32)))
    assert m.name == "main.1" and m.running_var[0] == 0


def test_invalid_statistics_from_file_name_the_file(tmp_path):
    path = tmp_path / "nan.npz"
    np.savez(path, **_sd(running_var=np.array([1.0, np.nan, 1.0], np.float32)))
    with pytest.raises(NormfixError) as e:
        load_stats(path)
    _assert_one_line_error(e, path, "NaN")


def test_no_stats_and_non_dict():
    with pytest.raises(NormfixError) as e:
        stats_from_arrays({"conv.weight": np.ones(3), "meta": {"lr": 1}})
    _assert_one_line_error(e, None, "no running statistics", "conv.weight", "meta")
    with pytest.raises(NormfixError):
        stats_from_arrays([np.ones(3)])


# ---------------------------------------------------------------------------------------------
# estimate_stats
#
#   x[N,C,*S] -> Mul(a[C,1..]) -> Add(b[C,1..]) -> t -> InstanceNormalization(scale, B) -> y
#   t per channel: mean = a*mu + b, var = a^2 * sigma^2


def _norm_model(spatial, batch, channels=3):
    rank = 2 + len(spatial)
    bshape = [channels] + [1] * len(spatial)
    a = np.array([2.0, -1.0, 0.5], np.float32)[:channels].reshape(bshape)
    b = np.array([1.0, 0.0, -3.0], np.float32)[:channels].reshape(bshape)
    nodes = [
        helper.make_node("Mul", ["x", "a"], ["m"]),
        helper.make_node("Add", ["m", "b"], ["t"]),
        helper.make_node("InstanceNormalization", ["t", "s", "B"], ["y"], epsilon=1e-5),
    ]
    inits = [onnx.numpy_helper.from_array(a, "a"), onnx.numpy_helper.from_array(b, "b"),
             onnx.numpy_helper.from_array(np.ones(channels, np.float32), "s"),
             onnx.numpy_helper.from_array(np.zeros(channels, np.float32), "B")]
    dims = [batch, channels, *spatial]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, channels, *spatial])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    assert rank == len(dims)
    return model, a, b


def _reference(x, a, b):
    t = (x * a + b).astype(np.float32)  # same float32 ops as onnxruntime
    flat = t.reshape(t.shape[0], t.shape[1], -1).astype(np.float64)
    return flat.mean(2).mean(0), flat.var(2, ddof=1).mean(0)


MU = np.array([0.5, -2.0, 3.0], np.float32)
SIGMA = np.array([1.0, 0.3, 2.0], np.float32)


def _samples(n, spatial, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3, *spatial)).astype(np.float32)
    shape = [1, 3] + [1] * len(spatial)
    return x * SIGMA.reshape(shape) + MU.reshape(shape)


@pytest.mark.parametrize("spatial,batch", [((64,), "N"), ((8, 8), "N"), ((8, 8), 4), ((3, 4, 5), 2)],
                         ids=["1d_dynamic", "2d_dynamic", "2d_fixed4", "3d_fixed2"])
def test_estimate_stats_matches_numpy_and_truth(spatial, batch):
    model, a, b = _norm_model(spatial, batch)
    before = model.SerializeToString()
    x = _samples(12 if batch != "N" else 10, spatial)
    got = estimate_stats(model, {"x": x}, ["t"])
    mean, var = got["t"]
    assert mean.dtype == var.dtype == np.float32 and mean.shape == var.shape == (3,)
    want_mean, want_var = _reference(x, a, b)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(var, want_var, rtol=1e-6, atol=1e-6)
    # the estimate approaches the true distribution (sampling error only: ~10 * 64 values/channel)
    true_mean, true_var = a.ravel() * MU + b.ravel(), (a.ravel() * SIGMA) ** 2
    np.testing.assert_allclose(mean, true_mean, atol=0.15 * np.sqrt(true_var).max())
    np.testing.assert_allclose(var, true_var, rtol=0.2)
    assert model.SerializeToString() == before  # the caller's model is untouched


def test_estimate_stats_fixed_batch_runs_in_chunks_and_equals_one_big_run():
    fixed, a, b = _norm_model((6, 6), 2)
    dynamic, _, _ = _norm_model((6, 6), "N")
    x = _samples(8, (6, 6), seed=3)
    m1, v1 = estimate_stats(fixed, {"x": x}, ["t"])["t"]
    m2, v2 = estimate_stats(dynamic, {"x": x.astype(np.float64)}, ["t", "t"])["t"]  # float64 cast, dup name
    np.testing.assert_allclose(m1, m2, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(v1, v2, rtol=1e-6, atol=1e-7)


def test_estimate_stats_of_graph_input_and_output():
    model, a, b = _norm_model((5, 5), "N")
    x = _samples(4, (5, 5))
    got = estimate_stats(model, {"x": x}, ["x", "y"])
    flat = x.reshape(4, 3, -1).astype(np.float64)
    np.testing.assert_allclose(got["x"][0], flat.mean(2).mean(0), rtol=1e-6)
    # y is instance-normalized: every instance has mean 0, var ~1 (biased var + eps -> unbiased)
    np.testing.assert_allclose(got["y"][0], 0, atol=1e-5)
    np.testing.assert_allclose(got["y"][1], 25 / 24, rtol=1e-3)


@pytest.mark.parametrize(
    "case,words",
    [
        ("unknown_tensor", ["not in the graph", "nope"]),
        ("missing_input", ["missing ['x']"]),
        ("extra_input", ["unknown ['z']"]),
        ("not_multiple", ["10 samples", "batch size 4"]),
        ("spatial_one", ["spatial element", "needs 2"]),
        ("no_sample_axis", ["leading sample axis"]),
        ("wrong_shape", ["onnxruntime failed"]),
    ],
)
def test_estimate_stats_errors(case, words):
    spatial = (1, 1) if case == "spatial_one" else (4, 4)
    model, _, _ = _norm_model(spatial, 4 if case == "not_multiple" else "N")
    x = _samples(10 if case == "not_multiple" else 4, spatial)
    data, tensors = {"x": x}, ["t"]
    if case == "unknown_tensor":
        tensors = ["t", "nope"]
    elif case == "missing_input":
        data = {}
    elif case == "extra_input":
        data = {"x": x, "z": x}
    elif case == "no_sample_axis":
        data = {"x": np.float32(1.0)}
    elif case == "wrong_shape":
        data = {"x": x[:, :2]}
    with pytest.raises(NormfixError) as e:
        estimate_stats(model, data, tensors)
    _assert_one_line_error(e, None, *words)
