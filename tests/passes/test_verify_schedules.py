"""VerifySchedules: a kernel whose schedule computes other numbers is named and falls back."""

import numpy as np
import pytest
import tvm
from tvm import relax, te

import pock_tvm
from helpers import SGD, labels
from pock_tvm.analysis.kernel_check import RULES_ATTR
from pock_tvm.models import SmallCNN
from pock_tvm.passes import ScheduleForCPU, VerifySchedules
from pock_tvm.passes.verify_schedules import FINDINGS_ATTR
from pock_tvm.targets import load_target
from pock_tvm.targets.toolchain import tvm_target


def _matmul_module():
    bb = relax.BlockBuilder()
    a, b = relax.Var("a", relax.TensorType((32, 64), "float32")), relax.Var("b", relax.TensorType((64, 48), "float32"))

    def matmul(x, y):
        k = te.reduce_axis((0, 64), name="k")
        return te.compute((32, 48), lambda i, j: te.sum(x[i, k] * y[k, j], axis=k), name="matmul")

    with bb.function("main", [a, b]):
        bb.emit_func_output(bb.emit_te(matmul, a, b, primfunc_name_hint="matmul"))
    return bb.get()


@tvm.transform.module_pass(opt_level=0, name="BrokenSchedule")
class BrokenSchedule:
    """A scheduling pass with a bug: its matmul skips the last step of the reduction."""

    def transform_module(self, mod, _ctx):
        gvar = mod.get_global_var("matmul")
        k = te.reduce_axis((0, 63), name="k")
        x, y = te.placeholder((32, 64), name="a"), te.placeholder((64, 48), name="b")
        out = te.compute((32, 48), lambda i, j: te.sum(x[i, k] * y[k, j], axis=k), name="matmul")
        wrong = te.create_prim_func([x, y, out]).with_attrs({RULES_ATTR: "broken_rule", "tirx.is_scheduled": True})
        result = tvm.IRModule(dict(mod.functions.items()), attrs=mod.attrs)
        result[gvar] = wrong
        return result


@pytest.fixture
def target():
    return tvm_target(load_target("host"))


def test_a_wrong_schedule_is_named_and_falls_back_to_the_plain_rule(target, caplog):
    before = _matmul_module()
    with target:
        after = VerifySchedules([BrokenSchedule()])(before)
    findings = [str(f) for f in after.attrs[FINDINGS_ATTR]]
    assert len(findings) == 1 and "kernel matmul (scheduled by broken_rule)" in findings[0]
    assert "falls back to the plain rule's schedule" in findings[0]
    assert "broken_rule" in caplog.text
    expected = ScheduleForCPU().schedule(before["matmul"], plain_only=True)
    tvm.ir.assert_structural_equal(after["matmul"], expected)


def test_right_schedules_pass_through_unchanged(target):
    before = _matmul_module()
    with target:
        after = VerifySchedules([ScheduleForCPU()])(before)
        expected = ScheduleForCPU()(before)
    assert [str(f) for f in after.attrs[FINDINGS_ATTR]] == []
    tvm.ir.assert_structural_equal(after["matmul"], expected["matmul"])


def test_compile_with_verify_checks_every_kernel_of_the_step_and_says_so():
    import torch

    model = SmallCNN().eval()
    x = torch.randn(2, 3, 16, 16)
    program = pock_tvm.compile(model, (x,), scheme="last-2", optimizer=SGD, verify=True)
    assert "kernels verified against their unscheduled form: all agree" in str(program.report())
    plain = pock_tvm.compile(model, (x,), scheme="last-2", optimizer=SGD, options="O0")
    y = labels(2).numpy()
    assert np.isclose(program.step(x.numpy(), y), plain.step(x.numpy(), y), rtol=1e-5)


def test_verify_must_be_a_bool():
    with pytest.raises(ValueError, match="verify must be True or False"):
        pock_tvm.compile(SmallCNN(), (np.zeros((1, 3, 16, 16), "float32"),), verify="yes")
