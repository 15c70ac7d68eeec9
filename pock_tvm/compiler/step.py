"""``pock_tvm.compile``: model + scheme + loss + optimizer -> a runnable training :class:`Program`."""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
import warnings

import numpy as np
import tvm

from .. import calling
from ..analysis.cost import kernel_flops, nbytes, training_cost
from ..analysis.memory import kernel_workspace, planned_bytes
from ..cache import compile_cache_enabled, lookup, step_key, store
from ..adapters import add_lora
from ..runtime.report import LayerRow, Report
from ..frontend import ImportedModel, import_model
from ..loss import make_loss
from ..optim import make_optimizer
from ..options import NONE, PipelineOptions
from ..quantization.post_training import describe, runtime_units, train_quantized
from ..passes.pipeline import pock_tvm_pipeline
from ..passes.verify_schedules import FINDINGS_ATTR
from ..passes.split_frozen_prefix import DECLINED_ATTR
from ..passes.split_partial_channels import FROZEN, UPDATED
from ..runtime.layout import Layout, RuntimeParam
from ..runtime.program import Program
from ..scheme import Scheme, Update
from ..targets import CONV_LAYOUTS, load_target
from ..targets.toolchain import cuda_build_env, cuda_info, exporter, tvm_target
from .phases import memory_by_phase

logger = logging.getLogger(__name__)
warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)


def plan(imported: ImportedModel, updates: dict[str, Update]):
    """Runtime tensors in ``forward`` order, the trainable Relax names and the channel splits."""
    params, trainable, partial = [], [], {}
    for info in imported.params:
        update = updates.get(info.name, Update("frozen"))
        shape, dtype = tuple(info.value.shape), str(info.value.dtype)
        if update.mode != "partial":
            is_trained = update.mode == "full" and not info.is_buffer
            params.append(RuntimeParam(info.var_name, info.name, shape, dtype, is_trained))
            if is_trained:
                trainable.append(info.var_name)
            continue
        axis, k = update.axis, update.channels
        partial[info.var_name] = (axis, k)
        up, fr = list(shape), list(shape)
        up[axis], fr[axis] = k, shape[axis] - k
        params.append(RuntimeParam(info.var_name + UPDATED, info.name, tuple(up), dtype, True, axis, 0, k))
        params.append(RuntimeParam(info.var_name + FROZEN, info.name, tuple(fr), dtype, False, axis, k, shape[axis]))
        trainable.append(info.var_name + UPDATED)
    return params, trainable, partial


def _plan_trained(imported: ImportedModel, updates: dict[str, Update]):
    """:func:`plan` after the trained int8 tensors became float32 masters in integer units:
    ``(model, params, trainable, partial, units)``, ``units`` per trainable runtime tensor (QAS)."""
    imported, units = train_quantized(imported, [n for n, u in updates.items() if u.mode != "frozen"])
    params, trainable, partial = plan(imported, updates)
    return imported, params, trainable, partial, runtime_units(units, params)


def _layer_rows(imported: ImportedModel, updates: dict[str, Update]) -> list[LayerRow]:
    rows: dict[str, LayerRow] = {}
    for info in imported.params:
        if info.is_buffer:
            continue
        row = rows.setdefault(info.layer, LayerRow(info.layer, [], 0, 0))
        size = int(info.value.size)
        row.total_elements += size
        update = updates.get(info.name, Update("frozen"))
        leaf = info.name.rpartition(".")[2]
        if update.mode == "full":
            row.updated.append(leaf)
            row.trainable_elements += size
        elif update.mode == "partial":
            c = info.value.shape[update.axis]
            index = "[:, :%d]" if update.axis == 1 else "[:%d]"
            row.updated.append(f"{leaf}{index % update.channels} of {c}")
            row.trainable_elements += size // c * update.channels
    return list(rows.values())


def build_training_graph(imported, trainable, partial, loss, optimizer,
                         options: PipelineOptions = NONE, frozen_values: dict | None = None,
                         units: dict | None = None, prefix: bool = False) -> tvm.IRModule:
    """Phases 1-2 of the pipeline (the training graph, not lowered). ``options`` default to no
    optimization: analysis sees every frozen tensor as an input. ``prefix``: add the frozen-prefix
    functions (``passes.SplitFrozenPrefix``)."""
    by_source = {p.name: p.var_name for p in imported.params}
    padding = {by_source[name]: row for name, row in imported.padding_rows.items() if by_source.get(name) in trainable}
    return pock_tvm_pipeline(trainable=trainable, partial=partial, origins=imported.origins, padding_rows=padding,
                             loss_function=loss.relax_function(imported.output), optimizer=optimizer,
                             frozen_values=frozen_values, options=options, lower=False, units=units,
                             prefix_inputs=len(imported.inputs) if prefix else None)(imported.mod)


def _user_names(imported: ImportedModel) -> dict[str, str]:
    """``{Relax variable name: the user's name}`` of the inputs and parameters (error messages)."""
    forward = imported.mod["forward"].params
    names = {var.name: spec.name for var, spec in zip(forward, imported.inputs)}
    names.update({p.var_name: p.name for p in imported.params})
    return names


@dataclass
class PlannedStep:
    """A training step lowered and memory-planned, before code generation: what the compiler knows
    of its cost (``report``: planned bytes, FLOPs) and what :func:`build` needs to make a program."""

    lowered: tvm.IRModule
    report: Report
    layout: Layout
    values: dict
    preset: object
    target: tvm.target.Target


def plan_step(model, example_inputs=None, *, scheme=None, loss="cross_entropy", optimizer="sgd",
              target="host", input_shapes: dict | None = None, memory_phases: bool = False,
              options: PipelineOptions | str | None = None, tuning_database=None,
              baseline: bool = True, verify: bool = False, prefix_cache: bool = False) -> PlannedStep:
    """The first half of :func:`compile` (same arguments): import, training graph, lowering and the
    static memory plan, without code generation. ``model`` may also be an :class:`ImportedModel`
    (import once, plan many schemes). ``baseline=False`` skips the full-backprop column of the
    report (one graph less to build), for callers that only read this scheme's cost."""
    if verify and not isinstance(verify, bool):
        raise ValueError(f"compile: verify must be True or False, not {verify!r}")
    options = PipelineOptions.load(options)
    preset = load_target(target)
    if tuning_database is None and preset.name == "host" and options.schedule_kernels:
        from ..tuning import shipped_database

        tuning_database = shipped_database()
    tgt = tvm_target(preset)
    gpu = tgt.kind.name == "cuda"
    imported = import_model(model, example_inputs, input_shapes)
    scheme = Scheme.load(scheme)
    if scheme.lora is not None:
        imported = add_lora(imported, scheme.lora)
    loss, optimizer = make_loss(loss), make_optimizer(optimizer)
    updates = scheme.resolve(imported)
    quantization = describe(imported, [n for n, u in updates.items() if u.mode != "frozen"])
    imported, params, trainable, partial, units = _plan_trained(imported, updates)
    values = _initial_values(imported, params)
    all_frozen = {p.var: values[p.var] for p in params if not p.trainable}
    if options.fold_frozen:
        params = [replace(p, folded=not p.trainable) for p in params]
    frozen = {p.var: values[p.var] for p in params if p.folded}
    train_mod = build_training_graph(imported, trainable, partial, loss, optimizer, options, frozen, units,
                                     prefix=prefix_cache)
    prefix = _prefix_extra(train_mod) if prefix_cache else {}
    report = _report(imported, scheme, updates, train_mod, trainable, loss, optimizer, baseline)
    report.quantization = quantization
    if memory_phases:
        report.phases = memory_by_phase(
            lambda opts: build_training_graph(imported, trainable, partial, loss, optimizer, opts, all_frozen, units),
            trainable, report.param_bytes, report.optimizer_state_bytes, tgt, CONV_LAYOUTS[preset.conv_layout])

    with tgt, tvm.transform.PassContext(opt_level=3):
        lowered = pock_tvm_pipeline(build_training_graph=False, gpu=gpu, options=options,
                                    tuning_database=str(tuning_database) if tuning_database else None,
                                    conv_layouts=CONV_LAYOUTS[preset.conv_layout], verify=verify,
                                    names=_user_names(imported))(train_mod)
        report.planned = {"train_step": planned_bytes(lowered)["storage"],
                          "forward": planned_bytes(lowered, "forward")["storage"],
                          "kernel_scratch": kernel_workspace(lowered)["peak"],
                          "folded_bytes": sum(int(v.nbytes) for v in frozen.values())}
        report.kernel_flops = kernel_flops(lowered)
        if prefix.get("prefix"):
            report.planned[calling.TRAIN_STEP_CACHED] = planned_bytes(lowered, calling.TRAIN_STEP_CACHED)["storage"]
            report.planned[calling.PREFIX] = planned_bytes(lowered, calling.PREFIX)["storage"]
            batch = int(imported.inputs[0].shape[0])
            report.planned["cached_bytes_per_sample"] = sum(
                int(np.prod(c["shape"])) * np.dtype(c["dtype"]).itemsize for c in prefix["prefix"]) // batch
    if tuning_database:
        report.notes.append(f"kernel schedules: tuned ones from {tuning_database}, defaults for the rest")
    if verify and not gpu:
        findings = [str(f) for f in (lowered.attrs or {}).get(FINDINGS_ATTR, [])]
        report.notes.append("kernels verified against their unscheduled form: "
                            + (f"{len(findings)} computed wrong and fell back" if findings else "all agree"))
        report.notes += [f"  {f}" for f in findings]
    report.notes.append(f"convs compiled in {preset.conv_layout} (target '{preset.name}')")
    if prefix.get("prefix_declined"):
        report.notes.append(f"no frozen-prefix function: {prefix['prefix_declined']}")
    layout = Layout(list(imported.inputs), loss.target_spec(imported.output), imported.output,
                    params, list(optimizer.state_names()), _optimizer_json(optimizer), loss.name,
                    scheme.to_dict(), preset.name,
                    {**({"quantization": quantization} if quantization else {}), **prefix})
    expected = layout.signatures()["train_step"]["args"]
    if [p.name for p in train_mod["train_step"].params] != expected:  # a pipeline bug, not user input
        raise RuntimeError(f"compile: train_step takes {[p.name for p in train_mod['train_step'].params]}, "
                           f"the calling convention says {expected}")
    logger.info("planned %d trainable tensors of %d (%d frozen folded into the step)",
                len(trainable), len(params), len(frozen))
    return PlannedStep(lowered, report, layout, values, preset, tgt)


def _prefix_extra(train_mod: tvm.IRModule) -> dict:
    """The layout's entry for a step compiled with ``prefix_cache=True``: ``{"prefix": [{"shape",
    "dtype"}, ...]}`` of the cached activations, or ``{"prefix_declined": why}``."""
    if not any(g.name_hint == calling.PREFIX for g in train_mod.get_global_vars()):
        why = (train_mod.attrs or {}).get(DECLINED_ATTR, "the pipeline made no prefix function")
        return {"prefix_declined": str(why)}
    fields = train_mod[calling.PREFIX].ret_ty.fields
    return {"prefix": [{"shape": [int(d) for d in f.shape], "dtype": str(f.dtype)} for f in fields]}


def build(planned: PlannedStep) -> Program:
    """The second half of :func:`compile`: code generation for the planned step's target."""
    preset, tgt = planned.preset, planned.target
    gpu = tgt.kind.name == "cuda"
    # host CPU steps go through the compile cache (pock_tvm.cache): the same lowered step, target
    # and versions load the library built before instead of generating code again
    key = step_key(planned.lowered, tgt) if compile_cache_enabled() and not gpu and not preset.is_cross else None
    cached = lookup(key) if key else None
    if cached is None:
        with tgt, tvm.transform.PassContext(opt_level=3), cuda_build_env(preset):
            exe = tvm.compile(planned.lowered, target=tgt, relax_pipeline=tvm.transform.Sequential([]))
        # the stored library is loaded rather than the in-memory one: that one would generate its
        # machine code a second time (LLVM's JIT) when the program starts
        stored = store(key, lambda file: exe.export_library(str(file))) if key else None
        exe, cached = _load_library(stored, exe)
    else:
        exe, cached = _load_library(cached, None)
    extra = {"target": {**preset.to_json(), "tvm_target": json.loads(str(tgt))}}
    if gpu:
        extra["cuda"] = cuda_info(tgt)
    device = tvm.cuda() if gpu and tvm.cuda().exist else None
    program = Program(exe, planned.layout, planned.values, planned.report, device, extra)
    program.exporter = exporter(preset)
    program.library_source = cached  # saving a cached step copies its library
    program.ir = planned.lowered  # the kernels as compiled, for `pock-tvm tune`
    return program


def build_many(plans: list[PlannedStep], workers: int | None = None) -> list[Program]:
    """:func:`build` of each planned step, ``workers`` at a time (default: one per CPU core, at most
    4), in the order given. Code generation runs in TVM's C++ with Python's lock released, so the
    builds of a scheme search or of a demo's schemes overlap; planning cannot (it runs Python
    passes and TVM's process-wide pass state), so plans are made first, one by one."""
    workers = workers or min(4, os.cpu_count() or 1)
    if workers <= 1 or len(plans) <= 1:
        return [build(p) for p in plans]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pock_tvm-build") as pool:
        return list(pool.map(build, plans))


def _load_library(path, built):
    """``(module, its file)`` from the compile cache, or ``(built, None)`` when ``path`` is None or
    the file went (another process trimmed the cache) and something was built here."""
    if path is not None:
        try:
            return tvm.runtime.load_module(str(path)), path
        except (OSError, RuntimeError, ValueError):
            if built is None:
                raise
            logger.info("compile cache: %s could not be loaded; using the library built here", path)
    return built, None


def compile(model, example_inputs=None, *, scheme=None, loss="cross_entropy", optimizer="sgd",
            target="host", input_shapes: dict | None = None, memory_phases: bool = False,
            options: PipelineOptions | str | None = None, tuning_database=None, verify: bool = False,
            baseline: bool = True, prefix_cache: bool = False) -> Program:
    """Compile ``model`` into a training :class:`Program` (:func:`plan_step`, then :func:`build`).

    ``target`` is a preset name (``pock_tvm.targets.PRESETS``: host, rpi4, rpi5, apple-m1,
    jetson-orin, jetson-nano, cuda) or a target file; a program for another machine cannot
    ``step`` here, ``save`` writes its bundle for the device runner.
    ``model`` is a ``torch.nn.Module`` (with ``example_inputs``), an ONNX path or ``ModelProto``.
    ``scheme`` is a :class:`Scheme`, a preset name or a ``.toml``/``.json`` file (default ``full``);
    ``loss`` is a name of ``pock_tvm.loss.LOSSES`` (``"cross_entropy"``, ``"next_token"`` for a causal
    LM, ``"mse"``) or a loss object such as :class:`pock_tvm.loss.TorchLoss`;
    ``optimizer`` is ``"sgd"``, ``"adam"``, ``"adamw"`` or an optimizer object.
    ``options`` switch optimizations of the pipeline: a :class:`PipelineOptions` or a preset
    ``"O0"``..``"O3"`` (default ``O3``, everything; ``PipelineOptions(fold_frozen=False)`` keeps
    frozen tensors as runtime inputs so that they can be reloaded).
    ``tuning_database`` is a directory of tuned kernel schedules (``pock-tvm tune``) for ``target``;
    for ``host`` it defaults to the database shipped for this CPU, if any (``pock_tvm/tuning``);
    ``False`` applies none.
    ``memory_phases=True`` adds the planned memory after each optimization phase to the report
    (one more lowering per phase, no code generation).
    ``verify=True`` runs every kernel that got a schedule (default rule or tuned record) once on
    random inputs against its unscheduled form; a kernel that computes other numbers is named in
    the log and the report and falls back to the plain schedule (``passes.VerifySchedules``).
    ``baseline=False`` leaves the full-backprop column out of the report (one training graph less
    to build), for callers that never show it.
    ``prefix_cache=True`` also compiles the frozen prefix of the step as a function of its own
    (``Program.prefix``) and a step that starts from its cached activations
    (``Program.step_cached``), so that ``fit(..., prefix_cache="float32")`` computes the frozen
    layers once per sample instead of once per epoch (``passes.SplitFrozenPrefix``; the report
    says why when the scheme leaves nothing to cache).
    """
    return build(plan_step(model, example_inputs, scheme=scheme, loss=loss, optimizer=optimizer,
                           target=target, input_shapes=input_shapes, memory_phases=memory_phases,
                           options=options, tuning_database=tuning_database, verify=verify, baseline=baseline,
                           prefix_cache=prefix_cache))


def _initial_values(imported: ImportedModel, params: list[RuntimeParam]) -> dict[str, np.ndarray]:
    sources = {p.name: p.value for p in imported.params}
    values = {}
    for p in params:
        value = sources[p.source]
        if p.axis is not None:
            value = np.take(value, range(p.start, p.stop), axis=p.axis)
        values[p.var] = np.require(value, requirements="C")  # (ascontiguousarray makes a 0-d tensor 1-d)
    return values


def _optimizer_json(optimizer) -> dict:
    return asdict(optimizer)


def _report(imported, scheme, updates, train_mod, trainable, loss, optimizer, baseline: bool = True) -> Report:
    sparse = training_cost(train_mod, trainable)
    dense = None
    if baseline:
        dense_model, _, dense_trainable, _, dense_units = _plan_trained(imported, Scheme.preset("full").resolve(imported))
        try:
            dense_mod = build_training_graph(dense_model, dense_trainable, {}, loss, optimizer, units=dense_units)
            dense = training_cost(dense_mod, dense_trainable)
        except ValueError as err:  # e.g. an op below the updated layers has no gradient rule
            logger.info("no full-backprop baseline for the report: %s", err)
    params = train_mod["loss"].params
    state = len(optimizer.state_names()) * sum(nbytes(p.ty) for p in params if p.name in set(trainable))
    param_bytes = sum(int(p.value.nbytes) for p in imported.params)
    report = Report.build(scheme.name, _layer_rows(imported, updates), dense or sparse, sparse, state,
                          param_bytes)
    if dense is None and baseline:
        report.notes.append("full backprop is not possible for this model (an op lacks a gradient "
                            "rule below the updated layers): its column repeats this scheme")
    if any(p.is_buffer for p in imported.params):
        report.notes.append("BatchNorm is frozen: running statistics are fixed inputs, not updated.")
    if sum(r.trainable_elements for r in report.layers) == 0:
        report.notes.append("warning: the scheme updates nothing")
    return report
