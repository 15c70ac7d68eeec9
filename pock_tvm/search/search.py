"""Pick the updates with the largest total gain that fit the budget.

Gains are assumed additive (as in TTE). Costs are increments over no update, read off the
compiler's plan of each option alone: ``memory(option) - inference_bytes``, and for a latency
budget ``step_ms(option) - forward_ms``. Summing increments counts the backward path two options
share twice, so a set's estimate is above what the compiler plans for it; the caller checks the
chosen scheme with the compiler (:func:`pock_tvm.search.scheme_search.search_scheme`).

One choice per group (bias depth; each weight's ratio or frozen). :func:`exact` is a knapsack over
groups keeping only Pareto-optimal partial choices; when those grow past ``max_states`` the search
is :func:`evolutionary` instead (seeded, deterministic).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .contribution import Analysis
from .space import Option

MAX_STATES = 20000


@dataclass(frozen=True)
class Item:
    option: Option
    gain: float
    memory: int  # increment over no update, bytes
    latency: float  # increment over the forward, ms
    upload: int = 0  # bytes of the tensors it trains (what a federated node sends per round)


@dataclass
class Choice:
    options: tuple[Option, ...]
    gain: float  # estimated: the sum of the options' gains
    memory: int  # estimated planned training bytes (inference bytes + increments)
    latency_ms: float | None  # estimated step time, when a latency budget was given
    method: str  # "exact" or "evolutionary"


def items(analysis: Analysis, latency: bool, uploads: dict[str, int] | None = None) -> dict[str, list[Item]]:
    """Groups of the options that were measured and gain something (``uploads``: trained bytes by
    option key, for an upload budget)."""
    base = analysis.baseline_accuracy
    groups: dict[str, list[Item]] = {}
    for row in analysis.rows:
        gain = row.gain(base) if base is not None else None
        if gain is None or gain <= 0 or (latency and row.step_ms is None):
            continue
        lat = max(0.0, row.step_ms - (analysis.forward_ms or 0.0)) if latency else 0.0
        groups.setdefault(row.option.group, []).append(
            Item(row.option, gain, max(0, row.memory - analysis.inference_bytes), lat,
                 (uploads or {}).get(row.option.key, 0)))
    return groups


def search(analysis: Analysis, budget: int, latency_ms: float | None = None, seed: int = 0,
           method: str = "auto", max_states: int = MAX_STATES, upload_bytes: int | None = None,
           uploads: dict[str, int] | None = None) -> Choice:
    """The best choice within ``budget`` planned training bytes (and ``latency_ms`` per step, and
    ``upload_bytes`` of trained tensors, with ``uploads`` the trained bytes of each option key).
    ``method``: ``auto`` (exact unless too large), ``exact`` or ``evolutionary``."""
    check_budget(analysis, budget, latency_ms)
    if upload_bytes is not None and uploads is None:
        raise ValueError("search: an upload budget needs the trained bytes of each option (uploads=)")
    groups = list(items(analysis, latency_ms is not None, uploads if upload_bytes is not None else None).values())
    if upload_bytes is not None:  # an option that alone sends too much can never be chosen
        groups = [kept for g in groups if (kept := [i for i in g if i.upload <= upload_bytes])]
    mem_left = budget - analysis.inference_bytes
    lat_left = None if latency_ms is None else latency_ms - (analysis.forward_ms or 0.0)
    picked, used = None, method
    if method in ("auto", "exact"):
        picked = exact(groups, mem_left, lat_left, max_states, upload_bytes)
        used = "exact"
        if picked is None and method == "exact":
            raise ValueError(f"search: the exact search needs more than {max_states} partial choices; "
                             "use method='evolutionary' (or 'auto')")
    if picked is None:
        picked, used = evolutionary(groups, mem_left, lat_left, seed, upload_left=upload_bytes), "evolutionary"
    return _choice(analysis, picked, latency_ms, used)


def _choice(analysis: Analysis, picked: list[Item], latency_ms, method: str) -> Choice:
    picked = sorted(picked, key=lambda i: i.option.key)
    return Choice(tuple(i.option for i in picked), sum(i.gain for i in picked),
                  analysis.inference_bytes + sum(i.memory for i in picked),
                  None if latency_ms is None else (analysis.forward_ms or 0.0) + sum(i.latency for i in picked),
                  method)


def exact(groups: list[list[Item]], mem_left: int, lat_left: float | None,
          max_states: int = MAX_STATES, upload_left: int | None = None) -> list[Item] | None:
    """Knapsack over groups; ``None`` when the Pareto set grows past ``max_states``."""
    # a state: (memory, latency, upload, -gain, items); keep the ones no other state beats on all four
    states = [(0, 0.0, 0, 0.0, ())]
    for group in groups:
        grown = list(states)
        for memory, lat, up, neg_gain, chosen in states:
            for item in group:
                m, t, u = memory + item.memory, lat + item.latency, up + item.upload
                if m <= mem_left and (lat_left is None or t <= lat_left) and (upload_left is None or u <= upload_left):
                    grown.append((m, t, u, neg_gain - item.gain, chosen + (item,)))
        states = _pareto(grown)
        if len(states) > max_states:
            return None
    best = min(states, key=lambda s: (s[3], s[0], s[1], s[2], [i.option.key for i in s[4]]))
    return list(best[4])


def _pareto(states):
    """The states not dominated in (memory, latency, upload, -gain), in a deterministic order."""
    states = sorted(states, key=lambda s: (s[0], s[1], s[2], s[3], [i.option.key for i in s[4]]))
    kept = []
    for s in states:
        if not any(k[0] <= s[0] and k[1] <= s[1] and k[2] <= s[2] and k[3] <= s[3] for k in kept):
            kept.append(s)
    return kept


def evolutionary(groups: list[list[Item]], mem_left: int, lat_left: float | None, seed: int = 0,
                 population: int = 64, generations: int = 150, mutation: float = 0.1,
                 upload_left: int | None = None) -> list[Item]:
    """A genetic search: a genome picks one item (or none, -1) per group; infeasible genomes are
    repaired by dropping the items with the least gain per byte. Elitist; seeded."""
    rng = np.random.default_rng(seed)
    sizes = np.array([len(g) for g in groups])

    def repair(genome):
        genome = genome.copy()
        while True:
            chosen = [(g, genome[g]) for g in range(len(groups)) if genome[g] >= 0]
            memory = sum(groups[g][k].memory for g, k in chosen)
            lat = sum(groups[g][k].latency for g, k in chosen)
            up = sum(groups[g][k].upload for g, k in chosen)
            if memory <= mem_left and (lat_left is None or lat <= lat_left) and (upload_left is None or up <= upload_left):
                return genome
            g, _ = min(chosen, key=lambda c: (groups[c[0]][c[1]].gain / max(groups[c[0]][c[1]].memory, 1), c[0]))
            genome[g] = -1

    def fitness(genome):
        return sum(groups[g][k].gain for g, k in enumerate(genome) if k >= 0)

    if not groups:
        return []
    pop = [repair(np.where(rng.random(len(groups)) < 0.5, rng.integers(0, sizes), -1)) for _ in range(population)]
    pop.append(repair(np.full(len(groups), -1)))
    for _ in range(generations):
        scores = np.array([fitness(g) for g in pop])
        elite = [pop[i] for i in np.argsort(-scores, kind="stable")[: population // 8]]
        children = list(elite)
        while len(children) < population:
            a, b = (pop[max(rng.choice(len(pop), 2, replace=False), key=lambda i: scores[i])] for _ in range(2))
            child = np.where(rng.random(len(groups)) < 0.5, a, b)
            flip = rng.random(len(groups)) < mutation
            child[flip] = np.where(rng.random(flip.sum()) < 0.3, -1, rng.integers(0, sizes[flip]))
            children.append(repair(child))
        pop = children
    best = max(pop, key=lambda g: (fitness(g), -sum(groups[i][k].memory for i, k in enumerate(g) if k >= 0)))
    return [groups[g][k] for g, k in enumerate(best) if k >= 0]


def smallest(analysis: Analysis) -> tuple[Option, int]:
    """The option with the least planned training memory, and that memory."""
    row = min(analysis.rows, key=lambda r: (r.memory, r.option.key))
    return row.option, row.memory


def check_budget(analysis: Analysis, budget: int, latency_ms: float | None) -> None:
    """A clear error when no option fits the budget (naming the smallest one and its cost)."""
    from ..runtime.report import format_bytes

    option, memory = smallest(analysis)
    if budget < memory:
        raise ValueError(f"search: no scheme fits a budget of {format_bytes(budget)}: the smallest, {option.describe()} "
                         f"({option.key}), plans {format_bytes(memory)} of training memory; raise the budget to at "
                         f"least {format_bytes(memory)}")
    if latency_ms is not None:
        timed = [r for r in analysis.rows if r.step_ms is not None and r.memory <= budget]
        fastest = min(timed, key=lambda r: r.step_ms, default=None)
        if fastest is not None and fastest.step_ms > latency_ms:
            raise ValueError(f"search: no scheme fits a latency of {latency_ms:g} ms per step: the fastest, "
                             f"{fastest.option.describe()} ({fastest.option.key}), takes {fastest.step_ms:.1f} ms "
                             f"here; raise the latency budget to at least {fastest.step_ms:.1f} ms")
