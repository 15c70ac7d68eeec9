"""Small versions of the CNN architectures users bring as ONNX files (torch definitions, seeded).

Each keeps the structure that trips importers and autodiff — bottlenecks with downsampling (ResNet-50),
LRN (AlexNet), multi-branch concat with pooling branches (Inception), channel shuffle (ShuffleNet),
dense concatenation (DenseNet), fire modules and a conv classifier (SqueezeNet), depthwise
separable convs (MobileNet) — at widths that compile in seconds. Inputs are 2x3x32x32, 10 classes.
"""

from __future__ import annotations

import torch
from torch import nn

from pock_tvm.models.classic import CLASSES, VGG, AlexNet, InceptionV2ish, SqueezeNet, _cbr  # noqa: F401


class Bottleneck(nn.Module):
    def __init__(self, cin, mid, cout, stride):
        super().__init__()
        self.conv1 = _cbr(cin, mid, 1)
        self.conv2 = _cbr(mid, mid, 3, stride)
        self.conv3 = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return torch.relu(self.conv3(self.conv2(self.conv1(x))) + self.downsample(x))


class ResNet50ish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 7, 2, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        self.layer1 = Bottleneck(8, 4, 16, 1)
        self.layer2 = Bottleneck(16, 8, 32, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, CLASSES)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layer2(self.layer1(self.stem(x)))), 1))


def channel_shuffle(x, groups):
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, c, groups=2):
        super().__init__()
        self.groups = groups
        self.gconv1 = _cbr(c, c, 1, groups=groups)
        self.dw = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False), nn.BatchNorm2d(c))
        self.gconv2 = nn.Sequential(nn.Conv2d(c, c, 1, groups=groups, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return torch.relu(x + self.gconv2(self.dw(channel_shuffle(self.gconv1(x), self.groups))))


class ShuffleNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(_cbr(3, 8, 3, 2), nn.MaxPool2d(3, 2, 1))
        self.unit = ShuffleUnit(8)
        self.fc = nn.Linear(8, CLASSES)

    def forward(self, x):
        return self.fc(self.unit(self.stem(x)).mean((2, 3)))


class DenseLayer(nn.Module):
    def __init__(self, cin, growth):
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, x):
        return torch.cat([x, self.conv(torch.relu(self.norm(x)))], 1)


class DenseNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1, bias=False)
        self.block = nn.Sequential(DenseLayer(8, 4), DenseLayer(12, 4))
        self.transition = nn.Sequential(nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 1, bias=False),
                                        nn.AvgPool2d(2))
        self.norm = nn.BatchNorm2d(8)
        self.classifier = nn.Linear(8, CLASSES)

    def forward(self, x):
        x = torch.relu(self.norm(self.transition(self.block(self.stem(x)))))
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class MobileNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(_cbr(3, 8, 3, 2), _cbr(8, 8, 3, 1, groups=8), _cbr(8, 16, 1),
                                      _cbr(16, 16, 3, 2, groups=16), _cbr(16, 32, 1))
        self.classifier = nn.Linear(32, CLASSES)

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


ZOO = {"resnet50": ResNet50ish, "vgg": VGG, "alexnet": AlexNet, "inception": InceptionV2ish,
       "shufflenet": ShuffleNetish, "densenet": DenseNetish, "squeezenet": SqueezeNet, "mobilenet": MobileNetish}


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = ZOO[name]().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, as a trained model has
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


def export(model: nn.Module, path, exporter: str = "torchscript", opset: int | None = None) -> None:
    """``torchscript``: the classic exporter (old opsets, shape arithmetic kept, BN kept);
    ``dynamo``: torch.export based."""
    x = torch.randn(2, 3, 32, 32)
    if exporter == "torchscript":
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset or 11,
                          do_constant_folding=False, input_names=["input"], output_names=["logits"])
    else:
        torch.onnx.export(model, (x,), str(path), dynamo=True, opset_version=opset or 18,
                          input_names=["input"], output_names=["logits"], optimize=False, external_data=False)


class _ZooStyleTorch(nn.Module):
    """What the hand-written ONNX graph of :func:`zoo_style` computes, for the autograd reference."""

    def __init__(self, w):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 5, 2, 2)
        self.conv2 = nn.Conv2d(8, 16, 3, 1, 1)
        self.fc1 = nn.Linear(16 * 8 * 8, 32)
        self.fc2 = nn.Linear(32, CLASSES)
        self.load_state_dict({k: torch.from_numpy(v) for k, v in w.items()})

    def forward(self, x):
        x = nn.functional.local_response_norm(torch.relu(self.conv1(x)), 5, 1e-4, 0.75, 2.0)
        x = nn.functional.max_pool2d(nn.functional.pad(x, (0, 1, 0, 1), value=float("-inf")), 3, 2)
        x = torch.relu(self.conv2(x))
        return torch.softmax(self.fc2(torch.relu(self.fc1(x.reshape(x.shape[0], -1)))), 1)


def caffe2_names(model):
    """``model`` (changed in place and returned) named as Caffe2-converted zoo files name tensors."""
    from pock_tvm.models.classic import caffe2_style

    caffe2_style(model)
    return model


def zoo_style(seed: int = 0):
    """A graph as old model-zoo files have it (opset 9, IR 4): LRN as an op, max pooling with
    asymmetric padding, Dropout, a Softmax head, flattening through Shape/Gather/Unsqueeze/Concat/
    Reshape with int64 initializers. Returns ``(onnx.ModelProto, equivalent torch module)``."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = {"conv1.weight": rng.standard_normal((8, 3, 5, 5)) * 0.2, "conv1.bias": rng.standard_normal(8) * 0.1,
         "conv2.weight": rng.standard_normal((16, 8, 3, 3)) * 0.15, "conv2.bias": rng.standard_normal(16) * 0.1,
         "fc1.weight": rng.standard_normal((32, 1024)) * 0.05, "fc1.bias": rng.standard_normal(32) * 0.1,
         "fc2.weight": rng.standard_normal((CLASSES, 32)) * 0.2, "fc2.bias": rng.standard_normal(CLASSES) * 0.1}
    w = {k: v.astype("float32") for k, v in w.items()}
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()]
    inits += [numpy_helper.from_array(np.array(0, np.int64), "batch_axis"),
              numpy_helper.from_array(np.array([-1], np.int64), "rest")]
    node = helper.make_node
    nodes = [
        node("Conv", ["data", "conv1.weight", "conv1.bias"], ["c1"], "conv1", kernel_shape=[5, 5], strides=[2, 2],
             pads=[2, 2, 2, 2]),
        node("Relu", ["c1"], ["r1"], "relu1"),
        node("LRN", ["r1"], ["n1"], "norm1", size=5, alpha=1e-4, beta=0.75, bias=2.0),
        node("MaxPool", ["n1"], ["p1"], "pool1", kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 1, 1]),
        node("Conv", ["p1", "conv2.weight", "conv2.bias"], ["c2"], "conv2", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        node("Relu", ["c2"], ["r2"], "relu2"),
        node("Shape", ["r2"], ["s"], "shape"),
        node("Gather", ["s", "batch_axis"], ["n"], "gather", axis=0),
        node("Unsqueeze", ["n"], ["n1d"], "unsqueeze", axes=[0]),
        node("Concat", ["n1d", "rest"], ["target_shape"], "concat", axis=0),
        node("Reshape", ["r2", "target_shape"], ["flat"], "flatten"),
        node("Gemm", ["flat", "fc1.weight", "fc1.bias"], ["g1"], "fc1", transB=1),
        node("Relu", ["g1"], ["r3"], "relu3"),
        node("Dropout", ["r3"], ["d3"], "drop", ratio=0.5),
        node("Gemm", ["d3", "fc2.weight", "fc2.bias"], ["g2"], "fc2", transB=1),
        node("Softmax", ["g2"], ["prob"], "prob", axis=1),
    ]
    graph = helper.make_graph(nodes, "zoo_style", [helper.make_tensor_value_info("data", TensorProto.FLOAT,
                                                                                 [2, 3, 32, 32])],
                              [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [2, CLASSES])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 4
    onnx.checker.check_model(model)
    return model, _ZooStyleTorch(w).eval()
