"""The demo task with an int8 model: does quantized fine-tuning keep up with float fine-tuning?

The pretrained :class:`~pock_tvm.models.DigitsCNN` (:func:`pock_tvm.tasks.digits.pretrained`) is
quantized by :func:`pock_tvm.quantization.post_training.quantize`, calibrated on source-domain digits (what the
factory has; the device's data is not used), and fine-tuned on the new sensor's labelled digits
with :func:`pock_tvm.tasks.digits.sparse_scheme` three ways: the float model, the int8 model with
quantization-aware scaling (QAS) and the int8 model without it.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

CALIBRATION_BATCHES = 8


def compare(optimizer, epochs: int = 30, batch: int = 16, seed: int = 0, cache: Path | None = None) -> dict:
    """``{"float" | "int8 qas" | "int8 no qas": row}`` where a row holds the test accuracy before and
    after fine-tuning, the first and last loss, the planned training memory and the seconds taken;
    ``optimizer`` is a :class:`pock_tvm.SGD` or :class:`pock_tvm.Adam` (its ``qas`` is set per run)."""
    import torch

    from ..frontend import import_model
    from ..compiler.step import compile
    from ..training.finetune import accuracy, fit
    from ..quantization.post_training import quantize
    from ..cache import cache_dir
    from .digits import load_task, pretrained, sparse_scheme

    task = load_task()
    model = pretrained(cache or cache_dir() / "demo")
    imported = import_model(model, (torch.zeros(batch, *task.test[0].shape[1:]),))
    source = task.source[0]
    quantized = quantize(imported, [source[i * batch:(i + 1) * batch] for i in range(CALIBRATION_BATCHES)])
    rows = {}
    for name, graph, qas in (("float", imported, True), ("int8 qas", quantized, True),
                             ("int8 no qas", quantized, False)):
        start = time.perf_counter()
        program = compile(graph, scheme=sparse_scheme(), optimizer=replace(optimizer, qas=qas), baseline=False)
        before = accuracy(program, *task.test)
        result = fit(program, *task.labelled, epochs, seed)
        rows[name] = {"accuracy_before": before, "test_accuracy": accuracy(program, *task.test),
                      "first_loss": result.losses[0], "last_loss": result.losses[-1],
                      "planned_training_bytes": program.report().training_bytes(),
                      "weight_bytes": program.report().param_bytes,
                      "seconds": round(time.perf_counter() - start, 1)}
    return rows
