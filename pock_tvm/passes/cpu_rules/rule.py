"""The contract of a CPU schedule rule."""

from __future__ import annotations

from .cpu import CPU
from .nest import Nest


class CPURule:
    """Schedules one block of a kernel. ``apply`` returns False, without changing the schedule,
    when the rule does not apply to ``nest``; True when it scheduled the block. A rule may raise a
    TVM schedule error on a kernel it misjudged: ``ScheduleForCPU`` then tries the fallback rules.
    ``name`` is recorded on the kernel (``pock_tvm.schedule_rules``), so a wrong number found by
    ``VerifySchedules`` names its rule."""

    name = "rule"

    def apply(self, sch, nest: Nest, cpu: CPU) -> bool:
        raise NotImplementedError
