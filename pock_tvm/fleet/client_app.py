"""The Flower ClientApp: a node trains the step on its own data and answers with the trained tensors.

Settings a node reads from its ``--node-config``: ``data`` (its ``.npz``, :mod:`.node`), and
optionally ``bundle`` (a bundle on this node; default: the run's ``bundle``). Its optimizer state
(Adam's moments, the step counter) stays in the node's Flower context between rounds.

A node with ``runner`` (the path of ``pock_runner``) trains and evaluates with the C++ runner on its
own ``bundle`` (built for the device), which keeps the optimizer state (:mod:`.device`).
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..runtime.program import Program
from .device import evaluate_round_on_device, train_round_on_device
from .node import evaluate_round, read_node_data, train_round
from .records import from_record, to_record

app = ClientApp()

OPTIMIZER = "pock_tvm.optimizer"  # the key of the node's optimizer state in its context


def _bundle(context: Context) -> str:
    bundle = context.node_config.get("bundle") or context.run_config.get("bundle")
    if not bundle:
        raise ValueError("no bundle: pass the run's --run-config 'bundle=\"DIR\"' or the node's "
                         "--node-config 'bundle=\"DIR\"'")
    return str(bundle)


def _data_path(context: Context) -> str:
    if "data" not in context.node_config:
        raise ValueError("this SuperNode has no data: start it with --node-config 'data=\"/path/node.npz\"'")
    return str(context.node_config["data"])


def _device(context: Context):
    """``(runner, bundle)`` of a node that trains with the C++ runner, else None."""
    runner = context.node_config.get("runner")
    if not runner:
        return None
    if not context.node_config.get("bundle"):
        raise ValueError("a runner node needs its own bundle: --node-config 'runner=\"...\" bundle=\"DIR\"'")
    return Path(str(runner)), Path(str(context.node_config["bundle"]))


@app.train()
def train(msg: Message, context: Context) -> Message:
    data = read_node_data(_data_path(context))
    config = msg.content.config_records.get("config") or {}
    round_ = int(config.get("server-round", 0))
    epochs, seed = int(config.get("local-epochs", 1)), 1000 * round_ + int(context.node_config.get("partition-id", 0))
    tensors = from_record(msg.content["arrays"])
    device = _device(context)
    if device is not None:
        result = train_round_on_device(*device, data, tensors, epochs, seed)
    else:
        state = context.state.array_records.get(OPTIMIZER)
        result = train_round(Program.load(_bundle(context)), data, tensors,
                             from_record(state) if state is not None else None, epochs=epochs, seed=seed)
        context.state[OPTIMIZER] = to_record(result.optimizer_state)
    metrics = MetricRecord({"num-examples": result.samples, "train-loss": result.loss})
    return Message(content=RecordDict({"arrays": to_record(result.tensors), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    data, tensors, device = read_node_data(_data_path(context)), from_record(msg.content["arrays"]), _device(context)
    acc, count = evaluate_round_on_device(*device, data, tensors) if device is not None else \
        evaluate_round(Program.load(_bundle(context)), data, tensors)
    return Message(content=RecordDict({"metrics": MetricRecord({"num-examples": count, "accuracy": acc})}),
                   reply_to=msg)
