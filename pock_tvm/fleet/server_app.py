"""The Flower ServerApp: federated averaging of a step's trained tensors over the connected nodes.

Run settings (``flower_app/pyproject.toml``, overridden with ``flwr run --run-config``): ``bundle``
(the starting model), ``out`` (results), ``rounds``, ``local-epochs``, ``min-nodes``,
``expected-nodes`` (wait up to ``join-timeout`` seconds for this many before the first round),
``evaluate-on-nodes``, ``round-timeout``. Writes ``out/federation.json`` (per round: accuracy
on the nodes' test splits, bytes the nodes sent, nodes that answered, failed, rejected) and the
averaged model as a bundle, ``out/model``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from ..runtime.files import write_json
from ..runtime.program import Program
from .records import from_record, nbytes, to_record
from .strategy import sparse_fedavg

logger = logging.getLogger(__name__)

app = ServerApp()


def _wait_for_nodes(grid: Grid, count: int, timeout: float) -> int:
    """Wait until ``count`` nodes are connected or ``timeout`` seconds pass; how many are."""
    deadline = time.monotonic() + timeout
    while len(list(grid.get_node_ids())) < count and time.monotonic() < deadline:
        time.sleep(0.5)
    return len(list(grid.get_node_ids()))


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    if not cfg.get("bundle") or not cfg.get("out"):
        raise ValueError("the run needs --run-config 'bundle=\"DIR\" out=\"DIR\"'")
    out = Path(str(cfg["out"]))
    program = Program.load(str(cfg["bundle"]))
    initial = program.trained_tensors()
    least = int(cfg.get("min-nodes", 2))
    on_nodes = bool(cfg.get("evaluate-on-nodes", True))
    joined = _wait_for_nodes(grid, int(cfg.get("expected-nodes", 0)) or least, float(cfg.get("join-timeout", 60.0)))
    strategy = sparse_fedavg({k: v.shape for k, v in initial.items()}, fraction_train=1.0,
                             fraction_evaluate=1.0 if on_nodes else 0.0, min_available_nodes=least,
                             min_train_nodes=least, min_evaluate_nodes=least if on_nodes else 0)
    start = time.perf_counter()
    result = strategy.start(grid=grid, initial_arrays=to_record(initial), num_rounds=int(cfg.get("rounds", 3)),
                            timeout=float(cfg.get("round-timeout", 120.0)),
                            train_config=ConfigRecord({"local-epochs": int(cfg.get("local-epochs", 1))}))
    final = from_record(result.arrays)
    rounds = []
    for r, record in sorted(strategy.rounds.items()):
        evaluated = result.evaluate_metrics_clientapp.get(r, {})
        trained = result.train_metrics_clientapp.get(r, {})
        rounds.append({"round": r, **record, "accuracy": float(evaluated["accuracy"]) if "accuracy" in evaluated
                       else None, "train_loss": float(trained["train-loss"]) if "train-loss" in trained else None})
    program.load_trained_tensors(final)  # refuses non-finite values
    program.save(out / "model", force=True)
    write_json(out / "federation.json", {
        "nodes_joined": joined, "rounds": rounds, "seconds": round(time.perf_counter() - start, 1),
        "trained_bytes": nbytes(initial), "trained_tensors": sorted(initial)})
    logger.info("federation: %d rounds written to %s", len(rounds), out / "federation.json")
