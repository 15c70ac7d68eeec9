"""The step-time check of a searched scheme: alternating timing (on a fake clock), the retries that
tighten the step budget, the reference found among the analysis's options, and the search with a
step budget on a tiny Llama (timed for real, then cached)."""

import numpy as np
import pytest

from pock_tvm.scheme import LoRA, Scheme
from pock_tvm.search import scheme_of, step_check
from pock_tvm.search.scheme_search import _check_steps, _row_like, search_scheme
from pock_tvm.search.search import Choice
from pock_tvm.search.step_check import StepCheck, check_step, step_args, time_steps

from tiny_text import BATCH, SETTINGS, tokens


class Clock:
    now = 0.0

    def __call__(self):
        return self.now


class FakeProgram:
    """A step that takes ``ms`` on the fake clock and records when it ran."""

    def __init__(self, clock, ms, log, name):
        self.clock, self.ms, self.log, self.name = clock, ms, log, name

    def step(self, *args):
        self.log.append(self.name)
        self.clock.now += self.ms / 1e3
        return 0.0


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(step_check.time, "perf_counter", c)
    return c


def test_steps_alternate_in_both_orders_after_a_warm_up_round(clock):
    log = []
    a, b = FakeProgram(clock, 30, log, "a"), FakeProgram(clock, 20, log, "b")
    times = time_steps([a, b], (), rounds=3)
    assert log == ["a", "b", "b", "a", "a", "b", "b", "a"]  # round 0 (warm-up) not timed
    assert times == [[pytest.approx(30)] * 3, [pytest.approx(20)] * 3]
    check = check_step(a, (), reference=b, rounds=4)
    assert (check.step_ms, check.reference_ms, check.ratio, check.rounds) == (30, 20, 1.5, 4)
    assert check.excess_ms(200.0) == pytest.approx(100.0)  # the ratio's excess, in the estimate's ms
    alone = check_step(a, (), rounds=2)
    assert alone.ratio is None and alone.excess_ms(25.0) == pytest.approx(5.0)
    assert StepCheck.from_json(check.to_json()) == check


def test_step_args_take_one_batch_of_every_input():
    ids, mask = np.arange(12).reshape(4, 3), np.ones((4, 3), "int64")
    args = step_args((ids, mask), ids * 2, 2)
    assert [a.shape for a in args] == [(2, 3)] * 3 and (args[2] == ids[:2] * 2).all()
    assert [a.shape for a in step_args(np.zeros((5, 7), "float32"), np.zeros(5), 3)] == [(3, 7), (3,)]


def _choice(name, latency):
    return Choice((name,), 1.0, 100, latency, "exact")


def test_a_slow_choice_is_searched_again_with_the_budget_tightened_by_its_excess(clock):
    """First choice 1.2x the reference: searched again within 100 - 20 ms; the second fits."""
    log = []
    reference = FakeProgram(clock, 10, log, "ref")
    speeds = {"slow": 12, "fast": 9}
    asked = []

    def research(limit):
        asked.append(limit)
        return _choice("fast", limit)

    choice, memory, step = _check_steps(_choice("slow", 100.0), 100, 200, 100.0, research, lambda options: 150,
                                        lambda options: FakeProgram(clock, speeds[options[0]], log, options[0]),
                                        lambda: reference, (), "lora")
    assert asked == [pytest.approx(80.0)] and choice.options == ("fast",) and memory == 150
    assert step.ratio == pytest.approx(0.9) and step.reference_ms == pytest.approx(10)


def test_a_step_that_stays_slow_is_an_error_naming_the_budget(clock):
    log = []
    with pytest.raises(ValueError, match=r"stay slower than 5\.0 ms \(last: measured step: 9\.0 ms.*raise the step"):
        _check_steps(_choice("slow", 5.0), 100, 200, 5.0, lambda limit: _choice("slow", limit), lambda o: 150,
                     lambda options: FakeProgram(clock, 9, log, "x"), None, (), None)
    with pytest.raises(ValueError, match="stay slower than the step of 'lora'"):  # a re-search over the memory budget
        _check_steps(_choice("slow", 5.0), 100, 200, 5.0, lambda limit: _choice("slow", limit), lambda o: 201,
                     lambda options: FakeProgram(clock, 9, log, options[0]), lambda: FakeProgram(clock, 3, log, "r"), (),
                     "lora")


def test_the_reference_scheme_is_found_among_the_analysis_options(llama, analysis):
    row = _row_like(analysis, llama, Scheme("r4", lora=LoRA(rank=4, alpha=8.0)))
    assert row is not None and row.option.key == "lora:attention:r4"
    assert _row_like(analysis, llama, Scheme.preset("lora")) is None  # rank 8: not an option here
    block = analysis.rows[0].option
    assert _row_like(analysis, llama, Scheme("x", rules=scheme_of([block]).rules)).option == block


def test_a_search_with_a_step_budget_times_the_choice_and_caches_the_check(llama, analysis, cache, monkeypatch):
    budget = max(r.memory for r in analysis.rows)
    result = search_scheme(llama, *tokens(), batch=BATCH, budget=budget, latency_ms=1e6, settings=SETTINGS,
                           cache_dir=cache)
    assert result.step is not None and 0 < result.step.step_ms < 1e6 and result.step.ratio is None
    assert "measured step:" in result.table()
    monkeypatch.setattr(step_check, "time_steps", lambda *a, **k: pytest.fail("timed again"))
    again = search_scheme(llama, *tokens(), batch=BATCH, budget=budget, latency_ms=1e6, settings=SETTINGS,
                          cache_dir=cache)
    assert again.step == result.step and again.choice.options == result.choice.options
    with pytest.raises(ValueError, match="latency_ms.*or a scheme.*not both"):
        search_scheme(llama, *tokens(), batch=BATCH, budget=budget, latency_ms=1.0, latency_of="lora",
                      settings=SETTINGS, cache_dir=cache)


def test_a_search_no_slower_than_a_reference_compiles_it_and_compares_alternately(llama, analysis, cache,
                                                                                    monkeypatch):
    """``latency_of``: the reference's analysis row is the estimate's budget; the chosen step is
    timed against the compiled reference (faked here: the first choice 1.2x, the second 0.95x)."""
    from pock_tvm.search import scheme_search

    ratios = iter([1.2, 0.95])
    calls = []

    def fake_check(program, args, reference=None, rounds=step_check.ROUNDS):
        calls.append(reference is not None)
        return StepCheck(10.0, rounds, 10.0, next(ratios))

    monkeypatch.setattr(scheme_search, "check_step", fake_check)
    reference = Scheme("r4", lora=LoRA(rank=4, alpha=8.0))
    budget = max(r.memory for r in analysis.rows)
    result = search_scheme(llama, *tokens(), batch=BATCH, budget=budget, latency_of=reference, settings=SETTINGS,
                           cache_dir=cache)
    estimate = analysis.row("lora:attention:r4").step_ms
    assert calls == [True, True] and result.step.ratio == 0.95 and result.reference == "r4"
    assert result.choice.latency_ms <= estimate * 0.8 + 1e-9  # searched again within 1 - 0.2 of the estimate
    assert "'r4'" in result.table() and "0.950x" in result.table()
