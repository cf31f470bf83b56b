"""The README's pass-authoring examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch

import onnx_normfix as nf
from onnx_normfix.registry import PASSES

from test_authoring import _min_max_model
from test_fuse_hardswish import HandWritten

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _blocks(heading: str) -> list[str]:
    section = README[README.index(heading):]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_your_own_pass_example_runs(tmp_path):
    code = _blocks("### Your own pass")[0]
    # registered under other names, so it can sit beside the plugin file's own registration
    code = code.replace('"fuse_hardswish"', '"readme_hardswish"').replace("hardswish_scope", "readme_scope")
    try:
        exec(code, {})
        torch.onnx.export(HandWritten().eval(), (torch.randn(2, 3, 8, 8),), str(tmp_path / "m.onnx"),
                          opset_version=17, dynamo=False, input_names=["x"])
        stage = nf.optimize(tmp_path / "m.onnx", passes=["readme_hardswish"], readme_scope="").report["passes"][0]
        assert stage["rewrites"] == 1 and stage["validation"]["status"] == "passed"
    finally:
        PASSES.pop("readme_hardswish", None)


def test_the_graphsurgeon_example_runs():
    code = _blocks("### A graphsurgeon script as a pass")[0]
    try:
        exec(code, {})
        result = nf.optimize(_min_max_model(), passes=["minmax_to_clip"])
        assert [n.op_type for n in result.model.graph.node] == ["Clip"]
        assert result.report["passes"][0]["validation"]["status"] == "passed"
    finally:
        PASSES.pop("minmax_to_clip", None)
