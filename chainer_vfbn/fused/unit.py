"""The network's residual unit as one node forward and one node backward.

:class:`chainer_vfbn.model.ResidualUnit` is the definition (SPEC section 2)::

    r = relu(BN_1(W_1 * x))                          W_1: 3x3, stride s on it
    y = relu(BN_2(W_2 * r) + shortcut(x))            shortcut: 1x1 average pooling of
                                                     stride s, then zero channels

with BN over the batch and the positions (training mode: batch statistics, the
running mean and variance updated as ``L.BatchNormalization`` does, same decay and
eps, variance unbiased by m / (m - 1)). Composed from Chainer's links that is 7
function applications forward (two convolutions, two BNs, two ReLUs, the add) and 9
backward (their gradient functions and the add of x's two gradients), one or two
more each where the shortcut subsamples or grows, each one paid in Python on the
host; a GPU step of this package is bound by that host cost (docs/GPU.md).

:class:`FusedResidualUnit` computes the same ``y`` as ONE application, and its
:class:`FusedResidualUnitGrad` every gradient (``dL/dx``, ``dL/dW_1``,
``dL/dgamma_1``, ``dL/dbeta_1``, the same for BN_2 and W_2) as one more. The array
work is Chainer's own, in :mod:`chainer_vfbn.fused.kernels`: on the CPU the fused
unit is bit-identical to the composed one, output, running statistics and every
gradient (``tests/test_fused_unit.py``); on a GPU its elementwise chains are single
CuPy kernels: by reading the code, a unit launches about 37 kernels where the
composed one (without cuDNN) launches about 53; the normalisations, ReLUs, adds and
masks go from 32 kernels to 15, the convolutions' ~21 stay as they are.

The network's units are never differentiated twice (a synthesizer sees a detached
``h``), so the fused unit has a first derivative only; a second derivative asked
through it raises, naming the switch. VFBN's ``v_f``, which eq. 3 differentiates
twice, runs its units as :mod:`chainer_vfbn.fused.vf_unit` (differentiable twice),
and composed when that is switched off (:func:`chainer_vfbn.synthesizers.loss_gradient`).
The switch is ``chainer.config.vfbn_fused_units`` (:mod:`chainer_vfbn.fused`).
"""
import chainer
from chainer import function_node

from chainer_vfbn.fused import kernels


def applies():
    """Whether a residual unit runs fused now: the switch is on, and the unit trains
    (batch statistics) with the graph kept for a backward pass. Evaluation and
    ``no_backprop_mode`` run the composed unit."""
    config = chainer.config
    return (config.vfbn_fused_units and config.train and config.enable_backprop
            and not config.in_recomputing)


def residual_unit(unit, x):
    """``unit(x)`` for a :class:`chainer_vfbn.model.ResidualUnit` ``unit``, as one
    node; the unit's BN running statistics are updated in place."""
    y, = FusedResidualUnit(unit).apply((
        x, unit.conv1.W, unit.bn1.gamma, unit.bn1.beta,
        unit.conv2.W, unit.bn2.gamma, unit.bn2.beta))
    return y


def _running(bn):
    """What BN's training-mode update needs from an ``L.BatchNormalization``."""
    return bn.avg_mean, bn.avg_var, bn.decay, bn.eps


class FusedResidualUnit(function_node.FunctionNode):
    """``y = relu(BN_2(W_2 * relu(BN_1(W_1 * x))) + shortcut(x))``.

    Inputs ``(x, W_1, gamma_1, beta_1, W_2, gamma_2, beta_2)``; keeps for the
    backward pass what the composed links keep (x, ``W_1 * x``, r, ``W_2 * r``, y and
    BN's batch statistics)."""

    def __init__(self, unit):
        self.out_ch, self.stride = unit.out_ch, unit.stride
        self.running = _running(unit.bn1), _running(unit.bn2)

    def forward(self, inputs):
        x, W1, gamma1, beta1, W2, gamma2, beta2 = inputs
        self.retain_inputs((0, 1, 2, 4, 5))
        self.c1 = kernels.conv3x3(x, W1, self.stride)
        self.r, self.mean1, self.inv_std1 = kernels.bn_relu(
            self.c1, gamma1, beta1, self.running[0])
        self.c2 = kernels.conv3x3(self.r, W2, 1)
        s = kernels.shortcut(x, self.out_ch, self.stride)
        y, self.mean2, self.inv_std2 = kernels.bn_add_relu(
            self.c2, gamma2, beta2, self.running[1], s)
        self.retain_outputs((0,))
        return y,

    def backward(self, indexes, grad_outputs):
        x, W1, gamma1, W2, gamma2 = self.get_retained_inputs()
        y, = self.get_retained_outputs()
        return FusedResidualUnitGrad(self, indexes).apply(
            (x, W1, gamma1, W2, gamma2, y, grad_outputs[0]))


class FusedResidualUnitGrad(function_node.FunctionNode):
    """Every gradient of :class:`FusedResidualUnit` asked for (``indexes``, in its
    input order) from ``gy``, in the order the composed backward computes them."""

    def __init__(self, unit_node, indexes):
        self.f, self.indexes = unit_node, indexes

    def forward(self, inputs):
        x, W1, gamma1, W2, gamma2, y, gy = inputs
        f = self.f
        g, gc2, ggamma2, gbeta2 = kernels.relu_bn_grad(
            gy, y, f.c2, gamma2, f.mean2, f.inv_std2)
        gr = kernels.conv3x3_grad_x(gc2, W2, 1, f.r.shape[2:])
        gW2 = kernels.conv3x3_grad_W(f.r, gc2, 1)
        _, gc1, ggamma1, gbeta1 = kernels.relu_bn_grad(
            gr, f.r, f.c1, gamma1, f.mean1, f.inv_std1)
        gW1 = kernels.conv3x3_grad_W(x, gc1, f.stride)
        grads = {1: gW1, 2: ggamma1, 3: gbeta1, 4: gW2, 5: ggamma2, 6: gbeta2}
        if 0 in self.indexes:
            gx = kernels.conv3x3_grad_x(gc1, W1, f.stride, x.shape[2:])
            grads[0] = kernels.add_shortcut_grad(gx, g, gy, y, x.shape, f.stride)
        return tuple(grads[i] for i in self.indexes)

    def backward(self, indexes, grad_outputs):
        raise RuntimeError(
            'a second derivative through a fused residual unit '
            '(chainer_vfbn.fused.unit) is not available: run the unit composed, '
            "with chainer.using_config('vfbn_fused_units', False)")
