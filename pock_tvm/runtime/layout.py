"""The runtime contract of a compiled step: which tensors go in, in what order, from which source.

It is plain JSON (in ``manifest.json`` of a bundle) so that a device runner without Python can
read it too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .. import calling
from .spec import TensorSpec


@dataclass
class RuntimeParam:
    """One runtime tensor: a whole source parameter, or the slice ``[start, stop)`` on ``axis``.

    ``folded``: frozen and bound into the compiled step as a constant (not passed at run time)."""

    var: str
    source: str
    shape: tuple[int, ...]
    dtype: str
    trainable: bool
    axis: int | None = None
    start: int = 0
    stop: int | None = None
    folded: bool = False


@dataclass
class Layout:
    inputs: list[TensorSpec]
    target: TensorSpec
    output: TensorSpec
    params: list[RuntimeParam]
    state_names: list[str]
    optimizer: dict
    loss: str
    scheme: dict
    target_name: str = "host"
    extra: dict = field(default_factory=dict)

    @property
    def trainable(self) -> list[RuntimeParam]:
        return [p for p in self.params if p.trainable]

    @property
    def passed(self) -> list[RuntimeParam]:
        """The parameters the compiled functions take, in their order."""
        return [p for p in self.params if not p.folded]

    def state_keys(self) -> list[str]:
        return calling.state_keys([p.var for p in self.trainable], self.state_names)

    def cached(self) -> list[TensorSpec]:
        """The activations a step with a frozen-prefix function caches, in order (``extra["prefix"]``;
        none without one): ``prefix`` returns them, ``train_step_cached`` takes them."""
        found = self.extra.get("prefix", [])
        return [TensorSpec(name, tuple(c["shape"]), c["dtype"])
                for name, c in zip(calling.cached_names(len(found)), found)]

    def signatures(self) -> dict[str, dict[str, list[str]]]:
        """Argument and output names of ``train_step`` and ``forward`` (and of ``prefix`` and
        ``train_step_cached`` when the step has them; :mod:`pock_tvm.calling`)."""
        return calling.signatures([s.name for s in self.inputs], [p.var for p in self.passed], self.target.name,
                                  [p.var for p in self.trainable], self.state_names, len(self.cached()))

    def check_target(self, target: np.ndarray, where: str = "target") -> None:
        """Class labels of a cross-entropy step lie in ``[0, classes)`` (a causal LM's next-token
        labels in ``[0, vocab)`` or are the ignore index): an out-of-range label would read outside
        the logits. Other losses take any target."""
        target = np.asarray(target)
        if target.dtype.kind == "f" and not np.all(np.isfinite(target)):
            index = int(np.flatnonzero(~np.isfinite(target.ravel()))[0])
            raise ValueError(f"{where}: target holds {target.ravel()[index]} at position {index}; targets must be "
                             "finite")
        if (self.loss, len(self.output.shape)) not in (("cross_entropy", 2), ("next_token", 3)):
            return
        classes = self.output.shape[-1]
        bad = (target < 0) | (target >= classes)
        if self.loss == "next_token":
            bad &= target != calling.IGNORE_INDEX
        if np.any(bad):
            index = int(np.flatnonzero(np.ravel(bad))[0])
            raise ValueError(f"{where}: label {int(np.ravel(target)[index])} at position {index} is outside "
                             f"[0, {classes}) for the model's {classes} classes; fix the labels (class "
                             "indices counted from 0" + (f", {calling.IGNORE_INDEX} for one that does not count)"
                                                         if self.loss == "next_token" else ")"))

    def to_json(self) -> dict:
        data = asdict(self)
        data["inputs"] = [s.to_json() for s in self.inputs]
        data["target"] = self.target.to_json()
        data["output"] = self.output.to_json()
        return data

    @staticmethod
    def from_json(data: dict) -> Layout:
        params = [RuntimeParam(**{**p, "shape": tuple(p["shape"])}) for p in data["params"]]
        return Layout(
            [TensorSpec.from_json(s) for s in data["inputs"]], TensorSpec.from_json(data["target"]),
            TensorSpec.from_json(data["output"]), params, list(data["state_names"]),
            dict(data["optimizer"]), data["loss"], dict(data["scheme"]),
            data.get("target_name", "host"), dict(data.get("extra", {})),
        )
