"""v_f's head and its cross-entropy, differentiable twice, in three nodes (eq. 6, 3).

VFBN's ``delta_hat`` is the gradient of ``CE(y, fc(mean_hw(u)))``, ``u`` the maps
of v_f's last residual unit, and eq. 3 differentiates that gradient again. Composed
(global average pooling, ``L.Linear``, the cross-entropy), even with the one-node
pieces of :mod:`chainer_vfbn.fused.reductions` and
:mod:`chainer_vfbn.fused.cross_entropy`, this costs 3 applications forward, 4 for
the gradient (the cross-entropy's, ``LinearGradData``, a ``cast``, the pooling's)
and 9 more under eq. 3 (their derivatives, the forward's ``Linear`` backward, and the
add of fc's two weight gradients). Here one node each:

* :class:`Head`: ``z = mean_hw(u)``, ``l = z W^T + b``, ``CE(l)``;
* :class:`HeadGrad`: the gradients of CE w.r.t. ``u``, ``W``, ``b`` asked for, for an
  incoming ``g``: ``g_l = dCE/dl``, ``g_z = g_l W``, ``g_u = spread(g_z)`` (``g_l^T
  z`` for ``W``, ``sum_b g_l`` for ``b``);
* :class:`HeadGradGrad`: for ``G = dL2/dg_u``, eq. 3's gradients w.r.t. ``u``, ``W``,
  ``b`` and ``g``, by the composed graph's route: ``G_z' = gather(G)``; through
  ``g_z = g_l W``: ``G_W = g_l^T G_z'`` and ``G_l' = G_z' W^T``; through the
  cross-entropy's gradient: ``(G_l, G_g)``; through the forward's ``l = z W^T + b``:
  ``G_z = G_l W``, ``G_W += G_l^T z``, ``G_b = sum_b G_l``; ``G_u = spread(G_z)``.

Each step is the array work of the Chainer function it stands for (``LinearFunction``,
``LinearGradData``, ``LinearGradWeight``, ``Sum``; the cross-entropy's and the
pooling's from their fused modules), and the one sum of two terms (fc's weight
gradient) adds the same in either order, so the numbers are the composed head's bit
for bit (``tests/test_fused_vf_unit.py``). Only ``G`` at ``g_u`` is taken by the
second derivative (what eq. 3 gives: ``delta_hat`` is a gradient w.r.t. v_f's
input); one at the weight or bias gradients, or a third derivative, is refused. The
switch is ``chainer.config.vfbn_fused_v_f``.
"""
import numpy
from chainer import function_node
from chainer import utils

from chainer_vfbn.fused import cross_entropy, reductions


def _contiguous(a):
    """As Chainer's linear functions prepare ``x`` and ``gy`` (its issue 2744)."""
    if (isinstance(a, numpy.ndarray) and not (a.flags.c_contiguous or a.flags.f_contiguous)
            and 1 in a.shape):
        return numpy.ascontiguousarray(a)
    return a


def _linear(x, W):
    """``LinearFunction`` forward without the bias: ``x W^T``."""
    x = _contiguous(x)
    return x.dot(W.T).astype(x.dtype, copy=False)


def _grad_data(W, gy):
    """``LinearGradData`` forward: ``gy W``."""
    gy = _contiguous(gy)
    return gy.dot(W).astype(gy.dtype, copy=False)


def _grad_weight(x, gy, W):
    """``LinearGradWeight`` forward: ``gy^T x``."""
    gy = _contiguous(gy)
    return gy.T.dot(x).astype(W.dtype, copy=False)


def _bias_grad(gy):
    """``F.sum(gy, axis=0)``'s forward."""
    return utils.force_array(gy.sum(axis=(0,)))


class Head(function_node.FunctionNode):
    """``CE(y, fc(mean_hw(u)))``; inputs ``(u, W, b)``, labels ``y`` an int array."""

    def __init__(self, y):
        self.y = y

    def forward(self, inputs):
        self.retain_inputs((0, 1, 2))
        u, W, b = inputs
        self.z = reductions.mean_hw(u)
        l = _linear(self.z, W)
        l += b
        value, self.ls = cross_entropy.forward(l, self.y)
        return value,

    def backward(self, indexes, grad_outputs):
        return HeadGrad(self, indexes).apply(self.get_retained_inputs() + grad_outputs)


class HeadGrad(function_node.FunctionNode):
    """The first derivative: inputs ``(u, W, b, g)``; outputs the gradients w.r.t.
    the inputs of :class:`Head` asked for (``indexes``)."""

    def __init__(self, head, indexes):
        self.head, self.indexes = head, indexes

    def forward(self, inputs):
        u, W, b, g = inputs
        h = self.head
        self.u_shape, self.W = u.shape, W
        self.g_l, self.p, self.r = cross_entropy.grad(h.ls, h.y, g)
        grads = {}
        if 0 in self.indexes:
            grads[0] = reductions.spread(_grad_data(W, self.g_l), u.shape)
        if 1 in self.indexes:
            grads[1] = _grad_weight(h.z, self.g_l, W)
        if 2 in self.indexes:
            grads[2] = _bias_grad(self.g_l)
        return tuple(grads[i] for i in self.indexes)

    def backward(self, indexes, grad_outputs):
        if self.indexes[0] != 0 or any(G is not None for G in grad_outputs[1:]):
            raise NotImplementedError(
                "a second derivative of v_f's head through its weight or bias "
                'gradient is not implemented by chainer_vfbn.fused.vf_head (eq. 3 '
                "needs the one through its input's); run with "
                "chainer.using_config('vfbn_fused_v_f', False)")
        return HeadGradGrad(self, indexes).apply(grad_outputs[:1])


class HeadGradGrad(function_node.FunctionNode):
    """The second derivative (module docstring): input ``G = dL2/dg_u``; outputs the
    gradients w.r.t. ``(u, W, b, g)`` asked for (``indexes``)."""

    def __init__(self, grad, indexes):
        self.grad, self.indexes = grad, indexes

    def forward(self, inputs):
        G, = inputs
        d = self.grad
        h, W = d.head, d.W
        Gz_ = reductions.gather(G, d.u_shape)
        G_W = _grad_weight(Gz_, d.g_l, W)                  # LinearGradData's backward
        G_l, G_g = cross_entropy.grad_grad(_linear(Gz_, W), d.p, d.r, h.y)
        # Through the forward's l = z W^T + b, then the pooling.
        grads = {0: reductions.spread(_grad_data(W, G_l), d.u_shape),
                 1: G_W + _grad_weight(h.z, G_l, W),
                 2: _bias_grad(G_l),
                 3: G_g}
        return tuple(grads[i] for i in self.indexes)

    def backward(self, indexes, grad_outputs):
        raise cross_entropy.refuse_third("v_f's head", 'vfbn_fused_v_f')


def cross_entropy_of_head(u, fc, y):
    """``CE(y, fc(mean_hw(u)))`` for v_f's last maps ``u`` and its ``L.Linear``
    ``fc``, as one node differentiable twice (module docstring)."""
    if fc.b is None:
        raise ValueError("v_f's fused head needs fc with a bias, as VirtualForward's")
    y = fc.xp.asarray(getattr(y, 'array', y)).astype(numpy.intp, copy=False)
    return Head(y).apply((u, fc.W, fc.b))[0]
