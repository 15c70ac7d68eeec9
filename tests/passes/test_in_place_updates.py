"""InPlaceUpdates: every update is written in place, with the values of the functional step."""

import torch

import pock_tvm
from pock_tvm.options import PipelineOptions
from pock_tvm.models import MLP
from pock_tvm.passes.pipeline import pock_tvm_pipeline
from graphs import training_graph
from helpers import assert_setting_keeps_numbers


def _lowered(imported, scheme, optimizer, in_place):
    mod, _ = training_graph(imported, scheme, optimizer=optimizer)
    return pock_tvm_pipeline(build_training_graph=False, options=PipelineOptions(in_place=in_place))(mod)


def test_every_update_is_in_place_and_planned_storage_shrinks(small_cnn):
    from pock_tvm.analysis.memory import planned_bytes

    on = _lowered(small_cnn, "last-2", "adam", True)
    off = _lowered(small_cnn, "last-2", "adam", False)
    # 5 parameters, the step counter and 2 Adam states per parameter
    assert int(on["train_step"].attrs["pock_tvm.in_place"]) == 5 + 1 + 10
    assert "pock_tvm.in_place" not in off["train_step"].attrs
    assert planned_bytes(on)["storage"] < planned_bytes(off)["storage"]


def test_in_place_values_match_the_functional_step():
    torch.manual_seed(0)
    assert_setting_keeps_numbers(MLP(), torch.randn(4, 32), torch.randint(0, 10, (4,)),
                                 pock_tvm.SGD(lr=0.1, momentum=0.9), "full", "in_place")
