"""What the search chooses from in a transformer: parts of blocks, and LoRA.

One group per block and part, each frozen or one of its options:

- ``<block>:attention`` — the block's attention projections (q/k/v/o), all of them;
- ``<block>:mlp`` — its MLP projections, at one of :data:`MLP_RATIOS` of their input channels
  (TTE's partial channels: the first ``k`` input channels of each MLP weight) or all;
- ``<block>:norms`` — its normalization weights (and LayerNorm shifts);
- ``<block>:head`` — a block outside the transformer layers that holds linear weights (a
  classifier's head), trained whole.

Group ``lora``: adapters of rank ``r`` in :data:`LORA_RANKS` on the attention or the MLP weights of
every block (one ``[lora]`` table per scheme, so one LoRA option per choice).

An option's ``reach`` is the index (forward order, :func:`pock_tvm.scheme.blocks`) of the first
block the backward pass must reach to train it: options of one block share that depth, and a set
of options costs the depth of the deepest one once (:mod:`.search`). Embeddings are never options:
their gradient is a vocabulary-sized tensor for a few rows.
"""

from __future__ import annotations

from ..frontend.model import ImportedModel
from ..scheme import NORM_KINDS, block_of, blocks, role_of, trainable_params
from .space import LORA, Option, ratios

MLP_RATIOS = (0.25, 0.5, 1.0)
LORA_RANKS = (4, 8, 16)
LORA_ROLES = ("attention", "mlp")


def is_transformer(model: ImportedModel) -> bool:
    """Whether ``model`` has attention projections (a linear weight whose layer has the attention role)."""
    params, kinds, _ = trainable_params(model)
    return any(kinds[p.name] == "linear" and role_of(p.layer) == "attention" for p in params)


def transformer_options(model: ImportedModel, last_blocks: int | None = None,
                        lora_ranks: tuple[int, ...] | None = None) -> list[Option]:
    """The options of ``model``'s blocks in forward order (of the last ``last_blocks`` blocks that
    have any, when given), then LoRA's at each of ``lora_ranks`` (:data:`LORA_RANKS` when None;
    adapters on every block, whatever ``last_blocks``)."""
    if last_blocks is not None and last_blocks < 1:
        raise ValueError(f"search: last_blocks must be at least 1, got {last_blocks}")
    params, kinds, _ = trainable_params(model)
    order = blocks(model)
    per_block: dict[str, list] = {}
    for p in params:
        per_block.setdefault(block_of(p.layer), []).append(p)
    grouped = [(b, _block_options(b, order.index(b), per_block[b], kinds)) for b in order]
    grouped = [(b, options) for b, options in grouped if options]
    if last_blocks is not None:
        grouped = grouped[-last_blocks:]
    options = [o for _, options in grouped for o in options]
    for role in LORA_ROLES:
        reach = next((order.index(block_of(p.layer)) for p in params
                      if kinds[p.name] == "linear" and role_of(p.layer) == role), None)
        if reach is not None:
            options += [Option(LORA, select=f"@role:{role}", rank=rank, reach=reach)
                        for rank in (LORA_RANKS if lora_ranks is None else lora_ranks)]
    return options


def _block_options(block: str, reach: int, params, kinds) -> list[Option]:
    linear = {role: [p for p in params if kinds[p.name] == "linear" and role_of(p.layer) == role]
              for role in ("attention", "mlp", None)}
    options = []
    if linear["attention"]:
        options.append(Option(f"{block}:attention", select=f"{block}&@role:attention", reach=reach))
    if linear["mlp"]:
        size = min(int(p.value.shape[1]) for p in linear["mlp"])
        for ratio, _ in ratios(size):
            if ratio in MLP_RATIOS:
                options.append(Option(f"{block}:mlp", ratio=ratio, channels=f"{ratio:.0%} of the input",
                                      select=f"{block}&@role:mlp", reach=reach))
    if linear[None] and not (linear["attention"] or linear["mlp"]):
        options.append(Option(f"{block}:head", select=block, reach=reach))
    if any(kinds[p.name] in NORM_KINDS for p in params) and not (linear[None] and not linear["attention"]):
        options.append(Option(f"{block}:norms", select=f"{block}&@norms", reach=reach))
    return options
