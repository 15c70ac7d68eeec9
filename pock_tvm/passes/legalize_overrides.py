"""How a few Relax ops become TIR kernels, where TVM's own legalization computes more than needed.

``LEGALIZE_OVERRIDES`` is the table ``relax.transform.LegalizeOps`` takes (op name -> function of
``(BlockBuilder, Call)``); ops not in it are legalized by TVM. Each override computes the same
values as TVM's kernel (tested against it).
"""

from __future__ import annotations

from tvm import te


def _log_softmax(bb, call):
    """``x - (max + log(sum(exp(x - max))))`` with the row's ``max + log(sum)`` as a stage of its
    own: TOPI's kernel takes the ``log`` of the row's sum inside the elementwise output, once per
    element (49152 times per row for a language model's head) instead of once per row."""
    return bb.call_te(_log_softmax_te, call.args[0], int(call.attrs.axis), primfunc_name_hint="log_softmax")


def _log_softmax_te(x, axis: int):
    shape = x.shape
    axis = axis % len(shape)
    k1 = te.reduce_axis((0, shape[axis]), name="k")
    k2 = te.reduce_axis((0, shape[axis]), name="k")
    rows = [d for i, d in enumerate(shape) if i != axis]

    def full(indices, k):
        return indices[:axis] + (k,) + indices[axis:]

    top = te.compute(rows, lambda *i: te.max(x[full(i, k1)], axis=k1), name="T_softmax_maxelem")
    total = te.compute(rows, lambda *i: te.sum(te.exp(x[full(i, k2)] - top[i]), axis=k2), name="T_softmax_expsum")
    shift = te.compute(rows, lambda *i: top[i] + te.log(total[i]), name="T_logsumexp")
    return te.compute(shape, lambda *i: x[i] - shift[i[:axis] + i[axis + 1:]], name="compute")


LEGALIZE_OVERRIDES = {
    "relax.nn.log_softmax": _log_softmax,
}
