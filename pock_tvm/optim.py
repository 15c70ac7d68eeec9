"""Optimizers whose update is compiled into the training step (torch semantics).

Quantization-aware scaling (``qas``, TTE): a parameter of an int8 model trains in integer units
``q = w / u`` (``u``: its per-channel unit, :mod:`pock_tvm.quantization.int8`), so its gradient is ``u`` times
the float one and the ratio of weight to gradient is off by ``u**2``. With ``qas`` (the default)
an update moves the float value ``q * u`` as the float model's update would: SGD scales the gradient
by ``u**-2`` (TTE's rule; momentum and weight decay follow, being linear), Adam works on the float
gradient ``g / u`` and divides its step by ``u`` (Adam ignores a gradient's scale, so TTE's rule
alone would leave it moving every weight by about ``lr`` integer steps). Float parameters have no
unit and are unaffected.

The runtime keeps each optimizer's state (``state_names``) next to the parameters and feeds it
back every step; ``step`` is a float32 scalar counting updates (starts at 0), ``lr`` a runtime
scalar so that schedules need no recompilation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tvm import relax

from .runtime.checks import FLOAT32_MAX, check_lr, check_number  # noqa: F401  (check_lr: re-exported)

R = relax.op


def _c(value: float, dtype: str = "float32") -> relax.Constant:
    return relax.const(value, dtype)


def _validate(optimizer, ranges: dict) -> None:
    name = type(optimizer).__name__
    for field_name, (low, high, high_open) in ranges.items():
        check_number(f"{name}.{field_name}", getattr(optimizer, field_name), low, high, high_open)


@dataclass
class SGD:
    """``torch.optim.SGD``: momentum, dampening, nesterov, weight decay."""

    lr: float = 0.01
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    name: str = "sgd"
    qas: bool = True

    def __post_init__(self) -> None:
        _validate(self, {"lr": (0, FLOAT32_MAX, False), "momentum": (0, 1, True), "dampening": (0, 1, False),
                         "weight_decay": (0, math.inf, False)})

    def state_names(self) -> tuple[str, ...]:
        return ("momentum_buffer",) if self.momentum else ()

    def emit(self, bb, param, grad, states, step, lr, unit=None):
        """The update of one parameter; ``unit``: its integer unit (a constant), see ``qas``."""
        g = grad
        if unit is not None and self.qas:
            g = bb.emit(R.divide(g, R.multiply(unit, unit)))  # TTE: G_q * s^-2
        if self.weight_decay:
            g = bb.emit(R.add(g, R.multiply(_c(self.weight_decay), param)))
        new_states = []
        if self.momentum:
            (buf,) = states
            # torch sets buf = g on the first step, later buf = m*buf + (1-d)*g (buf starts at 0)
            first = R.less(step, _c(0.5))
            g_coef = R.where(first, _c(1.0), _c(1.0 - self.dampening))
            buf = bb.emit(R.add(R.multiply(_c(self.momentum), buf), R.multiply(g_coef, g)))
            new_states.append(buf)
            g = bb.emit(R.add(g, R.multiply(_c(self.momentum), buf))) if self.nesterov else buf
        new_param = bb.emit(R.subtract(param, R.multiply(lr, g)))
        return new_param, new_states


@dataclass
class Adam:
    """``torch.optim.Adam`` (L2 weight decay) or, with ``decoupled=True``, ``AdamW``."""

    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled: bool = False
    name: str = "adam"
    qas: bool = True

    def __post_init__(self) -> None:
        _validate(self, {"lr": (0, FLOAT32_MAX, False), "beta1": (0, 1, True), "beta2": (0, 1, True),
                         "eps": (0, math.inf, False), "weight_decay": (0, math.inf, False)})
        if self.eps <= 0:
            raise ValueError(f"Adam.eps must be > 0, got {self.eps!r}")

    def state_names(self) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def emit(self, bb, param, grad, states, step, lr, unit=None):
        """The update of one parameter; ``unit``: its integer unit (a constant), see ``qas``."""
        m, v = states
        g = grad
        unit = unit if self.qas else None
        if unit is not None:
            g = bb.emit(R.divide(g, unit))  # the gradient of the float weight q * unit
        if self.weight_decay and self.decoupled:
            param = bb.emit(R.multiply(param, R.subtract(_c(1.0), R.multiply(lr, _c(self.weight_decay)))))
        elif self.weight_decay:
            w = R.multiply(param, unit) if unit is not None else param
            g = bb.emit(R.add(g, R.multiply(_c(self.weight_decay), w)))
        t = R.add(step, _c(1.0))
        m = bb.emit(R.add(R.multiply(_c(self.beta1), m), R.multiply(_c(1.0 - self.beta1), g)))
        v = bb.emit(R.add(R.multiply(_c(self.beta2), v), R.multiply(_c(1.0 - self.beta2), R.multiply(g, g))))
        bias1 = R.subtract(_c(1.0), R.power(_c(self.beta1), t))
        bias2_sqrt = R.sqrt(R.subtract(_c(1.0), R.power(_c(self.beta2), t)))
        denom = R.add(R.divide(R.sqrt(v), bias2_sqrt), _c(self.eps))
        delta = R.multiply(R.divide(lr, bias1), R.divide(m, denom))
        new_param = bb.emit(R.subtract(param, R.divide(delta, unit) if unit is not None else delta))
        return new_param, [m, v]


def AdamW(lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 0.01, qas: bool = True) -> Adam:
    """``torch.optim.AdamW`` defaults (decoupled weight decay 0.01)."""
    return Adam(lr, beta1, beta2, eps, weight_decay, decoupled=True, name="adamw", qas=qas)


def optimizer_from_json(data: dict) -> SGD | Adam:
    """The optimizer a bundle's layout records (``dataclasses.asdict`` of it)."""
    data = dict(data)
    kind = SGD if data.get("name") == "sgd" else Adam if data.get("name") in ("adam", "adamw") else None
    if kind is None:
        raise ValueError(f"unknown optimizer {data.get('name')!r} in the bundle's layout")
    return kind(**data)


def make_optimizer(spec) -> SGD | Adam:
    if isinstance(spec, (SGD, Adam)):
        return spec
    if spec in (None, "sgd"):
        return SGD()
    if spec == "adam":
        return Adam()
    if spec == "adamw":
        return AdamW()
    raise ValueError(f"unknown optimizer {spec!r}; use 'sgd', 'adam', 'adamw' or pock_tvm.SGD(...)")
