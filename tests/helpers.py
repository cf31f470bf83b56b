"""Small shared helpers for the tests: run a model on onnxruntime, build feeds."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort


def ort_run(model: onnx.ModelProto, feeds: dict, outputs=None) -> dict:
    """Run `model` with every onnxruntime graph optimization disabled (an optimized
    reference would hide bugs in our rewrites)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = outputs or [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def assert_close(got: dict, want: dict, rtol=1e-4, atol=1e-5):
    assert set(got) == set(want), (sorted(got), sorted(want))
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=atol, err_msg=k)


def count_ops(model: onnx.ModelProto) -> dict:
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts
