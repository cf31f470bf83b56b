"""fold_bn property test: random Conv/ConvTranspose + BN configurations give the same outputs
before and after folding (onnxruntime, optimizations off)."""

from __future__ import annotations

import copy

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import count_ops, ort_run
from test_fold_bn import conv_model, feeds_for
from onnx_normfix.passes.fold_bn import PASS
from onnx_normfix.registry import PassContext


@st.composite
def conv_configs(draw):
    op = draw(st.sampled_from(["Conv", "ConvTranspose"]))
    dims = draw(st.integers(1, 3))
    group = draw(st.integers(1, 3))
    return dict(
        op=op,
        dims=dims,
        group=group,
        cin=group * draw(st.integers(1, 3)),
        cout=group * draw(st.integers(1, 3)),
        k=draw(st.integers(1, 3 if dims < 3 else 2)),
        stride=draw(st.integers(1, 2)),
        bias=draw(st.booleans()),
        dtype=draw(st.sampled_from([np.float32, np.float16])),
        opset=draw(st.sampled_from([7, 9, 14, 15, 22])),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_configs())
def test_folding_preserves_outputs(config):
    model = conv_model(**config)
    feeds = feeds_for(model, seed=config["seed"])
    want = ort_run(model, feeds)["y"]
    folded = copy.deepcopy(model)
    result = PASS.run(folded, PassContext(options={}))
    assert result.rewrites == 1 and result.notes == []
    assert count_ops(folded) == {config["op"]: 1}
    onnx.checker.check_model(folded, full_check=True)
    got = ort_run(folded, feeds)["y"]
    assert got.dtype == want.dtype and got.shape == want.shape
    if config["dtype"] == np.float32:
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    else:
        # fp16 (unit roundoff 2^-11): the reference rounds after the Conv and after BN, the
        # folded model rounds its weights; they differ by ~1 ulp of the output scale, where one
        # ulp is 2^-10 of it. Allowed: 4 ulps of max(|y|, 1).
        scale = max(float(np.abs(want.astype(np.float32)).max()), 1.0)
        np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32),
                                   rtol=2e-3, atol=4 * 2.0**-10 * scale)
