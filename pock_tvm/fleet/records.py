"""The trained tensors of a step as Flower records, and back."""

from __future__ import annotations

import numpy as np


def require_flwr():
    """Import Flower, or fail with the install command."""
    try:
        import flwr  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("federated fine-tuning needs Flower: pip install -c constraints.txt -e '.[fleet]' "
                          "(or `make fleet`, which installs it)") from e


def to_record(tensors: dict[str, np.ndarray]):
    """``{name: array}`` as a Flower ``ArrayRecord`` (names kept, arrays serialized as numpy)."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({name: Array.from_numpy_ndarray(np.ascontiguousarray(a)) for name, a in tensors.items()})


def from_record(record) -> dict[str, np.ndarray]:
    """A Flower ``ArrayRecord`` as ``{name: numpy array}``."""
    return {name: array.numpy() for name, array in record.items()}


def nbytes(tensors: dict[str, np.ndarray]) -> int:
    """The bytes of the arrays' values (what a round moves, headers aside)."""
    return int(sum(np.asarray(a).nbytes for a in tensors.values()))


def problems(tensors: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]]) -> list[str]:
    """Why ``tensors`` cannot be averaged into a model whose trained tensors have the shapes of
    ``expected``: missing or extra names, other shapes, non-finite values; empty when they can."""
    found = []
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing:
        found.append(f"missing tensors {missing[:3]}")
    if extra:
        found.append(f"unexpected tensors {extra[:3]}")
    for name in sorted(set(tensors) & set(expected)):
        a = np.asarray(tensors[name])
        if tuple(a.shape) != tuple(expected[name]):
            found.append(f"'{name}' has shape {tuple(a.shape)}, expected {tuple(expected[name])}")
        elif not np.issubdtype(a.dtype, np.floating):
            found.append(f"'{name}' is {a.dtype}, not a float tensor")
        elif not np.all(np.isfinite(a)):
            found.append(f"'{name}' holds {int(np.size(a) - np.isfinite(a).sum())} non-finite values")
    return found
