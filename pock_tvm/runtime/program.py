"""A compiled training program on the host: ``step``, ``predict``, state dicts, save and load."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import tvm
from tvm import relax

from .. import calling
from .checks import check_lr
from .bundle import atomic_file, read_manifest, read_state, write_bundle
from .layout import Layout

logger = logging.getLogger(__name__)



class Program:
    """A compiled ``train_step`` with its parameters and optimizer state.

    Parameters live in the runtime in their training layout (a partially updated weight as two
    tensors); :meth:`state_dict` reassembles them under their source names.
    """

    def __init__(self, executable, layout: Layout, values: dict[str, np.ndarray],
                 report=None, device=None, extra: dict | None = None):
        self.layout = layout
        self.extra = dict(extra or {})  # JSON: target preset, CUDA toolkit; stored in the manifest
        self.report_data = report
        self.exporter = None  # (executable, file) -> None for cross targets; set by compile
        self.library_source: Path | None = None  # the library file of a loaded bundle
        self.ir = None  # the lowered IRModule, when compiled in this process
        self._exe = executable
        self._dev = device or tvm.cpu()
        self.runs_here = _runs_here(self.extra.get("target", {}))
        self._vm = relax.VirtualMachine(executable, self._dev) if self.runs_here else None
        self._calls = layout.signatures()
        if self._vm is not None:
            self._check_library_signatures()
        # what the step carries from call to call, by calling-convention name
        self._live = {p.var: self._put(values[p.var]) for p in layout.passed}
        self._live[calling.STEP] = self._put(np.asarray(values.get(calling.STEP, 0.0), "float32"))
        for k in layout.state_keys():
            self._live[k] = self._put(values.get(k, np.zeros(self._state_shape(k), "float32")))
        self._folded = {p.var: np.asarray(values[p.var]) for p in layout.params if p.folded}
        self.lr = float(layout.optimizer.get("lr", 0.01))

    # ---- running --------------------------------------------------------------------------
    def step(self, *args, lr: float | None = None) -> float:
        """One training step on ``(*inputs, target)``; returns the loss of this batch."""
        self._check_runs_here("step")
        return self._train(calling.TRAIN_STEP, [*self.layout.inputs, self.layout.target], args, lr, "step")

    @property
    def has_prefix(self) -> bool:
        """Whether the step was compiled with a frozen-prefix function (``compile(...,
        prefix_cache=True)``): :meth:`prefix` and :meth:`step_cached`."""
        return calling.PREFIX in self._calls

    def prefix(self, *inputs) -> list[np.ndarray]:
        """The frozen prefix's activations for one batch of ``inputs`` (what :meth:`step_cached`
        takes instead of the inputs; ``layout.cached()`` names them). They depend only on the
        inputs and frozen tensors, so a fine-tune on fixed data computes them once per sample."""
        self._require_prefix("prefix")
        if len(inputs) != len(self.layout.inputs):
            raise ValueError(f"prefix: expected {len(self.layout.inputs)} inputs, got {len(inputs)}")
        given = {s.name: self._checked(_array(a), s) for a, s in zip(inputs, self.layout.inputs)}
        call = self._calls[calling.PREFIX]
        out = _run(self._vm[calling.PREFIX], [given[n] if n in given else self._live[n] for n in call["args"]],
                   "prefix")
        return [out[i].numpy() for i in range(len(call["outputs"]))]

    def step_cached(self, *args, lr: float | None = None) -> float:
        """One training step on ``(*cached, target)``, the cached activations of :meth:`prefix`
        for this batch in place of the inputs; the same update and loss as :meth:`step`."""
        self._require_prefix("step_cached")
        return self._train(calling.TRAIN_STEP_CACHED, [*self.layout.cached(), self.layout.target], args, lr,
                           "step_cached")

    def _train(self, func: str, specs: list, args: tuple, lr: float | None, what: str) -> float:
        if len(args) != len(specs):
            raise ValueError(f"{what}: expected {len(specs)} arguments "
                             f"({', '.join(s.name for s in specs)}), got {len(args)}")
        arrays = [_array(a) for a in args]
        self.layout.check_target(arrays[-1], what)
        # cached activations come from prefix (a causal mask holds -inf): only inputs are checked
        cached = {s.name for s in self.layout.cached()}
        given = {s.name: self._checked(a, s, s.name not in cached) for a, s in zip(arrays, specs)}
        given[calling.LR] = self._put(np.asarray(check_lr(self.lr if lr is None else lr), "float32"))
        call = self._calls[func]
        out = _run(self._vm[func], [given[n] if n in given else self._live[n] for n in call["args"]], what)
        loss = None
        for name, value in zip(call["outputs"], out):
            if name == calling.LOSS:
                loss = float(value.numpy())
            else:
                self._live[name] = value
        return loss

    def _require_prefix(self, what: str) -> None:
        self._check_runs_here(what)
        if not self.has_prefix:
            why = self.layout.extra.get("prefix_declined")
            raise ValueError(f"{what}: this program has no frozen-prefix function; " + (
                f"the compiler made none: {why}" if why else
                "compile with prefix_cache=True (`pock-tvm compile --prefix-cache`)"))

    def predict(self, *inputs) -> np.ndarray:
        self._check_runs_here("predict")
        if len(inputs) != len(self.layout.inputs):
            raise ValueError(f"predict: expected {len(self.layout.inputs)} inputs, got {len(inputs)}")
        given = {s.name: self._checked(_array(a), s) for a, s in zip(inputs, self.layout.inputs)}
        args = self._calls["forward"]["args"]
        return _run(self._vm["forward"], [given[n] if n in given else self._live[n] for n in args], "predict").numpy()

    def instrument(self, callback) -> None:
        """Call ``callback(func, name, before, ret, *args)`` around every call the VM makes (kernels
        included); ``None`` removes it. See ``tvm.runtime.vm.VirtualMachine.set_instrument``."""
        self._check_runs_here("instrument")
        self._vm.set_instrument(callback)

    @property
    def steps_done(self) -> int:
        return int(_numpy(self._live[calling.STEP]))

    def report(self):
        """The compile-time analysis (:class:`pock_tvm.runtime.report.Report`)."""
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
            self._live[p.var] = self._put(value.astype(p.dtype))

    def trained_tensors(self) -> dict[str, np.ndarray]:
        """The tensors the step updates, under their runtime names (a partially trained weight's
        trained slice alone, ``W__upd``): what a federated round exchanges."""
        return {p.var: self._value(p) for p in self.layout.trainable}

    def load_trained_tensors(self, tensors: dict[str, np.ndarray]) -> None:
        """Set every trained tensor from ``tensors`` (as :meth:`trained_tensors` names them).
        Refused, naming the tensor, when one is missing or extra, has another shape, or holds a
        non-finite value; nothing is changed then."""
        expected = {p.var: p for p in self.layout.trainable}
        unknown, missing = sorted(set(tensors) - set(expected)), sorted(set(expected) - set(tensors))
        if unknown or missing:
            raise ValueError(f"load_trained_tensors: unknown tensors {unknown[:5]}, missing tensors {missing[:5]}; "
                             "they must be the trained tensors of this bundle's scheme (trained_tensors())")
        values = {}
        for var, p in expected.items():
            value = np.asarray(tensors[var])
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"load_trained_tensors: '{var}' has shape {value.shape}, expected {p.shape}")
            if not np.all(np.isfinite(value)):
                raise ValueError(f"load_trained_tensors: '{var}' holds non-finite values (NaN or inf)")
            values[var] = value.astype(p.dtype, copy=False)
        for var, value in values.items():
            self._live[var] = self._put(value)

    def load_optimizer_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`optimizer_state` returned (the step counter and the momenta), as a
        node keeps it between federated rounds. Every key and shape must match."""
        keys = [calling.STEP, *self.layout.state_keys()]
        if sorted(state) != sorted(keys):
            raise ValueError(f"load_optimizer_state: keys {sorted(state)[:5]} are not this program's "
                             f"{sorted(keys)[:5]}; pass what optimizer_state() returned")
        values = {}
        for k in keys:
            value, shape = np.asarray(state[k], "float32"), _numpy(self._live[k]).shape
            if value.shape != shape and not (value.size == 1 and shape == ()):  # a scalar sent as (1,)
                raise ValueError(f"load_optimizer_state: '{k}' has shape {value.shape}, expected {shape}")
            values[k] = value.reshape(shape)
        for k, value in values.items():
            self._live[k] = self._put(value)

    def reset_optimizer(self) -> None:
        """Step counter and optimizer state (momenta) back to zero: a new fine-tune from the
        current parameters, as a freshly compiled program starts."""
        for key in [calling.STEP, *self.layout.state_keys()]:
            self._live[key] = self._put(np.zeros_like(_numpy(self._live[key])))

    def optimizer_state(self) -> dict[str, np.ndarray]:
        keys = [calling.STEP, *self.layout.state_keys()]
        return {k: _numpy(self._live[k]) for k in keys}

    # ---- persistence ----------------------------------------------------------------------
    def save(self, path: str | Path, force: bool = False) -> Path:
        """Write the bundle (library, ``manifest.json``, ``params.bin``) to directory ``path``
        atomically (all or nothing); see :mod:`pock_tvm.runtime.bundle` for the format.

        ``path`` may be new, empty or a bundle; another directory is refused unless ``force``.
        Non-finite parameters or state (a diverged training) are refused, naming the tensor."""
        library = self.extra.get("target", {}).get("export_format", "so")
        path = write_bundle(Path(path), self._export, f"lib.{library}", self.layout, self._all_values(),
                            {**self.extra, "report": self.report_data.to_json() if self.report_data else None},
                            force)
        logger.info("saved program to %s", path)
        return path

    def save_state(self, path: str | Path) -> None:
        """Write parameters and optimizer state only (``.npz``), atomically."""
        with atomic_file(Path(path)) as f:
            np.savez(f, **self._all_values())

    @staticmethod
    def load(path: str | Path) -> Program:
        """Load a bundle written by :meth:`save` or ``pock-tvm compile -o`` (or updated by the runner)."""
        from .report import Report

        path = Path(path)
        manifest = read_manifest(path)
        layout = Layout.from_json(manifest["layout"])
        values = read_state(path, manifest)
        target = manifest.get("target", {})
        if not _runs_here(target):
            raise ValueError(f"Program.load: bundle '{path}' is built for {target.get('name')} "
                             f"({target.get('arch')}, {target.get('os')}, {target.get('device')}); run it "
                             "there with the device runner (`pock-tvm build-runner`) or over RPC "
                             "(`pock-tvm run --rpc`)")
        exe = _load_library(path / manifest["library"], manifest["files"][manifest["library"]])
        report = Report.from_json(manifest["report"]) if manifest.get("report") else None
        extra = {k: manifest[k] for k in ("target", "cuda", "source") if k in manifest}
        device = tvm.cuda() if target.get("device") == "cuda" else None
        program = Program(exe, layout, values, report, device, extra)
        program.library_source = path / manifest["library"]
        return program

    def _all_values(self) -> dict[str, np.ndarray]:
        out = {p.var: self._value(p) for p in self.layout.params}
        out.update(self.optimizer_state())
        return out

    def _export(self, file: Path) -> None:
        if self.library_source is not None:
            shutil.copyfile(self.library_source, file)
        elif self.exporter is not None:
            self.exporter(self._exe, file)
        else:
            self._exe.export_library(str(file))

    def _check_library_signatures(self) -> None:
        """The library's functions take exactly the arguments the layout names, in that order."""
        arity, name = self._vm.module["get_function_arity"], self._vm.module["get_function_param_name"]
        for func, call in self._calls.items():
            try:
                found = [name(func, i) for i in range(arity(func))]
            except Exception as err:  # noqa: BLE001 -- the runtime raises its own error types
                raise ValueError(f"the library has no usable '{func}' function ({err}); recompile the model") from None
            if found != call["args"]:
                raise ValueError(f"the library's {func} takes {found}, the layout says {call['args']}; the "
                                 "manifest does not belong to this library, recompile the model")

    def _check_runs_here(self, what: str) -> None:
        if not self.runs_here:
            t = self.extra["target"]
            raise ValueError(f"{what}: this program is compiled for {t['name']} ({t['arch']}, {t['os']}, "
                             f"{t['device']}); save it (`save`) and run the bundle there, or compile "
                             "with target='host'")

    # ---- helpers --------------------------------------------------------------------------
    def _value(self, p) -> np.ndarray:
        return self._folded[p.var] if p.folded else _numpy(self._live[p.var])

    def _put(self, array: np.ndarray):
        array = np.asarray(array)
        if not self.runs_here:
            return array  # kept on the host for saving; this machine cannot run the program
        if not array.flags.c_contiguous:  # np.ascontiguousarray would turn a 0-d array into 1-d
            array = array.copy(order="C")
        return tvm.runtime.tensor(array, self._dev)

    def _state_shape(self, key: str) -> tuple[int, ...]:
        var = key.rsplit(".", 1)[0]
        return next(p.shape for p in self.layout.params if p.var == var)

    def _checked(self, array: np.ndarray, spec, values: bool = True):
        if tuple(array.shape) != tuple(spec.shape):
            raise ValueError(f"input '{spec.name}' has shape {tuple(array.shape)}, the program was "
                             f"compiled for {tuple(spec.shape)}; recompile with that shape")
        if str(array.dtype) != spec.dtype:
            raise ValueError(f"input '{spec.name}' has dtype {array.dtype}, the program expects "
                             f"{spec.dtype}; convert it (e.g. .astype('{spec.dtype}'))")
        if values:
            spec.check_values(array, "input")
        return self._put(array)



def _array(value) -> np.ndarray:
    return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)


def _numpy(value) -> np.ndarray:
    return value if isinstance(value, np.ndarray) else value.numpy()


# library path -> SHA-256 of the library this process loaded from it; the private directory of copies
_loaded: dict[str, str] = {}
_copies: list[Path] = []


def _load_library(file: Path, digest: str):
    """``tvm.runtime.load_module(file)``, except that a library replaced at a path this process
    already loaded from (a bundle saved again with ``force``) is loaded from a copy named by its
    hash, in a directory private to this process: the dynamic loader returns the first library
    for a path it has seen, and the step would not be the one the manifest describes."""
    key = str(Path(file).resolve())
    if _loaded.setdefault(key, digest) != digest:
        import tempfile

        if not _copies:
            _copies.append(Path(tempfile.mkdtemp(prefix="pock_tvm-libs-")))  # mode 0700
        copy = _copies[0] / f"lib-{digest[:32]}{Path(file).suffix}"
        if not copy.exists():
            shutil.copyfile(file, copy)
        file = copy
    return tvm.runtime.load_module(str(file))


def _runs_here(target: dict) -> bool:
    from .host import host_arch

    if not target:
        return True
    if target.get("device") == "cuda":
        return target.get("arch") == host_arch() and tvm.cuda().exist
    return target.get("arch") == host_arch() and target.get("os", "linux") == "linux"


def load_program(path: str | Path) -> Program:
    """Load a bundle (``pock_tvm.load``); see :meth:`Program.load`."""
    return Program.load(path)


def _run(function, args: list, what: str):
    """``function(*args)``; a check the compiled step makes on its inputs (an index outside its
    table, see ``passes.CheckIndices``) is a ValueError naming it, not a TVM error."""
    try:
        return function(*args)
    except Exception as err:  # noqa: BLE001 -- TVM raises RuntimeError/TVMError subclasses
        message = str(err)
        if calling.INDEX_ERROR in message:
            raise ValueError(f"{what}: {message[message.index(calling.INDEX_ERROR):].strip()}") from None
        raise
