"""SparseFedAvg: Flower's FedAvg over the trained tensors of a step, each reply checked first."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from .records import from_record, nbytes, problems

logger = logging.getLogger(__name__)


def sparse_fedavg(expected: dict[str, tuple[int, ...]], **options):
    """A :class:`SparseFedAvg` (built here so that importing this module does not need Flower).

    ``expected``: ``{name: shape}`` of the trained tensors (``Program.trained_tensors()``);
    ``options``: Flower's ``FedAvg`` settings (``min_available_nodes``, ``min_train_nodes``,
    ``fraction_evaluate``...). A round goes on with the nodes that answered: a node that is
    killed or times out is a failure Flower logs, and the round averages the others."""
    from flwr.serverapp.strategy import FedAvg

    class SparseFedAvg(FedAvg):
        """FedAvg, weighted by each node's ``num-examples``, of the ``arrays`` nodes send, which
        must be exactly the trained tensors (names and shapes) with finite values; a reply that is
        not is rejected and logged with its reason (it does not count in the average). Per round
        it records the bytes the accepted nodes sent (:attr:`rounds`)."""

        def __init__(self):
            super().__init__(**options)
            self.expected = dict(expected)
            self.rounds: dict[int, dict] = {}

        def aggregate_train(self, server_round: int, replies: Iterable):
            kept, record = [], {"bytes_up": 0, "nodes": 0, "failed": 0, "rejected": []}
            for msg in replies:
                if msg.has_error():
                    record["failed"] += 1
                    kept.append(msg)  # FedAvg logs it as a failure
                    continue
                arrays = msg.content.array_records.get(self.arrayrecord_key)
                tensors = from_record(arrays) if arrays is not None else {}
                found = problems(tensors, self.expected) if arrays is not None else ["no arrays in the reply"]
                if "num-examples" not in (msg.content.metric_records.get("metrics") or {}):
                    found.append("no num-examples metric")
                if found:
                    node = msg.metadata.src_node_id
                    logger.warning("round %d: rejected the reply of node %d: %s", server_round, node, "; ".join(found))
                    record["rejected"].append({"node": int(node), "reason": "; ".join(found)})
                    continue
                record["bytes_up"] += nbytes(tensors)
                record["nodes"] += 1
                kept.append(msg)
            self.rounds[server_round] = record
            return super().aggregate_train(server_round, kept)

    return SparseFedAvg()
