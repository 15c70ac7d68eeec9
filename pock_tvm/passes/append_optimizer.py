"""AppendOptimizer: ``train_step`` = gradients from ``loss_adjoint`` + the optimizer update."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from .. import calling


@tvm.transform.module_pass(opt_level=0, name="pock_tvm.AppendOptimizer")
class AppendOptimizer:
    """Reads ``loss`` and ``loss_adjoint``; creates ``train_step``.

    Signature: as :mod:`pock_tvm.calling` writes it, ``train_step(*loss_params, lr, step, *states)``
    where ``loss_params`` are the inputs, parameters and target of ``loss`` (in that order),
    ``step`` a float32 scalar (updates done so far) and ``states`` the optimizer state tensors, for
    each trainable parameter in order, one per ``optimizer.state_names()``. Returns
    ``(loss, *new_trainable, new_step, *new_states)``.
    The optimizer math is emitted inline, so the update of each parameter is ordinary graph code
    that later passes can schedule and fuse. Requires ``SparseGradient``.
    ``units``: ``{trainable name: array}`` of the parameters an int8 model trains in integer units
    (the float value of one step, broadcastable to the parameter); the optimizer receives each as
    a constant for its quantization-aware scaling (``pock_tvm.optim``).
    """

    def __init__(self, optimizer=None, trainable: list[str] | None = None,
                 func_name: str = "loss", new_func_name: str = "train_step", units: dict | None = None):
        self.optimizer = optimizer
        self.trainable = list(trainable or [])
        self.units = dict(units or {})
        self.func_name = func_name
        self.new_func_name = new_func_name

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        if self.optimizer is None:
            raise ValueError("AppendOptimizer: no optimizer given; pass optimizer=SGD(...)")
        adjoint_gv = mod.get_global_var(self.func_name + "_adjoint")
        loss_func = mod[self.func_name]
        scalar = relax.TensorType((), "float32")
        args = [relax.Var(p.name, p.ty) for p in loss_func.params]
        by_name = {v.name: v for v in args}
        names = self.optimizer.state_names()
        states = {(p, s): relax.Var(calling.state_key(p, s), by_name[p].ty) for p in self.trainable for s in names}
        special = {calling.LR: relax.Var(calling.LR, scalar), calling.STEP: relax.Var(calling.STEP, scalar)}
        lr, step = special[calling.LR], special[calling.STEP]
        by_name.update(special)
        keys = [v.name for v in states.values()]  # calling.state_keys order: parameter, then state
        by_name.update({v.name: v for v in states.values()})
        order = calling.train_step_args([v.name for v in args], keys)

        bb = relax.BlockBuilder(mod)
        with bb.function(self.new_func_name, [by_name[n] for n in order]):
            with bb.dataflow():
                result = bb.emit(relax.Call(adjoint_gv, args), "adjoint")
                loss = bb.emit(relax.TupleGetItem(result, 0), "loss")
                grads = bb.emit(relax.TupleGetItem(result, 1), "grads")
                new = {calling.LOSS: loss}
                for i, name in enumerate(self.trainable):
                    grad = bb.emit(relax.TupleGetItem(grads, i), f"{name}.grad")
                    own = [states[(name, s)] for s in names]
                    unit = relax.const(np.asarray(self.units[name], "float32")) if name in self.units else None
                    new[name], updated = self.optimizer.emit(bb, by_name[name], grad, own, step, lr, unit)
                    new.update({calling.state_key(name, s): u for s, u in zip(names, updated)})
                new[calling.STEP] = bb.emit(relax.op.add(step, relax.const(1.0, "float32")), "next_step")
                out = bb.emit_output(relax.Tuple([new[n] for n in calling.train_step_outputs(self.trainable, keys)]))
            bb.emit_func_output(out)
        new_mod = bb.get()
        func = new_mod[self.new_func_name].with_attr("pock_tvm.trainable", self.trainable)
        new_mod[self.new_func_name] = func.with_attr("pock_tvm.state_names", list(names))
        return new_mod
