"""One runtime input or target of a compiled step: name, shape, dtype, and the bound of its values."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one runtime input. ``bound``: the values must lie in ``[0, bound)``
    (token ids index an embedding table of ``bound`` rows; one outside would read outside it)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    bound: int | None = None

    def to_json(self) -> dict:
        data = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        if self.bound is not None:
            data["bound"] = self.bound
        return data

    @staticmethod
    def from_json(data: dict) -> TensorSpec:
        return TensorSpec(data["name"], tuple(data["shape"]), data["dtype"], data.get("bound"))

    def check_values(self, array, where: str) -> None:
        """A clear error for a NaN or inf in a float input (it would turn every parameter it
        reaches into NaN while the loss may stay finite) and for a value outside ``[0, bound)``."""
        array = np.asarray(array)
        if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            index = int(np.flatnonzero(~np.isfinite(array.ravel()))[0])
            raise ValueError(f"{where}: input '{self.name}' holds {array.ravel()[index]} at position {index}; "
                             "inputs must be finite: clean or impute the data (e.g. numpy.nan_to_num)")
        if self.bound is None:
            return
        bad = (array < 0) | (array >= self.bound)
        if bad.any():
            index = int(np.flatnonzero(np.ravel(bad))[0])
            raise ValueError(f"{where}: input '{self.name}' holds {int(np.ravel(array)[index])} at position {index}, "
                             f"outside [0, {self.bound}): it indexes a table of {self.bound} rows (a vocabulary); "
                             "fix the ids (e.g. the tokenizer's vocabulary must be the model's)")
