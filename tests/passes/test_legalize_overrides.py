"""LEGALIZE_OVERRIDES: pock_tvm's kernels for a few ops compute TVM's numbers with less work."""

import numpy as np
import pytest
import tvm
from tvm import relax

from pock_tvm.passes import ScheduleForCPU
from pock_tvm.passes.legalize_overrides import LEGALIZE_OVERRIDES


def _log_softmax_module(shape, axis):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.nn.log_softmax(x, axis))
        bb.emit_func_output(y)
    return bb.get()


def _run(mod, x, overrides, schedule):
    mod = relax.transform.LegalizeOps(overrides)(mod)
    if schedule:
        target = tvm.target.Target({"kind": "llvm"})
        with target:
            mod = ScheduleForCPU()(relax.transform.AnnotateTIROpPattern()(mod))
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


@pytest.mark.parametrize("shape,axis", [((3, 7, 50), -1), ((2, 33), 1), ((4, 5, 6), 1), ((1, 2, 129), 2)])
def test_log_softmax_matches_tvms_kernel_and_float64(shape, axis):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 10).astype("float32")
    x.reshape(-1)[::7] = -np.inf  # masked entries (a causal mask's -inf) give -inf, not NaN
    mod = _log_softmax_module(shape, axis)
    theirs = _run(mod, x, None, False)
    for schedule in (False, True):
        ours = _run(mod, x, LEGALIZE_OVERRIDES, schedule)
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    x64 = x.astype(np.float64)
    top = x64.max(axis, keepdims=True)
    expected = x64 - top - np.log(np.exp(x64 - top).sum(axis, keepdims=True))
    np.testing.assert_allclose(_run(mod, x, LEGALIZE_OVERRIDES, True), expected, rtol=1e-5, atol=1e-5)


def test_log_softmax_takes_the_log_once_per_row():
    mod = relax.transform.LegalizeOps(LEGALIZE_OVERRIDES)(_log_softmax_module((2, 4, 64), -1))
    kernel = next(f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc))
    script = kernel.script()
    assert script.count("T.log(") == 1
    log_line = next(line for line in script.splitlines() if "T.log(" in line)
    assert log_line.strip().startswith("T_logsumexp[")  # the row's stage, not the elementwise output
