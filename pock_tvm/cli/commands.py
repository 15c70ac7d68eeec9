"""What the CLI commands do: compile to a directory, show info, train on a data file, demo."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..runtime.program import Program
from ..compiler.step import compile

logger = logging.getLogger(__name__)


def load_model(spec: str, input_shape: tuple[int, ...] | None):
    """``file.onnx``, a reference model name (``mobilenetv2``), or ``module_or_file.py:factory``.

    Returns ``(model, example_inputs)``; ONNX models carry their own shapes.
    """
    import torch

    from ..models import DEFAULT_INPUT_SHAPES, REGISTRY, build

    if spec.endswith(".onnx"):
        return spec, None
    if spec in REGISTRY:
        model = build(spec)
        shape = input_shape or DEFAULT_INPUT_SHAPES.get(spec, (8, 3, 128, 128))
        return model, (torch.randn(*shape),)
    if ":" in spec:
        where, name = spec.rsplit(":", 1)
        if where.endswith(".py"):
            module_spec = importlib.util.spec_from_file_location(Path(where).stem, where)
            if module_spec is None or not Path(where).exists():
                raise ValueError(f"no such file '{where}'")
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
        if input_shape is None:
            raise ValueError(f"model '{spec}' needs --input-shape (e.g. 8,3,128,128)")
        return getattr(module, name)(), (torch.randn(*input_shape),)
    raise ValueError(f"unknown model '{spec}': give an .onnx file, a reference model "
                     f"({', '.join(sorted(REGISTRY))}) or module.py:factory")


def compile_to_dir(model: str, out: str, scheme: str | None = None, target: str = "host",
                   input_shape: tuple[int, ...] | None = None, loss: str = "cross_entropy",
                   optimizer=None, options=None, force: bool = False, tuning_database=None,
                   verify: bool = False, prefix_cache: bool = False) -> Program:
    from ..runtime.bundle import check_replaceable

    check_replaceable(Path(out), force)  # before minutes of compiling
    model_obj, example, shapes = _model_and_shapes(model, input_shape)
    program = compile(model_obj, example, scheme=scheme, loss=loss, optimizer=optimizer or "sgd",
                      target=target, input_shapes=shapes, options=options, tuning_database=tuning_database,
                      verify=verify, prefix_cache=prefix_cache)
    # what `pock-tvm tune BUNDLE` needs to compile the same step again (the bundle holds machine code)
    program.extra["source"] = {"model": model, "scheme": scheme if isinstance(scheme, str) or scheme is None
                               else None, "input_shape": list(input_shape) if input_shape else None,
                               "target": target, "options": asdict(options) if options is not None else None}
    program.save(out, force=force)
    return program


def export_onnx(bundle: str, output: str, model: str | None = None, force: bool = False) -> tuple[Path, float]:
    """``pock-tvm export``: the bundle's fine-tuned parameters in its source model as ONNX, checked
    with ONNX Runtime against the bundle before it is written. Returns the path and the largest
    difference."""
    import torch

    from ..export.onnx_export import check_with_onnxruntime, torch_onnx, with_trained_initializers, write_onnx
    from ..export.state import fine_tuned_state

    program = Program.load(bundle)
    source = model or (program.extra.get("source") or {}).get("model")
    if not source:
        raise ValueError(f"'{bundle}' does not record its source model (compiled from Python): pass --model, or "
                         "from Python use pock_tvm.export.onnx_export.torch_onnx with your torch model")
    state = fine_tuned_state(program)
    if str(source).endswith(".onnx"):
        proto = with_trained_initializers(source, state)
    else:
        torch_model, _ = load_model(source, tuple(program.layout.inputs[0].shape))
        example = tuple(torch.zeros(s.shape, dtype=getattr(torch, s.dtype)) for s in program.layout.inputs)
        proto = torch_onnx(torch_model, example, state)
    diff = check_with_onnxruntime(proto, program)
    return write_onnx(proto, output, force), diff


def _model_and_shapes(model: str, input_shape):
    model_obj, example = load_model(model, input_shape)
    shapes = None
    if example is None and input_shape is not None:
        from ..frontend.onnx_frontend import first_input

        shapes = {first_input(model): input_shape}
    return model_obj, example, shapes


def tune_model(model: str, database: str | None, scheme: str | None = None, input_shape=None,
               loss: str = "cross_entropy", kernels: int = 10, trials: int = 16, target: str = "host",
               device=None):
    """``pock-tvm tune``: see :func:`pock_tvm.compiler.tune.tune`. ``model`` may be a bundle made by
    ``pock-tvm compile``: its model, scheme, shapes, loss, optimizer and target are used (the model
    must still be there). ``database`` defaults to the one shipped for this CPU (host target only);
    ``device`` is a :class:`TuningDevice`."""
    from ..compiler.tune import tune

    optimizer, options = "sgd", None
    if (Path(model) / "manifest.json").is_file():
        model, scheme, input_shape, loss, optimizer, options, target = _bundle_source(Path(model))
    database = _tuning_database(database, target)
    model_obj, example, shapes = _model_and_shapes(model, input_shape)
    return database, tune(model_obj, example, database=database, kernels=kernels, trials=trials,
                          scheme=scheme, loss=loss, input_shapes=shapes, target=target, device=device,
                          optimizer=optimizer, options=options)


def refresh_defaults(database: str | None, target: str = "host", device=None) -> tuple[str, int]:
    """``pock-tvm tune --refresh-defaults``: see :func:`pock_tvm.compiler.tune.refresh_defaults`."""
    from ..compiler.tune import refresh_defaults as refresh

    database = _tuning_database(database, target)
    return database, refresh(database, target=target, device=device)


def _tuning_database(database: str | None, target: str) -> str:
    """``--db``, or the database shipped for this CPU (host target only)."""
    from ..tuning import shipped_database_dir

    if database is not None:
        return database
    if target != "host":
        raise ValueError(f"tune: give --db DIR for target {target} (the shipped databases are for host CPUs)")
    return str(shipped_database_dir())


def _bundle_source(bundle: Path):
    from ..optim import optimizer_from_json
    from ..options import PipelineOptions
    from ..runtime.bundle import read_manifest
    from ..runtime.layout import Layout

    manifest = read_manifest(bundle)
    source = manifest.get("source")
    if not isinstance(source, dict) or not isinstance(source.get("model"), str):
        raise ValueError(f"tune: bundle '{bundle}' does not say which model it was compiled from (it was not "
                         "made by `pock-tvm compile`, or by an older one); tune the model itself: "
                         "`pock-tvm tune MODEL --scheme ... --input-shape ...`")
    if source.get("scheme") is None and manifest.get("layout", {}).get("scheme", {}).get("name") not in (None, "full"):
        raise ValueError(f"tune: bundle '{bundle}' was compiled with a scheme object; tune the model itself")
    layout = Layout.from_json(manifest["layout"])
    shape = source.get("input_shape")
    options = PipelineOptions(**source["options"]) if source.get("options") else None
    return (source["model"], source.get("scheme"), tuple(shape) if shape else None, layout.loss,
            optimizer_from_json(layout.optimizer), options, source.get("target", "host"))


def info(path: str) -> str:
    """What a bundle holds and what its step costs (reads the manifest; any target)."""
    from ..runtime.report import Report
    from ..runtime.bundle import read_manifest, read_state
    from ..runtime.layout import Layout
    from ..targets.inspect import cubin_archs, library_kind

    manifest = read_manifest(Path(path))
    layout = Layout.from_json(manifest["layout"])
    target = manifest.get("target", {})
    library = Path(path) / manifest["library"]
    kind = library_kind(library)
    steps = int(read_state(Path(path), manifest)["step"])
    lines = [f"bundle: {path}",
             f"target: {target.get('name')} ({target.get('arch')}, {target.get('os')}, {target.get('device')}); "
             f"{manifest['library']}: {kind['format']} {kind['machine']}",
             "inputs: " + ", ".join(f"{s.name}{list(s.shape)} {s.dtype}" for s in [*layout.inputs, layout.target]),
             f"loss: {layout.loss}, optimizer: {layout.optimizer}", f"steps done: {steps}"]
    if target.get("device") == "cuda":
        lines.append(f"CUDA kernels: {', '.join(sorted(set(cubin_archs(library)))) or 'source only'} "
                     f"(built with nvcc {manifest.get('cuda', {}).get('nvcc_release', '?')})")
    report = manifest.get("report")
    return "\n".join(lines + [""]) + (str(Report.from_json(report)) if report else "(no report stored)")


def pack_data(bundle: str, data: str, out: str) -> int:
    """Write ``data`` (.npz) as the device runner's batch file for ``bundle``."""
    from ..runtime.bundle import read_manifest, write_batches
    from ..runtime.layout import Layout

    from ..runtime.files import writable_file

    writable_file(out, "pack-data -o")
    layout = Layout.from_json(read_manifest(Path(bundle))["layout"])
    inputs, target = _npz_arrays(data, layout)
    return write_batches(Path(out), layout, inputs, target)


def load_data(path: str, program: Program) -> tuple[list[np.ndarray], np.ndarray]:
    """An ``.npz`` with one array per input (by name, or ``x``) and ``y`` or ``target``, in the
    program's dtypes (see :func:`_npz_arrays`)."""
    return _npz_arrays(path, program.layout)


def _npz_arrays(path: str, layout) -> tuple[list[np.ndarray], np.ndarray]:
    """The inputs and targets of an ``.npz`` in the layout's dtypes. Refused with a clear error:
    a missing or unreadable file, arrays of strings or objects, inputs and targets of different
    lengths, integer targets (class labels) given as floats that are not whole numbers."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"no such data file '{path}'" if not file.exists() else
                         f"data '{path}' is not a file; give an .npz with the inputs and 'y'")
    try:
        data = np.load(file, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"data file '{path}' is not an .npz that numpy can read without pickles ({err}); "
                         "write it with numpy.savez(path, x=..., y=...)") from None
    if not hasattr(data, "files"):
        raise ValueError(f"data file '{path}' holds one array, not an .npz; write it with numpy.savez(path, x=..., y=...)")
    with data:
        arrays = {}
        for key in data.files:
            try:
                arrays[key] = data[key]
            except ValueError:  # an object array (None, Python objects) needs pickle, which is refused
                raise ValueError(f"data file '{path}': '{key}' holds strings or objects (it needs pickle to "
                                 "load); give numbers (class labels as integer indices)") from None
        data = arrays
        keys = set(data)
        names = [s.name for s in layout.inputs]
        if len(names) == 1 and names[0] not in keys and "x" in keys:
            inputs = [data["x"]]
            names = ["x"]
        else:
            missing = [n for n in names if n not in keys]
            if missing:
                raise ValueError(f"data file '{path}' lacks arrays {missing} (it has {sorted(keys)})")
            inputs = [data[n] for n in names]
        target_key = "y" if "y" in keys else "target"
        if target_key not in keys:
            raise ValueError(f"data file '{path}' needs the targets as array 'y' or 'target'")
        target = data[target_key]
    for name, array in [*zip(names, inputs), (target_key, target)]:
        if array.dtype.kind not in "biuf":
            raise ValueError(f"data file '{path}': '{name}' holds {array.dtype} values (strings or objects); give "
                             "numbers (class labels as integer indices)")
        if array.ndim == 0 or len(array) != len(target):
            raise ValueError(f"data file '{path}': '{name}' has {len(array) if array.ndim else 0} samples and "
                             f"'{target_key}' {len(target) if target.ndim else 0}; give one target per sample")
    inputs = [_converted(a, s.dtype, f"data file '{path}': '{n}'") for a, s, n in zip(inputs, layout.inputs, names)]
    return inputs, _converted(target, layout.target.dtype, f"data file '{path}': '{target_key}'")


def _converted(array: np.ndarray, dtype: str, where: str) -> np.ndarray:
    """``array`` as ``dtype``; floats going to an integer dtype must be whole numbers (a label of 2.7
    is an error, not class 2)."""
    if np.dtype(dtype).kind in "iu" and array.dtype.kind == "f":
        whole = np.isfinite(array) & (array == np.round(array))
        if not whole.all():
            index = int(np.flatnonzero(~whole.ravel())[0])
            raise ValueError(f"{where} holds {array.ravel()[index]!r} at position {index}, which is not a whole "
                             f"number; the model takes {dtype} (class labels or token ids)")
    return array.astype(dtype, copy=False)


def train(path: str, data: str, epochs: int = 1, lr: float | None = None, save: bool = True,
          prefix_cache: str | None = None) -> list[float]:
    """Run training steps over ``data`` in batches of the compiled batch size, holding the
    bundle's lock; the state is saved back only if every loss and every value is finite.
    ``prefix_cache`` (float32, float16, int8; a bundle compiled with ``--prefix-cache``): the
    frozen prefix runs once per sample and the steps start from its cached activations."""
    from ..optim import check_lr
    from ..runtime.bundle import clean_state_leftovers, read_manifest
    from ..runtime.files import locked

    if lr is not None:
        check_lr(lr)
    # --no-save writes nothing, so it takes no lock either (a read-only bundle trains for a look)
    with locked(Path(path), "train") if save else contextlib.nullcontext():
        if save:
            clean_state_leftovers(Path(path), read_manifest(Path(path)))
        program = Program.load(path)
        inputs, target = load_data(data, program)
        batch = program.layout.target.shape[0] if program.layout.target.shape else 1
        count = len(target) // batch
        if count == 0:
            raise ValueError(f"data has {len(target)} samples, fewer than one batch of {batch}")
        program.layout.check_target(target[:count * batch], f"data file '{data}'")
        cache = None
        if prefix_cache:
            from ..training.prefix_cache import build_cache

            cache = build_cache(program, tuple(x[:count * batch] for x in inputs), prefix_cache)
            logger.info("prefix cache: %d samples, %.1f MiB (%s), filled in %.1f s", count * batch,
                        cache.nbytes / 2**20, prefix_cache, cache.seconds)
        losses = []
        for epoch in range(epochs):
            for i in range(count):
                sl = slice(i * batch, (i + 1) * batch)
                start = time.perf_counter()
                if cache is not None:
                    loss = program.step_cached(*cache.batch(np.arange(sl.start, sl.stop)), target[sl], lr=lr)
                else:
                    loss = program.step(*[x[sl] for x in inputs], target[sl], lr=lr)
                losses.append(loss)
                logger.info("epoch %d step %d loss %.5f time %.1f ms", epoch, i, loss,
                            1e3 * (time.perf_counter() - start))
                if not np.isfinite(loss):
                    raise ValueError(f"loss is {loss} at epoch {epoch} step {i}: training diverged; lower the "
                                     f"learning rate (--lr). '{path}' was not changed")
        if save:
            _check_trained_outputs(program, [x[:batch] for x in inputs], path)
            program.save(path)
    return losses


def _check_trained_outputs(program: Program, inputs: list[np.ndarray], path: str) -> None:
    """A diverged step can leave weights that are finite (1e29) yet a model that predicts NaN or
    inf: the trained model must give finite outputs on the first batch before it is saved."""
    output = program.predict(*inputs)
    if not np.all(np.isfinite(output)):
        raise ValueError(f"training diverged: the trained model's output on the first batch holds "
                         f"{int(np.size(output) - np.count_nonzero(np.isfinite(output)))} NaN or inf values; "
                         f"lower the learning rate (--lr). '{path}' was not changed")
