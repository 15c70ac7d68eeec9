"""What a node does in a federated round, apart from Flower's messages: its data file, training
the received tensors on it, evaluating them.

A node's data is one ``.npz`` file (:func:`write_node_data`) with ``x_train``, ``y_train``,
``x_test`` and ``y_test`` (inputs in the compiled step's shape per sample, integer labels). It never
leaves the node: only the trained tensors and counts do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..runtime.files import atomic_file
from ..runtime.program import Program
from ..training import accuracy, fit

KEYS = ("x_train", "y_train", "x_test", "y_test")


@dataclass
class NodeData:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def write_node_data(path: str | Path, data: NodeData) -> Path:
    """Write a node's data file atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        np.savez(f, **{k: getattr(data, k) for k in KEYS})
    return path


def read_node_data(path: str | Path) -> NodeData:
    """A node's data file; a missing file or key is an error that names it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"node data '{path}' does not exist; pass the node's .npz with "
                                f"--node-config 'data=\"/path/to/node.npz\"' (keys {', '.join(KEYS)})")
    with np.load(path, allow_pickle=False) as f:
        missing = [k for k in KEYS if k not in f.files]
        if missing:
            raise ValueError(f"node data '{path}' lacks {missing}; it needs {', '.join(KEYS)}")
        return NodeData(*(f[k] for k in KEYS))


@dataclass
class TrainResult:
    tensors: dict[str, np.ndarray]
    optimizer_state: dict[str, np.ndarray]
    samples: int
    loss: float


def train_round(program: Program, data: NodeData, tensors: dict[str, np.ndarray],
                optimizer_state: dict[str, np.ndarray] | None, epochs: int, seed: int) -> TrainResult:
    """Load the global ``tensors`` (and this node's own optimizer state from its last round, if
    any), fine-tune ``epochs`` epochs on the node's training split, return the trained tensors.
    ``fit`` stops with an error on a non-finite loss: a diverged node sends nothing."""
    program.load_trained_tensors(tensors)
    if optimizer_state is not None:
        program.load_optimizer_state(optimizer_state)
    result = fit(program, data.x_train, data.y_train, epochs, seed=seed)
    return TrainResult(program.trained_tensors(), program.optimizer_state(), len(data.y_train),
                       float(np.mean(result.losses)) if result.losses else float("nan"))


def evaluate_round(program: Program, data: NodeData, tensors: dict[str, np.ndarray]) -> tuple[float, int]:
    """Accuracy of the global ``tensors`` on the node's test split, and its size."""
    program.load_trained_tensors(tensors)
    return accuracy(program, data.x_test, data.y_test), len(data.y_test)
