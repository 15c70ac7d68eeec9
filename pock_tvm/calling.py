"""The calling convention of a compiled training step, written down once.

Every place that builds, calls or describes ``train_step`` / ``forward`` takes the order of their
arguments and outputs, and the names of optimizer-state tensors, from here: the passes that
create and rewrite ``train_step``, the host :class:`~pock_tvm.runtime.program.Program`, the RPC
client, and the bundle's ``manifest.json`` (``"calling"``), which the C++ device runner reads
instead of recomputing it.

- ``train_step(*inputs, *params, target, lr, step, *states)`` returns
  ``(loss, *new trainable params, new step, *new states)``;
- ``forward(*inputs, *params)`` returns the model output;
- ``params`` are the runtime parameters that are passed (frozen tensors folded into the step are
  not), ``states`` hold, for each trainable parameter in order, one tensor per optimizer state name.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def signatures(inputs: Sequence[str], params: Sequence[str], target: str, trainable: Sequence[str],
               state_names: Sequence[str]) -> dict[str, dict[str, list[str]]]:
    """Argument and output names of both entry functions, as stored in ``manifest.json``."""
    states = state_keys(trainable, state_names)
    names = [*inputs, *params, target, LR, STEP, *states]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise ValueError(f"calling convention: the names {clash} are used twice among inputs, parameters, "
                         f"target, '{LR}', '{STEP}' and optimizer states; rename the model input")
    return {
        "train_step": {"args": train_step_args([*inputs, *params, target], states),
                       "outputs": train_step_outputs(trainable, states)},
        "forward": {"args": forward_args(inputs, params), "outputs": [OUTPUT]},
    }

# The start of the error a compiled function raises when an index it reads memory at lies outside
# its table (``passes.CheckIndices``); runtimes turn it into a clear error for the user.
INDEX_ERROR = "pock_tvm: index out of range"
