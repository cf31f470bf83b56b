"""Constants that depend on static properties of other tensors (dtype; shape where fixed), and
the real case behind them: dynamo exports with optimize=False write a bias-free Conv's zero
bias as Expand(CastLike(Constant, x), Expand(Shape(W)[0:1], [1])). fold_bn must fold those
exports exactly like TorchScript ones.
"""

from __future__ import annotations

import io
import logging
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_normfix
from onnx_normfix.graph import GraphIndex

from helpers import count_ops, ort_run


def _model(nodes, inputs, inits=(), outputs=("y",)):
    g = helper.make_graph(nodes, "g", inputs, [helper.make_empty_tensor_value_info(o) for o in outputs], list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 8
    return m


def _f(name, shape, t=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, t, shape)


def _zero_bias_chain(x="x", w="W"):
    """dynamo's zero bias for a Conv without one."""
    return [helper.make_node("Shape", [w], ["s"], start=0, end=1),
            helper.make_node("Constant", [], ["one"], value_ints=[1]),
            helper.make_node("Expand", ["s", "one"], ["n"]),
            helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0.0, np.float64))),
            helper.make_node("CastLike", ["zero", x], ["z"]),
            helper.make_node("Expand", ["z", "n"], ["b"])]


def test_dtype_and_initializer_shape_make_a_constant():
    w = numpy_helper.from_array(np.ones((5, 3, 1, 1), np.float16), "W")
    m = _model(_zero_bias_chain() + [helper.make_node("Conv", ["x", "W", "b"], ["y"])],
               [_f("x", ["N", 3, "H", "W"], TensorProto.FLOAT16)], [w])
    ix = GraphIndex(m)
    value = ix.constant("b")
    assert value is not None and value.dtype == np.float16 and value.shape == (5,) and not value.any()


def test_shape_of_a_tensor_with_a_symbolic_dim_is_not_constant():
    """Twin: Shape(x) where x has a symbolic dim is a run-time value."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Reshape", ["x", "s"], ["y"])]
    ix = GraphIndex(_model(nodes, [_f("x", ["N", 3])]))
    assert ix.constant("s") is None
    nodes = [helper.make_node("Shape", ["x"], ["s"], start=1), helper.make_node("Size", ["x"], ["n"]),
             helper.make_node("Relu", ["x"], ["y"])]
    ix = GraphIndex(_model(nodes, [_f("x", ["N", 3, 4])]))
    assert ix.constant("s").tolist() == [3, 4]  # the fixed dims only
    assert ix.constant("n") is None  # Size needs every dim


def test_shape_of_an_intermediate_comes_from_inference_not_value_info():
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0]), helper.make_node("Shape", ["t"], ["s"]),
             helper.make_node("Reshape", ["t", "s"], ["y"])]
    m = _model(nodes, [_f("x", [2, 7])])
    m.graph.value_info.append(_f("t", [99, 1]))  # a wrong claim
    assert GraphIndex(m).constant("s").tolist() == [7, 2]


def test_castlike_of_an_overridable_initializer_reads_only_its_dtype():
    init = numpy_helper.from_array(np.ones(2, np.float16), "d")
    nodes = [helper.make_node("Constant", [], ["c"], value_float=1.5), helper.make_node("CastLike", ["c", "d"], ["y"])]
    m = _model(nodes, [_f("d", [2], TensorProto.FLOAT16)], [init])
    ix = GraphIndex(m)
    assert ix.constant("d") is None and ix.constant("y").dtype == np.float16


def test_size_bound_holds_for_expand():
    nodes = [helper.make_node("Constant", [], ["shape"], value_ints=[1 << 13, 1 << 13, 4]),
             helper.make_node("Constant", [], ["one"], value_float=1.0),
             helper.make_node("Expand", ["one", "shape"], ["y"])]
    assert GraphIndex(_model(nodes, [])).constant("y") is None


def test_fold_bn_folds_the_dynamo_zero_bias():
    rng = np.random.default_rng(4)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W")
    bn = [numpy_helper.from_array(v.astype(np.float32), n) for n, v in
          (("g", rng.uniform(0.5, 2, 4)), ("be", rng.standard_normal(4)), ("mu", rng.standard_normal(4)),
           ("var", rng.uniform(0.5, 2, 4)))]
    nodes = _zero_bias_chain() + [helper.make_node("Conv", ["x", "W", "b"], ["c"], pads=[1, 1, 1, 1]),
                                  helper.make_node("BatchNormalization", ["c", "g", "be", "mu", "var"], ["y"])]
    m = _model(nodes, [_f("x", ["N", 3, 5, 5])], [w, *bn])
    result = onnx_normfix.optimize(m, passes=["fold_bn"])
    assert result.report["passes"][0]["rewrites"] == 1
    assert count_ops(result.model) == {"Conv": 1}
    x = rng.standard_normal((2, 3, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(ort_run(result.model, {"x": x})["y"], ort_run(m, {"x": x})["y"], rtol=1e-4, atol=1e-5)


# ---- real exports: TorchScript and dynamo(optimize=False) of a few CNN blocks -------------------
torch = pytest.importorskip("torch")
nn = torch.nn


class ResBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c, self.d = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.d(self.c(torch.relu(self.b(self.a(x))))) + x)


class MobileUp(nn.Module):
    """Depthwise, pointwise with bias, then a transposed conv."""

    def __init__(self, c):
        super().__init__()
        self.dw, self.bn1 = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c)
        self.pw, self.bn2 = nn.Conv2d(c, 2 * c, 1), nn.BatchNorm2d(2 * c)
        self.up, self.bn3 = nn.ConvTranspose2d(2 * c, c, 2, stride=2, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn3(self.up(nn.functional.relu6(self.bn2(self.pw(torch.relu(self.bn1(self.dw(x))))))))


class Conv1dHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.b = nn.Conv1d(4, 6, 3, bias=False), nn.BatchNorm1d(6)
        self.lin, self.b2 = nn.Linear(36, 5, bias=False), nn.BatchNorm1d(5)

    def forward(self, x):
        return self.b2(self.lin(torch.relu(self.b(self.c(x))).flatten(1)))


BLOCKS = {"resblock": (lambda: ResBlock(6), (2, 6, 9, 11), 2),
          "mobile_up": (lambda: MobileUp(5), (2, 5, 8, 6), 3),
          "conv1d_head": (lambda: Conv1dHead(), (3, 4, 8), 2)}


def _randomized(make):
    torch.manual_seed(0)
    m = make()
    for mod in m.modules():
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
    return m.eval()


def _export(m, x, exporter):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            if exporter == "dynamo":
                return torch.onnx.export(m, (x,), dynamo=True, optimize=False, verbose=False).model_proto
            f = io.BytesIO()
            torch.onnx.export(m, (x,), f, dynamo=False, opset_version=18, do_constant_folding=False,
                              training=torch.onnx.TrainingMode.PRESERVE, input_names=["x"])
            return onnx.load_from_string(f.getvalue())
        finally:
            logging.disable(logging.NOTSET)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_real_exports_fold_every_bn(name, exporter):
    make, shape, bns = BLOCKS[name]
    m = _randomized(make)
    x = torch.randn(*shape)
    model = _export(m, x, exporter)
    assert count_ops(model)["BatchNormalization"] == bns
    result = onnx_normfix.optimize(model, passes=["fold_bn"])
    entry = result.report["passes"][0]
    assert entry["rewrites"] == bns, entry["notes"]
    assert entry["validation"]["status"] == "passed"
    assert "BatchNormalization" not in count_ops(result.model)
    with torch.no_grad():
        want = m(x).numpy()
    got = ort_run(result.model, {result.model.graph.input[0].name: x.numpy()})
    np.testing.assert_allclose(next(iter(got.values())), want, rtol=1e-4, atol=1e-5)
