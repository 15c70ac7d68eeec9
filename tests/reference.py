"""PyTorch autograd reference for a compiled program: same scheme, same loss, same optimizer."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch.func import functional_call

import pock_tvm


def torch_optimizer(opt, tensors):
    if isinstance(opt, pock_tvm.SGD):
        return torch.optim.SGD(tensors, lr=opt.lr, momentum=opt.momentum, dampening=opt.dampening,
                               weight_decay=opt.weight_decay, nesterov=opt.nesterov)
    cls = torch.optim.AdamW if opt.decoupled else torch.optim.Adam
    return cls(tensors, lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps, weight_decay=opt.weight_decay)


class Reference:
    """Trains a copy of ``model`` in eval mode with autograd, updating what ``program`` updates.

    A partially updated weight is rebuilt every step as ``cat(trainable slice, frozen rest)``,
    so torch differentiates w.r.t. exactly the slice the program trains.
    ``units``: ``{name: unit}`` of weights held in integer units (``pock_tvm.quantization.torch_reference``);
    torch trains the float value ``q * unit`` (what quantization-aware scaling means), and the
    state is reported in integer units again.
    """

    def __init__(self, model, program, optimizer, loss_fn=torch.nn.functional.cross_entropy, units=None):
        self.model = copy.deepcopy(model).eval()
        self.loss_fn = loss_fn
        # named_parameters() gives tied weights (lm_head = embeddings) one name, as the program does
        named = {**dict(self.model.named_parameters()), **dict(self.model.named_buffers())}
        self.state = {k: v.detach().clone() for k, v in named.items()}
        self.trained: dict[str, list] = {}
        self.units = {}
        leaves = []
        for p in program.layout.params:
            if p.trainable:
                full = self.state[p.source]
                piece = full if p.axis is None else full.narrow(p.axis, p.start, p.stop - p.start)
                unit = (units or {}).get(p.source)
                if unit is not None:
                    unit = unit if unit.shape[p.axis or 0] == 1 or p.axis is None else \
                        unit.narrow(p.axis, p.start, p.stop - p.start)
                    self.units[p.source] = unit
                    piece = piece * unit
                leaf = torch.nn.Parameter(piece.clone())
                leaves.append(leaf)
                self.trained[p.source] = (p, leaf)
        self.opt = torch_optimizer(optimizer, leaves)

    def _params(self):
        params = dict(self.state)
        for source, (p, leaf) in self.trained.items():
            if source in self.units:
                leaf = leaf / self.units[source]
            if p.axis is None:
                params[source] = leaf
            else:
                full = self.state[source]
                rest = full.narrow(p.axis, p.stop, full.shape[p.axis] - p.stop)
                params[source] = torch.cat([leaf, rest], dim=p.axis)
        return params

    def step(self, *args) -> float:
        *inputs, target = [torch.as_tensor(a) for a in args]
        self.opt.zero_grad()
        loss = self.loss_fn(functional_call(self.model, self._params(), tuple(inputs)), target)
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def state_dict(self) -> dict[str, np.ndarray]:
        with torch.no_grad():
            return {k: v.detach().numpy().copy() for k, v in self._params().items()}
