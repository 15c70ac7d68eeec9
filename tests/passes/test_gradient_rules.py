"""Each gradient rule pock_tvm registers, against torch autograd (one line per op)."""

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from pock_tvm.passes import gradient_rules_installed

R = relax.op


def _grad(op, x: np.ndarray, out_shape) -> np.ndarray:
    """d/dx sum(op(x) * w) through Relax Gradient, w fixed random."""
    w = np.random.default_rng(1).standard_normal(out_shape).astype("float32")
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(x.shape, "float32"))
    with bb.function("f", [xv]):
        with bb.dataflow():
            y = bb.emit(op(xv))
            out = bb.emit_output(R.sum(R.multiply(y, relax.const(w))))
        bb.emit_func_output(out)
    mod = _differentiate(bb.get())
    exe = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}))
    vm = relax.VirtualMachine(exe, tvm.cpu())
    return vm["f_adjoint"](tvm.runtime.tensor(x))[1][0].numpy(), w



def _differentiate(mod):
    with gradient_rules_installed():
        return relax.transform.Gradient("f")(mod)


def _torch_grad(fn, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Autograd in float64: the reference is the exact gradient, not float32 torch's rounding of it
    (the tanh GELU's torch float32 gradient is 0 where the true one is 1e-6)."""
    t = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    (fn(t) * torch.tensor(w, dtype=torch.float64)).sum().backward()
    return t.grad.numpy()


X = np.random.default_rng(0).standard_normal((2, 4, 6, 6)).astype("float32") * 4
X[0, 0, 0, :3] = [0.0, 6.0, -0.0]  # exactly on the kinks

QSCALE = np.array([0.02, 0.05, 0.1, 0.2], "float32")
GAMMA = np.random.default_rng(2).standard_normal((6, 6)).astype("float32")
BETA = np.random.default_rng(3).standard_normal((6, 6)).astype("float32")

CASES = {
    "relu6": (lambda x: R.clip(x, 0.0, 6.0), torch.nn.functional.relu6, X.shape),
    "relu": (R.nn.relu, torch.relu, X.shape),
    "squeeze": (lambda x: R.squeeze(R.sum(x, axis=[3], keepdims=True), [3]),
                lambda t: t.sum(3, keepdim=True).squeeze(3), X.shape[:3]),
    "flatten": (R.flatten, lambda t: t.flatten(), (288,)),
    "adaptive_avg_pool2d": (lambda x: R.nn.adaptive_avg_pool2d(x, (2, 3)),
                            lambda t: torch.nn.functional.adaptive_avg_pool2d(t, (2, 3)), (2, 4, 2, 3)),
    "rsqrt": (lambda x: R.rsqrt(R.add(R.multiply(x, x), relax.const(1.0))),
              lambda t: torch.rsqrt(t * t + 1), X.shape),
    "leaky_relu": (lambda x: R.nn.leakyrelu(x, 0.1),
                   lambda t: torch.nn.functional.leaky_relu(t, 0.1), X.shape),
    "erf": (lambda x: R.erf(R.multiply(x, relax.const(0.25))), lambda t: torch.erf(t * 0.25), X.shape),
    "pad": (lambda x: R.nn.pad(x, (0, 0, 1, 0, 2, 1, 0, 3)),
            lambda t: torch.nn.functional.pad(t, (0, 3, 2, 1, 1, 0)), (2, 5, 9, 9)),
    "stack": (lambda x: R.stack(relax.Tuple([R.multiply(x, relax.const(2.0)), R.exp(R.multiply(x, relax.const(0.1)))]), 1),
              lambda t: torch.stack([t * 2, torch.exp(t * 0.1)], 1), (2, 2, 4, 6, 6)),
    "gelu": (R.nn.gelu, torch.nn.functional.gelu, X.shape),
    "gelu_tanh": (R.nn.gelu_tanh, lambda t: torch.nn.functional.gelu(t, approximate="tanh"), X.shape),
    "layer_norm": (lambda x: R.nn.layer_norm(x, relax.const(GAMMA), relax.const(BETA), [-2, -1], 1e-5),
                   lambda t: torch.nn.functional.layer_norm(t, (6, 6), torch.tensor(GAMMA, dtype=t.dtype),
                                                            torch.tensor(BETA, dtype=t.dtype)),
                   X.shape),
    # clamped at 2: rows with several maxima, the gradient split among the ties as torch does
    "max": (lambda x: R.max(R.minimum(x, relax.const(2.0)), axis=[1, 3]),
            lambda t: torch.amax(torch.clamp(t, max=2.0), (1, 3)), (2, 6)),
    "max_keepdims": (lambda x: R.max(x, axis=[-1], keepdims=True), lambda t: torch.amax(t, -1, keepdim=True),
                     (2, 4, 6, 1)),
    # rotary embeddings' halves and a causal LM's shifted logits: unit-stride slices, negative ends
    "strided_slice": (lambda x: R.strided_slice(x, [1, 3], [1, 0], [3, -2]), lambda t: t[:, 1:3, :, :-2],
                      (2, 2, 6, 4)),
    # exported LocalResponseNorm: a (k, 1, 1) average over channels of the unsqueezed input
    "avg_pool3d": (lambda x: R.nn.avg_pool3d(R.expand_dims(x, 1), (3, 1, 1), padding=(1, 0, 0, 1, 0, 0)),
                   lambda t: torch.nn.functional.avg_pool3d(t.unsqueeze(1), (3, 1, 1), 1, (1, 0, 0)), (2, 1, 4, 6, 6)),
    # int8 fake quantization, per tensor and per channel: torch's straight-through estimator, zero where clamped
    "fake_quantize": (lambda x: R.dequantize(R.quantize(x, relax.const(0.05), relax.const(3, "int8"), -1, "int8"),
                                             relax.const(0.05), relax.const(3, "int8"), -1, "float32"),
                      lambda t: torch.fake_quantize_per_tensor_affine(t.float(), 0.05, 3, -128, 127), X.shape),
    "fake_quantize_per_channel": (
        lambda x: R.dequantize(R.quantize(x, relax.const(QSCALE), relax.const(np.zeros(4, "int8")), 1, "int8"),
                               relax.const(QSCALE), relax.const(np.zeros(4, "int8")), 1, "float32"),
        lambda t: torch.fake_quantize_per_channel_affine(t.float(), torch.tensor(QSCALE), torch.zeros(4, dtype=torch.int32),
                                                         1, -128, 127), X.shape),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_rule_matches_torch(name):
    op, fn, out_shape = CASES[name]
    ours, w = _grad(op, X, out_shape)
    np.testing.assert_allclose(ours, _torch_grad(fn, X, w), rtol=1e-5, atol=1e-6)


def test_rules_are_installed_only_while_pock_tvm_differentiates():
    """Importing pock_tvm leaves TVM's rules alone; inside gradient_rules_installed() every rule of
    ours is in place (nested blocks too); after it, TVM's own again (none where TVM has none)."""
    from pock_tvm.passes.gradient_rules import GRADIENT_OVERRIDES, GRADIENT_RULES, has_gradient_rule

    def rule(name):
        op = tvm.ir.Op.get(name)
        return op.get_attr("FPrimalGradient") if op.has_attr("FPrimalGradient") else None

    tvm_rules = {name: rule(name) for name in [*GRADIENT_RULES, *GRADIENT_OVERRIDES]}
    assert all(tvm_rules[name] is None for name in GRADIENT_RULES)
    with gradient_rules_installed():
        with gradient_rules_installed():
            assert all(has_gradient_rule(name) for name in [*GRADIENT_RULES, *GRADIENT_OVERRIDES])
        assert all(not rule(name).same_as(tvm_rules[name]) for name in GRADIENT_OVERRIDES)
    for name, original in tvm_rules.items():
        now = rule(name)
        assert (now is None) if original is None else now.same_as(original), name


def test_layer_norm_gradients_of_weight_and_bias_match_torch():
    x = X.reshape(2, 4, 36)
    gamma, beta = GAMMA.reshape(36), BETA.reshape(36)
    w = np.random.default_rng(1).standard_normal(x.shape).astype("float32")
    bb = relax.BlockBuilder()
    xv, gv, bv = (relax.Var(n, relax.TensorType(a.shape, "float32")) for n, a in (("x", x), ("g", gamma), ("b", beta)))
    with bb.function("f", [xv, gv, bv]):
        with bb.dataflow():
            y = bb.emit(R.nn.layer_norm(xv, gv, bv, [-1], 1e-5))
            out = bb.emit_output(R.sum(R.multiply(y, relax.const(w))))
        bb.emit_func_output(out)
    exe = tvm.compile(_differentiate(bb.get()), target=tvm.target.Target({"kind": "llvm"}))
    grads = relax.VirtualMachine(exe, tvm.cpu())["f_adjoint"](*map(tvm.runtime.tensor, (x, gamma, beta)))[1]
    ts = [torch.tensor(a, requires_grad=True) for a in (x, gamma, beta)]
    (torch.nn.functional.layer_norm(ts[0], (36,), ts[1], ts[2]) * torch.tensor(w)).sum().backward()
    for ours, theirs in zip(grads, ts):
        np.testing.assert_allclose(ours.numpy(), theirs.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_take_with_token_ids_of_batch_by_sequence_matches_torch_embedding():
    table = np.random.default_rng(4).standard_normal((10, 5)).astype("float32")
    ids = np.array([[1, 3, 3, 0], [9, 1, 2, 3]], "int64")  # repeated ids accumulate
    ours, w = _grad(lambda t: R.take(t, relax.const(ids), axis=0), table, (2, 4, 5))
    theirs = _torch_grad(lambda t: torch.nn.functional.embedding(torch.tensor(ids), t), table, w)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_take_of_one_position_matches_torch_indexing():
    ours, w = _grad(lambda t: R.take(t, relax.const(2, "int64"), axis=2), X, (2, 4, 6))
    np.testing.assert_allclose(ours, _torch_grad(lambda t: t[:, :, 2], X, w), rtol=1e-6)


# a causal LM's labels: -100 marks padding that must not count, in the mean's denominator either
NLL_TARGETS = np.array([3, -100, 0, 5, -100, 5], "int64")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_nll_loss_with_ignore_index_matches_torch(reduction, weighted):
    x = X.reshape(6, 48)[:, :7]
    weights = np.linspace(0.5, 2.0, 7).astype("float32") if weighted else None
    out_shape = (6,) if reduction == "none" else ()
    wv = relax.const(weights) if weighted else None
    ours, w = _grad(lambda t: R.nn.nll_loss(R.nn.log_softmax(t), relax.const(NLL_TARGETS), wv, reduction), x,
                    out_shape)
    tw = torch.tensor(weights, dtype=torch.float64) if weighted else None
    theirs = _torch_grad(lambda t: torch.nn.functional.nll_loss(
        torch.log_softmax(t, -1), torch.tensor(NLL_TARGETS), tw, reduction=reduction), x, w)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stride,dilation,padding,groups,kernel,size", [
    (1, 2, (1, 1, 1, 1), 1, (3, 3), (9, 9)),  # a dilated 3x3 (TVM's rule failed to build it)
    (2, 2, (2, 1, 0, 3), 2, (3, 5), (11, 10)),  # asymmetric padding, groups, rows left over
    (3, 1, (0, 0, 0, 0), 1, (2, 2), (10, 11)),  # stride > window: input rows no window reads
    (4, 3, (5, 4, 2, 3), 1, (3, 3), (23, 23)),
    (1, 1, (1, 1, 1, 1), 6, (3, 3), (7, 7)),  # depthwise
])
def test_conv2d_gradients_of_input_and_weight_match_torch(stride, dilation, padding, groups, kernel, size):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 6, *size)).astype("float32")
    weight = rng.standard_normal((4 if groups < 6 else 6, 6 // groups, *kernel)).astype("float32")
    top, left, bottom, right = padding

    def reference(t, wt):
        padded = torch.nn.functional.pad(t, (left, right, top, bottom))
        return torch.nn.functional.conv2d(padded, wt, stride=stride, dilation=dilation, groups=groups)

    out_shape = tuple(reference(torch.tensor(x), torch.tensor(weight)).shape)
    r = rng.standard_normal(out_shape).astype("float32")
    bb = relax.BlockBuilder()
    xv, wv = (relax.Var(n, relax.TensorType(a.shape, "float32")) for n, a in (("x", x), ("w", weight)))
    with bb.function("f", [xv, wv]):
        with bb.dataflow():
            y = bb.emit(R.nn.conv2d(xv, wv, stride, padding, dilation, groups))
            out = bb.emit_output(R.sum(R.multiply(y, relax.const(r))))
        bb.emit_func_output(out)
    exe = tvm.compile(_differentiate(bb.get()), target=tvm.target.Target({"kind": "llvm"}))
    grads = relax.VirtualMachine(exe, tvm.cpu())["f_adjoint"](tvm.runtime.tensor(x), tvm.runtime.tensor(weight))[1]
    ts = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (x, weight)]
    (reference(*ts) * torch.tensor(r, dtype=torch.float64)).sum().backward()
    for ours, theirs in zip(grads, ts):
        np.testing.assert_allclose(ours.numpy(), theirs.grad.numpy(), rtol=1e-4, atol=1e-4)


IDX = np.random.default_rng(6).integers(0, 6, size=(2, 4, 6, 3)).astype("int64")  # repeats accumulate
ND_IDX = np.array([[0, 1, 1], [2, 3, 3]], "int64")  # x[0,2], x[1,3], x[1,3] (Relax takes it transposed, ONNX-style)

GATHER_CASES = {
    "gather_elements": (lambda x: R.gather_elements(x, relax.const(IDX), 3),
                        lambda t: torch.gather(t, 3, torch.tensor(IDX)), IDX.shape),
    "gather_nd": (lambda x: R.gather_nd(x, relax.const(np.ascontiguousarray(ND_IDX.T), "int64")),
                  lambda t: t[torch.tensor(ND_IDX[0]), torch.tensor(ND_IDX[1])], (3, 6, 6)),
    "scatter_elements_add": (lambda x: R.scatter_elements(x, relax.const(IDX), R.multiply(R.strided_slice(
        x, [3], [0], [3]), relax.const(2.0)), 3, "add"),
        lambda t: t.scatter_add(3, torch.tensor(IDX), t[..., :3] * 2.0), X.shape),
    "scatter_elements_update": (lambda x: R.scatter_elements(x, relax.const(IDX[..., :1]), R.multiply(
        R.strided_slice(x, [3], [0], [1]), relax.const(3.0)), 3, "update"),
        lambda t: t.scatter(3, torch.tensor(IDX[..., :1]), t[..., :1] * 3.0), X.shape),
}


@pytest.mark.parametrize("name", sorted(GATHER_CASES))
def test_gather_and_scatter_rules_match_torch(name):
    op, fn, out_shape = GATHER_CASES[name]
    ours, w = _grad(op, X, out_shape)
    np.testing.assert_allclose(ours, _torch_grad(fn, X, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size,kernel,stride,padding,ceil", [
    (2, 2, 1, 0, False),  # one window over the whole map (TVM's rule returned unwritten memory)
    (2, 3, 1, 1, True),  # GoogLeNet's pooling branch over a 2x2 map
    (4, 3, 1, 0, False), (4, 3, 2, 0, False),  # overlapping windows; the last row read by none
    (7, 2, 2, 0, False), (7, 3, 2, 1, True), (5, 3, 3, 1, True), (8, 1, 2, 0, False),
])
def test_max_pool2d_gradient_matches_torch(size, kernel, stride, padding, ceil):
    x = np.random.default_rng(size * 7 + kernel).standard_normal((2, 3, size, size)).astype("float32")
    fn = lambda t: torch.nn.functional.max_pool2d(t, kernel, stride, padding, ceil_mode=ceil)  # noqa: E731
    out_shape = tuple(fn(torch.tensor(x)).shape)
    ours, w = _grad(lambda v: R.nn.max_pool2d(v, kernel, stride, padding, ceil_mode=ceil), x, out_shape)
    np.testing.assert_allclose(ours, _torch_grad(fn, x, w), rtol=1e-6, atol=1e-6)


def test_max_pool2d_gradient_goes_to_the_first_of_tied_maxima_as_in_torch():
    # after a ReLU whole windows are 0: torch gives each window's gradient to its first element
    x = np.maximum(np.random.default_rng(3).standard_normal((2, 3, 6, 6)), 0).astype("float32")
    x[0, 0, :3, :3] = 0.0
    fn = lambda t: torch.nn.functional.max_pool2d(t, 3, 1, 1)  # noqa: E731
    ours, w = _grad(lambda v: R.nn.max_pool2d(v, 3, 1, 1), x, (2, 3, 6, 6))
    np.testing.assert_allclose(ours, _torch_grad(fn, x, w), rtol=1e-6, atol=1e-6)
