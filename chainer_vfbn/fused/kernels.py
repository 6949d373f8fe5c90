"""The array work of the fused residual unit (:mod:`chainer_vfbn.fused.unit`).

On the CPU each function computes Chainer 7.8.1's NumPy operations, on arrays of the
same memory layout, so that the fused unit is bit-identical to the composed links
(tested): the convolution is ``Convolution2DFunction``'s im2col + tensordot, its
input gradient ``Deconvolution2DFunction``'s tensordot + col2im, its weight gradient
``Convolution2DGradW``'s; batch normalisation is ``GeneralBatchNormalizationImpl``
(batch statistics, running mean and variance updated in place with the unbiased
variance); ReLU is ``ReLU`` and ``ReLUGrad2``; the shortcut is ``AveragePooling2D``,
``Concat``, the grad ``Add`` and their gradients. "The same layout" is part of the
contract: NumPy's reductions and BLAS sum in an order that follows the memory
layout, and NumPy computes ``a + b`` into ``a`` when ``a`` is a nameless temporary
of 256 KiB or more, so an expression is written here with the same named operands
as Chainer's. Three pieces do the same arithmetic in fewer NumPy calls, which is
what a step costs on the CPU: :func:`im2col_cpu` (copies only), :func:`col2im_cpu`
(the same additions in the same order) and :func:`_dot_cpu` (``tensordot``'s own
transposes and ``dot``); on a GPU Chainer's im2col and col2im are one kernel each
already, so these gains are the CPU's alone.

On a GPU the convolutions run Chainer's cuDNN-free CuPy code (im2col, tensordot,
col2im), and each elementwise chain is ONE CuPy kernel: BN's normalise-scale-shift
with the ReLU; with the shortcut add as well; the backward's ReLU mask inside BN's
gradient sums and its input gradient; the shortcut's masked gradient added in place.
"""
import math

import numpy

from chainer.backends import cuda
from chainer.utils import conv

#: Broadcasts a per-channel vector (C,) against maps (N, C, H, W).
_E = (None, slice(None), None, None)
_AXIS = (0, 2, 3)       # BN's statistics: over the batch and the positions


def _is_cpu(a):
    return isinstance(a, numpy.ndarray)


# ---------------------------------------------------------------------------
# Convolution 3x3, padding 1, no bias.

def im2col_cpu(x, k, stride, pad):
    """``conv.im2col_cpu(x, k, k, stride, stride, pad, pad)``: the same values in the
    same C-contiguous ``(n, c, k, k, out_h, out_w)`` array, copied by two NumPy
    operations (a zero-padded copy, then every window at once through a strided
    view) where Chainer's makes ``numpy.pad``'s dozen and ``k * k`` slice copies.
    Copies are exact, so the columns, and all that is computed from them, are
    Chainer's bit for bit."""
    n, c, h, w = x.shape
    out_h, out_w = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    img = numpy.zeros((n, c, h + 2 * pad, w + 2 * pad), dtype=x.dtype)
    img[:, :, pad:pad + h, pad:pad + w] = x
    sn, sc, sh, sw = img.strides
    windows = numpy.ndarray((n, c, k, k, out_h, out_w), x.dtype, img, 0,
                            (sn, sc, sh, sw, sh * stride, sw * stride))
    return windows.copy()


#: The largest col2im output (elements) that :func:`col2im_cpu` gathers; measured on a
#: 2-core AMD EPYC, the gather is 0.45-0.9x Chainer's time up to 2**15 elements and
#: 1.05x at 2**17, 3.7x at 2**19.
GATHER_MAX = 1 << 15


def col2im_cpu(col, stride, pad, h, w):
    """``conv.col2im_cpu(col, stride, stride, pad, pad, h, w)``: every pixel's sum of
    the window entries that cover it, in Chainer's order. Chainer adds the ``k * k``
    shifted slices one by one into zeros; with stride 1 each pixel's terms are here
    gathered at once, through a strided view of the zero-padded columns, into a
    ``(k * k, ...)`` array whose first axis NumPy then reduces in order,
    ``((t_00 + t_01) + t_02) + ...``: the same additions, absent terms being exact
    zeros (``+0.0`` for Chainer's ``0.0 + t_00``: the same values). Four NumPy
    operations where Chainer makes ``k * k + 2``, for the small maps of a host-bound
    step; on larger ones (more than :data:`GATHER_MAX` output elements) the gather's
    ``k * k``-fold temporary leaves the cache and Chainer's in-place adds are faster
    (3.7x at 128 x 16 x 26 x 26), so they run. Other strides: Chainer's."""
    n, c, k, _, out_h, out_w = col.shape
    if stride != 1 or n * c * h * w > GATHER_MAX:
        return conv.col2im_cpu(col, stride, stride, pad, pad, h, w)
    # Pixel (y, x) gets col[..., j, i, y + pad - j, x + pad - i] where in range:
    # index the columns padded by q = k - 1 - pad before and by k - 1 after.
    q = k - 1 - pad
    padded = numpy.zeros((n, c, k, k, out_h + q + k - 1, out_w + q + k - 1), col.dtype)
    padded[:, :, :, :, q:q + out_h, q:q + out_w] = col
    sn, sc, sj, si, sy, sx = padded.strides
    terms = numpy.ndarray((k, k, n, c, h, w), col.dtype, padded,
                          (q + pad) * (sy + sx), (sj - sy, si - sx, sn, sc, sy, sx))
    return numpy.add.reduce(terms.reshape(k * k, n, c, h, w), axis=0)


def _dot_cpu(a, b, perm_a, perm_b, k):
    """``numpy.tensordot`` of ``a`` and ``b`` with the axes to sum already moved by
    ``perm_a`` to ``a``'s last ``k`` and by ``perm_b`` to ``b``'s first ``k``: NumPy's
    own transposes, reshapes and ``dot``, so the same BLAS call on arrays of the same
    layout (bit-identical), without its argument checks in Python."""
    at, bt = a.transpose(perm_a), b.transpose(perm_b)
    free_a, free_b = at.shape[:at.ndim - k], bt.shape[k:]
    summed = math.prod(at.shape[at.ndim - k:])
    res = numpy.dot(at.reshape(math.prod(free_a), summed),
                    bt.reshape(summed, math.prod(free_b)))
    return res.reshape(free_a + free_b)


def conv3x3(x, W, stride):
    """``conv(x, W)``, as ``Convolution2DFunction._forward_{cpu,gpu}_core``."""
    if _is_cpu(x):      # tensordot(col, W, ((1, 2, 3), (1, 2, 3)))
        y = _dot_cpu(im2col_cpu(x, 3, stride, 1), W, (0, 4, 5, 1, 2, 3), (1, 2, 3, 0), 3)
        return numpy.rollaxis(y.astype(x.dtype, copy=False), 3, 1)
    col = conv.im2col_gpu(x, 3, 3, stride, stride, 1, 1)
    y = cuda.cupy.tensordot(col, W, ((1, 2, 3), (1, 2, 3))).astype(x.dtype, copy=False)
    return cuda.cupy.rollaxis(y, 3, 1)


def conv3x3_grad_x(gy, W, stride, size):
    """d conv / d x applied to ``gy``: ``Deconvolution2DFunction``'s core with
    ``outsize=size``."""
    if _is_cpu(gy):     # tensordot(W, gy, (0, 1))
        gcol = _dot_cpu(W, gy, (1, 2, 3, 0), (1, 0, 2, 3), 1).astype(gy.dtype, copy=False)
        return col2im_cpu(numpy.rollaxis(gcol, 3), stride, 1, *size)
    gcol = cuda.cupy.tensordot(W, gy, (0, 1)).astype(gy.dtype, copy=False)
    gcol = cuda.cupy.rollaxis(gcol, 3)
    return conv.col2im_gpu(gcol, stride, stride, 1, 1, size[0], size[1])


def conv3x3_grad_W(x, gy, stride):
    """d conv / d W applied to ``gy``: ``Convolution2DGradW``'s core."""
    if _is_cpu(x):      # tensordot(gy, col, ((0, 2, 3), (0, 4, 5)))
        if not (gy.flags.c_contiguous or gy.flags.f_contiguous) and 1 in gy.shape:
            gy = numpy.ascontiguousarray(gy)      # as Chainer (its issue 2744)
        gW = _dot_cpu(gy, im2col_cpu(x, 3, stride, 1), (1, 0, 2, 3), (0, 4, 5, 1, 2, 3), 3)
        return gW.astype(x.dtype, copy=False)
    col = conv.im2col_gpu(x, 3, 3, stride, stride, 1, 1)
    return cuda.cupy.tensordot(gy, col, ((0, 2, 3), (0, 4, 5))).astype(x.dtype, copy=False)


# ---------------------------------------------------------------------------
# Batch normalisation with batch statistics, and what follows it.

def _bn_stats_cpu(x, gamma, running):
    """Batch mean, variance and 1 / sqrt(var + eps); the running statistics updated
    (``GeneralBatchNormalizationImpl.forward``)."""
    running_mean, running_var, decay, eps = running
    interm = numpy.promote_types(x.dtype, gamma.dtype)
    mean = x.mean(axis=_AXIS, dtype=interm)
    var = x.var(axis=_AXIS, dtype=interm)
    inv_std = numpy.reciprocal(numpy.sqrt(var + eps, dtype=interm))
    m = x.size // gamma.size
    adjust = m / max(m - 1., 1.)                # unbiased estimation
    running_mean *= decay
    running_mean += (1 - decay) * mean
    running_var *= decay
    running_var += (1 - decay) * adjust * var
    return mean, inv_std


def _bn_cpu(x, gamma, beta, mean, inv_std):
    interm = numpy.promote_types(x.dtype, gamma.dtype)
    x_hat = x - mean[_E]
    x_hat *= inv_std[_E]
    y = x_hat * gamma[_E].astype(interm, copy=False)
    y += beta[_E].astype(interm, copy=False)
    return y.astype(x.dtype)


def _bn_stats_gpu(x, running):
    running_mean, running_var, decay, eps = running
    m = x.size // x.shape[1]
    inv_m = x.dtype.type(1. / m)
    mean = cuda.reduce(
        'T x, T inv_m', 'T mean', 'x', 'a + b', 'mean = a * inv_m', '0',
        'vfbn_unit_bn_mean')(x, inv_m, axis=_AXIS)
    var = cuda.reduce(
        'T x, T mean, T inv_m', 'T var', '(x - mean) * (x - mean)', 'a + b',
        'var = a * inv_m', '0', 'vfbn_unit_bn_var')(x, mean[_E], inv_m, axis=_AXIS)
    inv_std = cuda.cupy.empty_like(var)
    cuda.elementwise(
        'T mean, T var, T eps, T decay, T adjust', 'T inv_std, T r_mean, T r_var',
        '''inv_std = rsqrt(var + eps);
           r_mean = r_mean * decay + mean * (1 - decay);
           r_var = r_var * decay + var * (1 - decay) * adjust;''',
        'vfbn_unit_bn_running')(mean, var, eps, decay, m / max(m - 1., 1.),
                                inv_std, running_mean, running_var)
    return mean, inv_std


def bn_relu(x, gamma, beta, running):
    """``relu(bn(x))`` with batch statistics: ``(y, mean, inv_std)``."""
    if _is_cpu(x):
        mean, inv_std = _bn_stats_cpu(x, gamma, running)
        b = _bn_cpu(x, gamma, beta, mean, inv_std)
        return numpy.maximum(b, 0, dtype=b.dtype), mean, inv_std
    mean, inv_std = _bn_stats_gpu(x, running)
    y = cuda.elementwise(
        'T x, T mean, T inv_std, T gamma, T beta', 'T y',
        'T v = gamma * (x - mean) * inv_std + beta; y = v < (T)0 ? (T)0 : v;',
        'vfbn_unit_bn_relu')(x, mean[_E], inv_std[_E], gamma[_E], beta[_E])
    return y, mean, inv_std


def bn_add_relu(x, gamma, beta, running, s):
    """``relu(bn(x) + s)`` with batch statistics: ``(y, mean, inv_std)``."""
    if _is_cpu(x):
        mean, inv_std = _bn_stats_cpu(x, gamma, running)
        b = _bn_cpu(x, gamma, beta, mean, inv_std)
        a = b + s   # not into b in place (NumPy does that to a nameless temporary)
        return numpy.maximum(a, 0, dtype=a.dtype), mean, inv_std
    mean, inv_std = _bn_stats_gpu(x, running)
    y = cuda.elementwise(
        'T x, T mean, T inv_std, T gamma, T beta, T s', 'T y',
        'T v = gamma * (x - mean) * inv_std + beta + s; y = v < (T)0 ? (T)0 : v;',
        'vfbn_unit_bn_add_relu')(x, mean[_E], inv_std[_E], gamma[_E], beta[_E], s)
    return y, mean, inv_std


def relu_bn_grad(gy, y, x, gamma, mean, inv_std):
    """The gradient through ``y = relu(bn(x) ...)`` to bn's input, gamma and beta:
    ``(g, gx, ggamma, gbeta)``, ``g = gy * (y > 0)`` being the gradient after the
    ReLU (None on a GPU, where it lives only inside the kernels)."""
    if _is_cpu(gy):
        g = gy * (y > 0)                                        # ReLUGrad2
        g = g if g.dtype == gy.dtype else g.astype(gy.dtype)
        x_hat = x - mean[_E]
        x_hat *= inv_std[_E]
        gbeta = g.sum(axis=_AXIS, dtype=gamma.dtype)
        ggamma = (g * x_hat).sum(axis=_AXIS, dtype=gamma.dtype)
        inv_m = gamma.dtype.type(1. / (x.size // gamma.size))
        gx = (gamma * inv_std)[_E] * (g - (x_hat * ggamma[_E] + gbeta[_E]) * inv_m)
        return g, gx.astype(x.dtype, copy=False), ggamma, gbeta
    args = (gy, y, x, mean[_E], inv_std[_E])
    gbeta = cuda.reduce(
        'T gy, T y, T x, T mean, T inv_std', 'T gbeta', 'y > 0 ? gy : (T)0',
        'a + b', 'gbeta = a', '0', 'vfbn_unit_relu_bn_gbeta')(*args, axis=_AXIS)
    ggamma = cuda.reduce(
        'T gy, T y, T x, T mean, T inv_std', 'T ggamma',
        'y > 0 ? gy * ((x - mean) * inv_std) : (T)0',
        'a + b', 'ggamma = a', '0', 'vfbn_unit_relu_bn_ggamma')(*args, axis=_AXIS)
    inv_m = x.dtype.type(1. / (x.size // gamma.size))
    gx = cuda.elementwise(
        'T gy, T y, T x, T mean, T inv_std, T gamma, T ggamma, T gbeta, T inv_m',
        'T gx',
        '''T g = y > 0 ? gy : (T)0;
           T x_hat = (x - mean) * inv_std;
           gx = (gamma * inv_std) * (g - (x_hat * ggamma + gbeta) * inv_m);''',
        'vfbn_unit_relu_bn_gx')(*args, gamma[_E], ggamma[_E], gbeta[_E], inv_m)
    return None, gx, ggamma, gbeta


# ---------------------------------------------------------------------------
# The parameter-free shortcut: 1x1 average pooling of stride 2, zero channels.

def shortcut(x, out_ch, stride):
    """:func:`chainer_vfbn.model.shortcut` on arrays."""
    cpu = _is_cpu(x)
    xp = numpy if cpu else cuda.cupy
    s = x
    if stride != 1:
        if cpu:     # AveragePooling2D.forward_cpu: the mean of one value, itself
            s = numpy.ascontiguousarray(x[:, :, ::stride, ::stride])
        else:       # a view; the kernel that adds it reads it in place
            s = x[:, :, ::stride, ::stride]
    pad = out_ch - s.shape[1]
    if pad > 0:
        zeros = xp.zeros((s.shape[0], pad) + s.shape[2:], dtype=s.dtype)
        s = xp.concatenate((s, zeros), axis=1)
    return s


def add_shortcut_grad(gx, g, gy, y, x_shape, stride):
    """The input gradient: the convolution's ``gx`` plus the shortcut's, the
    gradient ``g = gy * (y > 0)`` at the unit's output taken back through the
    zero channels and the subsampling."""
    c_in, (h, w) = x_shape[1], x_shape[2:]
    if _is_cpu(gx):
        gs = g[:, :c_in] if g.shape[1] > c_in else g    # Concat's split_axis
        if stride != 1:     # AveragePooling2DGrad: col2im of a 1x1 window, / 1
            sub = gs
            gs = numpy.zeros((gs.shape[0], c_in, h, w), dtype=gs.dtype)
            gs[:, :, ::stride, ::stride] += sub
        return gs + gx          # the grad Add, the shortcut's gradient arriving first
    cuda.elementwise(
        'T gy, T y', 'T gx', 'gx += y > 0 ? gy : (T)0',
        'vfbn_unit_shortcut_grad')(gy[:, :c_in], y[:, :c_in],
                                   gx[:, :, ::stride, ::stride])
    return gx
