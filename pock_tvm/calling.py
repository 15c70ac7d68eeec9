"""The calling convention of a compiled training step, written down once.

Every place that builds, calls or describes ``train_step`` / ``forward`` takes the order of their
arguments and outputs, and the names of optimizer-state tensors, from here: the passes that
create and rewrite ``train_step``, the host :class:`~pock_tvm.runtime.program.Program`, the RPC
client, and the bundle's ``manifest.json`` (``"calling"``), which the C++ device runner reads
instead of recomputing it.

- ``train_step(*inputs, *params, target, lr, step, *states)`` returns
  ``(loss, *new trainable params, new step, *new states)``;
- ``forward(*inputs, *params)`` returns the model output;
- with a frozen-prefix function (``compile(..., prefix_cache=True)``, ``passes.SplitFrozenPrefix``):
  ``prefix(*inputs, *params)`` returns the tuple of cached activations ``(cached0, cached1, ...)``
  and ``train_step_cached(*cached, *params, target, lr, step, *states)`` returns what
  ``train_step`` returns;
- ``params`` are the runtime parameters that are passed (frozen tensors folded into the step are
  not), ``states`` hold, for each trainable parameter in order, one tensor per optimizer state name.
"""

from __future__ import annotations

from collections.abc import Sequence

TRAIN_STEP = "train_step"
FORWARD = "forward"
PREFIX = "prefix"
TRAIN_STEP_CACHED = "train_step_cached"
CACHED = "cached"  # cached activation i is the argument ``cached{i}`` of train_step_cached
LOSS = "loss"
LR = "lr"
STEP = "step"
OUTPUT = "output"
IGNORE_INDEX = -100  # a label that does not count (torch's and Hugging Face's default)


def state_key(param: str, state: str) -> str:
    """Name of optimizer state ``state`` (``exp_avg``) of parameter ``param``."""
    return f"{param}.{state}"


def state_keys(trainable: Sequence[str], state_names: Sequence[str]) -> list[str]:
    return [state_key(p, s) for p in trainable for s in state_names]


def train_step_args(loss_args: Sequence[str], states: Sequence[str]) -> list[str]:
    """``loss_args`` are what the loss function takes: ``[*inputs, *params, target]``."""
    return [*loss_args, LR, STEP, *states]


def train_step_outputs(trainable: Sequence[str], states: Sequence[str]) -> list[str]:
    return [LOSS, *trainable, STEP, *states]


def forward_args(inputs: Sequence[str], params: Sequence[str]) -> list[str]:
    return [*inputs, *params]


def cached_names(count: int) -> list[str]:
    """Names of the ``count`` cached activations of a frozen-prefix step, in order."""
    return [f"{CACHED}{i}" for i in range(count)]


def signatures(inputs: Sequence[str], params: Sequence[str], target: str, trainable: Sequence[str],
               state_names: Sequence[str], cached: int = 0) -> dict[str, dict[str, list[str]]]:
    """Argument and output names of the entry functions, as stored in ``manifest.json``;
    ``cached``: the number of cached activations when the step has a frozen-prefix function."""
    states = state_keys(trainable, state_names)
    names = [*inputs, *params, target, LR, STEP, *states, *cached_names(cached)]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise ValueError(f"calling convention: the names {clash} are used twice among inputs, parameters, "
                         f"target, '{LR}', '{STEP}' and optimizer states; rename the model input")
    calls = {
        TRAIN_STEP: {"args": train_step_args([*inputs, *params, target], states),
                     "outputs": train_step_outputs(trainable, states)},
        FORWARD: {"args": forward_args(inputs, params), "outputs": [OUTPUT]},
    }
    if cached:
        calls[PREFIX] = {"args": forward_args(inputs, params), "outputs": cached_names(cached)}
        calls[TRAIN_STEP_CACHED] = {"args": train_step_args([*cached_names(cached), *params, target], states),
                                    "outputs": train_step_outputs(trainable, states)}
    return calls

# The start of the error a compiled function raises when an index it reads memory at lies outside
# its table (``passes.CheckIndices``); runtimes turn it into a clear error for the user.
INDEX_ERROR = "pock_tvm: index out of range"
