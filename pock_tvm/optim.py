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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .runtime.checks import FLOAT32_MAX, check_lr, check_number  # noqa: F401  (check_lr: re-exported)

def _ops():
    """``tvm.relax.op``, imported when an update is emitted (the CLI reads :data:`OPTIMIZERS` without TVM)."""
    from tvm import relax

    return relax.op


def _c(value: float, dtype: str = "float32"):
    from tvm import relax

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
        R = _ops()
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
        R = _ops()
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


class Optimizer(Protocol):
    """What the compiler asks of an optimizer (``AppendOptimizer`` emits its update into the step).

    ``name`` is recorded in the bundle; ``lr`` is the default learning rate (a step input);
    ``state_names()`` are the per-parameter state tensors it keeps (``("exp_avg", "exp_avg_sq")``);
    ``emit(bb, param, grad, states, step, lr, unit)`` emits the update and returns
    ``(new_param, new_states)``. A new optimizer is a dataclass with these, added to
    :data:`OPTIMIZERS`: the CLI, ``make_optimizer`` and bundle loading take it from there."""

    name: str
    lr: float

    def state_names(self) -> tuple[str, ...]: ...

    def emit(self, bb, param, grad, states, step, lr, unit=None): ...


# name -> constructor (keyword settings: lr, momentum, weight_decay, ...), the one list of optimizers
OPTIMIZERS: dict[str, Callable[..., Optimizer]] = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


def optimizer_from_json(data: dict) -> Optimizer:
    """The optimizer a bundle's layout records (``dataclasses.asdict`` of it)."""
    data = dict(data)
    if data.get("name") not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {data.get('name')!r} in the bundle's layout; this pock_tvm knows "
                         f"{', '.join(OPTIMIZERS)}")
    return type(OPTIMIZERS[data["name"]]())(**data)


def make_optimizer(spec=None, **settings) -> Optimizer:
    """``spec``: an optimizer object (returned as is), or a name of :data:`OPTIMIZERS` (default
    ``"sgd"``) built with ``settings`` (those given as None keep the optimizer's default)."""
    if spec is not None and not isinstance(spec, str):
        if not all(hasattr(spec, a) for a in ("name", "state_names", "emit")):
            raise ValueError(f"optimizer {spec!r} is not an optimizer: it needs name, state_names() and emit() "
                             "(pock_tvm.optim.Optimizer)")
        return spec
    name = spec or "sgd"
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {spec!r}; use one of {', '.join(OPTIMIZERS)} or an object such as "
                         "pock_tvm.SGD(...)")
    return OPTIMIZERS[name](**{k: v for k, v in settings.items() if v is not None})
