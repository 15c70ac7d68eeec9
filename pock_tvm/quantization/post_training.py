"""pock_tvm's post-training quantizer: a float model into the int8 form the compiler trains.

Weights of conv and linear layers become int8 per output channel (symmetric); the input of each
such layer is fake-quantized to int8 per tensor (symmetric), with the range seen on calibration
data. The result is an :class:`ImportedModel` in QDQ form (``relax.quantize``/``dequantize``, as
an ONNX QDQ model imports), so both paths meet in the same compiler: frozen layers run as integer
kernels (``IntegerKernels``), trained ones keep a float32 master in integer units and train with
quantization-aware scaling (``pock_tvm.optim``, ``qas``).
"""

from __future__ import annotations

import fnmatch
from dataclasses import replace
from typing import Iterable, Sequence

import numpy as np

from ..frontend import ImportedModel, import_model
from ..passes.quantize_forward import OpScales, QuantizeForward, quantizable_ops
from ..passes.split_partial_channels import FROZEN, UPDATED
from ..passes.train_quantized_params import TrainQuantizedParams
from .int8 import RANGES, WEIGHT_DTYPE, along, is_integer, param_units

QMAX = RANGES[WEIGHT_DTYPE][1]  # symmetric: [-127, 127], so that -q is representable


def quantize(model, calibration: Iterable, example_inputs=None, *, input_shapes: dict | None = None,
             skip: Sequence[str] = ()) -> ImportedModel:
    """``model`` (a torch module with ``example_inputs``, an ONNX model or an :class:`ImportedModel`)
    with every conv/linear layer quantized to int8, except weights whose source name matches a glob
    of ``skip``. ``calibration`` yields input batches (an array, or a tuple for several inputs) of
    the imported input shapes; activation ranges are their maxima."""
    imported = import_model(model, example_inputs, input_shapes)
    func = imported.mod["forward"]
    by_var = {p.var_name: p for p in imported.params}
    ops = {w: x for w, x in quantizable_ops(func).items()
           if w in by_var and by_var[w].value.dtype.kind == "f"
           and not any(fnmatch.fnmatchcase(by_var[w].name, g) for g in skip)}
    if not ops:
        raise ValueError("quantize: the model has no conv2d or linear layer with a weight parameter to quantize "
                         f"(skip={list(skip)!r})")
    ranges = calibrate(imported, list(ops.values()), calibration)
    scales, params = {}, []
    for info in imported.params:
        if info.var_name not in ops:
            params.append(info)
            continue
        w = np.asarray(info.value, np.float32)
        amax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
        weight_scale = np.where(amax > 0, amax / QMAX, 1.0).astype(np.float32)
        q = np.clip(np.round(w / weight_scale.reshape([-1] + [1] * (w.ndim - 1))), -QMAX, QMAX)
        params.append(replace(info, value=q.astype(WEIGHT_DTYPE)))
        amax_x = ranges[ops[info.var_name]]
        scales[info.var_name] = OpScales(float(amax_x / QMAX) if amax_x > 0 else 1.0, weight_scale)
    return replace(imported, mod=QuantizeForward(scales)(imported.mod), params=params)


def calibrate(imported: ImportedModel, tensors: list, batches: Iterable) -> dict:
    """``{tensor: max |value|}`` of variables of ``forward`` over ``batches``, run by TVM on this
    machine with the model's own parameters."""
    import tvm
    from tvm import relax

    func = imported.mod["forward"]
    plain = relax.transform.ToNonDataflow()(tvm.IRModule({"forward": func}))["forward"]
    names = [t.name for t in tensors]
    visible = {b.var.name: b.var for block in plain.body.blocks for b in block.bindings}
    visible.update({p.name: p for p in plain.params})
    body = relax.BlockBuilder().normalize(relax.SeqExpr(plain.body.blocks,
                                                        relax.Tuple([visible[n] for n in names])))
    probe = relax.Function(plain.params, body, None, plain.is_pure, plain.attrs)
    exe = tvm.compile(tvm.IRModule({"forward": probe}), target=tvm.target.Target("llvm"))
    vm = relax.VirtualMachine(exe, tvm.cpu())
    params = [tvm.runtime.tensor(np.require(p.value, requirements="C")) for p in imported.params]
    amax = dict.fromkeys(names, 0.0)
    count = 0
    for batch in batches:
        arrays = batch if isinstance(batch, (tuple, list)) else (batch,)
        arrays = [np.ascontiguousarray(_numpy(a)) for a in arrays]
        for spec, array in zip(imported.inputs, arrays):
            if tuple(array.shape) != tuple(spec.shape) or str(array.dtype) != spec.dtype:
                raise ValueError(f"quantize: calibration batch for input '{spec.name}' is {array.dtype}{list(array.shape)}, "
                                 f"the model takes {spec.dtype}{list(spec.shape)}; give batches of the imported shape")
        if len(arrays) != len(imported.inputs):
            raise ValueError(f"quantize: a calibration batch holds {len(arrays)} arrays, the model takes "
                             f"{len(imported.inputs)} inputs")
        outs = vm["forward"](*[tvm.runtime.tensor(a) for a in arrays], *params)
        for name, out in zip(names, outs):
            value = float(np.abs(out.numpy()).max())
            if not np.isfinite(value):
                raise ValueError(f"quantize: calibration produced a non-finite value at {name}; check the data")
            amax[name] = max(amax[name], value)
        count += 1
    if count == 0:
        raise ValueError("quantize: no calibration batches; pass a few batches of representative inputs")
    by_tensor = {t: amax[t.name] for t in tensors}
    return by_tensor


def _numpy(array):
    return array.detach().cpu().numpy() if hasattr(array, "detach") else np.asarray(array)



def train_quantized(imported: ImportedModel, trained: Iterable[str]) -> tuple[ImportedModel, dict]:
    """``imported`` with the quantized parameters among ``trained`` (source names) turned into
    float32 masters in integer units (:class:`~pock_tvm.passes.TrainQuantizedParams`), and
    ``{var name: unit}``: each one's float value of one integer step, broadcastable to it."""
    trained = set(trained)
    units_by_var = param_units(imported.mod["forward"])
    chosen = {p.var_name: p for p in imported.params if p.name in trained and is_integer(p.value.dtype)}
    unreadable = sorted(p.name for v, p in chosen.items() if v not in units_by_var)
    if unreadable:
        raise ValueError(f"quantize: {unreadable} are integer parameters without a constant scale in the graph; "
                         "they cannot be trained (freeze them)")
    if not chosen:
        return imported, {}
    units = {v: along(units_by_var[v][0], units_by_var[v][2], p.value.ndim).astype(np.float32)
             for v, p in chosen.items()}
    params = [replace(p, value=p.value.astype(np.float32)) if p.var_name in chosen else p for p in imported.params]
    return replace(imported, mod=TrainQuantizedParams(list(chosen))(imported.mod), params=params), units


def runtime_units(units: dict, params) -> dict:
    """``units`` (per Relax parameter) for the runtime tensors of ``params``
    (:class:`~pock_tvm.runtime.layout.RuntimeParam`), sliced like a partially trained weight."""
    out = {}
    for p in params:
        base = p.var.removesuffix(UPDATED).removesuffix(FROZEN) if p.axis is not None else p.var
        if not p.trainable or base not in units:
            continue
        unit = units[base]
        if p.axis is not None and unit.ndim and unit.shape[p.axis] > 1:
            unit = np.take(unit, range(p.start, p.stop), axis=p.axis)
        out[p.var] = unit
    return out


def describe(imported: ImportedModel, trained: Iterable[str]) -> dict:
    """The int8 parts of ``imported`` as data, for the report and the bundle's manifest: each
    quantized tensor's dtype, scales (per channel on ``axis``), zero points and whether it trains
    (as a float32 master in integer units) or stays frozen, and the activation scale at each
    quantized layer's input. Empty for a float model."""
    from ..passes.quantize_forward import read_scales

    func = imported.mod["forward"]
    units = param_units(func)
    if not units:
        return {}
    trained = set(trained)
    by_var = {p.var_name: p for p in imported.params}
    tensors = {by_var[v].name: {"dtype": str(by_var[v].value.dtype), "scale": np.ravel(s).tolist(),
                                "zero_point": np.ravel(z).astype(int).tolist(), "axis": axis,
                                "trained": by_var[v].name in trained}
               for v, (s, z, axis) in units.items() if v in by_var}
    activations = {by_var[v].name: scales.activation for v, scales in read_scales(func).items() if v in by_var}
    return {"tensors": tensors, "activation_scales": activations}


def float_state_dict(state: dict[str, np.ndarray], quantization: dict) -> dict[str, np.ndarray]:
    """A program's ``state_dict()`` with every int8 tensor (and every trained one, held in integer
    units) as the float tensor it stands for, ``(q - zero_point) * scale``: the fine-tuned model for
    the float architecture (``load_state_dict`` in torch). ``quantization`` is the program's
    ``report().quantization`` (a bundle's ``layout.extra["quantization"]``)."""
    out = dict(state)
    for name, t in quantization.get("tensors", {}).items():
        value = np.asarray(state[name], np.float32)
        scale = along(np.asarray(t["scale"], np.float32), t["axis"], value.ndim)
        zero = along(np.asarray(t["zero_point"], np.float32), t["axis"], value.ndim)
        out[name] = ((value - zero) * scale).astype(np.float32)
    return out
