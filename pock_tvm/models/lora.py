"""LoRA in PyTorch, the reference a compiled LoRA step is compared with (tests, benchmarks): a
``nn.Linear`` with its adapters beside it, as ``pock_tvm.adapters.add_lora`` names them."""

from __future__ import annotations

import copy

import numpy as np
import torch


class LoRALinear(torch.nn.Linear):
    """``weight``/``bias`` as the layer had them, ``lora_A``/``lora_B`` beside:
    ``y = x W^T + b + scale * (x A^T) B^T``."""

    def __init__(self, base: torch.nn.Linear, a: np.ndarray, b: np.ndarray, scale: float):
        super().__init__(base.in_features, base.out_features, base.bias is not None)
        self.load_state_dict(base.state_dict())
        self.lora_A = torch.nn.Linear(base.in_features, a.shape[0], bias=False)
        self.lora_B = torch.nn.Linear(a.shape[0], base.out_features, bias=False)
        with torch.no_grad():
            self.lora_A.weight.copy_(torch.from_numpy(np.asarray(a)))
            self.lora_B.weight.copy_(torch.from_numpy(np.asarray(b)))
        self.scale = scale

    def forward(self, x):
        return super().forward(x) + self.lora_B(self.lora_A(x)) * self.scale


def with_lora(model: torch.nn.Module, state: dict, scale: float) -> torch.nn.Module:
    """A copy of ``model`` with every adapter of ``state`` (a program's ``state_dict()``: the
    ``<layer>.lora_A.weight`` / ``lora_B.weight`` entries) on its layer, same values."""
    model = copy.deepcopy(model)
    suffix = ".lora_A.weight"
    for key in [k for k in state if k.endswith(suffix)]:
        path = key[: -len(suffix)]
        parent, _, leaf = path.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, leaf, LoRALinear(getattr(owner, leaf), state[key], state[path + ".lora_B.weight"], scale))
    return model
