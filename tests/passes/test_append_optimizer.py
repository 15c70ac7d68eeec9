"""AppendLoss and AppendOptimizer: the signatures the runtime relies on."""

from graphs import training_graph


def test_loss_takes_forward_inputs_then_target(small_cnn):
    mod, _ = training_graph(small_cnn, "last-1")
    forward = [p.name for p in mod["forward"].params]
    loss = [p.name for p in mod["loss"].params]
    assert loss[:-1] == forward and loss[-1] == "target"
    assert len(mod["loss"].ret_ty.shape) == 0


def test_train_step_signature_and_outputs(small_cnn):
    mod, trainable = training_graph(small_cnn, "last-1", optimizer="adam")
    assert trainable == ["p_classifier_weight", "p_classifier_bias"]
    step = mod["train_step"]
    names = [p.name for p in step.params]
    loss_params = [p.name for p in mod["loss"].params]
    states = [f"{t}.{s}" for t in trainable for s in ("exp_avg", "exp_avg_sq")]
    assert names == loss_params + ["lr", "step"] + states
    # (loss, 2 new parameters, new step, 4 new states)
    assert len(step.ret_ty.fields) == 1 + 2 + 1 + 4
    assert list(step.attrs["pock_tvm.trainable"]) == trainable
