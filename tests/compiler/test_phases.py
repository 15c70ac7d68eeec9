"""Memory by optimization phase: each phase plans no more than the one before; the report shows it."""

import torch

import pock_tvm
from pock_tvm.compiler.phases import PHASES
from pock_tvm.models import SmallCNN


def test_each_phase_plans_no_more_and_the_report_shows_them():
    torch.manual_seed(0)
    program = pock_tvm.compile(SmallCNN(), (torch.zeros(4, 3, 32, 32),), scheme="last-2",
                               optimizer=pock_tvm.SGD(lr=0.1, momentum=0.9), memory_phases=True)
    rows = program.report().phases
    assert [r["phase"] for r in rows] == [name for name, _ in PHASES]
    peaks = [r["peak"] for r in rows]
    assert all(b <= a for a, b in zip(peaks, peaks[1:])) and peaks[-1] < peaks[0]
    assert rows[-1]["kernel_scratch"] < rows[0]["kernel_scratch"]  # folding + inlining
    assert rows[-1]["step_storage"] == program.report().planned["train_step"]  # last phase = compiled step
    text = str(program.report())
    assert "after phase" in text and "+ inline kernel scratch" in text and "kernel scratch" in text
