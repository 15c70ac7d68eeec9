"""Gradient rules that TVM 0.27's Relax autodiff lacks, as one table.

Each rule has the ``FPrimalGradient`` signature ``(orig_var, orig_call, output_grad, ctx)`` and
returns one gradient per argument of the call. :func:`gradient_rules_installed` installs the rules
(and the overrides of TVM's own) for the duration of a ``with`` block: the pipeline differentiates
inside one, and importing pock_tvm changes no rule of TVM's.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import numpy as np

import tvm
from tvm import relax
from tvm.relax.op.grad import avg_pool2d_backward, no_grad, take_backward

from ..quantization.int8 import RANGES, along_expr

R = relax.op


def _shape(expr) -> list[int]:
    return [int(d) for d in expr.ty.shape]


def _clip(var, call, grad, ctx):
    """ReLU6 and friends: pass the gradient where ``lo < x < hi`` (torch hardtanh_backward), tested
    on the output ``y = clip(x)``, which is inside exactly where ``x`` is: the backward pass keeps
    the tensor the next layer reads anyway, not the pre-activation too."""
    x, lo, hi = call.args
    dtype = x.ty.dtype
    lo_c = relax.const(float(lo.value), dtype)
    hi_c = relax.const(float(hi.value), dtype)
    inside = R.logical_and(R.greater(var, lo_c), R.less(var, hi_c))
    return [R.where(inside, grad, R.zeros_like(grad)), no_grad(lo), no_grad(hi)]


def _to_input_shape(var, call, grad, ctx):
    """Shape-only ops (squeeze, flatten): reshape the gradient back to the input's shape."""
    rest = [no_grad(arg) for arg in call.args[1:]]
    return [R.reshape(grad, call.args[0].ty.shape), *rest]


def _adaptive_avg_pool2d(var, call, grad, ctx):
    """Adaptive average pooling whose output divides the input: an average pool of fixed size."""
    x = call.args[0]
    if call.attrs.layout != "NCHW":
        raise ValueError("gradient of adaptive_avg_pool2d: only NCHW layout is supported")
    _, _, in_h, in_w = _shape(x)
    _, _, out_h, out_w = _shape(var)
    if in_h % out_h or in_w % out_w:
        raise ValueError(
            f"gradient of adaptive_avg_pool2d: output {out_h}x{out_w} does not divide input "
            f"{in_h}x{in_w}; use an input size that is a multiple of the pooled size"
        )
    kernel = (in_h // out_h, in_w // out_w)
    return [avg_pool2d_backward(grad, x, kernel, kernel, (0, 0, 0, 0), (1, 1), False, True)]


def _relu(var, call, grad, ctx):
    """Pass the gradient where ``x > 0`` only. TVM's own rule also passes it at ``x == 0``, which
    differs from torch wherever an activation is exactly zero (common after ReLU + conv without
    bias: all-zero windows). Tested on the output (``relu(x) > 0`` exactly where ``x > 0``, as
    torch's threshold_backward does), so the pre-activation need not be kept."""
    x = call.args[0]
    return [R.where(R.greater(var, relax.const(0.0, x.ty.dtype)), grad, R.zeros_like(grad))]


def _rsqrt(var, call, grad, ctx):
    """d/dx x^-1/2 = -1/2 * x^-3/2 = -1/2 * y^3."""
    half = relax.const(-0.5, var.ty.dtype)
    return [R.multiply(grad, R.multiply(half, R.multiply(var, R.multiply(var, var))))]


def _leaky_relu(var, call, grad, ctx):
    x = call.args[0]
    alpha = relax.const(float(call.attrs.alpha), x.ty.dtype)
    positive = R.greater(x, relax.const(0.0, x.ty.dtype))
    return [R.where(positive, grad, R.multiply(grad, alpha))]


def _erf(var, call, grad, ctx):
    """d/dx erf(x) = 2/sqrt(pi) * exp(-x^2)."""
    x = call.args[0]
    scale = relax.const(2.0 / math.sqrt(math.pi), x.ty.dtype)
    return [R.multiply(grad, R.multiply(scale, R.exp(R.negative(R.multiply(x, x)))))]


def _pad(var, call, grad, ctx):
    """Constant padding: the gradient is the unpadded window of the output gradient."""
    if call.attrs.pad_mode != "constant":
        raise ValueError(f"gradient of pad: only constant padding is supported, got {call.attrs.pad_mode!r}")
    widths = [int(w) for w in call.attrs.pad_width]
    shape = _shape(call.args[0])
    axes = list(range(len(shape)))
    begin = widths[0::2]
    if any(w < 0 for w in widths):
        raise ValueError("gradient of pad: negative padding (cropping) is not supported")
    return [R.strided_slice(grad, axes, begin, [b + n for b, n in zip(begin, shape)])]


def _stack(var, call, grad, ctx):
    """Stacked tensors get their slice of the gradient along the new axis."""
    axis = int(call.attrs.axis)
    count = len(call.args[0].ty.fields)
    parts = R.split(grad, count, axis)
    return [relax.Tuple([R.squeeze(relax.TupleGetItem(parts, i), [axis]) for i in range(count)])]


def _avg_pool3d(var, call, grad, ctx):
    """3-D average pooling over the first spatial axis only (kernel ``(k, 1, 1)``), which is how
    exporters write LocalResponseNorm: the last two axes merge into one and the 2-D rule applies."""
    a = call.attrs
    if a.layout != "NCDHW" or [int(v) for v in a.pool_size[1:]] != [1, 1] or \
            [int(v) for v in a.strides[1:]] != [1, 1] or [int(v) for v in a.dilation] != [1, 1, 1] or \
            any(int(a.padding[i]) for i in (1, 2, 4, 5)):
        raise ValueError("gradient of avg_pool3d: only pooling over the depth axis (kernel (k, 1, 1), as in "
                         f"exported LocalResponseNorm) is supported, got kernel {list(a.pool_size)}")
    x = call.args[0]
    n, c, d, h, w = _shape(x)
    flat = lambda t, depth: R.reshape(t, (n, c, depth, h * w))  # noqa: E731
    back = avg_pool2d_backward(flat(grad, _shape(var)[2]), flat(x, d), (int(a.pool_size[0]), 1),
                               (int(a.strides[0]), 1), (int(a.padding[0]), 0, int(a.padding[3]), 0), (1, 1),
                               bool(a.ceil_mode), bool(a.count_include_pad))
    return [R.reshape(back, (n, c, d, h, w))]


def _layer_norm(var, call, grad, ctx):
    """torch ``native_layer_norm_backward``: with ``xhat = (x - mean) * rstd`` over ``axes``,
    ``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))`` where ``g = dy * gamma``;
    ``dgamma = sum(dy * xhat)`` and ``dbeta = sum(dy)`` over the other axes."""
    x, gamma, beta = call.args
    dtype = x.ty.dtype
    ndim = len(_shape(x))
    axes = sorted(int(a) % ndim for a in call.attrs.axes)
    outer = [i for i in range(ndim) if i not in axes]
    if axes != list(range(ndim - len(axes), ndim)):
        raise ValueError(f"gradient of layer_norm: only trailing normalized axes are supported, got {axes}")
    centered = R.subtract(x, R.mean(x, axes, keepdims=True))
    rstd = R.rsqrt(R.add(R.mean(R.multiply(centered, centered), axes, keepdims=True),
                         relax.const(float(call.attrs.epsilon), dtype)))
    xhat = R.multiply(centered, rstd)
    g = R.multiply(grad, gamma) if call.attrs.scale else grad
    dx = R.multiply(rstd, R.subtract(R.subtract(g, R.mean(g, axes, keepdims=True)),
                                     R.multiply(xhat, R.mean(R.multiply(g, xhat), axes, keepdims=True))))
    dgamma = R.sum(R.multiply(grad, xhat), outer) if call.attrs.scale else R.zeros_like(gamma)
    dbeta = R.sum(grad, outer) if call.attrs.center else R.zeros_like(beta)
    return [dx, dgamma, dbeta]


def _gelu(var, call, grad, ctx):
    """Exact (erf) GELU, ``x * Phi(x)``: ``d/dx = Phi(x) + x * phi(x)`` (torch ``approximate='none'``)."""
    x = call.args[0]
    c = lambda v: relax.const(v, x.ty.dtype)  # noqa: E731
    cdf = R.multiply(c(0.5), R.add(c(1.0), R.erf(R.multiply(x, c(1.0 / math.sqrt(2.0))))))
    pdf = R.multiply(c(1.0 / math.sqrt(2.0 * math.pi)), R.exp(R.multiply(c(-0.5), R.multiply(x, x))))
    return [R.multiply(grad, R.add(cdf, R.multiply(x, pdf)))]


def _gelu_tanh(var, call, grad, ctx):
    """Tanh GELU, ``0.5 x (1 + tanh(u))`` with ``u = sqrt(2/pi) (x + 0.044715 x^3)`` (torch
    ``approximate='tanh'``). With ``s = sigmoid(2u) = (1 + tanh(u)) / 2`` (no cancellation where
    ``tanh(u)`` is near -1): ``d/dx = s + 2 x s (1 - s) du/dx``."""
    x = call.args[0]
    c = lambda v: relax.const(v, x.ty.dtype)  # noqa: E731
    k = math.sqrt(2.0 / math.pi)
    x2 = R.multiply(x, x)
    s = R.sigmoid(R.multiply(c(2.0 * k), R.add(x, R.multiply(c(0.044715), R.multiply(x2, x)))))
    du = R.multiply(c(k), R.add(c(1.0), R.multiply(c(3 * 0.044715), x2)))
    slope = R.multiply(R.multiply(c(2.0), x), R.multiply(R.multiply(s, R.subtract(c(1.0), s)), du))
    return [R.multiply(grad, R.add(s, slope))]


def _quantize(var, call, grad, ctx):
    """Fake quantization's straight-through estimator (torch ``fake_quantize_per_*_affine``): the
    gradient per integer step, ``grad / scale``, where ``round(x / scale) + zero_point`` lies within
    the integer range, zero where it was clamped. The integer output's adjoint is a float tensor
    (what :func:`_dequantize` sends)."""
    x, scale, zero_point = call.args
    ndim = len(_shape(x))
    s = along_expr(scale, int(call.attrs.axis), ndim)
    z = R.astype(along_expr(zero_point, int(call.attrs.axis), ndim), x.ty.dtype)
    lo, hi = RANGES[str(call.attrs.out_dtype)]
    steps = R.add(R.round(R.divide(x, s)), z)
    inside = R.logical_and(R.greater_equal(steps, relax.const(float(lo), x.ty.dtype)),
                           R.less_equal(steps, relax.const(float(hi), x.ty.dtype)))
    return [R.where(inside, R.divide(grad, s), R.zeros_like(grad)), no_grad(scale), no_grad(zero_point)]


def _dequantize(var, call, grad, ctx):
    """``(q - zero_point) * scale``: the gradient per integer step is ``grad * scale``, a float
    tensor (only :func:`_quantize` consumes it; an integer input has no gradient of its own)."""
    q, scale, zero_point = call.args
    s = along_expr(scale, int(call.attrs.axis), len(_shape(q)))
    return [R.multiply(grad, s), no_grad(scale), no_grad(zero_point)]


def _not_differentiable(var, call, grad, ctx):
    """Boolean and integer ops (attention masks, positions): nothing flows back through them."""
    return [no_grad(arg) for arg in call.args]


def _max(var, call, grad, ctx):
    """``max`` over ``axis`` (torch ``amax``): the gradient goes to the maxima, split evenly among
    ties; a boolean ``max`` (torch ``any``) has none."""
    x = call.args[0]
    if x.ty.dtype == "bool":
        return [no_grad(x)]
    ndim = len(_shape(x))
    axes = list(range(ndim)) if call.attrs.axis is None else [int(a) % ndim for a in call.attrs.axis]
    keep = (lambda t: t) if call.attrs.keepdims else (lambda t: R.expand_dims(t, axes))  # noqa: E731
    hit = R.astype(R.equal(x, keep(var)), x.ty.dtype)
    share = R.divide(keep(grad), R.sum(hit, axes, keepdims=True))
    return [R.multiply(hit, share)]


def _take(var, call, grad, ctx):
    """TVM's ``take_backward`` handles 1-D indices only. A scalar index (``hidden[:, 0]``, the
    classification token) becomes a 1-element one; token ids of shape (batch, sequence) along
    axis 0 (an embedding lookup) are flattened together with the gradient's rows."""
    x, indices = call.args
    axis = call.attrs.axis
    index_shape = _shape(indices)
    padding = PADDING_ROWS.get().get(getattr(x, "name", None))
    if len(index_shape) == 1 and padding is None:
        return [take_backward(grad, x, indices, axis), no_grad(indices)]
    if axis is None:
        raise ValueError(f"gradient of take: indices of shape {index_shape} need an axis")
    axis = int(axis) % len(_shape(x))
    if not index_shape:
        return [take_backward(R.expand_dims(grad, [axis]), x, R.reshape(indices, (1,)), axis), no_grad(indices)]
    if axis != 0:
        raise ValueError(f"gradient of take: indices of shape {index_shape} are supported along axis 0 only, "
                         f"got axis {axis}")
    rows = math.prod(index_shape)
    flat_grad = R.reshape(grad, (rows, *_shape(x)[1:])) if len(index_shape) != 1 else grad
    flat_ids = R.reshape(indices, (rows,)) if len(index_shape) != 1 else indices
    if padding is not None:  # an embedding's padding row learns nothing from this lookup (torch)
        at_padding = R.expand_dims(R.equal(flat_ids, relax.const(padding, str(indices.ty.dtype))), [1])
        flat_grad = R.where(at_padding, R.zeros_like(flat_grad), flat_grad)
    return [take_backward(flat_grad, x, flat_ids, 0), no_grad(indices)]


# {parameter name: padding row} of the embeddings being differentiated (``padding_rows`` sets it
# around autodiff): a lookup of that row passes no gradient, while another use of the same table
# (an LM head tied to it) still does
PADDING_ROWS: contextvars.ContextVar[dict] = contextvars.ContextVar("padding_rows", default={})


@contextlib.contextmanager
def padding_rows(rows: dict[str, int]):
    """Within the block, ``take`` from these tables gives their padding row no gradient."""
    token = PADDING_ROWS.set(dict(rows))
    try:
        yield
    finally:
        PADDING_ROWS.reset(token)


def _ints(expr) -> list[int]:
    """The integers of a tuple argument (``strided_slice``'s axes, begin, end, strides)."""
    return [int(v.value) for v in expr.fields]


def _strided_slice(var, call, grad, ctx):
    """A unit-stride slice (rotary ``x[..., :d/2]``, a causal LM's ``logits[:, :-1]``): the gradient
    is the output gradient padded with zeros back to the input's shape."""
    x, axes, begin, end = call.args[:4]
    shape = _shape(x)
    strides = _ints(call.args[4]) if len(call.args) > 4 else [1] * len(axes.fields)
    if any(s != 1 for s in strides):
        raise ValueError(f"gradient of strided_slice: only unit strides are supported, got {strides}")
    widths = [0] * (2 * len(shape))
    for axis, b, e in zip(_ints(axes), _ints(begin), _ints(end)):
        axis %= len(shape)
        n = shape[axis]
        b = min(max(b + n if b < 0 else b, 0), n)
        e = min(max(e + n if e < 0 else e, b), n)
        widths[2 * axis], widths[2 * axis + 1] = b, n - e
    return [R.nn.pad(grad, widths), *[no_grad(arg) for arg in call.args[1:]]]


def _index_tensor(var, call, grad, ctx):
    """Advanced indexing; what transformers build masks with (integer or boolean data, no
    gradient). Indexing float data on the backward path is not supported."""
    data = call.args[0]
    if "float" in str(data.ty.dtype):
        raise ValueError("gradient of index_tensor: indexing float data with tensors (x[idx]) is not "
                         "supported on the backward path; use torch.gather / index_select (take)")
    return [no_grad(arg) for arg in call.args]


def _nll_loss(var, call, grad, ctx):
    """torch ``nll_loss``: ``-w[t] / norm`` at each target's class, where a target equal to
    ``ignore_index`` counts nowhere (``norm`` is the summed weight of the counted targets for
    ``mean``). TVM's rule handles a non-negative ``ignore_index`` only: with -100 (a causal LM's
    padding) it counted padded positions and read ``w[-100]``."""
    pred, target = call.args[:2]
    weights = call.args[2] if len(call.args) > 2 else None
    dtype, reduction = pred.ty.dtype, call.attrs.reduction
    classes = _shape(pred)[1 if len(_shape(pred)) > 1 else 0]
    valid = R.not_equal(target, relax.const(int(call.attrs.ignore_index), target.ty.dtype))
    safe = R.where(valid, target, R.zeros_like(target))
    weight = R.astype(valid, dtype)
    if weights is not None:
        weight = R.multiply(weight, R.take(weights, safe, axis=0))
    if reduction == "none":
        coef = R.multiply(R.negative(grad), weight)
    else:
        scale = R.negative(grad) if reduction == "sum" else R.divide(R.negative(grad), R.sum(weight))
        coef = R.multiply(scale, weight)
    axis = 1 if len(_shape(pred)) > 1 else 0
    class_ids = R.reshape(R.arange(0, classes, 1, target.ty.dtype),
                          [classes if i == axis else 1 for i in range(len(_shape(pred)))])
    hit = R.astype(R.equal(R.expand_dims(safe, [axis]), class_ids), dtype)
    rest = [no_grad(target)] + ([no_grad(weights)] if weights is not None else [])
    return [R.multiply(hit, R.expand_dims(coef, [axis])), *rest]

def _conv2d(var, call, grad, ctx):
    """NCHW/OIHW conv2d, any stride, dilation, asymmetric padding and groups. TVM's rule sizes the
    input gradient with the window's extent undilated, so a dilated conv asked its transposed conv
    for an output padding >= the stride and failed to build.

    Input gradient: the transposed conv (same strides, padding, dilation, groups) covers the rows up
    to the last window's end, and pads up to ``stride - 1`` more rows itself (a stride that does
    not divide the padded size); rows beyond that, which no window read, get zeros. Weight
    gradient: a conv of the activations (channels as batch) with the output gradient as its
    kernel, strides and dilation swapped, cut to the window where the last window overhangs."""
    a = call.attrs
    if (a.data_layout, a.kernel_layout, a.out_layout) != ("NCHW", "OIHW", "NCHW"):
        raise ValueError(f"gradient of conv2d: only NCHW data and OIHW kernels are supported, got "
                         f"{a.data_layout}/{a.kernel_layout}; import the model in NCHW")
    x, w = call.args
    batch, channels, in_h, in_w = _shape(x)
    out_channels, _, k_h, k_w = _shape(w)
    _, _, g_h, g_w = _shape(var)
    top, left, bottom, right = (int(p) for p in a.padding)
    s_h, s_w = (int(v) for v in a.strides)
    d_h, d_w = (int(v) for v in a.dilation)
    groups = int(a.groups)
    extra_h = in_h - ((g_h - 1) * s_h - top - bottom + d_h * (k_h - 1) + 1)
    extra_w = in_w - ((g_w - 1) * s_w - left - right + d_w * (k_w - 1) + 1)
    out_pad = (min(extra_h, s_h - 1), min(extra_w, s_w - 1))
    dx = R.nn.conv2d_transpose(grad, w, a.strides, a.padding, out_pad, a.dilation, groups, "NCHW", "IOHW", "NCHW",
                               a.out_dtype)
    if extra_h > out_pad[0] or extra_w > out_pad[1]:
        dx = R.nn.pad(dx, [0, 0, 0, 0, 0, extra_h - out_pad[0], 0, extra_w - out_pad[1]])
    data = x
    if groups != 1:  # (groups x batch) as the channels of a grouped conv over the input's channels
        data = R.reshape(x, (batch, groups, channels // groups, in_h, in_w))
        data = R.reshape(R.permute_dims(data, [1, 0, 2, 3, 4]), (groups * batch, channels // groups, in_h, in_w))
    dw = R.nn.conv2d(data, grad, strides=a.dilation, padding=a.padding, dilation=a.strides, groups=groups,
                     data_layout="CNHW", kernel_layout="IOHW", out_layout="CNHW", out_dtype=a.out_dtype)
    dw_h = (in_h + top + bottom - (g_h - 1) * s_h - 1) // d_h + 1
    dw_w = (in_w + left + right - (g_w - 1) * s_w - 1) // d_w + 1
    if dw_h > k_h or dw_w > k_w:
        dw = R.strided_slice(dw, [0, 1, 2, 3], [0, 0, 0, 0], [out_channels, channels // groups, k_h, k_w])
    return [dx, dw]

def _gather_elements(var, call, grad, ctx):
    """``out[i][j] = data[i][idx[i][j]]`` along ``axis`` (torch ``gather``; how torch.export writes
    ``F.cross_entropy`` on flattened logits): the gradient adds each output's gradient into the
    element it read (indices that repeat accumulate)."""
    data, indices = call.args
    return [R.scatter_elements(R.zeros_like(data), indices, grad, int(call.attrs.axis), "add"), no_grad(indices)]


def _gather_nd(var, call, grad, ctx):
    """``gather_nd``: the gradient adds each gathered slice's gradient back where it was read."""
    data, indices = call.args
    if int(call.attrs.batch_dims) != 0:
        raise ValueError("gradient of gather_nd: batch_dims other than 0 is not supported; "
                         "freeze the layers below it")
    return [R.scatter_nd(R.zeros_like(data), indices, grad, "add"), no_grad(indices)]


def _scatter_elements(var, call, grad, ctx):
    """``scatter_elements(data, idx, updates)``: with ``update``, the scattered positions take
    ``updates`` (no gradient to ``data`` there); with ``add``, ``data`` passes the gradient
    everywhere. ``updates`` gets the gradient at the positions it went to."""
    data, indices, updates = call.args
    axis, reduction = int(call.attrs.axis), str(call.attrs.reduction)
    if reduction not in ("update", "add"):
        raise ValueError(f"gradient of scatter_elements: reduction '{reduction}' is not supported; "
                         "freeze the layers below it")
    d_updates = R.gather_elements(grad, indices, axis)
    if reduction == "add":
        return [grad, no_grad(indices), d_updates]
    hit = R.scatter_elements(R.zeros_like(data), indices, R.ones_like(updates), axis, "update")
    return [R.multiply(grad, R.subtract(R.ones_like(hit), hit)), no_grad(indices), d_updates]

def _max_pool2d(var, call, grad, ctx):
    """NCHW max pooling (any window, stride, padding, ceil mode; no dilation). TVM's rule returned
    memory it never wrote for some shapes (a 2x2 window over a 2x2 map, windows that leave the last
    rows uncovered), so GoogLeNet's branches trained on garbage.

    Each output's gradient goes to the first maximum of its window in row-major order (torch's
    choice on ties): the strided views of the padded input at the window's offsets, stacked, give
    the offset by ``argmax`` (its first index); the gradients, one channel per offset, are placed
    back by a transposed conv with a one-hot kernel per offset (col2im)."""
    a = call.attrs
    if a.layout != "NCHW" or any(int(d) != 1 for d in a.dilation):
        raise ValueError("gradient of max_pool2d: only NCHW pooling without dilation is supported; "
                         "freeze the layers below it")
    x = call.args[0]
    batch, channels, in_h, in_w = _shape(x)
    _, _, out_h, out_w = _shape(var)
    (k_h, k_w), (s_h, s_w) = (int(v) for v in a.pool_size), (int(v) for v in a.strides)
    top, left = int(a.padding[0]), int(a.padding[1])
    span_h, span_w = (out_h - 1) * s_h + k_h, (out_w - 1) * s_w + k_w  # rows the windows cover, padded
    below, right = span_h - top - in_h, span_w - left - in_w  # < 0: the windows stop before the end
    dtype = str(x.ty.dtype)
    padded = R.nn.pad(x, [0, 0, 0, 0, top, max(below, 0), left, max(right, 0)], pad_value=float("-inf")) \
        if top or left or below > 0 or right > 0 else x
    windows = [R.strided_slice(padded, [2, 3], [i, j], [i + (out_h - 1) * s_h + 1, j + (out_w - 1) * s_w + 1],
                               [s_h, s_w]) for i in range(k_h) for j in range(k_w)]
    first = R.argmax(R.stack(relax.Tuple(windows), axis=2), axis=2, keepdims=True)  # ties: the first offset
    offsets = relax.const(np.arange(k_h * k_w, dtype="int64").reshape(1, 1, -1, 1, 1))
    hit = R.equal(R.astype(first, "int64"), offsets)  # (batch, channels, k_h * k_w, out_h, out_w)
    parts = R.where(hit, R.expand_dims(grad, 2), relax.const(0.0, dtype))
    stacked = R.reshape(parts, (batch, channels * k_h * k_w, out_h, out_w))
    one_hot = np.zeros((channels * k_h * k_w, 1, k_h, k_w), dtype)
    for c in range(channels):
        for i in range(k_h):
            for j in range(k_w):
                one_hot[(c * k_h + i) * k_w + j, 0, i, j] = 1.0
    placed = R.nn.conv2d_transpose(stacked, relax.const(one_hot), (s_h, s_w), (0, 0, 0, 0), (0, 0), (1, 1),
                                   channels, "NCHW", "IOHW", "NCHW")  # (batch, channels, span_h, span_w)
    keep_h, keep_w = min(in_h, span_h - top), min(in_w, span_w - left)
    dx = R.strided_slice(placed, [2, 3], [top, left], [top + keep_h, left + keep_w])
    if keep_h < in_h or keep_w < in_w:  # rows no window reads
        dx = R.nn.pad(dx, [0, 0, 0, 0, 0, in_h - keep_h, 0, in_w - keep_w])
    return [dx]


# op name -> rule. Installed where TVM has no rule of its own.
GRADIENT_RULES = {
    "relax.clip": _clip,
    "relax.squeeze": _to_input_shape,
    "relax.flatten": _to_input_shape,
    "relax.nn.adaptive_avg_pool2d": _adaptive_avg_pool2d,
    "relax.rsqrt": _rsqrt,
    "relax.nn.leakyrelu": _leaky_relu,
    "relax.erf": _erf,
    "relax.nn.pad": _pad,
    "relax.stack": _stack,
    "relax.nn.avg_pool3d": _avg_pool3d,
    "relax.nn.layer_norm": _layer_norm,
    "relax.nn.gelu": _gelu,
    "relax.nn.gelu_tanh": _gelu_tanh,
    "relax.max": _max,
    "relax.logical_not": _not_differentiable,
    "relax.bitwise_and": _not_differentiable,
    "relax.arange": _not_differentiable,
    "relax.strided_slice": _strided_slice,
    "relax.quantize": _quantize,
    "relax.dequantize": _dequantize,
    "relax.index_tensor": _index_tensor,
    "relax.gather_elements": _gather_elements,
    "relax.gather_nd": _gather_nd,
    "relax.scatter_elements": _scatter_elements,
}

# op name -> rule. Replaces TVM's rule, which disagrees with PyTorch.
GRADIENT_OVERRIDES = {
    "relax.nn.conv2d": _conv2d,
    "relax.nn.max_pool2d": _max_pool2d,
    "relax.nn.relu": _relu,
    "relax.take": _take,
    "relax.nn.nll_loss": _nll_loss,
}


def has_gradient_rule(op_name: str) -> bool:
    return tvm.ir.Op.get(op_name).get_attr("FPrimalGradient") is not None


_OVERRIDE_LEVEL = 11  # above TVM's default level 10
_depth = 0  # nesting of gradient_rules_installed()
_saved: dict[str, object] = {}  # TVM's own rule of each op we override (None: it had none)


@contextlib.contextmanager
def gradient_rules_installed():
    """Within the block, TVM's autodiff uses the rules of :data:`GRADIENT_RULES` (ops TVM has no
    rule for) and :data:`GRADIENT_OVERRIDES` (ops whose TVM rule we replace); on leaving, every op
    has TVM's own rule again. Rules are process-wide op attributes in TVM, so they are installed
    only while pock_tvm differentiates: importing pock_tvm changes nothing for other code. Nests."""
    global _depth
    if _depth == 0:
        for name, rule in [*GRADIENT_RULES.items(), *GRADIENT_OVERRIDES.items()]:
            op = tvm.ir.Op.get(name)
            _saved[name] = op.get_attr("FPrimalGradient") if op.has_attr("FPrimalGradient") else None
            if name in GRADIENT_OVERRIDES or _saved[name] is None:
                relax.op.register_gradient(name, rule, level=_OVERRIDE_LEVEL)
            else:
                _saved.pop(name)  # TVM has a rule for it now: keep TVM's
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            for name, original in _saved.items():
                op = tvm.ir.Op.get(name)
                op.reset_attr("FPrimalGradient")
                if original is not None:
                    op.set_attr("FPrimalGradient", original, 10)
            _saved.clear()
