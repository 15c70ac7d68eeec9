"""A compiled training program on the host: ``step``, ``predict``, state dicts, save and load."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import tvm
from tvm import relax

from .layout import Layout

logger = logging.getLogger(__name__)

LIB, META, STATE = "lib.so", "meta.json", "state.npz"


class Program:
    """A compiled ``train_step`` with its parameters and optimizer state.

    Parameters live in the runtime in their training layout (a partially updated weight as two
    tensors); :meth:`state_dict` reassembles them under their source names.
    """

    def __init__(self, executable, layout: Layout, values: dict[str, np.ndarray],
                 report=None, device=None):
        self.layout = layout
        self.report_data = report
        self._exe = executable
        self._dev = device or tvm.cpu()
        self._vm = relax.VirtualMachine(executable, self._dev)
        self._tensors = {p.var: self._put(values[p.var]) for p in layout.passed}
        self._folded = {p.var: np.asarray(values[p.var]) for p in layout.params if p.folded}
        self._states = {k: self._put(values.get(k, np.zeros(self._state_shape(k), "float32")))
                        for k in layout.state_keys()}
        self._step = self._put(np.asarray(values.get("step", 0.0), "float32"))
        self.lr = float(layout.optimizer.get("lr", 0.01))

    # ---- running --------------------------------------------------------------------------
    def step(self, *args, lr: float | None = None) -> float:
        """One training step on ``(*inputs, target)``; returns the loss of this batch."""
        specs = [*self.layout.inputs, self.layout.target]
        if len(args) != len(specs):
            raise ValueError(f"step: expected {len(specs)} arguments "
                             f"({', '.join(s.name for s in specs)}), got {len(args)}")
        tensors = [self._checked(a, s) for a, s in zip(args, specs)]
        params = [self._tensors[p.var] for p in self.layout.passed]
        states = [self._states[k] for k in self.layout.state_keys()]
        lr_t = self._put(np.asarray(self.lr if lr is None else lr, "float32"))
        *inputs, target = tensors
        out = self._vm["train_step"](*inputs, *params, target, lr_t, self._step, *states)
        trainable = self.layout.trainable
        for i, p in enumerate(trainable):
            self._tensors[p.var] = out[1 + i]
        self._step = out[1 + len(trainable)]
        for i, key in enumerate(self.layout.state_keys()):
            self._states[key] = out[2 + len(trainable) + i]
        return float(out[0].numpy())

    def predict(self, *inputs) -> np.ndarray:
        if len(inputs) != len(self.layout.inputs):
            raise ValueError(f"predict: expected {len(self.layout.inputs)} inputs, got {len(inputs)}")
        tensors = [self._checked(a, s) for a, s in zip(inputs, self.layout.inputs)]
        return self._vm["forward"](*tensors, *[self._tensors[p.var] for p in self.layout.passed]).numpy()

    @property
    def steps_done(self) -> int:
        return int(self._step.numpy())

    def report(self):
        """The compile-time analysis (:class:`pock_tvm.analysis.report.Report`)."""
        return self.report_data

    # ---- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Parameters and buffers under their source names, partial weights reassembled."""
        parts: dict[str, list] = {}
        for p in self.layout.params:
            parts.setdefault(p.source, []).append((p, self._value(p)))
        out = {}
        for source, pieces in parts.items():
            if len(pieces) == 1 and pieces[0][0].axis is None:
                out[source] = pieces[0][1]
            else:
                pieces.sort(key=lambda item: item[0].start)
                out[source] = np.concatenate([arr for _, arr in pieces], axis=pieces[0][0].axis)
        return out

    def load_state_dict(self, state: dict[str, np.ndarray], strict: bool = True) -> None:
        known = {p.source for p in self.layout.params}
        unknown = sorted(set(state) - known)
        missing = sorted(known - set(state))
        if strict and (unknown or missing):
            raise ValueError(f"load_state_dict: unknown keys {unknown[:5]}, missing keys {missing[:5]}")
        for p in self.layout.params:
            if p.source not in state:
                continue
            value = np.asarray(state[p.source])
            if p.axis is not None:
                value = np.take(value, range(p.start, p.stop), axis=p.axis)
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"load_state_dict: '{p.source}' has shape {value.shape}, "
                                 f"expected {p.shape}")
            if p.folded:
                if not np.array_equal(value, self._folded[p.var]):
                    raise ValueError(f"load_state_dict: '{p.source}' is frozen and folded into the "
                                     "compiled step as a constant; recompile with fold_frozen=False "
                                     "to load new values for frozen tensors")
                continue
            self._tensors[p.var] = self._put(value.astype(p.dtype))

    def optimizer_state(self) -> dict[str, np.ndarray]:
        return {"step": self._step.numpy(), **{k: v.numpy() for k, v in self._states.items()}}

    # ---- persistence ----------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write library, layout and state to directory ``path`` atomically (all or nothing)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            self._exe.export_library(str(tmp / LIB))
            (tmp / META).write_text(json.dumps({"layout": self.layout.to_json(),
                                                "report": self.report_data.to_json() if self.report_data else None},
                                               indent=1))
            self._write_state(tmp / STATE)
            _replace_dir(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("saved program to %s", path)
        return path

    def save_state(self, path: str | Path) -> None:
        """Write parameters and optimizer state only (``.npz``), atomically."""
        self._write_state(Path(path))

    def _write_state(self, path: Path) -> None:
        arrays = {f"param/{p.var}": self._value(p) for p in self.layout.params}
        arrays.update({f"state/{k}": v for k, v in self.optimizer_state().items()})
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @staticmethod
    def load(path: str | Path) -> Program:
        from ..analysis.report import Report

        path = Path(path)
        for name in (LIB, META, STATE):
            if not (path / name).exists():
                raise ValueError(f"Program.load: '{path}' has no {name}; is it a pock_tvm program "
                                 "directory written by Program.save or `pock-tvm compile -o`?")
        meta = json.loads((path / META).read_text())
        layout = Layout.from_json(meta["layout"])
        with np.load(path / STATE) as data:
            values = {k.split("/", 1)[1]: data[k] for k in data.files}
        exe = tvm.runtime.load_module(str(path / LIB))
        report = Report.from_json(meta["report"]) if meta.get("report") else None
        return Program(exe, layout, values, report)

    # ---- helpers --------------------------------------------------------------------------
    def _value(self, p) -> np.ndarray:
        return self._folded[p.var] if p.folded else self._tensors[p.var].numpy()

    def _put(self, array: np.ndarray):
        array = np.asarray(array)
        if not array.flags.c_contiguous:  # np.ascontiguousarray would turn a 0-d array into 1-d
            array = array.copy(order="C")
        return tvm.runtime.tensor(array, self._dev)

    def _state_shape(self, key: str) -> tuple[int, ...]:
        var = key.rsplit(".", 1)[0]
        return next(p.shape for p in self.layout.params if p.var == var)

    def _checked(self, value, spec):
        array = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        if tuple(array.shape) != tuple(spec.shape):
            raise ValueError(f"input '{spec.name}' has shape {tuple(array.shape)}, the program was "
                             f"compiled for {tuple(spec.shape)}; recompile with that shape")
        if str(array.dtype) != spec.dtype:
            raise ValueError(f"input '{spec.name}' has dtype {array.dtype}, the program expects "
                             f"{spec.dtype}; convert it (e.g. .astype('{spec.dtype}'))")
        return self._put(array)


def _replace_dir(new: Path, dest: Path) -> None:
    """Move directory ``new`` to ``dest``; an existing ``dest`` is swapped out, then removed."""
    if not dest.exists():
        os.replace(new, dest)
        return
    old = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(dest, old)
    os.replace(new, dest)
    shutil.rmtree(old, ignore_errors=True)
