"""Contribution analysis on a small model: costs are the compiler's plans, gains come from real
fine-tunes, over-budget options are not fine-tuned, and the cache makes a second analysis instant."""

import numpy as np
import pytest
import torch

import pock_tvm
from pock_tvm.frontend import import_model
from pock_tvm.compiler import step as compiler
from pock_tvm.models import MLP
from pock_tvm.search import AnalysisSettings, analyze, scheme_of
from pock_tvm.search.contribution import split

SETTINGS = AnalysisSettings(epochs=5, optimizer=pock_tvm.Adam(lr=1e-2))
BATCH = 8


def data(n=64):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, n)
    x = rng.standard_normal((n, 32)).astype("float32") * 0.3
    x[np.arange(n), y] += 2.0  # the class is readable from one feature: learnable in a few steps
    return x, y.astype("int64")


@pytest.fixture(scope="module")
def imported():
    torch.manual_seed(0)
    return import_model(MLP().eval(), (torch.zeros(BATCH, 32),))


@pytest.fixture(scope="module")
def analysis(imported, tmp_path_factory):
    budget_probe = analyze(imported, *data(), batch=BATCH, settings=SETTINGS, budget=0,
                           cache_dir=tmp_path_factory.mktemp("probe"))  # costs only: nothing fits 0 bytes
    cache = tmp_path_factory.mktemp("cache")
    budget = budget_probe.row("fc1.weight@0.5").memory  # the first layer at half its inputs fits, fc2 in full not
    return analyze(imported, *data(), batch=BATCH, settings=SETTINGS, budget=budget, cache_dir=cache), budget, cache


@pytest.mark.slow  # make test-all; the feature keeps a faster test in make test
def test_costs_are_the_compilers_plan_of_each_option(imported, analysis):
    result, _, _ = analysis
    for key in ("bias:last-1", "bias:last-3", "fc2.weight@0.25", "fc1.weight@1"):
        row = result.row(key)
        planned = compiler.plan_step(imported, scheme=scheme_of([row.option]), optimizer=SETTINGS.optimizer,
                                     baseline=False).report
        assert row.memory == planned.training_bytes()
        assert row.backward_flops == planned.sparse["backward_flops"]
    biases = [result.row(f"bias:last-{n}").memory for n in (1, 2, 3)]
    assert biases[0] < biases[1] < biases[2]  # deeper bias updates save more activations
    assert result.inference_bytes > 0


@pytest.mark.slow  # the analysis fixture compiles every option (33 s); search is in make test via test_cli_search
def test_gains_are_measured_only_for_options_within_the_budget(analysis):
    result, budget, _ = analysis
    for row in result.rows:
        if row.memory > budget:
            assert row.accuracy is None and row.step_ms is None
    assert result.row("fc2.weight@1").accuracy is None and result.row("fc1.weight@0.5").accuracy is not None
    fitted = [r for r in result.rows if r.accuracy is not None]
    assert fitted and all(0.0 <= r.accuracy <= 1.0 and r.step_ms > 0 for r in fitted)
    assert 0.0 <= result.baseline_accuracy <= 0.3  # an untrained MLP is near chance on 10 classes
    assert max(r.gain(result.baseline_accuracy) for r in fitted) > 0.2  # the classifier learns the feature


@pytest.mark.slow  # the analysis fixture compiles every option (33 s); search is in make test via test_cli_search
def test_a_second_analysis_comes_from_the_cache_without_compiling(imported, analysis, monkeypatch):
    result, budget, cache = analysis

    def refuse(*args, **kwargs):
        raise AssertionError("compiled although the analysis is cached")

    monkeypatch.setattr(compiler, "plan_step", refuse)
    monkeypatch.setattr(compiler, "build", refuse)
    again = analyze(imported, *data(), batch=BATCH, settings=SETTINGS, budget=budget, cache_dir=cache)
    assert again.to_json() == result.to_json()


@pytest.mark.slow  # make test-all; the feature keeps a faster test in make test
def test_other_data_is_another_cache_entry(imported, analysis):
    result, _, cache = analysis
    x, y = data()
    other = analyze(imported, x, (y + 1) % 10, batch=BATCH, settings=SETTINGS, budget=0, cache_dir=cache)
    assert other.key != result.key and len(list(cache.glob("contributions-*.json"))) == 2


def test_split_holds_out_the_same_quarter_for_a_seed():
    x, y = data()
    a, b = split(x, y, SETTINGS), split(x, y, SETTINGS)
    assert len(a[3]) == 16 and len(a[1]) == 48
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
