"""A node that trains with the C++ runner (``pock_runner``, no Python on the device side) on its
own bundle: the bundle on the node's disk holds the model and the optimizer state between rounds.

A round writes the received tensors into the bundle (:func:`~pock_tvm.runtime.bundle.update_state`),
packs the node's samples for the epochs of the round (shuffled with the round's seed) as the
runner's data file, runs ``pock_runner train``, and reads the trained tensors back from the bundle.
Evaluation is ``pock_runner eval`` on the node's test split, with the received tensors.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from ..runtime.bundle import read_manifest, read_state, update_state, write_batches
from ..runtime.layout import Layout
from .node import NodeData, TrainResult
from .records import problems

_STEP = re.compile(r"^step \d+ loss (\S+)", re.M)
_EVAL = re.compile(r"^eval samples (\d+) accuracy (\S+)", re.M)


def _run(args: list[str], timeout: float) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{Path(args[0]).name} {args[1]} failed ({done.returncode}): {done.stderr.strip()[-600:]}")
    return done.stdout


def _layout(bundle: Path) -> Layout:
    return Layout.from_json(read_manifest(bundle)["layout"])


def train_round_on_device(runner: Path, bundle: Path, data: NodeData, tensors: dict[str, np.ndarray], epochs: int,
                          seed: int, timeout: float = 600.0) -> TrainResult:
    """:func:`~pock_tvm.fleet.node.train_round` on the C++ runner: the bundle is the node's state."""
    layout = _layout(bundle)
    found = problems(tensors, {p.var: tuple(p.shape) for p in layout.trainable})
    if found:
        raise ValueError(f"the received tensors do not fit bundle '{bundle}': {'; '.join(found)}")
    update_state(bundle, tensors)
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(data.y_train)) for _ in range(epochs)])
    with tempfile.TemporaryDirectory() as tmp:
        batches = write_batches(Path(tmp) / "data.bin", layout, [data.x_train[order]], data.y_train[order])
        out = _run([str(runner), "train", str(bundle), str(Path(tmp) / "data.bin"), "--steps", str(batches)], timeout)
    losses = [float(v) for v in _STEP.findall(out)]
    values = read_state(bundle, read_manifest(bundle))
    params = {p.var for p in layout.params}
    return TrainResult({p.var: values[p.var] for p in layout.trainable},
                       {k: v for k, v in values.items() if k not in params},  # the step counter and moments
                       len(data.y_train), float(np.mean(losses)) if losses else float("nan"))


def evaluate_round_on_device(runner: Path, bundle: Path, data: NodeData, tensors: dict[str, np.ndarray],
                             timeout: float = 600.0) -> tuple[float, int]:
    """Accuracy of ``tensors`` on the node's test split, by ``pock_runner eval``. The tensors are
    written into the node's bundle first, as the next training round writes them anyway (its
    optimizer state is left as it is), so nothing is copied."""
    layout = _layout(bundle)
    update_state(bundle, tensors)
    with tempfile.TemporaryDirectory() as tmp:
        batches = write_batches(Path(tmp) / "test.bin", layout, [data.x_test], data.y_test)
        out = _run([str(runner), "eval", str(bundle), str(Path(tmp) / "test.bin")], timeout)
    found = _EVAL.search(out)
    if not found or not batches:
        raise RuntimeError(f"pock_runner eval printed no accuracy: {out.strip()[-300:]}")
    return float(found.group(2)), int(found.group(1))
