"""The Flower ClientApp: a node trains the step on its own data and answers with the trained tensors.

Settings a node reads from its ``--node-config``: ``data`` (its ``.npz``, :mod:`.node`), and
optionally ``bundle`` (a bundle on this node; default: the run's ``bundle``). Its optimizer state
(Adam's moments, the step counter) stays in the node's Flower context between rounds.
"""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..runtime.program import Program
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


@app.train()
def train(msg: Message, context: Context) -> Message:
    program, data = Program.load(_bundle(context)), read_node_data(_data_path(context))
    config = msg.content.config_records.get("config") or {}
    state = context.state.array_records.get(OPTIMIZER)
    round_ = int(config.get("server-round", 0))
    result = train_round(program, data, from_record(msg.content["arrays"]),
                         from_record(state) if state is not None else None,
                         epochs=int(config.get("local-epochs", 1)),
                         seed=1000 * round_ + int(context.node_config.get("partition-id", 0)))
    context.state[OPTIMIZER] = to_record(result.optimizer_state)
    metrics = MetricRecord({"num-examples": result.samples, "train-loss": result.loss})
    return Message(content=RecordDict({"arrays": to_record(result.tensors), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    program, data = Program.load(_bundle(context)), read_node_data(_data_path(context))
    acc, count = evaluate_round(program, data, from_record(msg.content["arrays"]))
    return Message(content=RecordDict({"metrics": MetricRecord({"num-examples": count, "accuracy": acc})}),
                   reply_to=msg)
