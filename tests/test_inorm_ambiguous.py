"""fix_inorm: affine=False norms of equal channel count, unscoped names. Nothing in the graph
says which checkpoint module is which: registration order is not run order, and a
.safetensors checkpoint comes back name-sorted. Refused with the candidates; settled by
PyTorch's outputs (`--inputs`/`--reference`, a bounded search) or an explicit mapping.

The network registers its norms z, x, y, runs them y, z, x, and the names sort x, y, z: any
order-based guess is wrong.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest

import onnx_normfix
from onnx_normfix import NormfixError
from onnx_normfix.passes import fix_inorm

from helpers import count_ops, ort_run

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")
nn = torch.nn


class Net(nn.Module):
    def __init__(self, track: bool, channels=(5, 5, 5)):
        super().__init__()
        cz, cx, cy = channels
        self.conv1 = nn.Conv2d(3, cy, 3, padding=1)
        self.n_z = nn.InstanceNorm2d(cz, affine=False, track_running_stats=track)
        self.n_x = nn.InstanceNorm2d(cx, affine=False, track_running_stats=track)
        self.n_y = nn.InstanceNorm2d(cy, affine=False, track_running_stats=track)
        self.conv2 = nn.Conv2d(cy, cz, 3, padding=1)
        self.conv3 = nn.Conv2d(cz, cx, 1)

    def forward(self, x):
        h = torch.relu(self.n_y(self.conv1(x)))
        h = torch.relu(self.n_z(self.conv2(h)))
        return self.n_x(self.conv3(h))


def _case(tmp_path, channels=(5, 5, 5)):
    torch.manual_seed(5)
    real = Net(True, channels)
    g = torch.Generator().manual_seed(9)
    for norm in (real.n_x, real.n_y, real.n_z):
        norm.running_mean.copy_(torch.rand(norm.num_features, generator=g) - 0.5)
        norm.running_var.copy_(torch.rand(norm.num_features, generator=g) * 2.5 + 0.3)
    real.eval()
    twin = Net(False, channels)  # what torch <= 1.9 exported: the stats are gone
    twin.load_state_dict({k: v for k, v in real.state_dict().items() if "running" not in k and "num_batches" not in k})
    twin.eval()
    x = torch.randn(2, 3, 6, 7)
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(twin, (x,), f, dynamo=False, input_names=["x"], output_names=["y"], opset_version=17)
    model = onnx.load_from_string(f.getvalue())
    for k, node in enumerate(model.graph.node):  # unscoped names: no evidence in the graph
        node.name = f"node{k}"
    assert count_ops(model)["InstanceNormalization"] == 3
    from safetensors.torch import save_file

    ckpt = tmp_path / "net.safetensors"
    save_file({k: v.contiguous() for k, v in real.state_dict().items()}, str(ckpt))
    with torch.no_grad():
        want = real(x).numpy()
    return model, ckpt, x.numpy(), want


def test_equal_channels_are_refused_with_the_candidates(tmp_path):
    model, ckpt, _, _ = _case(tmp_path)
    with pytest.raises(NormfixError) as err:
        onnx_normfix.optimize(model, passes=["fix_inorm"], stats=str(ckpt))
    message = str(err.value)
    assert "modules n_x, n_y, n_z all have 5 channels" in message
    assert ".safetensors sorts keys by name" in message and "--reference" in message


def test_reference_from_pytorch_settles_it(tmp_path):
    model, ckpt, x, want = _case(tmp_path)
    result = onnx_normfix.optimize(model, passes=["fix_inorm", "fold_bn"], stats=str(ckpt),
                                   inputs={"x": x}, reference={"y": want})
    norms = result.report["passes"][0]["details"]["norms"]
    assert [d["module"] for d in norms] == ["n_y", "n_z", "n_x"]  # run order
    assert all(d["method"].startswith("reference (6 assignments tried") for d in norms)
    assert result.report["reference"]["status"] == "passed"
    np.testing.assert_allclose(ort_run(result.model, {"x": x})["y"], want, rtol=1e-4, atol=1e-5)


def test_cli_with_and_without_the_reference(tmp_path):
    from onnx_normfix.cli import main

    model, ckpt, x, want = _case(tmp_path)
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(model, src)
    np.savez(tmp_path / "in.npz", x=x)
    np.savez(tmp_path / "ref.npz", y=want)
    base = [str(src), str(out), "--passes", "fix_inorm", "--stats", str(ckpt), "-q"]
    assert main(base) == 2 and not out.exists()
    assert main(base + ["--inputs", str(tmp_path / "in.npz"), "--reference", str(tmp_path / "ref.npz")]) == 0
    np.testing.assert_allclose(ort_run(onnx.load(out), {"x": x})["y"], want, rtol=1e-4, atol=1e-5)
    labels = [n.name for n in model.graph.node if n.op_type == "InstanceNormalization"]
    mapping = [f"--inorm-module={a}={b}" for a, b in zip(labels, ["n_y", "n_z", "n_x"])]
    assert main(base + mapping) == 0


def test_a_wrong_reference_is_no_match(tmp_path):
    model, ckpt, x, want = _case(tmp_path)
    with pytest.raises(NormfixError, match="none of the 6 assignments .* reproduces the reference"):
        onnx_normfix.optimize(model, passes=["fix_inorm"], stats=str(ckpt), inputs={"x": x}, reference={"y": want + 1})


def test_the_search_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(fix_inorm, "MAX_ASSIGNMENTS", 5)
    model, ckpt, x, want = _case(tmp_path)
    with pytest.raises(NormfixError, match="6 assignments .* more than 5 to try"):
        onnx_normfix.optimize(model, passes=["fix_inorm"], stats=str(ckpt), inputs={"x": x}, reference={"y": want})


def test_twin_distinct_channel_counts_match_without_a_reference(tmp_path):
    model, ckpt, x, want = _case(tmp_path, channels=(4, 6, 5))
    result = onnx_normfix.optimize(model, passes=["fix_inorm"], stats=str(ckpt))
    norms = result.report["passes"][0]["details"]["norms"]
    assert [(d["module"], d["method"]) for d in norms] == [("n_y", "channels"), ("n_z", "channels"), ("n_x", "channels")]
    np.testing.assert_allclose(ort_run(result.model, {"x": x})["y"], want, rtol=1e-4, atol=1e-5)
