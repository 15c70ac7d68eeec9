"""The registered pipeline: phases by name, and what each phase leaves in the module."""

import pytest
import tvm
from tvm import relax

import pock_tvm
from pock_tvm.compiler.step import plan


def _settings(imported, scheme):
    _, trainable, partial = plan(imported, pock_tvm.Scheme.load(scheme).resolve(imported))
    return {"trainable": trainable, "partial": partial, "origins": imported.origins,
            "loss_function": pock_tvm.loss.make_loss("ce").relax_function(imported.output),
            "optimizer": pock_tvm.SGD()}


def test_registered_and_training_graph_phase(small_cnn):
    mod = relax.get_pipeline("pock_tvm", lower=False, **_settings(small_cnn, "last-2"))(small_cnn.mod)
    names = {gv.name_hint for gv in mod.get_global_vars()}
    assert names == {"forward", "loss", "loss_adjoint", "loss__tail_adjoint", "train_step"}


def test_lowering_phase_leaves_no_high_level_op(small_cnn):
    mod = relax.get_pipeline("pock_tvm", **_settings(small_cnn, "bias-only"))(small_cnn.mod)
    text = mod["train_step"].script()
    assert "R.nn.conv2d" not in text and "R.matmul" not in text
    assert any(isinstance(f, tvm.tirx.PrimFunc) for f in mod.functions.values())


def test_missing_settings_are_errors(small_cnn):
    with pytest.raises(ValueError, match="AppendLoss: no loss function given"):
        relax.get_pipeline("pock_tvm", trainable=["p_classifier_bias"], lower=False)(small_cnn.mod)


def test_phase_4_is_tvms_default_build_with_in_place_updates_before_memory_planning():
    """``default_build`` restates TVM's ``default_build_pipeline`` (its passes are built inside a
    closure, so they cannot be reused one by one): read TVM's list from its source and compare, so
    that a TVM upgrade changing it fails here."""
    import inspect
    import re

    from tvm.relax import pipeline as tvm_pipeline

    from pock_tvm.passes.pipeline import default_build

    source = inspect.getsource(tvm_pipeline.default_build_pipeline)
    tvm_names = [getattr(getattr(relax, space), name)().info.name
                 for space, name in re.findall(r"\b(backend|transform)\.(\w+)\(\)", source)]
    ours = [p.info.name for p in default_build(in_place=True)]
    assert len(tvm_names) == 15 and [n for n in ours if n != "pock_tvm.InPlaceUpdates"] == tvm_names
    assert ours.index("pock_tvm.InPlaceUpdates") == ours.index("StaticPlanBlockMemory") - 1
    assert [p.info.name for p in default_build(in_place=False)] == tvm_names
