"""Pick the updates with the largest total gain that fit the budget.

Gains are assumed additive (as in TTE). Costs are increments over no update, read off the
compiler's plan of each option alone: ``memory(option) - inference_bytes``, and for a latency
budget ``step_ms(option) - forward_ms``. For CNN options they are summed: that counts the backward
path two options share twice, so a set's estimate is above what the compiler plans for it. A
transformer option's cost is split into its depth's (what reaching its block costs,
:func:`depth_costs`) and its own: a set costs its deepest depth once plus every own part. Either
way the caller checks the chosen scheme with the compiler
(:func:`pock_tvm.search.scheme_search.search_scheme`).

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
    memory: int  # increment over no update, bytes (for a transformer option: its own part, beyond its depth's)
    latency: float  # increment over the forward, ms (likewise)
    upload: int = 0  # bytes of the tensors it trains (what a federated node sends per round)
    reach: int = -1  # transformer options: the first block the backward must reach (-1: additive costs)
    depth_memory: int = 0  # what reaching that block costs, shared by every option of that depth or shallower
    depth_latency: float = 0.0


@dataclass
class Choice:
    options: tuple[Option, ...]
    gain: float  # estimated: the sum of the options' gains
    memory: int  # estimated planned training bytes (inference bytes + increments)
    latency_ms: float | None  # estimated step time, when a latency budget was given
    method: str  # "exact" or "evolutionary"


def items(analysis: Analysis, latency: bool, uploads: dict[str, int] | None = None) -> dict[str, list[Item]]:
    """Groups of the options that were measured and gain something (``uploads``: trained bytes by
    option key, for an upload budget). Options with a ``reach`` (transformers) split their cost:
    the depth's (:func:`depth_costs`) and their own, what they cost beyond it."""
    base = analysis.baseline_accuracy
    depth_mem, depth_lat = depth_costs(analysis, latency)
    groups: dict[str, list[Item]] = {}
    for row in analysis.rows:
        gain = row.gain(base) if base is not None else None
        if gain is None or gain <= 0 or (latency and row.step_ms is None):
            continue
        lat = max(0.0, row.step_ms - (analysis.forward_ms or 0.0)) if latency else 0.0
        memory = max(0, row.memory - analysis.inference_bytes)
        reach = row.option.reach
        shared_mem, shared_lat = (depth_mem[reach], depth_lat.get(reach, 0.0)) if reach >= 0 else (0, 0.0)
        groups.setdefault(row.option.group, []).append(
            Item(row.option, gain, max(0, memory - shared_mem), max(0.0, lat - shared_lat),
                 (uploads or {}).get(row.option.key, 0), reach, shared_mem, shared_lat))
    return groups


def depth_costs(analysis: Analysis, latency: bool) -> tuple[dict[int, int], dict[int, float]]:
    """What reaching each depth costs (memory, and step time with ``latency``): the increment of the
    cheapest option of that reach, made monotone (a deeper reach costs at least a shallower one).
    The cheapest option of a block is nearly all depth (a norm's own weights are a few KiB)."""
    memory: dict[int, int] = {}
    lat: dict[int, float] = {}
    for row in analysis.rows:
        reach = row.option.reach
        if reach < 0:
            continue
        memory[reach] = min(memory.get(reach, row.memory), row.memory)
        if latency and row.step_ms is not None:
            lat[reach] = min(lat.get(reach, row.step_ms), row.step_ms)
    shared_mem, shared_lat = {}, {}
    deepest_mem, deepest_lat = 0, 0.0
    for reach in sorted(memory, reverse=True):  # from the output back
        deepest_mem = max(deepest_mem, memory[reach] - analysis.inference_bytes)
        shared_mem[reach] = deepest_mem
        if reach in lat:
            deepest_lat = max(deepest_lat, lat[reach] - (analysis.forward_ms or 0.0))
            shared_lat[reach] = deepest_lat
    return shared_mem, shared_lat


def cost(chosen: list[Item]) -> tuple[int, float, int]:
    """``(memory, latency, upload)`` increments of a set of items: the deepest reach's depth once,
    plus every item's own part."""
    return (max((i.depth_memory for i in chosen), default=0) + sum(i.memory for i in chosen),
            max((i.depth_latency for i in chosen), default=0.0) + sum(i.latency for i in chosen),
            sum(i.upload for i in chosen))


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
    memory, lat, _ = cost(picked)
    return Choice(tuple(i.option for i in picked), sum(i.gain for i in picked), analysis.inference_bytes + memory,
                  None if latency_ms is None else (analysis.forward_ms or 0.0) + lat, method)


def exact(groups: list[list[Item]], mem_left: int, lat_left: float | None,
          max_states: int = MAX_STATES, upload_left: int | None = None) -> list[Item] | None:
    """Knapsack over groups; ``None`` when the Pareto set grows past ``max_states``. With
    transformer options (a ``reach``), one knapsack per depth: the options that depth reaches, with
    its shared cost taken off the budget first; the best of them."""
    reaches = sorted({i.reach for g in groups for i in g if i.reach >= 0})
    if not reaches:
        return _knapsack(groups, mem_left, lat_left, max_states, upload_left)
    best = []
    for reach in reaches:
        within = [kept for g in groups if (kept := [i for i in g if i.reach < 0 or i.reach >= reach])]
        shared = [i for g in within for i in g if i.reach == reach][0]
        if shared.depth_memory > mem_left or (lat_left is not None and shared.depth_latency > lat_left):
            continue
        picked = _knapsack(within, mem_left - shared.depth_memory,
                           None if lat_left is None else lat_left - shared.depth_latency, max_states, upload_left,
                           need=reach)
        if picked is None:
            return None
        if (sum(i.gain for i in picked), -cost(picked)[0]) > (sum(i.gain for i in best), -cost(best)[0]):
            best = picked
    return best


def _knapsack(groups, mem_left, lat_left, max_states, upload_left, need: int | None = None):
    """The additive knapsack over items' own costs; ``need``: the answer must hold an item of that
    reach (else its depth was paid for nothing: that answer belongs to a shallower depth)."""
    # a state: (memory, latency, upload, -gain, items); keep the ones no other state beats on all four
    states = [(0, 0.0, 0, 0.0, ())]
    for group in groups:
        grown = list(states)
        for memory, lat, up, neg_gain, chosen in states:
            for item in group:
                m, t, u = memory + item.memory, lat + item.latency, up + item.upload
                if m <= mem_left and (lat_left is None or t <= lat_left) and (upload_left is None or u <= upload_left):
                    grown.append((m, t, u, neg_gain - item.gain, chosen + (item,)))
        states = _pareto(grown, need)
        if len(states) > max_states:
            return None
    if need is not None:
        states = [s for s in states if any(i.reach == need for i in s[4])] or [(0, 0.0, 0, 0.0, ())]
    best = min(states, key=lambda s: (s[3], s[0], s[1], s[2], [i.option.key for i in s[4]]))
    return list(best[4])


def _pareto(states, need: int | None = None):
    """The states not dominated in (memory, latency, upload, -gain), in a deterministic order; with
    ``need``, states holding an item of that reach and states without one are kept apart (one that
    lacks it cannot stand in for one that has it)."""
    states = sorted(states, key=lambda s: (s[0], s[1], s[2], s[3], [i.option.key for i in s[4]]))
    kept = []
    for s in states:
        has = need is None or any(i.reach == need for i in s[4])
        if not any(k[0] <= s[0] and k[1] <= s[1] and k[2] <= s[2] and k[3] <= s[3]
                   and (need is None or not has or any(i.reach == need for i in k[4])) for k in kept):
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
            memory, lat, up = cost([groups[g][k] for g, k in chosen])
            if memory <= mem_left and (lat_left is None or lat <= lat_left) and (upload_left is None or up <= upload_left):
                return genome
            g, _ = min(chosen, key=lambda c: (groups[c[0]][c[1]].gain / max(groups[c[0]][c[1]].memory
                                                                              + groups[c[0]][c[1]].depth_memory, 1), c[0]))
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
    best = max(pop, key=lambda g: (fitness(g), -cost([groups[i][k] for i, k in enumerate(g) if k >= 0])[0]))
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
