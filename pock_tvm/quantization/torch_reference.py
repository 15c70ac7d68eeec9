"""An int8 model in PyTorch, the reference a compiled int8 step is compared with (tests,
benchmarks): the float model with each layer :mod:`.post_training` quantized replaced by one that
does the same arithmetic with fake quantization, its weight a float parameter in integer units."""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F


class FakeQuantized(torch.nn.Module):
    """A conv2d or linear layer: ``y = layer(fq(x, s_x), weight * s_w) + bias`` where ``fq`` is
    int8 fake quantization (torch's straight-through gradient) and ``weight`` holds the integer
    values (a float parameter, so that it can be trained in integer units as pock_tvm does)."""

    def __init__(self, base: torch.nn.Module, q: np.ndarray, activation: float, weight_scale: np.ndarray):
        super().__init__()
        self.linear = isinstance(base, torch.nn.Linear)
        self.conv = {} if self.linear else dict(stride=base.stride, padding=base.padding, dilation=base.dilation,
                                                groups=base.groups)
        self.weight = torch.nn.Parameter(torch.from_numpy(np.asarray(q, np.float32)).to(base.weight.dtype))
        self.bias = base.bias
        self.activation = activation
        shape = [-1] + [1] * (q.ndim - 1)
        self.register_buffer("weight_scale", torch.from_numpy(np.asarray(weight_scale, np.float32)).reshape(shape)
                             .to(self.weight.dtype), persistent=False)

    def forward(self, x):
        x = torch.fake_quantize_per_tensor_affine(x, self.activation, 0, -128, 127)
        w = self.weight * self.weight_scale
        if self.linear:
            return F.linear(x, w, self.bias)
        return F.conv2d(x, w, self.bias, **self.conv)


def fake_quantized(model: torch.nn.Module, quantized) -> torch.nn.Module:
    """A copy of ``model`` with every layer that ``quantized`` (the :class:`ImportedModel`
    ``pock_tvm.quantization.post_training.quantize`` made of it) holds in int8 replaced by :class:`FakeQuantized`
    with the same integers and scales. Parameter names are unchanged (``features.0.0.weight``)."""
    from ..passes.quantize_forward import read_scales

    model = copy.deepcopy(model)
    by_var = {p.var_name: p for p in quantized.params}
    for var, scales in read_scales(quantized.mod["forward"]).items():
        info = by_var[var]
        path = info.name.removesuffix(".weight")
        parent, _, leaf = path.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, leaf, FakeQuantized(getattr(owner, leaf), info.value, scales.activation, scales.weight))
    return model


def units(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{parameter name: unit}`` of the integer-unit weights of a :func:`fake_quantized` model."""
    return {f"{name}.weight": m.weight_scale for name, m in model.named_modules() if isinstance(m, FakeQuantized)}
