"""profile: per-kernel time, share and achieved GFLOP/s of a compiled step."""

import time
from types import SimpleNamespace

from pock_tvm.runtime.profile import profile_program

CALL_S = 0.005  # one call of the fake kernel


class _TwoCallsPerStep:
    """A program whose step calls one kernel of 1 GFLOP twice (a conv shared by two layers)."""

    def __init__(self):
        spec = SimpleNamespace(shape=(2,), dtype="float32")
        self.layout = SimpleNamespace(inputs=[spec], target=spec, output=spec)
        self.callback = None

    def report(self):
        return SimpleNamespace(kernel_flops={"fused_conv2d": 10 ** 9})

    def instrument(self, callback):
        self.callback = callback

    def step(self, *_args, lr):
        for _ in range(2):
            if self.callback:
                self.callback(None, "fused_conv2d", True, None)
            time.sleep(CALL_S)
            if self.callback:
                self.callback(None, "fused_conv2d", False, None)


def test_gflops_count_every_call_of_a_kernel_in_the_step():
    _, (row,) = profile_program(_TwoCallsPerStep(), steps=3, warmup=0)
    assert row.ms_per_step >= 2 * CALL_S * 1e3  # both calls are in the step's time
    expected = 1.0 / CALL_S  # 1 GFLOP per call of CALL_S seconds
    assert 0.5 * expected < row.gflops <= expected  # (sleep can only run long); was half of it per call
