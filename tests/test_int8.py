"""int8 models: pock_tvm.quantization.post_training, the compiled int8 step against a torch model doing the same
quantized arithmetic (fake quantization, weights in integer units), QAS, integer kernels."""

import numpy as np
import pytest
import torch

import pock_tvm
from pock_tvm.models import DigitsCNN
from pock_tvm.quantization.torch_reference import fake_quantized, units
from pock_tvm.quantization.post_training import quantize
from pock_tvm.scheme import Rule, Scheme
from helpers import train_both

BATCH = 4
# a partially and a fully trained int8 conv, BN biases, the int8 classifier
SCHEME = Scheme("int8-test", bias=3, rules=[Rule("features.8.0.weight", "partial", 0.5),
                                            Rule("features.9.0.weight", "full"), Rule("classifier", "full")])


@pytest.fixture(scope="module")
def case():
    torch.manual_seed(0)
    model = DigitsCNN().eval()
    for m in model.modules():  # BN statistics that are not the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    x = torch.randn(BATCH, 1, 24, 24)
    y = torch.randint(0, 10, (BATCH,))
    quantized = quantize(model, [torch.randn(BATCH, 1, 24, 24).numpy() for _ in range(2)], (x,))
    return model, quantized, x, y


def _check(case, optimizer, options, update_tol):
    model, quantized, x, y = case
    program = pock_tvm.compile(quantized, scheme=SCHEME, optimizer=optimizer, options=options)
    reference = fake_quantized(model, quantized)
    before, after, expected, ours, theirs = train_both(reference, program, optimizer, (x,), y,
                                                       units=units(reference) if optimizer.qas else None)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4 if update_tol < 1e-2 else 1e-3)
    trained = {p.source for p in program.layout.params if p.trainable}
    assert {"features.9.0.weight", "classifier.weight", "features.8.1.bias"} <= trained
    for name in trained:
        update = np.abs(expected[name] - before[name]).max()
        assert update > 0, name
        np.testing.assert_allclose(after[name], expected[name], rtol=0, atol=update_tol * update, err_msg=name)
    for name, value in after.items():
        if name not in trained:
            np.testing.assert_array_equal(value, before[name], err_msg=f"frozen {name} changed")
    return program


@pytest.mark.parametrize("optimizer", [pock_tvm.SGD(lr=0.05, momentum=0.9, weight_decay=1e-4),
                                       pock_tvm.Adam(lr=1e-3, weight_decay=1e-4)], ids=["sgd", "adam"])
def test_int8_step_matches_torch_fake_quantization_with_qas(case, optimizer):
    """O0: the same float operations as the reference, so any difference is a wrong gradient or update."""
    _check(case, optimizer, "O0", update_tol=1e-4)


def test_optimized_int8_step_matches_up_to_rounding(case):
    """O3 folds BN into the int8 weights' scales and runs integer kernels: float rounding differs
    from torch's, and an activation within it of a rounding boundary lands on the other integer
    (a few of ~10^5), which moves the updates by a few percent at most."""
    program = _check(case, pock_tvm.SGD(lr=0.05, momentum=0.9), "O3", update_tol=0.1)
    # the frozen convs run on int8 tensors with int32 accumulation; their int8 outputs are what is stored
    int8_convs = [f for name, f in _kernels(program) if name.startswith("fused_conv2d")
                  and str(getattr(f.params[0], "dtype", "")) == "int8"]
    assert len(int8_convs) >= 7


def _kernels(program):
    import tvm

    return [(gv.name_hint, f) for gv, f in program.ir.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]


@pytest.mark.slow  # make test-all; QAS itself is checked against torch in make test
def test_without_qas_the_weights_barely_move(case):
    """Trained in integer units without QAS, SGD moves a weight by s_w^2 of the float step."""
    model, quantized, x, y = case
    moved = {}
    for qas in (True, False):
        program = pock_tvm.compile(quantized, scheme=SCHEME, optimizer=pock_tvm.SGD(lr=0.05, qas=qas), options="O0")
        before = program.state_dict()["features.9.0.weight"]
        program.step(x.numpy(), y.numpy())
        moved[qas] = np.abs(program.state_dict()["features.9.0.weight"] - before).max()
    assert moved[False] < 1e-3 * moved[True]


def test_quantize_errors_name_the_fix(case):
    model, _, x, _ = case
    with pytest.raises(ValueError, match=r"calibration batch for input 'x' is float32\[2, 1, 24, 24\], the model "
                                         r"takes float32\[4, 1, 24, 24\]"):
        quantize(model, [np.zeros((2, 1, 24, 24), "float32")], (x,))
    with pytest.raises(ValueError, match="no calibration batches"):
        quantize(model, [], (x,))
    with pytest.raises(ValueError, match="no conv2d or linear layer with a weight parameter to quantize"):
        quantize(model, [x.numpy()], (x,), skip=["*"])
    bad = x.numpy().copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite value"):
        quantize(model, [bad], (x,))


def test_skipped_layers_stay_float(case):
    model, _, x, _ = case
    quantized = quantize(model, [x.numpy()], (x,), skip=["classifier.*", "features.0.*"])
    dtypes = {p.name: str(p.value.dtype) for p in quantized.params}
    assert dtypes["classifier.weight"] == dtypes["features.0.0.weight"] == "float32"
    assert dtypes["features.1.0.weight"] == "int8"


def test_the_fine_tuned_int8_model_loads_into_the_float_architecture(case):
    """float_state_dict: int8 tensors and integer-unit masters back to float weights, which load
    into the float model; each is the fake-quantized reference's integers times their unit."""
    from pock_tvm.quantization.post_training import float_state_dict

    model, quantized, x, y = case
    program = pock_tvm.compile(quantized, scheme=SCHEME, optimizer=pock_tvm.SGD(lr=0.05), options="O0")
    program.step(x.numpy(), y.numpy())
    state = program.state_dict()
    floats = float_state_dict(state, program.report().quantization)
    assert all(v.dtype == np.float32 for v in floats.values())
    restored = DigitsCNN().eval()
    restored.load_state_dict({k: torch.from_numpy(v) for k, v in floats.items()})
    reference = fake_quantized(model, quantized)
    reference.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in state.items()})
    quantized_names = set(program.report().quantization["tensors"])
    assert quantized_names == set(units(reference))
    for name, unit in units(reference).items():
        torch.testing.assert_close(reference.get_parameter(name).detach() * unit, restored.get_parameter(name).detach())
