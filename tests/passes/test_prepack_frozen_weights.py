"""PrepackFrozenWeights: a frozen weight's panels are folded into a constant; a trained one is packed per call."""

import numpy as np
import torch
import tvm
from tvm import relax

import pock_tvm
from pock_tvm.scheme import Rule, Scheme


class Wide(torch.nn.Module):
    """A frozen ``inputs -> 512`` linear, a trained 512 -> 512 one and a trained head; with 512
    inputs, the frozen and the trained linear are one kernel shape."""

    def __init__(self, inputs: int = 64):
        super().__init__()
        self.frozen = torch.nn.Linear(inputs, 512)
        self.trained = torch.nn.Linear(512, 512)
        self.head = torch.nn.Linear(512, 10)

    def forward(self, x):
        return self.head(torch.relu(self.trained(torch.relu(self.frozen(x)))))


def _compiled(inputs: int = 64):
    torch.manual_seed(0)
    model = Wide(inputs)
    x = torch.randn(32, inputs)
    scheme = Scheme("t", rules=[Rule("trained", "full"), Rule("head", "full")])
    return model, x, pock_tvm.compile(model, (x,), scheme=scheme, optimizer=pock_tvm.SGD(lr=0.1))


def _kernels_called(program, func="train_step"):
    """``(kernel, arguments)`` of every kernel call of the lowered ``func``."""
    found = []
    relax.analysis.post_order_visit(program.ir[func], lambda e: found.append(e)
                                    if isinstance(e, relax.Call) and isinstance(e.op, relax.GlobalVar) else None)
    return [(program.ir[c.op], list(c.args)) for c in found if isinstance(program.ir[c.op], tvm.tirx.PrimFunc)]


def test_frozen_weight_is_read_packed_and_trained_weight_is_packed_per_call():
    _, _, program = _compiled()
    packed_constants, copies_per_call = [], []
    for kernel, args in _kernels_called(program):
        script = kernel.script()
        assert "layout_rewrite_preproc" not in script  # every marked packing stage was split off and folded
        packed_constants += [tuple(int(d) for d in a.value.shape) for a in args
                             if isinstance(a, tvm.ir.GenericConst) and len(a.value.shape) == 3]
        if "_global = T.sblock_alloc_buffer" in script:
            copies_per_call.append(kernel)
    # the frozen 64 -> 512 weight: panels of 32 outputs over K = 64, computed at compile time
    assert (16, 64, 32) in packed_constants
    assert copies_per_call, "the trained 512 -> 512 weight changes every step: packed inside its kernel"


def test_numbers_match_torch():
    model, x, program = _compiled()
    np.testing.assert_allclose(program.predict(x.numpy()), model(x).detach().numpy(), rtol=1e-5, atol=1e-5)
    _step_matches_torch(model, x, program)


def _step_matches_torch(model, x, program):
    """One SGD step (lr 0.1) gives torch's loss and trained weight."""
    y = torch.randint(0, 10, (32,))
    loss = program.step(x.numpy(), y.numpy())
    expected = torch.nn.functional.cross_entropy(model(x), y)
    expected.backward()
    assert abs(loss - expected.item()) < 1e-5
    with torch.no_grad():
        new = model.trained.weight - 0.1 * model.trained.weight.grad
    np.testing.assert_allclose(program.state_dict()["trained.weight"], new.numpy(), rtol=1e-5, atol=1e-6)


def test_a_kernel_called_with_a_frozen_and_a_trained_weight_is_copied_for_the_frozen_calls():
    model, x, program = _compiled(inputs=512)
    calls = _kernels_called(program)
    frozen = [(k, a) for k, a in calls if "_frozen" in str(k.attrs["global_symbol"])]
    # the frozen layer's call reads its weight packed at compile time (panels over K = 512) ...
    assert any(isinstance(a, tvm.ir.GenericConst) and len(a.value.shape) == 3 for _, args in frozen for a in args)
    # ... while the trained layer's call of the same shape still packs its weight per call
    assert any("_global = T.sblock_alloc_buffer" in k.script() and "_frozen" not in str(k.attrs["global_symbol"])
               for k, _ in calls)
    _step_matches_torch(model, x, program)
