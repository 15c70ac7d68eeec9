"""SparseGradient: the backward graph holds only what the scheme's updates need."""

import pock_tvm
from graphs import backward_calls, training_graph


def _convs(mod):
    calls = backward_calls(mod)
    weight_grads = [c for c in calls if c.op.name == "relax.nn.conv2d" and c.attrs.data_layout == "CNHW"]
    input_grads = [c for c in calls if c.op.name == "relax.nn.conv2d_transpose"]
    return weight_grads, input_grads


def test_full_has_every_weight_gradient_and_no_input_gradient_for_x(small_cnn):
    weight_grads, input_grads = _convs(training_graph(small_cnn, "full")[0])
    assert len(weight_grads) == 3  # features.0/1/2 convs
    assert len(input_grads) == 2  # features.2 and .1; nothing needs d(loss)/d(x)


def test_bias_only_has_no_weight_gradient(small_cnn):
    weight_grads, input_grads = _convs(training_graph(small_cnn, "bias-only")[0])
    assert weight_grads == []
    assert len(input_grads) == 2  # the BN biases of features.0 and .1 need them


def test_last_k_stops_the_input_gradient_at_the_lowest_updated_layer(small_cnn):
    weight_grads, input_grads = _convs(training_graph(small_cnn, "last-2")[0])  # features.2 + classifier
    assert len(weight_grads) == 1
    assert input_grads == []
    weight_grads, input_grads = _convs(training_graph(small_cnn, "last-1")[0])
    assert weight_grads == [] and input_grads == []


def test_partial_channel_weight_gradient_has_the_sliced_shape(small_cnn):
    scheme = pock_tvm.Scheme(rules=[pock_tvm.Rule("features.1.0.weight", "partial", 0.25)])
    mod, trainable = training_graph(small_cnn, scheme)
    assert trainable == ["p_features_1_0_weight__upd"]
    weight_grads, _ = _convs(mod)
    assert len(weight_grads) == 1
    # the weight-gradient conv of a (16, 8, 3, 3) weight reads 2 of the 8 input channels only
    data = weight_grads[0].args[0]
    assert int(data.ty.shape[0]) == 2  # CNHW: the layer input, sliced at forward time
    assert [int(d) for d in weight_grads[0].ty.shape][:2] == [16, 2]
    grads = mod["loss_adjoint"].ret_ty.fields[1].fields
    assert [int(d) for d in grads[0].shape] == [16, 2, 3, 3]


def test_no_trainable_parameter_is_an_error(small_cnn):
    import pytest

    with pytest.raises(ValueError, match="SparseGradient: the scheme updates no parameter"):
        training_graph(small_cnn, pock_tvm.Scheme("nothing"))


# -- Before/Expected: the frozen prefix as inference, the Relax gradient of the rest

import tvm  # noqa: E402
from tvm import relax  # noqa: E402
from tvm.script import ir as I, relax as R  # noqa: E402

from pock_tvm.passes import SparseGradient  # noqa: E402
from pock_tvm.passes.sparse_gradient import FORWARD_BINDINGS  # noqa: E402

F32 = "float32"


@I.ir_module
class Before:
    @R.function
    def loss(x: R.Tensor((2, 3), F32), w1: R.Tensor((3, 4), F32), w2: R.Tensor((4, 5), F32),
             target: R.Tensor((2, 5), F32)):
        with R.dataflow():
            h = R.matmul(x, w1)
            a = R.nn.relu(h)
            y = R.matmul(a, w2)
            d = R.subtract(y, target)
            squares = R.multiply(d, d)
            gv = R.sum(squares)
            R.output(gv)
        return gv


@I.ir_module
class ExpectedTail:
    """What the Relax gradient is taken of: the bindings w2 reaches, with the frontier ``a`` (the
    last frozen value they read) as an extra parameter after loss's own."""

    @R.function
    def loss__tail(x: R.Tensor((2, 3), F32), w1: R.Tensor((3, 4), F32), w2: R.Tensor((4, 5), F32),
                   target: R.Tensor((2, 5), F32), a: R.Tensor((2, 4), F32)):
        with R.dataflow():
            y = R.matmul(a, w2)
            d = R.subtract(y, target)
            squares = R.multiply(d, d)
            gv = R.sum(squares)
            R.output(gv)
        return gv


@I.ir_module
class ExpectedAdjoint:
    @R.function(private=True)
    def loss__tail_adjoint(x: R.Tensor((2, 3), F32), w1: R.Tensor((3, 4), F32), w2: R.Tensor((4, 5), F32),
                           target: R.Tensor((2, 5), F32), a: R.Tensor((2, 4), F32)) \
            -> R.Tuple(R.Tensor((), F32), R.Tuple(R.Tensor((4, 5), F32))):
        return R.tuple(R.sum(R.zeros((2, 5), F32)), R.tuple(R.zeros((4, 5), F32)))  # stands for the callee

    @R.function(private=True)
    def loss_adjoint(x: R.Tensor((2, 3), F32), w1: R.Tensor((3, 4), F32), w2: R.Tensor((4, 5), F32),
                     target: R.Tensor((2, 5), F32)):
        cls = ExpectedAdjoint
        with R.dataflow():
            h = R.matmul(x, w1)  # the frozen prefix: plain inference, no gradient
            a = R.nn.relu(h)
            result = cls.loss__tail_adjoint(x, w1, w2, target, a)
            R.output(result)
        return result


def test_frozen_prefix_runs_as_inference_and_the_tail_gets_the_relax_gradient():
    after = SparseGradient(["w2"])(Before)
    # the tail's adjoint: Relax's Gradient of ExpectedTail for w2 only, its backward after 4 forward
    # bindings; it stands in for ExpectedAdjoint's placeholder of the same name
    tail = ExpectedTail["loss__tail"]
    gradient = relax.transform.Gradient("loss__tail", require_grads=[tail.params[2]])(ExpectedTail)
    expected = tvm.IRModule({**dict(ExpectedAdjoint.functions.items()), Before.get_global_var("loss"): Before["loss"]})
    expected[expected.get_global_var("loss__tail_adjoint")] = \
        gradient["loss__tail_adjoint"].with_attr(FORWARD_BINDINGS, 4).without_attr("global_symbol")
    # loss kept; loss_adjoint: h and relu as inference (relu needs no gradient rule), then the tail's adjoint
    tvm.ir.assert_structural_equal(after, expected)
