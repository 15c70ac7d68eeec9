"""Import a ``torch.nn.Module`` through ``torch.export`` into Relax.

The model is exported in eval mode: BatchNorm uses its running statistics (frozen BN, as TTE and
PockEngine fine-tune) and dropout is the identity. Buffers are turned into non-trainable
parameters before export so that they stay runtime inputs (and appear in ``state_dict``) instead
of being baked into the compiled library.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import torch
from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

from ..passes.unbroadcast_linear import UnbroadcastLinear
from .model import ImportedModel, ParamInfo, TensorSpec, origins_by_binding, with_index_bounds

logger = logging.getLogger(__name__)


class _TrackingImporter(ExportedProgramImporter):
    """TVM's importer, recording which FX node produced each Relax variable."""

    def __init__(self) -> None:
        super().__init__()
        self.converted: list[tuple[object, object]] = []
        for key, convert in list(self.convert_map.items()):
            self.convert_map[key] = self._tracked(convert)

    def _tracked(self, convert):
        def run(node, *args):
            out = convert(node, *args)
            self.converted.append((node, out))
            return out

        return run


def _describe(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    module = ""
    if stack:
        path, kind = list(stack.values())[-1]
        path = path.replace("L['self'].", "").replace("L['self']", "")
        kind_name = getattr(kind, "__name__", str(kind).rsplit(".", 1)[-1].strip("'>"))
        module = f" in module '{path}' ({kind_name})" if path else ""
    return f"torch node '{node.name}' ({node.target}){module}"


def _origins(mod, converted) -> dict[str, str]:
    produced = {}
    for node, out in converted:
        hint = getattr(out, "name", None)
        if hint is not None:
            produced.setdefault(str(hint), _describe(node))
    return origins_by_binding(mod["main"], produced)


def _buffers_to_params(model: torch.nn.Module) -> set[str]:
    """Re-register floating-point buffers as frozen parameters; returns their full names."""
    names = set()
    for prefix, module in model.named_modules():
        for key, buf in list(module.named_buffers(recurse=False)):
            if buf is None or not buf.is_floating_point():
                continue
            del module._buffers[key]
            module._non_persistent_buffers_set.discard(key)  # a parameter is always in the state dict
            module.register_parameter(key, torch.nn.Parameter(buf.detach().clone(), requires_grad=False))
            names.add(f"{prefix}.{key}" if prefix else key)
    return names


def _tied_names(model: torch.nn.Module) -> dict[str, str]:
    """``{alias: name}`` for parameters that are one tensor under several names (tied input and
    output embeddings); ``name`` is the one ``named_parameters()`` keeps."""
    first = {id(p): name for name, p in model.named_parameters()}
    return {name: first[id(p)] for name, p in model.named_parameters(remove_duplicate=False)
            if first[id(p)] != name}


class _Logits(torch.nn.Module):
    """A Hugging Face model that returns a ``ModelOutput``, returning its ``logits``."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        return self.inner(*args).logits


def _for_training(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` (a copy) with the key/value cache of every Hugging Face model in it switched off
    (``config.use_cache = False``): a training step reads no cache, and a model that builds one
    (transformers' default) exports ops on it that the import cannot convert."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "use_cache", False):
            config.use_cache = False
    return model


def _export(model: torch.nn.Module, example_inputs):
    """``torch.export`` and the core-ATen decompositions. A Hugging Face model whose attention
    kernel (``sdpa``) does not decompose (GPT-2's: a ``view`` of the transposed output) is exported
    again with the eager attention, which computes the same."""
    try:
        with torch.no_grad():
            return torch.export.export(model, example_inputs).run_decompositions()
    except Exception:
        configs = [c for c in (getattr(m, "config", None) for m in model.modules())
                   if getattr(c, "_attn_implementation", "eager") != "eager"]
        if not configs:
            raise
        for config in configs:
            config._attn_implementation = "eager"
        logger.info("from_torch: exporting again with eager attention (the sdpa kernel did not decompose)")
        with torch.no_grad():
            return torch.export.export(model, example_inputs).run_decompositions()


def _padding_rows(exported) -> dict[str, int]:
    """``{placeholder name: padding_idx}`` of every ``aten.embedding`` with a padding row."""
    rows = {}
    for node in exported.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.embedding.default:
            padding = node.args[2] if len(node.args) > 2 else node.kwargs.get("padding_idx", -1)
            if isinstance(padding, int) and padding >= 0 and hasattr(node.args[0], "name"):
                rows[node.args[0].name] = padding
    return rows


def from_torch(model: torch.nn.Module, example_inputs) -> ImportedModel:
    """Export ``model`` with ``example_inputs`` (a tensor or a tuple) and import it into Relax."""
    if isinstance(example_inputs, (torch.Tensor, np.ndarray)):
        example_inputs = (example_inputs,)
    example_inputs = tuple(torch.from_numpy(np.asarray(t)) if isinstance(t, np.ndarray) else t
                           for t in example_inputs)
    model = _for_training(copy.deepcopy(model).eval())
    with torch.no_grad():
        output = model(*example_inputs)
    if not isinstance(output, torch.Tensor) and isinstance(getattr(output, "logits", None), torch.Tensor):
        logger.info("from_torch: the model returns %s; training reads its logits", type(output).__name__)
        model, output = _Logits(model), output.logits
    prefix = "inner." if isinstance(model, _Logits) else ""  # parameters keep the model's own names
    if not isinstance(output, torch.Tensor):
        raise ValueError(
            "from_torch: the model must return one tensor (the logits or prediction); "
            f"it returned {type(output).__name__}. Wrap it in a module that returns one tensor."
        )
    buffer_names = _buffers_to_params(model)
    exported = _export(model, example_inputs)
    importer = _TrackingImporter()
    mod = importer.from_exported_program(exported, True, True, False, None)

    sig = exported.graph_signature
    var_to_source = dict(sig.inputs_to_parameters)
    named = dict(model.named_parameters())  # one name per tensor: tied weights under the first
    canonical = _tied_names(model)
    func = mod["main"]
    num_inputs = len(example_inputs)
    params, seen, ties = [], {}, {}
    for var in func.params[num_inputs:]:
        source = var_to_source.get(var.name)
        if source is None:
            raise ValueError(f"from_torch: cannot map Relax input '{var.name}' to a parameter")
        source = canonical.get(source, source)
        if source in seen:  # a tied weight (lm_head = embeddings): one tensor, both uses
            ties[var] = seen[source]
            continue
        seen[source] = var
        tensor = named[source].detach().cpu().numpy()
        params.append(ParamInfo(source.removeprefix(prefix), var.name, np.require(tensor, requirements="C"),
                                source in buffer_names))
    if ties:
        func = func.bind_params(ties)
        logger.info("tied parameters share one tensor: %s", {k.name: v.name for k, v in ties.items()})
    inputs = [
        TensorSpec(var.name, tuple(t.shape), str(t.dtype).replace("torch.", ""))
        for var, t in zip(func.params[:num_inputs], example_inputs)
    ]
    out_spec = TensorSpec("output", tuple(output.shape), str(output.dtype).replace("torch.", ""))
    origins = _origins(mod, importer.converted)
    padding = {canonical.get(var_to_source[name], var_to_source[name]).removeprefix(prefix): row
               for name, row in _padding_rows(exported).items() if name in var_to_source}
    new_func = func.without_attr("params").with_attr("global_symbol", "forward")
    out_mod = type(mod)({})
    out_mod["forward"] = new_func
    out_mod = UnbroadcastLinear()(out_mod)  # transformers' 3-D linear layers read their weight
    logger.info("imported torch model: %d inputs, %d parameters", len(inputs), len(params))
    return with_index_bounds(ImportedModel(out_mod, inputs, params, out_spec, origins, "torch", padding))
