"""Random kernels of a training step, made the way the pipeline makes them, for the schedule fuzz tests.

A case is a small Relax function: one forward op (a conv, a matmul, a pool, a reduction, a
normalization) with the tail a model puts after it (bias, ReLU), its loss ``sum(out * r)``, the
gradients of every input (input gradients, weight gradients, pool backward) and an SGD update of the
weight: lowered, fused and inlined as in phase 3 of ``pock_tvm_pipeline``. Every kernel of it is then
scheduled and run against its unscheduled form (``pock_tvm.analysis.kernel_check``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import tvm
from tvm import relax

from pock_tvm.passes import gradient_rules_installed
from pock_tvm.passes.inline_kernel_intermediates import InlineKernelIntermediates
from pock_tvm.passes.reorder_updates import ReorderUpdates

KINDS = ("conv2d", "matmul", "wide_matmul", "pool", "reduction", "norm")


@dataclass
class Case:
    kind: str
    params: dict
    inputs: dict[str, tuple] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.kind}({', '.join(f'{k}={v}' for k, v in self.params.items())})"


def _conv2d(rng: random.Random) -> Case | None:
    groups = rng.choice([1, 1, 1, 2, 3, 4, "depthwise"])
    per_group_in = rng.randint(1, 12)
    if groups == "depthwise":
        cin = rng.randint(1, 40)
        groups, cout = cin, cin * rng.choice([1, 1, 2])
    else:
        cin = groups * per_group_in
        cout = groups * rng.randint(1, 48 // groups)
    k = rng.choice([1, 1, 3, 3, 3, 5, 7, 11]) if rng.random() < 0.8 else rng.randint(1, 11)
    kh, kw = (k, k) if rng.random() < 0.85 else (k, rng.randint(1, 5))
    stride = rng.choice([1, 1, 1, 2, 2, 3, 4])
    dilation = rng.choice([1, 1, 1, 1, 2, 3])
    pads = [rng.randint(0, max(kh // 2, 0) + (1 if rng.random() < 0.2 else 0)) for _ in range(2)]
    pads += [rng.randint(0, kh // 2 + 1), rng.randint(0, kw // 2 + 1)] if rng.random() < 0.3 else pads
    batch = rng.choice([1, 1, 2, 3, 8, 16])
    h = rng.randint(1, 24 if batch < 8 else 14)
    w = h if rng.random() < 0.8 else rng.randint(1, 24)
    eff_h, eff_w = dilation * (kh - 1) + 1, dilation * (kw - 1) + 1
    if h + pads[0] + pads[2] < eff_h or w + pads[1] + pads[3] < eff_w:
        return None
    return Case("conv2d", dict(batch=batch, cin=cin, h=h, w=w, cout=cout, kernel=(kh, kw), stride=stride,
                               dilation=dilation, padding=tuple(pads), groups=groups, bias=rng.random() < 0.6,
                               relu=rng.random() < 0.5))


def _matmul(rng: random.Random) -> Case:
    m, k, n = (rng.choice([1, 2, 3, 7, 8, 16, 31, 64, 100]) for _ in range(3))
    batch = rng.choice([(), (), (2,), (3,), (2, 3)])
    return Case("matmul", dict(batch=batch, m=m, k=k, n=n, transpose_b=rng.random() < 0.5,
                               bias=rng.random() < 0.5, relu=rng.random() < 0.3))


def _pool(rng: random.Random) -> Case | None:
    k = rng.randint(1, 5)
    stride = rng.randint(1, 3)
    pad = rng.randint(0, k // 2)
    h = rng.randint(k, 20)
    return Case("pool", dict(op=rng.choice(["max", "avg"]), batch=rng.choice([1, 2, 8]), c=rng.randint(1, 20),
                             h=h, w=rng.choice([h, rng.randint(k, 20)]), kernel=k, stride=stride,
                             padding=(pad, pad, rng.randint(0, k // 2), rng.randint(0, k // 2)),
                             ceil_mode=rng.random() < 0.4, count_include_pad=rng.random() < 0.5))


def _reduction(rng: random.Random) -> Case:
    shape = tuple(rng.choice([1, 2, 3, 5, 8, 13, 16, 33, 64]) for _ in range(rng.randint(1, 4)))
    axes = sorted(rng.sample(range(len(shape)), rng.randint(1, len(shape))))
    return Case("reduction", dict(op=rng.choice(["sum", "mean", "max"]), shape=shape, axes=tuple(axes),
                                  keepdims=rng.random() < 0.5))


def _norm(rng: random.Random) -> Case:
    rows = rng.choice([1, 2, 7, 16, 64])
    return Case("norm", dict(op=rng.choice(["softmax", "log_softmax", "layer_norm"]),
                             shape=(rows, rng.choice([3, 16, 30, 64, 129]))))


def _wide_matmul(rng: random.Random) -> Case:
    """Transformer-sized matmuls: rows of the right operand long enough to be packed into panels
    (register_tiled.PANEL_ROW_BYTES), long reductions that are walked in blocks."""
    k = rng.choice([16, 64, 96, 100, 576, 1000, 3000, 4096])
    n = rng.choice([512, 528, 576, 768, 1000, 1536])
    m = rng.choice([1, 7, 8, 16] if k >= 1000 else [1, 7, 8, 16, 33, 64, 128])  # (the reference runs unscheduled)
    return Case("matmul", dict(batch=rng.choice([(), (), (2,)]), m=m, k=k, n=n, transpose_b=rng.random() < 0.5,
                               bias=rng.random() < 0.5, relu=rng.random() < 0.3))


MAKERS = {"conv2d": _conv2d, "matmul": _matmul, "wide_matmul": _wide_matmul, "pool": _pool, "reduction": _reduction, "norm": _norm}


def cases(seed: int, count: int, kinds=KINDS) -> list[Case]:
    """``count`` random cases of each kind in ``kinds``, the same for the same seed."""
    rng = random.Random(seed)
    found = []
    for kind in kinds:
        made = 0
        while made < count:
            case = MAKERS[kind](rng)
            if case is not None:
                found.append(case)
                made += 1
    return found


def _f32(shape):
    return relax.TensorType(tuple(int(d) for d in shape), "float32")


def forward(case: Case) -> tuple[list[relax.Var], relax.Expr, list[relax.Var]]:
    """The case's inputs, a builder of its output, and the inputs to differentiate."""
    p = case.params
    if case.kind == "conv2d":
        kh, kw = p["kernel"]
        x = relax.Var("x", _f32((p["batch"], p["cin"], p["h"], p["w"])))
        w = relax.Var("w", _f32((p["cout"], p["cin"] // p["groups"], kh, kw)))
        args = [x, w] + ([relax.Var("b", _f32((1, p["cout"], 1, 1)))] if p["bias"] else [])

        def out(bb):
            y = bb.emit(relax.op.nn.conv2d(x, w, strides=p["stride"], padding=p["padding"],
                                           dilation=p["dilation"], groups=p["groups"]))
            if p["bias"]:
                y = bb.emit(relax.op.add(y, args[2]))
            return bb.emit(relax.op.nn.relu(y)) if p["relu"] else y
        return args, out, args
    if case.kind == "matmul":
        a = relax.Var("a", _f32((*p["batch"], p["m"], p["k"])))
        b = relax.Var("b", _f32((p["n"], p["k"]) if p["transpose_b"] else (p["k"], p["n"])))
        args = [a, b] + ([relax.Var("c", _f32((p["n"],)))] if p["bias"] else [])

        def out(bb):
            rhs = bb.emit(relax.op.permute_dims(b)) if p["transpose_b"] else b
            y = bb.emit(relax.op.matmul(a, rhs))
            if p["bias"]:
                y = bb.emit(relax.op.add(y, args[2]))
            return bb.emit(relax.op.nn.relu(y)) if p["relu"] else y
        return args, out, args
    if case.kind == "pool":
        x = relax.Var("x", _f32((p["batch"], p["c"], p["h"], p["w"])))
        if p["op"] == "max":
            op = lambda: relax.op.nn.max_pool2d(x, p["kernel"], p["stride"], p["padding"],  # noqa: E731
                                                ceil_mode=p["ceil_mode"])
        else:
            op = lambda: relax.op.nn.avg_pool2d(x, p["kernel"], p["stride"], p["padding"],  # noqa: E731
                                                ceil_mode=p["ceil_mode"], count_include_pad=p["count_include_pad"])
        return [x], lambda bb: bb.emit(op()), [x]
    if case.kind == "reduction":
        x = relax.Var("x", _f32(p["shape"]))
        op = getattr(relax.op, p["op"])
        return [x], lambda bb: bb.emit(op(x, axis=list(p["axes"]), keepdims=p["keepdims"])), [x]
    x = relax.Var("x", _f32(p["shape"]))
    if p["op"] == "layer_norm":
        g, b = relax.Var("g", _f32(p["shape"][-1:])), relax.Var("beta", _f32(p["shape"][-1:]))
        return [x, g, b], lambda bb: bb.emit(relax.op.nn.layer_norm(x, g, b, axes=[-1])), [x, g, b]
    op = getattr(relax.op.nn, p["op"])
    return [x], lambda bb: bb.emit(op(x, axis=-1)), [x]


def training_module(case: Case) -> tvm.IRModule:
    """``main(inputs..., r) = sum(op(inputs) * r)`` with its gradients, and ``step``: the gradients
    and an SGD update of every differentiated input (the fused tail of a weight gradient)."""
    args, out, grads = forward(case)
    bb = relax.BlockBuilder()
    with bb.function("main"):
        with bb.dataflow():
            y = out(bb)
            r = relax.Var("r", y.ty)
            loss = bb.emit_output(relax.op.sum(relax.op.multiply(y, r)))
        bb.emit_func_output(loss, params=[*args, r])
    mod = bb.get()
    mod = relax.transform.DecomposeOpsForTraining()(mod)
    with gradient_rules_installed():
        mod = relax.transform.Gradient("main", require_grads=grads)(mod)
    adjoint = mod["main_adjoint"]
    bb = relax.BlockBuilder()
    params = [relax.Var(p.name, p.ty) for p in adjoint.params]
    with bb.function("step", params):
        with bb.dataflow():
            result = bb.emit(relax.Call(mod.get_global_var("main_adjoint"), params))
            grads_tuple = bb.emit(relax.TupleGetItem(result, 1))
            updated = []
            for i, g in enumerate(grads):
                grad = bb.emit(relax.TupleGetItem(grads_tuple, i))
                source = params[args.index(g)]
                updated.append(bb.emit(relax.op.subtract(source, relax.op.multiply(grad, relax.const(0.1, "float32")))))
            output = bb.emit_output(relax.Tuple([bb.emit(relax.TupleGetItem(result, 0)), *updated]))
        bb.emit_func_output(output)
    step = bb.get()
    mod = tvm.IRModule({**dict(mod.functions.items()), **dict(step.functions.items())})
    return ReorderUpdates("step")(mod)  # the adjoint inlined: updates fuse into their gradients


def fused_kernels(mod: tvm.IRModule) -> dict[str, tvm.tirx.PrimFunc]:
    """The TIR kernels of ``mod`` after phase 3 of the pipeline up to scheduling."""
    mod = tvm.transform.Sequential([
        relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
        relax.transform.FuseOps(), relax.transform.FuseTIR(), InlineKernelIntermediates(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.DeadCodeElimination(["step"])])(mod)
    return {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
