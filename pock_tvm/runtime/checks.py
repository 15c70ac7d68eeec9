"""Checks of the numbers a step is given (learning rates, hyperparameters): a clear error naming the value."""

from __future__ import annotations

import math


# The step takes the learning rate as float32: a larger number would become inf there.
FLOAT32_MAX = 3.4028234663852886e38


def check_lr(lr) -> float:
    """A learning rate is a finite float32 number >= 0; anything else is refused with the value."""
    return check_number("learning rate", lr, 0.0, FLOAT32_MAX)


def check_number(what: str, value, low: float, high: float, high_open: bool = False) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(number) or number < low or number > high \
            or (high_open and number == high):
        bounds = f">= {low:g}" if high == math.inf else \
            f">= {low:g} that float32 holds (<= {high:.3g})" if high == FLOAT32_MAX else \
            f"in [{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{what} must be a finite number {bounds}, got {value!r}")
    return number
