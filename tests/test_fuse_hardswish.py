"""The newcomer's pass (tests/plugins/fuse_hardswish.py): one pass file and this test file,
no edit anywhere else. Real PyTorch exports, a must-not-fire twin per guard, the CLI flag."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from helpers import assert_declines, assert_rewrites, count_ops

PLUGIN = Path(__file__).parent / "plugins" / "fuse_hardswish.py"


@pytest.fixture(scope="module")
def fuse_hardswish():
    sys.path.insert(0, str(PLUGIN.parent))
    try:
        import fuse_hardswish as module
    finally:
        sys.path.remove(str(PLUGIN.parent))
    yield module.PASS
    from onnx_normfix.registry import PASSES

    PASSES.pop("fuse_hardswish", None)


class HandWritten(torch.nn.Module):
    def __init__(self, shared=False):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.shared = shared

    def forward(self, x):
        y = self.conv(x)
        inner = y * torch.nn.functional.relu6(y + 3)
        out = inner / 6
        return (out, inner) if self.shared else out


class Exported(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y * torch.nn.functional.hardsigmoid(y)


def export(module, tmp_path, opset=17, name="m.onnx") -> onnx.ModelProto:
    torch.manual_seed(0)
    module.eval()
    path = tmp_path / name
    torch.onnx.export(module, (torch.randn(2, 3, 8, 8),), str(path), opset_version=opset, dynamo=False,
                      input_names=["x"], dynamic_axes={"x": {0: "N"}})
    return onnx.load(str(path))


def test_fuses_the_hand_written_form_and_matches_pytorch(fuse_hardswish, tmp_path):
    module = HandWritten()
    model = export(module, tmp_path)
    result = assert_rewrites(fuse_hardswish, model, rewrites=1, ops={"HardSwish": 1, "Clip": 0, "Div": 0})
    x = torch.rand(2, 3, 8, 8) * 255
    from helpers import ort_run

    got = ort_run(result.model, {"x": x.numpy()})
    np.testing.assert_allclose(list(got.values())[0], module(x).detach().numpy(), rtol=1e-4, atol=1e-4)


def test_fuses_x_times_hardsigmoid(fuse_hardswish, tmp_path):
    assert_rewrites(fuse_hardswish, export(Exported(), tmp_path), rewrites=1, ops={"HardSwish": 1, "HardSigmoid": 0})


def test_declines_when_an_intermediate_is_also_an_output(fuse_hardswish, tmp_path):
    assert_declines(fuse_hardswish, export(HandWritten(shared=True), tmp_path), why="also used elsewhere")


def test_declines_below_opset_14(fuse_hardswish, tmp_path):
    assert_declines(fuse_hardswish, export(HandWritten(), tmp_path, opset=13), why="needs opset 14")


def test_scope_option_limits_the_sites(fuse_hardswish, tmp_path):
    model = export(HandWritten(), tmp_path)
    result = assert_rewrites(fuse_hardswish, model, rewrites=0, options={"hardswish_scope": "/nowhere/"})
    assert count_ops(result.model) == count_ops(model)


def test_the_cli_loads_it_and_builds_its_flag(tmp_path):
    model = export(HandWritten(), tmp_path)
    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    cli = [sys.executable, "-m", "onnx_normfix"]
    listed = subprocess.run(cli + ["--plugin", str(PLUGIN), "--list-passes"], capture_output=True, text=True)
    assert "fuse_hardswish" in listed.stdout and "[preserves outputs]" in listed.stdout
    helped = subprocess.run(cli + ["--plugin", str(PLUGIN), "--help"], capture_output=True, text=True)
    assert "--hardswish-scope" in helped.stdout
    run = subprocess.run(cli + [str(src), str(out), "--plugin", str(PLUGIN), "--passes", "fuse_hardswish,fold_bn",
                                "--hardswish-scope", "/"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert count_ops(onnx.load(str(out))).get("HardSwish") == 1
    assert model.graph.node  # the input file was only read
