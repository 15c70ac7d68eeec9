"""The budgeted search over fake contribution tables (no compiling): optimal, deterministic, and
clear when nothing fits."""

import itertools

import numpy as np
import pytest

from pock_tvm.search import Analysis, AnalysisSettings, Option, OptionRow, search
from pock_tvm.search.search import items

BASE = 1000  # inference bytes


def fake_analysis(seed: int, weights: int = 5, ratios=(1.0, 0.5, 0.25)) -> Analysis:
    rng = np.random.default_rng(seed)
    rows = [OptionRow(Option("bias", blocks=n), BASE + 100 * n, 0, 0.1 + 0.02 * n + rng.uniform(0, 0.02), 2.0 + n)
            for n in range(1, 4)]
    for w in range(weights):
        for r in ratios:
            rows.append(OptionRow(Option(f"layer{w}.weight", ratio=r), BASE + int(rng.integers(50, 800) * r), 0,
                                  0.1 + rng.uniform(0, 0.2) * r, 3.0 + 5 * r))
    return Analysis("k", AnalysisSettings(), BASE, rows, baseline_accuracy=0.1, forward_ms=1.0)


def brute_force(analysis: Analysis, budget: int, latency=None) -> float:
    groups = list(items(analysis, latency is not None).values())
    best = 0.0
    for pick in itertools.product(*[[None, *g] for g in groups]):
        chosen = [i for i in pick if i is not None]
        memory = BASE + sum(i.memory for i in chosen)
        lat = 1.0 + sum(i.latency for i in chosen)
        if memory <= budget and (latency is None or lat <= latency):
            best = max(best, sum(i.gain for i in chosen))
    return best


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("budget", [1300, 2000, 3500])
def test_exact_search_finds_the_best_choice_within_the_budget(seed, budget):
    analysis = fake_analysis(seed)
    choice = search(analysis, budget)
    assert choice.method == "exact"
    assert choice.memory <= budget
    assert choice.gain == pytest.approx(brute_force(analysis, budget))


def test_latency_budget_is_respected_and_optimal():
    analysis = fake_analysis(7)
    choice = search(analysis, 4000, latency_ms=12.0)
    assert choice.latency_ms <= 12.0
    assert choice.gain == pytest.approx(brute_force(analysis, 4000, latency=12.0))
    assert search(analysis, 4000).gain > choice.gain  # the latency budget binds


def _uploads(analysis: Analysis) -> dict[str, int]:
    """Fake trained bytes: biases small, a weight option by its ratio."""
    return {r.option.key: 40 * r.option.blocks if r.option.group == "bias" else int(1000 * r.option.ratio)
            for r in analysis.rows}


def brute_force_upload(analysis: Analysis, budget: int, upload: int) -> float:
    groups = list(items(analysis, False, _uploads(analysis)).values())
    best = 0.0
    for pick in itertools.product(*[[None, *g] for g in groups]):
        chosen = [i for i in pick if i is not None]
        if BASE + sum(i.memory for i in chosen) <= budget and sum(i.upload for i in chosen) <= upload:
            best = max(best, sum(i.gain for i in chosen))
    return best


@pytest.mark.parametrize("method", ["exact", "evolutionary"])
def test_upload_budget_is_respected_and_optimal(method):
    analysis = fake_analysis(2)
    uploads = _uploads(analysis)
    choice = search(analysis, 4000, upload_bytes=600, uploads=uploads, method=method)
    assert sum(uploads[o.key] for o in choice.options) <= 600
    best = brute_force_upload(analysis, 4000, 600)
    assert choice.gain == pytest.approx(best) if method == "exact" else choice.gain >= 0.98 * best
    assert search(analysis, 4000).gain > choice.gain  # the upload budget binds
    with pytest.raises(ValueError, match="needs the trained bytes of each option"):
        search(analysis, 4000, upload_bytes=600)


def test_evolutionary_search_is_deterministic_with_a_seed_and_near_optimal():
    analysis = fake_analysis(3)
    runs = [search(analysis, 2500, seed=s, method="evolutionary") for s in (5, 5, 6)]
    assert runs[0] == runs[1]
    assert all(r.method == "evolutionary" and r.memory <= 2500 for r in runs)
    assert runs[0].gain >= 0.98 * brute_force(analysis, 2500)


def test_auto_falls_back_to_evolutionary_when_the_exact_search_grows_too_large():
    analysis = fake_analysis(1, weights=8)
    choice = search(analysis, 4000, max_states=5)
    assert choice.method == "evolutionary" and choice.memory <= 4000
    with pytest.raises(ValueError, match="exact search needs more than 5"):
        search(analysis, 4000, method="exact", max_states=5)


def test_a_budget_nothing_fits_names_the_smallest_scheme_and_its_cost():
    rows = [OptionRow(Option("bias", blocks=1), 1100, 0, 0.2, 2.0),
            OptionRow(Option("fc.weight", ratio=0.5, channels="4 of 8"), 1400, 0, 0.3, 3.0)]
    analysis = Analysis("k", AnalysisSettings(), BASE, rows, baseline_accuracy=0.1, forward_ms=1.0)
    with pytest.raises(ValueError) as err:
        search(analysis, 1050)
    text = str(err.value)
    assert "no scheme fits a budget of 1.03 KiB" in text
    assert "biases of the last 1 block (bias:last-1), plans 1.07 KiB" in text and "at least 1.07 KiB" in text
    assert search(analysis, 1100).options == (rows[0].option,)


def test_a_latency_nothing_fits_names_the_fastest_option():
    with pytest.raises(ValueError, match=r"latency of 1 ms per step: the fastest, .*bias:last-1.*3\.0 ms"):
        search(fake_analysis(0), 4000, latency_ms=1.0)
