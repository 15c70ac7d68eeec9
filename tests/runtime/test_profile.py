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


def test_kernel_classes_drop_fusion_prefixes_and_numbers():
    from pock_tvm.runtime.profile import kernel_class

    assert kernel_class("fused_conv2d_transpose4_greater2_zeros5_where3") == "conv2d_transpose"
    assert kernel_class("matmul7") == "matmul"
    assert kernel_class("fused_conv2d1_subtract_divide") == "conv2d"
    assert kernel_class("log_softmax") == "log_softmax"


def test_class_rates_weigh_each_kernel_by_its_time_and_the_peak_is_a_column():
    from pock_tvm.runtime.profile import KernelRow, by_class, format_profile

    rows = [KernelRow("matmul4", 10.0, 0.5, 100.0), KernelRow("fused_matmul7_add", 5.0, 0.25, 40.0),
            KernelRow("fused_relu", 5.0, 0.25, None)]
    # 1 GFLOP in 10 ms and 0.2 in 5 ms: 1.2 GFLOP in 15 ms = 80 GFLOP/s, not the mean of the rates (70)
    assert by_class(rows) == [("matmul", 15.0, 80.0), ("relu", 5.0, None)]
    text = format_profile(20.0, rows, peak=200.0)
    assert "SGEMM on this machine, same run: 200.0 GFLOP/s" in text
    matmul_class = next(line for line in text.splitlines() if line.startswith("matmul "))
    assert matmul_class.split()[-2:] == ["80.00", "40.0%"]
    assert "of SGEMM" not in format_profile(20.0, rows)  # no peak given: no column


def test_the_sgemm_peak_is_a_measured_positive_rate():
    from pock_tvm.runtime.profile import sgemm_peak

    assert sgemm_peak(size=128, repeat=2) > 0.1
