"""PipelineOptions: presets are cumulative, unknown names are errors."""

import dataclasses

import pytest

from pock_tvm.options import PRESETS, PipelineOptions


def test_presets_add_optimizations_level_by_level():
    levels = [dataclasses.astuple(PRESETS[f"O{i}"]) for i in range(4)]
    count = len(dataclasses.fields(PipelineOptions))
    assert levels[0] == (False,) * count and levels[3] == (True,) * count
    for lower, higher in zip(levels, levels[1:]):
        assert all(h or not lo for lo, h in zip(lower, higher)) and sum(higher) > sum(lower)
    assert PipelineOptions.load(None) == PipelineOptions() == PRESETS["O3"]
    assert PipelineOptions.load("O1").fold_frozen and not PipelineOptions.load("O1").in_place


def test_unknown_level_or_optimization_is_an_error():
    with pytest.raises(ValueError, match=r"unknown level 'O4'; choose one of O0, O1, O2, O3"):
        PipelineOptions.load("O4")
    with pytest.raises(ValueError, match=r"unknown optimization \['fold'\]"):
        PipelineOptions().without("fold")
    assert PipelineOptions().without("in_place") == PipelineOptions(in_place=False)
