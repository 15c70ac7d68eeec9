"""What the search chooses from: one choice per group.

CNNs. Group ``bias``: the biases of the last N blocks, N = 1..all (or none). Group ``<weight
name>``: that conv, depthwise or linear weight at one of :data:`RATIOS` of its channels (or frozen);
ratios that give the same number of channels as a larger one are left out (a 1-channel input conv
has only ratio 1). Transformers: per block and part, and LoRA (:mod:`.transformer_space`). Each option is a :class:`pock_tvm.scheme.Scheme` fragment; a choice of options is a scheme.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..frontend.model import ImportedModel
from ..scheme import LoRA, Rule, Scheme, blocks, trainable_params

RATIOS = (0.125, 0.25, 0.5, 1.0)
BIAS = "bias"
LORA = "lora"
_WEIGHT_KINDS = {"conv": 1, "linear": 1, "depthwise": 0}  # kind -> the axis a partial update slices


@dataclass(frozen=True)
class Option:
    group: str  # "bias", the weight's source name, "<block>:<part>" or "lora"
    blocks: int = 0  # bias options: how many last blocks
    ratio: float = 1.0  # weight options
    channels: str = ""  # weight options: "8 of 32" (what the ratio gives)
    select: str = ""  # transformer parts: the scheme rule's selection (pock_tvm.scheme.select_params)
    rank: int = 0  # LoRA options: the adapters' rank (on the linear weights ``select`` picks)
    reach: int = -1  # transformer options: the first block (forward order) the backward pass must reach

    @property
    def key(self) -> str:
        """One string per option, used as the cache key and in tables."""
        if self.group == BIAS:
            return f"bias:last-{self.blocks}"
        if self.group == LORA:
            return f"lora:{self.select.removeprefix('@role:')}:r{self.rank}"
        return f"{self.group}@{self.ratio:g}"

    def describe(self) -> str:
        if self.group == BIAS:
            return f"biases of the last {self.blocks} block{'s' if self.blocks > 1 else ''}"
        if self.group == LORA:
            return f"LoRA rank {self.rank} on {self.select.removeprefix('@role:')} weights"
        return f"{self.group} ({self.channels} channels)" if self.ratio < 1 else f"{self.group} (all)"

    def rules(self) -> list[Rule]:
        if self.group in (BIAS, LORA):
            return []
        select = self.select or self.group
        return [Rule(select, "full")] if self.ratio == 1 else [Rule(select, "partial", self.ratio)]

    def lora(self) -> LoRA | None:
        """The adapters of a LoRA option (alpha = 2 x rank: the same scale, 2, at every rank)."""
        return LoRA(rank=self.rank, alpha=2.0 * self.rank, select=self.select) if self.group == LORA else None


def options_for(model: ImportedModel, last_blocks: int | None = None,
                lora_ranks: tuple[int, ...] | None = None) -> list[Option]:
    """Every option of ``model``: :func:`pock_tvm.search.transformer_space.transformer_options` for
    a transformer (of its last ``last_blocks`` blocks when given; LoRA at ``lora_ranks``), else the
    CNN options: biases
    first, then weights in forward order."""
    from .transformer_space import is_transformer, transformer_options

    if is_transformer(model):
        return transformer_options(model, last_blocks, lora_ranks)
    params, kinds, _ = trainable_params(model)
    options = [Option(BIAS, blocks=n) for n in range(1, len(blocks(model)) + 1)]
    for p in params:
        if kinds[p.name] not in _WEIGHT_KINDS:
            continue
        size = int(p.value.shape[_WEIGHT_KINDS[kinds[p.name]]])
        options += [Option(p.name, ratio=ratio, channels=channels) for ratio, channels in ratios(size)]
    return options


def ratios(size: int) -> list[tuple[float, str]]:
    """``(ratio, "k of size")`` for each of :data:`RATIOS`, largest first, leaving out a ratio that
    gives as many channels as a larger one."""
    seen, out = set(), []
    for ratio in sorted(RATIOS, reverse=True):
        channels = min(size, math.ceil(ratio * size))
        if channels not in seen:
            seen.add(channels)
            out.append((ratio, f"{channels} of {size}"))
    return out


def scheme_of(options: list[Option] | tuple[Option, ...], name: str = "searched") -> Scheme:
    """The scheme that applies ``options`` (at most one per group)."""
    groups = [o.group for o in options]
    if len(groups) != len(set(groups)):
        raise ValueError(f"search: options {sorted(o.key for o in options)} choose twice in one group")
    bias = next((o.blocks for o in options if o.group == BIAS), 0)
    rules = [r for o in options for r in o.rules()]
    lora = next((o.lora() for o in options if o.group == LORA), None)
    return Scheme(name, rules=rules, bias=bias if bias else "none", lora=lora)
