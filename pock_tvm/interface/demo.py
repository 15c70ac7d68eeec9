"""The default job: compile MobileNetV2-w0.35@128 for a sparse fine-tune and run it on the host."""

from __future__ import annotations

import logging
import statistics
import time

from ..models import MobileNetV2
from ..models.synthetic import synthetic_task
from .compiler import compile

logger = logging.getLogger(__name__)


def demo(steps: int = 20, batch: int = 8, scheme: str = "tte-mbv2", lr: float = 0.05) -> dict:
    import torch

    from ..optim import SGD

    torch.manual_seed(0)
    model = MobileNetV2(width_mult=0.35, num_classes=10)
    start = time.perf_counter()
    program = compile(model, (torch.zeros(batch, 3, 128, 128),), scheme=scheme,
                      optimizer=SGD(lr=lr, momentum=0.9))
    compile_s = time.perf_counter() - start
    print(program.report())
    x, y = synthetic_task(batch, 10)
    losses, times = [], []
    for i in range(steps):
        t0 = time.perf_counter()
        losses.append(program.step(x, y))
        times.append(time.perf_counter() - t0)
        print(f"step {i:3d}  loss {losses[-1]:.4f}  {1e3 * times[-1]:.1f} ms")
    result = {"compile_s": compile_s, "first_loss": losses[0], "last_loss": losses[-1],
              "median_step_ms": 1e3 * statistics.median(times[1:] or times)}
    print(f"\ncompiled in {compile_s:.1f} s; loss {losses[0]:.4f} -> {losses[-1]:.4f}; "
          f"median step {result['median_step_ms']:.1f} ms (batch {batch}, host CPU; default kernel schedules, "
          "tuned ones where this CPU's shipped database has them)")
    return result
