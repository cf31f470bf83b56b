"""fuse_norms review findings: dynamo's GroupNorm (symbolic shapes), the leftovers' reasons,
hand-written GroupNorm under opset-13 Reshape inference. Each case has a must-not-fire twin."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from helpers import count_ops, ort_run
from onnx_normfix.leftovers import find_leftovers
from onnx_normfix.passes.fuse_norms import PASS
from onnx_normfix.registry import PassContext

C, G = 8, 2


def run_pass(model, **options):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    result = PASS.run(out, PassContext(options={"target_opset": None, **options}))
    return out, result


def feeds(model, shape=(2, C, 5, 3), seed=0):
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 3 + 1}


def _const(name, value):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name))


def dynamo_groupnorm(opset=21, target=(0, G, -1), scale_value=1.0, shape_attrs=None):
    """dynamo's GroupNorm with symbolic N/H/W, unoptimized style: the Reshape target is a
    Concat of Constants (shape inference cannot read it), the InstanceNormalization's ones
    and zeros are Expand(CastLike(.)), and the way back is Shape(x, start=0)."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((C, 1, 1)).astype(np.float32)
    b = rng.standard_normal((C, 1, 1)).astype(np.float32)
    nodes = [
        _const("t0", np.array([target[0]], np.int64)), _const("t1", np.array([target[1]], np.int64)),
        _const("t2", np.array([target[2]], np.int64)),
        helper.make_node("Concat", ["t0", "t1", "t2"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["xg"]),
        _const("one", np.array(scale_value, np.float32)), _const("zero", np.array(0.0, np.float32)),
        _const("ng", np.array([max(target[1], target[2])], np.int64)),
        helper.make_node("CastLike", ["one", "x"], ["one_c"]),
        helper.make_node("Expand", ["one_c", "ng"], ["ones"]),
        helper.make_node("CastLike", ["zero", "x"], ["zero_c"]),
        helper.make_node("Expand", ["zero_c", "ng"], ["zeros"]),
        helper.make_node("InstanceNormalization", ["xg", "ones", "zeros"], ["yg"], epsilon=1e-5, name="node_inorm"),
        helper.make_node("Shape", ["x"], ["xs"], **(shape_attrs if shape_attrs is not None else {"start": 0})),
        helper.make_node("Reshape", ["yg", "xs"], ["yr"]),
        helper.make_node("Mul", ["yr", "w"], ["ym"]),
        helper.make_node("Add", ["ym", "b"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "dynamo_gn", [helper.make_tensor_value_info("x", T.FLOAT, ["N", C, "H", "W"])],
        [helper.make_tensor_value_info("y", T.FLOAT, ["N", C, "H", "W"])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _groupnorm_ref(x, w, b, eps=1e-5):
    n = x.shape[0]
    xg = x.reshape(n, G, -1).astype(np.float64)
    y = (xg - xg.mean(-1, keepdims=True)) / np.sqrt(xg.var(-1, keepdims=True) + eps)
    return y.reshape(x.shape) * w + b


def test_dynamo_groupnorm_form_fuses_with_symbolic_shapes():
    model = dynamo_groupnorm()
    after, result = run_pass(model)
    assert result.rewrites == 1, result.notes
    onnx.checker.check_model(after, full_check=True)
    ops = count_ops(after)
    assert ops.get("GroupNormalization") == 1 and "InstanceNormalization" not in ops, ops
    for shape in [(2, C, 5, 3), (1, C, 4, 7)]:  # symbolic N/H/W: two shapes
        f = feeds(model, shape)
        want, got = ort_run(model, f)["y"], ort_run(after, f)["y"]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        w = numpy_helper.to_array(model.graph.initializer[0])
        b = numpy_helper.to_array(model.graph.initializer[1])
        np.testing.assert_allclose(got, _groupnorm_ref(f["x"], w, b), rtol=1e-4, atol=1e-4)


def test_dynamo_groupnorm_twins_do_not_fire():
    # a real InstanceNorm over the [N, G, -1] view (scale not ones): not a GroupNorm, no rewrite
    after, result = run_pass(dynamo_groupnorm(scale_value=2.0))
    assert result.rewrites == 0 and count_ops(after).get("InstanceNormalization") == 1
    # [N, -1, G]: the statistics are over strided channels, not groups: declined, with a note
    _, result = run_pass(dynamo_groupnorm(target=(0, -1, G)))
    assert result.rewrites == 0
    assert any("GroupNorm at node_inorm" in n and "cannot prove" in n for n in result.notes), result.notes
    # below opset 21: stays in the exporters' form, and the note names the option
    _, result = run_pass(dynamo_groupnorm(opset=20))
    assert result.rewrites == 0
    assert any("GroupNorm at node_inorm" in n and "--target-opset 21" in n for n in result.notes), result.notes


def test_shape_with_start_end_is_not_the_whole_shape():
    from onnx_normfix.passes._fuse_norms_patterns import whole_shape

    assert whole_shape(helper.make_node("Shape", ["x"], ["s"]), 4)
    assert whole_shape(helper.make_node("Shape", ["x"], ["s"], start=0), 4)
    assert whole_shape(helper.make_node("Shape", ["x"], ["s"], start=-4, end=4), 4)
    assert not whole_shape(helper.make_node("Shape", ["x"], ["s"], start=1), 4)
    assert not whole_shape(helper.make_node("Shape", ["x"], ["s"], start=0, end=3), 4)
    assert not whole_shape(helper.make_node("Shape", ["x"], ["s"], end=-1), 4)


@pytest.mark.parametrize("optimize", [True, False])
def test_real_dynamo_groupnorm_export_fuses_at_21(optimize):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, C, 3, padding=1), torch.nn.GroupNorm(G, C)).eval()
    with torch.no_grad():
        m[1].weight.uniform_(0.5, 1.5)
        m[1].bias.uniform_(-0.5, 0.5)
    auto = torch.export.Dim.AUTO
    x = torch.randn(2, 3, 6, 5)
    model = torch.onnx.export(m, (x,), None, dynamo=True, optimize=optimize, input_names=["x"],
                              dynamic_shapes=({0: auto, 2: auto, 3: auto},), verbose=False).model_proto
    import onnx_normfix

    result = onnx_normfix.optimize(model, passes=["fuse_norms"], target_opset=21, validate=False)
    ops = count_ops(result.model)
    assert ops.get("GroupNormalization") == 1 and "InstanceNormalization" not in ops, ops
    for shape in [(2, 3, 6, 5), (1, 3, 4, 9)]:
        xi = torch.randn(*shape)
        got = next(iter(ort_run(result.model, {"x": xi.numpy()}).values()))
        np.testing.assert_allclose(got, m(xi).detach().numpy(), rtol=1e-4, atol=1e-4)


# ---- hand-written GroupNorm, TorchScript at opset 13: Reshape-13's shape inference reads only a
# constant target, so the Concat(Unsqueeze(Gather(Shape(x), i))) target left the rank unknown
def _hand_groupnorm_ts(opset, swap_back=False):
    torch = pytest.importorskip("torch")

    class HandGN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c = torch.nn.Conv2d(3, 6, 3, padding=1)
            self.w = torch.nn.Parameter(torch.rand(1, 6, 1, 1) + 0.5)
            self.b = torch.nn.Parameter(torch.rand(1, 6, 1, 1) - 0.5)

        def forward(self, x):
            x = self.c(x)
            n, c, h, w = x.shape
            g = x.reshape(n, 3, -1)
            m = g.mean(-1, keepdim=True)
            v = ((g - m) ** 2).mean(-1, keepdim=True)
            g = (g - m) / torch.sqrt(v + 1e-5)
            back = g.reshape(n, c, w, h) if swap_back else g.reshape(n, c, h, w)
            return back * self.w + self.b

    import io

    torch.manual_seed(0)
    m = HandGN().eval()
    buf = io.BytesIO()
    torch.onnx.export(m, (torch.randn(2, 3, 5, 5),), buf, dynamo=False, opset_version=opset, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "N", 2: "H", 3: "W"}})
    return m, onnx.load_from_string(buf.getvalue())


@pytest.mark.parametrize("opset", [13, 16])
def test_hand_groupnorm_torchscript_fuses_at_every_export_opset(opset):
    import onnx_normfix
    import torch

    m, model = _hand_groupnorm_ts(opset)
    result = onnx_normfix.optimize(model, passes=["fuse_norms"], target_opset=21, validate=False)
    ops = count_ops(result.model)
    assert ops.get("GroupNormalization") == 1 and not {"ReduceMean", "Sqrt", "Reshape"} & set(ops), ops
    below = onnx_normfix.optimize(model, passes=["fuse_norms"], validate=False)  # no target: the InstanceNorm form
    assert count_ops(below.model).get("InstanceNormalization") == 1 and "Sqrt" not in count_ops(below.model)
    for shape in [(2, 3, 5, 5), (1, 3, 4, 7)]:
        x = torch.randn(*shape)
        want = m(x).detach().numpy()
        for fused in (result.model, below.model):
            np.testing.assert_allclose(ort_run(fused, {"x": x.numpy()})["y"], want, rtol=1e-4, atol=1e-4)


def test_hand_groupnorm_reshaped_back_to_another_shape_is_no_groupnorm():
    import onnx_normfix
    import torch

    m, model = _hand_groupnorm_ts(13, swap_back=True)  # back to [N, C, W, H]
    result = onnx_normfix.optimize(model, passes=["fuse_norms"], target_opset=21, validate=False)
    assert "GroupNormalization" not in count_ops(result.model)
    for shape in [(2, 3, 5, 5), (1, 3, 4, 7)]:  # H != W: the output is [N, C, W, H], as in PyTorch
        x = torch.randn(*shape)
        np.testing.assert_allclose(ort_run(result.model, {"x": x.numpy()})["y"], m(x).detach().numpy(),
                                   rtol=1e-4, atol=1e-4)


# ---- leftovers: the real reason a norm stayed
def _left(model, **options):
    after, result = run_pass(model, **options)
    return {(g["op"], g["kind"]): g for g in find_leftovers(after, ["fuse_norms"], {"fuse_norms": result.notes},
                                                            available={"fuse_norms", "fix_inorm", "fold_bn"})}


@pytest.mark.parametrize("kind,opset,need,label", [("rms", 17, 23, "RMSNorm"), ("rms", 22, 23, "RMSNorm"),
                                                   ("ln", 16, 17, "LayerNorm")])
def test_leftover_norm_declined_for_the_opset_says_so(kind, opset, need, label):
    from norm_graphs import build

    group = _left(build(kind=kind, opset=opset))[(f"decomposed {label}", "ReduceMean ... Sqrt chain")]
    assert f"needs opset {need}" in group["reason"] and f"--target-opset {need}" in group["reason"], group
    assert "did not match" not in group["reason"]
    # without the pass's notes (a report from elsewhere), the opset itself still gives the reason
    after, _ = run_pass(build(kind=kind, opset=opset))
    bare = find_leftovers(after, ["fuse_norms"], {"fuse_norms": []}, available={"fuse_norms"})
    assert f"--target-opset {need}" in bare[0]["reason"] and "did not match" not in bare[0]["reason"]
    not_run = find_leftovers(after, ["fold_bn"], {}, available={"fuse_norms"})
    assert not_run[0]["hint"] == f"run with fuse_norms --target-opset {need}"


def test_leftover_norm_declined_for_another_reason_gives_that_reason_not_the_opset():
    from norm_graphs import build

    group = _left(build(extra_use="sub"))[("decomposed LayerNorm", "ReduceMean ... Sqrt chain")]
    assert "is also read by" in group["reason"] and "opset" not in group["reason"], group
    # at the right opset and with no note naming it, nothing about the opset is claimed
    after, _ = run_pass(build(extra_use="sub"))
    bare = find_leftovers(after, ["fuse_norms"], {"fuse_norms": []}, available={"fuse_norms"})
    assert bare[0]["reason"] == "fuse_norms did not match it"


def test_leftover_instancenorm_of_a_groupnorm_is_called_a_groupnorm():
    model = dynamo_groupnorm(opset=20)
    left = find_leftovers(model, ["fold_bn"], {}, available={"fuse_norms", "fix_inorm"})
    assert [(g["op"], g["kind"]) for g in left] == [("InstanceNormalization", "GroupNorm between Reshapes")]
    assert "a GroupNorm" in left[0]["reason"] and "track_running_stats" not in left[0]["reason"]
    assert left[0]["hint"] == "GroupNormalization: run with fuse_norms --target-opset 21"
    declined = _left(model)[("InstanceNormalization", "GroupNorm between Reshapes")]
    assert "--target-opset 21" in declined["reason"] and declined["hint"] is None
    at21 = find_leftovers(dynamo_groupnorm(opset=21), ["fold_bn"], {}, available={"fuse_norms"})
    assert at21[0]["hint"] == "GroupNormalization: run with fuse_norms"


def test_leftover_plain_instancenorm_between_reshapes_stays_per_instance():
    # scale 2: an InstanceNorm of the [N, G, -1] view, not a GroupNorm: the running-stats wording stays
    left = find_leftovers(dynamo_groupnorm(scale_value=2.0), ["fold_bn"], {}, available={"fuse_norms", "fix_inorm"})
    assert left[0]["kind"] == "per-instance statistics" and "track_running_stats" in left[0]["reason"]
