"""Benchmark models, built with fixed seeds and cached under benchmarks/out/ (never committed).

    python benchmarks/models.py [name ...]      # build (or reuse) and print the paths

| name          | what                                                            | size     |
|---------------|-----------------------------------------------------------------|----------|
| resnet50      | ResNet-50 (torch, written here: no torchvision), BN unfolded    | ~100 MB  |
| mobilenetv2   | MobileNetV2 (torch, written here), BN unfolded, depthwise convs | ~14 MB   |
| stargan       | StarGAN-style generator of fixtures/_inorm_models.py at conv_dim | ~4 MB   |
|               | 64, 128x128, InstanceNorm with running stats (TorchScript:      |          |
|               | Reshape/BN(N*C)/Reshape, for fix_inorm,fold_bn)                 |          |
| grid1k/10k/100k | synthetic Conv+BN+Relu chains side by side, joined by Concat  | 0.3-34 MB|
| big           | 7 x Conv(2048->2048, 3x3)+BN+Relu, external data                | ~1.06 GB |

The torch models are exported with the TorchScript exporter, `do_constant_folding=False`: in
eval mode with constant folding on, that exporter fuses Conv+BN itself (no BN left to fold);
`training=TrainingMode.PRESERVE` keeps BN too but is not needed (see `_export`).
Running statistics and BN affine parameters are randomized so a wrong fold shows in outputs.
"""

from __future__ import annotations

import pathlib
import sys
import warnings

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OUT = pathlib.Path(__file__).resolve().parent / "out"
ROOT = pathlib.Path(__file__).resolve().parent.parent
SEED = 1234
OPSET = 17

# name -> (passes to run, input shapes for validation are all static here)
PASSES = {
    "resnet50": "fold_bn",
    "mobilenetv2": "fold_bn",
    "stargan": "fix_inorm,fold_bn",
    "grid1k": "fold_bn",
    "grid10k": "fold_bn",
    "grid100k": "fold_bn",
    "big": "fold_bn",
}
GRID_NODES = {"grid1k": 1_000, "grid10k": 10_000, "grid100k": 100_000}


def path_of(name: str) -> pathlib.Path:
    return OUT / name / f"{name}.onnx"


def build(name: str, force: bool = False) -> pathlib.Path:
    """Build model `name` unless it is cached; returns its path."""
    path = path_of(name)
    if path.exists() and not force:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    if name in GRID_NODES:
        _grid(path, GRID_NODES[name])
    elif name == "big":
        _big(path)
    else:
        torch = _torch()
        torch.manual_seed(SEED)
        if name == "resnet50":
            net, args, names = _resnet50(), (torch.randn(1, 3, 224, 224),), (["x"], ["y"])
        elif name == "mobilenetv2":
            net, args, names = _mobilenetv2(), (torch.randn(1, 3, 224, 224),), (["x"], ["y"])
        elif name == "stargan":
            net, args, names = _stargan(), (torch.randn(1, 3, 128, 128), torch.ones(1, 5)), (["x", "c"], ["y"])
        else:
            raise KeyError(f"unknown model {name!r}; known: {', '.join(PASSES)}")
        _randomize_norms(net.eval())
        _export(net, args, path, *names)
    return path


# ---- torch models ---------------------------------------------------------------------
def _torch():
    import torch

    torch.set_num_threads(1)
    return torch


def _export(net, args, path: pathlib.Path, input_names, output_names) -> None:
    torch = _torch()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, args, str(path), dynamo=False, opset_version=OPSET, do_constant_folding=False,
                          input_names=input_names, output_names=output_names)
    model = onnx.load(str(path))
    if not any(n.op_type in ("BatchNormalization", "InstanceNormalization") for n in model.graph.node):
        raise RuntimeError(f"{path.name}: the exporter folded every norm; nothing left to benchmark")


def _randomize_norms(net) -> None:
    """Non-trivial running stats and affine parameters (default init is mean 0, var 1, w 1, b 0,
    which a fold that ignores them would still pass). Weights stay O(1) so outputs stay finite."""
    torch = _torch()
    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for m in net.modules():
            if getattr(m, "running_mean", None) is not None:
                c = m.running_mean.shape[0]
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(0.3 + 0.4 * torch.rand(c, generator=g))
                    m.bias.copy_(0.1 * torch.randn(c, generator=g))


#   x -> Conv7x7/2 BN ReLU MaxPool -> 4 stages of Bottlenecks [3, 4, 6, 3]
#        Bottleneck: Conv1x1 BN ReLU Conv3x3 BN ReLU Conv1x1 BN (+ Conv1x1 BN downsample) Add ReLU
#     -> GlobalAveragePool -> Flatten -> Gemm(2048 -> 1000) -> y
def _resnet50():
    nn = _torch().nn

    class Bottleneck(nn.Module):
        def __init__(self, cin, width, stride):
            super().__init__()
            cout = width * 4
            self.body = nn.Sequential(
                nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):
            return self.relu(self.body(x) + (x if self.down is None else self.down(x)))

    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for k in range(blocks):
            layers.append(Bottleneck(cin, width, stride if k == 0 else 1))
            cin = width * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 1000)]
    return nn.Sequential(*layers)


#   x -> Conv3x3/2 BN ReLU6 -> 17 inverted residuals -> Conv1x1 BN ReLU6 -> pool -> Gemm -> y
#        inverted residual: [Conv1x1 BN ReLU6] DepthwiseConv3x3 BN ReLU6 Conv1x1 BN (+ x)
def _mobilenetv2():
    nn = _torch().nn

    def cbr(cin, cout, k, stride=1, groups=1):
        return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU6(inplace=True)]

    class InvertedResidual(nn.Module):
        def __init__(self, cin, cout, stride, expand):
            super().__init__()
            hidden = cin * expand
            layers = cbr(cin, hidden, 1) if expand != 1 else []
            layers += cbr(hidden, hidden, 3, stride, groups=hidden)
            layers += [nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
            self.body = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            return x + self.body(x) if self.residual else self.body(x)

    layers = cbr(3, 32, 3, 2)
    cin = 32
    for expand, cout, repeats, stride in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                                          (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)):
        for k in range(repeats):
            layers.append(InvertedResidual(cin, cout, stride if k == 0 else 1, expand))
            cin = cout
    layers += cbr(cin, 1280, 1) + [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1280, 1000)]
    return nn.Sequential(*layers)


def _stargan():
    """The fixtures' StarGAN-style generator (one builder, see fixtures/_inorm_models.py) at
    the paper's width: conv_dim=64, 5 attributes (its residual blocks stay at 2)."""
    sys.path.insert(0, str(ROOT / "fixtures"))
    try:
        from _inorm_models import _stargan as stargan_builder
    finally:
        sys.path.pop(0)
    generator_class = type(stargan_builder(track=True))
    return generator_class(conv_dim=64, c_dim=5)


# ---- synthetic graphs (onnx.helper: seconds even at 100k nodes) -------------------------
#   x[1,4,8,8] -+-> Conv3x3 BN Relu -> Conv3x3 BN Relu -> ... (DEPTH units) -+-> Concat -> y
#               +-> Conv3x3 BN Relu -> ...                                    |
#               +-> ... (width chains, width = nodes / (3 * DEPTH))   --------+
GRID_CHANNELS, GRID_DEPTH = 4, 20


def _grid(path: pathlib.Path, nodes: int) -> None:
    rng = np.random.default_rng(SEED)
    c, width = GRID_CHANNELS, max(1, nodes // (3 * GRID_DEPTH))
    graph_nodes, inits, outs = [], [], []
    for chain in range(width):
        x = "x"
        for unit in range(GRID_DEPTH):
            p = f"c{chain}_u{unit}"
            w = (rng.standard_normal((c, c, 3, 3)) * (1.0 / 6)).astype(np.float32)
            params = [1 + 0.2 * rng.standard_normal(c), 0.1 * rng.standard_normal(c),
                      0.1 * rng.standard_normal(c), 0.5 + rng.random(c)]
            inits.append(numpy_helper.from_array(w, f"{p}_W"))
            inits += [numpy_helper.from_array(v.astype(np.float32), f"{p}_{k}") for k, v in
                      zip(("scale", "B", "mean", "var"), params)]
            graph_nodes += [
                helper.make_node("Conv", [x, f"{p}_W"], [f"{p}_conv"], name=f"{p}_Conv", pads=[1, 1, 1, 1]),
                helper.make_node("BatchNormalization", [f"{p}_conv"] + [f"{p}_{k}" for k in ("scale", "B", "mean", "var")],
                                 [f"{p}_bn"], name=f"{p}_BN"),
                helper.make_node("Relu", [f"{p}_bn"], [f"{p}_relu"], name=f"{p}_Relu"),
            ]
            x = f"{p}_relu"
        outs.append(x)
    graph_nodes.append(helper.make_node("Concat", outs, ["y"], name="join", axis=1))
    graph = helper.make_graph(graph_nodes, path.stem,
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c * width, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.save(model, str(path))


#   x[1,2048,4,4] -> 7 x (Conv3x3(2048->2048) BN Relu) -> y          weights in big.onnx.data
BIG_CHANNELS, BIG_LAYERS = 2048, 7


def _big(path: pathlib.Path) -> None:
    rng = np.random.default_rng(SEED)
    c = BIG_CHANNELS
    nodes, inits, x = [], [], "x"
    for k in range(BIG_LAYERS):
        w = rng.standard_normal((c, c, 3, 3), dtype=np.float32)
        w *= np.float32(1.0 / np.sqrt(9 * c))
        inits.append(numpy_helper.from_array(w, f"l{k}_W"))
        del w
        params = [1 + 0.2 * rng.standard_normal(c), 0.1 * rng.standard_normal(c),
                  0.1 * rng.standard_normal(c), 0.5 + rng.random(c)]
        inits += [numpy_helper.from_array(v.astype(np.float32), f"l{k}_{n}") for n, v in
                  zip(("scale", "B", "mean", "var"), params)]
        nodes += [helper.make_node("Conv", [x, f"l{k}_W"], [f"l{k}_conv"], name=f"l{k}_Conv", pads=[1, 1, 1, 1]),
                  helper.make_node("BatchNormalization", [f"l{k}_conv"] + [f"l{k}_{n}" for n in ("scale", "B", "mean", "var")],
                                   [f"l{k}_bn"], name=f"l{k}_BN"),
                  helper.make_node("Relu", [f"l{k}_bn"], [f"l{k}_relu" if k < BIG_LAYERS - 1 else "y"], name=f"l{k}_Relu")]
        x = f"l{k}_relu"
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 4, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{path.name}.data", size_threshold=1024)


def disk_size(path: pathlib.Path) -> int:
    """The model file plus its external data files, in bytes."""
    return sum(p.stat().st_size for p in path.parent.glob(f"{path.name}*") if p.is_file())


if __name__ == "__main__":
    for name in sys.argv[1:] or list(PASSES):
        p = build(name)
        print(f"{name:12s} {disk_size(p) / 1e6:9.1f} MB  {p}")
