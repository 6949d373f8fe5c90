"""v_f's residual unit differentiable twice, in three nodes (VFBN's eq. 3).

VFBN differentiates v_f twice: ``delta_hat = d CE(v_f(h)) / dh`` keeps its graph
(eq. 6), and eq. 3 backprops through it to v_f's parameters. Composed, one residual
unit costs 7 applications forward, 7 for its first derivative and about 25 for the
second (even with :mod:`chainer_vfbn.fused.batchnorm`). Here a unit of v_f's kind
(:class:`chainer_vfbn.model.ResidualUnit` with stride 1 and as many channels out as
in, so that its shortcut is the identity) is

* :class:`UnitFunction`, one node: ``y = relu(z)``, ``z = b2 + x``,
  ``b_k = BN_k(a_k)`` (batch statistics; the links' running statistics updated as
  Chainer does), ``a1 = conv(x, W1)``, ``r1 = relu(b1)``, ``a2 = conv(r1, W2)``;
* :class:`UnitGrad`, one node, its first derivative: for ``gy = dL/dy``, with the
  masks ``m2 = [z > 0]`` and ``m1 = [r1 > 0]``::

      g_z = gy m2;  (g_a2, g_gamma2, g_beta2) = BN2'(a2; g_z)
      g_r1 = deconv(g_a2, W2);  g_W2 = gradW(r1, g_a2);  g_b1 = g_r1 m1
      (g_a1, g_gamma1, g_beta1) = BN1'(a1; g_b1)
      g_x = deconv(g_a1, W1) + g_z;  g_W1 = gradW(x, g_a1)

* :class:`UnitGradGrad`, one node, its second derivative: the gradients ``G_.`` of
  a loss w.r.t. :class:`UnitGrad`'s outputs, taken back to its inputs by reverse
  mode through the lines above. Each line's adjoint: ``deconv`` and ``gradW`` are
  bilinear, so their adjoints are ``conv``, ``deconv`` and ``gradW`` again; BN''s is
  :func:`chainer_vfbn.fused.batchnorm.double_grad`; the masks have zero derivative,
  so ``beta2`` and the shortcut get nothing from it. A third derivative is refused.

The first derivative depends on the inputs also through the forward's
intermediates ``a1``, ``r1`` and ``a2``. They are outputs of :class:`UnitFunction`
and inputs of :class:`UnitGrad`, so eq. 3's gradients w.r.t. them meet the
gradients of the forward pass at ``a1``, ``r1`` and ``a2``, exactly where they meet
in the composed graph, and :class:`UnitFunction`'s backward takes the sums on from
there. With Chainer's own array operations (its im2col / tensordot / col2im
convolution, its batch-normalisation forward and backward, ReLU's ``maximum`` and
mask) every sum then has the composed graph's terms (two at most in eq. 3; two
terms add the same in either order), and the results are the composed unit's bit
for bit on the CPU, float32 and float64: forward, running statistics, first and
second derivatives (tested). On a GPU the composed unit uses cuDNN; this does not.
"""
import chainer
from chainer import backend
from chainer import function_node
from chainer.functions.normalization import batch_normalization as chainer_bn

from chainer_vfbn.fused import batchnorm, kernels

_AXIS, _EXPAND = (0, 2, 3), (None, slice(None), None, None)
_BN = chainer_bn.GeneralBatchNormalizationImpl()


# -- the convolutions: 3x3, stride 1, padding 1, the network unit's array work ------

def conv(x, W):
    """``Convolution2DFunction`` forward (no bias)."""
    return kernels.conv3x3(x, W, 1)


def deconv(gy, W):
    """``Deconvolution2DFunction`` forward (no bias): the gradient of ``conv``
    w.r.t. its input."""
    return kernels.conv3x3_grad_x(gy, W, 1, gy.shape[2:])


def grad_w(x, gy):
    """``Convolution2DGradW`` forward: the gradient of ``conv`` w.r.t. ``W``."""
    return kernels.conv3x3_grad_W(x, gy, 1)


def _bn_grad(a, gamma, gy, stats):
    mean, inv_std = stats
    xp = backend.get_array_module(a)
    ga, _, ggamma, gbeta = _BN.backward(_AXIS, gamma, gy, a, None, xp, _EXPAND, mean,
                                        inv_std, None, None, None)
    return ga, ggamma, gbeta


def _add(a, b):
    return b if a is None else a if b is None else a + b


# -- the three nodes ---------------------------------------------------------------

class UnitFunction(function_node.FunctionNode):
    """The unit's forward pass: inputs ``(x, W1, gamma1, beta1, W2, gamma2, beta2)``,
    outputs ``(y, a1, r1, a2)``. The intermediates are outputs so that gradients
    meet where they meet in the composed graph (the module docstring)."""

    def __init__(self, bn1, bn2):
        self.bn = (bn1, bn2)

    def forward(self, inputs):
        self.retain_inputs((0, 1, 2, 4, 5))
        self.retain_outputs((1, 2, 3))
        x, W1, gamma1, beta1, W2, gamma2, beta2 = inputs
        xp = backend.get_array_module(x)
        a1 = conv(x, W1)
        b1, self.stats1 = self._bn(0, a1, gamma1, beta1, xp)
        r1 = xp.maximum(b1, 0, dtype=b1.dtype)
        a2 = conv(r1, W2)
        b2, self.stats2 = self._bn(1, a2, gamma2, beta2, xp)
        y = xp.maximum(b2 + x, 0, dtype=x.dtype)
        self.m2 = y > 0
        return y, a1, r1, a2

    def _bn(self, k, a, gamma, beta, xp):
        link = self.bn[k]
        out = _BN.forward(_AXIS, gamma, a, None, xp, _EXPAND, beta, link.eps, link.decay,
                          link.avg_mean, link.avg_var)
        y, _, _, _, mean, _, inv_std, _ = out
        return y, (mean, inv_std)

    def backward(self, indexes, grad_outputs):
        x, W1, gamma1, W2, gamma2 = self.get_retained_inputs()
        a1, r1, a2 = self.get_retained_outputs()
        gy, ext = grad_outputs[0], grad_outputs[1:]
        if gy is None:
            gy = x.xp.zeros(x.shape, x.dtype)
        node = UnitGrad(self, tuple(g is not None for g in ext))
        gx, gW1, ggamma1, gbeta1, gW2, ggamma2, gbeta2 = node.apply(
            (x, W1, gamma1, W2, gamma2, a1, r1, a2, gy) + tuple(g for g in ext if g is not None))
        return gx, gW1, ggamma1, gbeta1, gW2, ggamma2, gbeta2


class UnitGrad(function_node.FunctionNode):
    """The first derivative: inputs ``(x, W1, gamma1, W2, gamma2, a1, r1, a2, gy)``
    and the given ones of the gradients w.r.t. ``a1``, ``r1``, ``a2`` (eq. 3's, met
    there as in the composed graph); outputs the gradients w.r.t. the seven inputs of
    :class:`UnitFunction`."""

    def __init__(self, unit, ext):
        self.unit, self.ext = unit, ext

    def forward(self, inputs):
        self.retain_inputs(tuple(range(9)))
        x, W1, gamma1, W2, gamma2, a1, r1, a2, gy = inputs[:9]
        it = iter(inputs[9:])
        ext_a1, ext_r1, ext_a2 = [next(it) if e else None for e in self.ext]
        u = self.unit
        self.gz = (gy * u.m2).astype(gy.dtype, copy=False)
        self.ga2, self.ggamma2, gbeta2 = _bn_grad(a2, gamma2, self.gz, u.stats2)
        ga2 = _add(self.ga2, ext_a2)
        gW2 = grad_w(r1, ga2)
        self.gb1 = (_add(deconv(ga2, W2), ext_r1) * (r1 > 0)).astype(gy.dtype, copy=False)
        self.ga1, self.ggamma1, gbeta1 = _bn_grad(a1, gamma1, self.gb1, u.stats1)
        ga1 = _add(self.ga1, ext_a1)
        gx = deconv(ga1, W1) + self.gz
        return gx, grad_w(x, ga1), self.ggamma1, gbeta1, gW2, self.ggamma2, gbeta2

    def backward(self, indexes, grad_outputs):
        if any(self.ext):
            raise NotImplementedError(
                "the derivative of eq. 3's backward through v_f's residual unit (a "
                'third derivative) is not implemented by chainer_vfbn.fused.vf_unit; '
                "run with chainer.using_config('vfbn_fused_v_f', False)")
        given = tuple(g is not None for g in grad_outputs)
        node = UnitGradGrad(self, given)
        gs = node.apply(self.get_retained_inputs()
                        + tuple(g for g in grad_outputs if g is not None))
        it = iter(gs)
        return tuple(next(it) if has else None for has in node.has)


class UnitGradGrad(function_node.FunctionNode):
    """The second derivative (module docstring): inputs ``(x, W1, gamma1, W2, gamma2,
    a1, r1, a2, gy)`` and the given ones of the gradients ``G_.`` w.r.t.
    :class:`UnitGrad`'s seven outputs; outputs the gradients w.r.t. those nine inputs
    that are not zero by structure (``has``)."""

    def __init__(self, grad, given):
        self.grad, self.given = grad, given
        gx, gW1, _, _, gW2, _, _ = given
        #          x    W1  gamma1 W2    gamma2 a1    r1   a2    gy
        self.has = (gW1, gx, True, True, True, True, gW2, True, True)

    def forward(self, inputs):
        x, W1, gamma1, W2, gamma2, a1, r1, a2, gy = inputs[:9]
        it = iter(inputs[9:])
        Ggx, GgW1, Gggamma1, Ggbeta1, GgW2, Gggamma2, Ggbeta2 = [
            next(it) if g else None for g in self.given]
        d, u = self.grad, self.grad.unit
        xp = backend.get_array_module(x)

        def zeros_if_none(g, like):
            return xp.zeros(like.shape, like.dtype) if g is None else g

        # g_x = deconv(g_a1, W1) + g_z;  g_W1 = gradW(x, g_a1)
        G_ga1 = _add(None if Ggx is None else conv(Ggx, W1),
                     None if GgW1 is None else conv(x, GgW1))
        G_W1 = None if Ggx is None else grad_w(Ggx, d.ga1)
        G_x = None if GgW1 is None else deconv(d.ga1, GgW1)
        # (g_a1, g_gamma1, g_beta1) = BN1'(a1; g_b1)
        G_a1, G_gamma1, G_gb1 = batchnorm.double_grad(
            a1, gamma1, d.gb1, zeros_if_none(G_ga1, x), zeros_if_none(Gggamma1, gamma1),
            zeros_if_none(Ggbeta1, gamma1), d.ga1, d.ggamma1, *u.stats1, _AXIS, _EXPAND,
            G_ga1 is not None)
        # g_b1 = g_r1 m1;  g_r1 = deconv(g_a2, W2);  g_W2 = gradW(r1, g_a2)
        G_gr1 = (G_gb1 * (r1 > 0)).astype(x.dtype, copy=False)
        G_ga2 = _add(conv(G_gr1, W2), None if GgW2 is None else conv(r1, GgW2))
        G_W2 = grad_w(G_gr1, d.ga2)
        G_r1 = None if GgW2 is None else deconv(d.ga2, GgW2)
        # (g_a2, g_gamma2, g_beta2) = BN2'(a2; g_z);  g_z = gy m2
        G_a2, G_gamma2, G_gz = batchnorm.double_grad(
            a2, gamma2, d.gz, G_ga2, zeros_if_none(Gggamma2, gamma2),
            zeros_if_none(Ggbeta2, gamma2), d.ga2, d.ggamma2, *u.stats2, _AXIS, _EXPAND)
        G_gy = (_add(Ggx, G_gz) * u.m2).astype(gy.dtype, copy=False)
        out = (G_x, G_W1, G_gamma1, G_W2, G_gamma2, G_a1, G_r1, G_a2, G_gy)
        return tuple(g for g, has in zip(out, self.has) if has)

    def backward(self, indexes, grad_outputs):
        raise NotImplementedError(
            "the third derivative of v_f's residual unit is not implemented by "
            'chainer_vfbn.fused.vf_unit; run with chainer.using_config('
            "'vfbn_fused_v_f', False) for the composed unit")


def applies(unit):
    """Whether :func:`residual_unit` computes ``unit`` now: training mode, the switch
    ``vfbn_fused_v_f`` on, and a unit with an identity shortcut."""
    return (chainer.config.train and chainer.config.vfbn_fused_v_f
            and not chainer.config.in_recomputing and unit.stride == 1
            and unit.conv1.W.shape[0] == unit.conv1.W.shape[1]
            and unit.bn1.avg_mean is not None and unit.bn2.avg_mean is not None)


def residual_unit(unit, x):
    """``unit(x)`` for a :class:`chainer_vfbn.model.ResidualUnit` of v_f's kind
    (:func:`applies`) in training mode, as one node differentiable twice."""
    return UnitFunction(unit.bn1, unit.bn2).apply((
        x, unit.conv1.W, unit.bn1.gamma, unit.bn1.beta, unit.conv2.W, unit.bn2.gamma,
        unit.bn2.beta))[0]
