"""Eq. 3's squared error and v_f's global average pooling in fewer nodes.

Both are reductions that Chainer composes from several functions, each one
application, and so each one paid in Python on the host (docs/GPU.md):

* :func:`squared_error`, eq. 3's ``sum((a - b)^2) / B``
  (:func:`chainer_vfbn.synthesizers.squared_error`, every synthesizer's loss):
  composed from ``-``, ``square``, ``sum`` and ``* (1/B)``, 4 applications forward
  and 5 backward (the constant's, ``broadcast_to``, ``* 2.0``, ``*`` and ``sum_to``);
  here :class:`SquaredError` and :class:`SquaredErrorGrad`, one each. Eq. 3 is
  differentiated once (its gradient trains the synthesizer); a second derivative
  through it is refused, naming the switch.
* :func:`global_average`, the mean over the positions of ``(B, C, H, W)`` maps
  (``F.average(h, axis=(2, 3))``, before the fc of v_f and of the network's upper
  half): Chainer's ``Mean`` forward, 3 applications for its gradient (``* (1/HW)``,
  ``reshape``, ``broadcast_to``) and 3 more for the gradient's own (``sum_to``,
  ``reshape``, ``* (1/HW)``), which VFBN takes under eq. 3 (v_f is differentiated
  twice). Here one node each: :class:`GlobalAverage`, :class:`GlobalAverageGrad`,
  :class:`GlobalAverageGradGrad`.

Each node does the array operations of the Chainer functions it stands for, in
their order and on arrays of their layout, so the numbers are the composed ones bit
for bit (``tests/test_fused_reductions.py``). The switch is
``chainer.config.vfbn_fused_reductions`` (:mod:`chainer_vfbn.fused`).
"""
from chainer import backend
from chainer import function_node
from chainer import utils

_SWITCH_OFF = "chainer.using_config('vfbn_fused_reductions', False)"


# -- eq. 3's squared error ---------------------------------------------------------

class SquaredError(function_node.FunctionNode):
    """``sum((a - b)^2) / B``, ``B = a.shape[0]``: Chainer's ``Sub``, ``Square``,
    ``Sum`` and ``MulConstant(1 / B)`` forwards, in order."""

    def forward(self, inputs):
        self.retain_inputs((0, 1))
        a, b = inputs
        xp = backend.get_array_module(a)
        self.d = utils.force_array(a - b)
        total = xp.asarray(xp.square(self.d, dtype=self.d.dtype).sum())
        return utils.force_array(a.dtype.type(1. / a.shape[0]) * total),

    def backward(self, indexes, grad_outputs):
        # a and b are inputs of the gradient, so that a second derivative asked
        # through it reaches its backward, and is refused there.
        return SquaredErrorGrad(self.d, indexes).apply(
            self.get_retained_inputs() + grad_outputs)


class SquaredErrorGrad(function_node.FunctionNode):
    """The gradients of :class:`SquaredError` w.r.t. ``a`` and ``b`` asked for
    (``indexes``) for an incoming ``g``; inputs ``(a, b, g)``: ``(2 ((1/B) g)) (a - b)`` and its negation,
    as the backwards of ``MulConstant``, ``Sum`` (a broadcast), ``Square`` (``g * 2.0
    * x``) and ``Sub`` compute them."""

    def __init__(self, d, indexes):
        self.d, self.indexes = d, indexes

    def forward(self, inputs):
        _, _, g = inputs
        d = self.d
        scale = d.dtype.type(2.0) * utils.force_array(d.dtype.type(1. / d.shape[0]) * g)
        ga = utils.force_array(scale * d)
        return tuple(ga if i == 0 else -ga for i in self.indexes)

    def backward(self, indexes, grad_outputs):
        raise RuntimeError(
            'a second derivative of eq. 3 through chainer_vfbn.fused.reductions is '
            'not available; compose it with ' + _SWITCH_OFF)


def squared_error(a, b):
    """``sum((a - b)^2) / a.shape[0]`` as one node (once differentiable)."""
    return SquaredError().apply((a, b))[0]


# -- global average pooling ----------------------------------------------------------

def mean_hw(x):
    """The mean of ``(B, C, H, W)`` maps over the positions: ``Mean``'s forward."""
    return utils.force_array(x.mean(axis=(2, 3)))


class GlobalAverage(function_node.FunctionNode):
    """:func:`mean_hw` as a node."""

    def forward(self, inputs):
        x, = inputs
        self.shape = x.shape
        return mean_hw(x),

    def backward(self, indexes, grad_outputs):
        return GlobalAverageGrad(self.shape).apply(grad_outputs)


def spread(gy, shape):
    """``gy / HW`` at every position of ``shape`` ``(B, C, H, W)``, a broadcast view
    as Chainer's: ``Mean``'s backward (``gy * (1/HW)``, ``reshape``,
    ``broadcast_to``)."""
    xp = backend.get_array_module(gy)
    g = utils.force_array(gy.dtype.type(1. / (shape[2] * shape[3])) * gy)
    g = g.reshape(shape[:2] + (1, 1))
    return g if g.shape == shape else xp.broadcast_to(g, shape)


def gather(G, shape):
    """The derivative of :func:`spread`: ``G`` summed over the positions, times
    ``1/HW``, as the backwards of ``broadcast_to`` (``sum_to``), ``reshape`` and the
    constant compute it."""
    summed = utils.sum_to(G, shape[:2] + (1, 1)).reshape(shape[:2])
    return utils.force_array(G.dtype.type(1. / (shape[2] * shape[3])) * summed)


class GlobalAverageGrad(function_node.FunctionNode):
    """:func:`spread` as a node, :class:`GlobalAverage`'s backward."""

    def __init__(self, shape):
        self.shape = shape

    def forward(self, inputs):
        return spread(inputs[0], self.shape),

    def backward(self, indexes, grad_outputs):
        return GlobalAverageGradGrad(self.shape).apply(grad_outputs)


class GlobalAverageGradGrad(function_node.FunctionNode):
    """:func:`gather` as a node, :class:`GlobalAverageGrad`'s backward."""

    def __init__(self, shape):
        self.shape = shape

    def forward(self, inputs):
        return gather(inputs[0], self.shape),

    def backward(self, indexes, grad_outputs):
        raise RuntimeError(
            'a third derivative of global average pooling through '
            'chainer_vfbn.fused.reductions is not available; compose it with '
            + _SWITCH_OFF)


def global_average(x):
    """``F.average(x, axis=(2, 3))`` for ``(B, C, H, W)`` maps, one node per
    derivative (twice differentiable)."""
    return GlobalAverage().apply((x,))[0]
