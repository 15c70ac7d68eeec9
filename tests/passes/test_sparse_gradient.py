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
