"""What the search chooses from: one choice per group.

Group ``bias``: the biases of the last N blocks, N = 1..all (or none). Group ``<weight name>``:
that conv, depthwise or linear weight at one of :data:`RATIOS` of its channels (or frozen); ratios
that give the same number of channels as a larger one are left out (a 1-channel input conv has only
ratio 1). Each option is a :class:`pock_tvm.scheme.Scheme` fragment; a choice of options is a scheme.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..frontend.model import ImportedModel
from ..scheme import Rule, Scheme, blocks, trainable_params

RATIOS = (0.125, 0.25, 0.5, 1.0)
BIAS = "bias"
_WEIGHT_KINDS = {"conv": 1, "linear": 1, "depthwise": 0}  # kind -> the axis a partial update slices


@dataclass(frozen=True)
class Option:
    group: str  # "bias", or the weight's source name
    blocks: int = 0  # bias options: how many last blocks
    ratio: float = 1.0  # weight options
    channels: str = ""  # weight options: "8 of 32" (what the ratio gives)

    @property
    def key(self) -> str:
        """One string per option, used as the cache key and in tables."""
        return f"bias:last-{self.blocks}" if self.group == BIAS else f"{self.group}@{self.ratio:g}"

    def describe(self) -> str:
        if self.group == BIAS:
            return f"biases of the last {self.blocks} block{'s' if self.blocks > 1 else ''}"
        return f"{self.group} ({self.channels} channels)" if self.ratio < 1 else f"{self.group} (all)"

    def rules(self) -> list[Rule]:
        if self.group == BIAS:
            return []
        return [Rule(self.group, "full")] if self.ratio == 1 else [Rule(self.group, "partial", self.ratio)]


def options_for(model: ImportedModel) -> list[Option]:
    """Every option of ``model``, biases first, then weights in forward order."""
    params, kinds, _ = trainable_params(model)
    options = [Option(BIAS, blocks=n) for n in range(1, len(blocks(model)) + 1)]
    for p in params:
        if kinds[p.name] not in _WEIGHT_KINDS:
            continue
        size = int(p.value.shape[_WEIGHT_KINDS[kinds[p.name]]])
        seen = set()
        for ratio in sorted(RATIOS, reverse=True):
            channels = min(size, math.ceil(ratio * size))
            if channels in seen:
                continue
            seen.add(channels)
            options.append(Option(p.name, ratio=ratio, channels=f"{channels} of {size}"))
    return options


def scheme_of(options: list[Option] | tuple[Option, ...], name: str = "searched") -> Scheme:
    """The scheme that applies ``options`` (at most one per group)."""
    groups = [o.group for o in options]
    if len(groups) != len(set(groups)):
        raise ValueError(f"search: options {sorted(o.key for o in options)} choose twice in one group")
    bias = next((o.blocks for o in options if o.group == BIAS), 0)
    rules = [r for o in options for r in o.rules()]
    return Scheme(name, rules=rules, bias=bias if bias else "none")
