"""v_f's cross-entropy differentiable twice, in three nodes (VFBN's eq. 6 and 3).

VFBN's ``delta_hat`` is the gradient of the batch-mean cross-entropy
``CE = -(1/B) sum_b log p_b[y_b]``, ``p = softmax(l)``, of v_f's logits ``l``
(:func:`chainer_vfbn.synthesizers.cross_entropy`), and eq. 3 differentiates that
gradient again. Composed (``log_softmax``, ``select_item``, ``sum``, negation, ``/ B``)
this costs 5 applications forward, 5 for the gradient and about 10 for the second
derivative. Here it is one node each:

* :class:`CrossEntropy`: ``CE(l)``, by Chainer's ``log_softmax`` (``ls = l -
  logsumexp(l)``), ``select_item``, ``sum``, negation and ``* (1/B)``;
* :class:`CrossEntropyGrad`: ``dCE/dl = g4 - p r`` for an incoming ``g = dL/dCE``,
  where ``g4`` is ``-g/B`` at ``(b, y_b)`` and 0 elsewhere and ``r_b = sum_k g4_bk``
  (Chainer's backward of those five functions, operation for operation, so
  ``delta_hat`` is the same bits as composed);
* :class:`CrossEntropyGradGrad`: for ``G = dL2/d(dCE/dl)``, since ``g4`` does not
  depend on ``l`` and ``dp_k/dl_j = p_k (delta_kj - p_j)``::

      dL2/dl_bj = -r_b p_bj (G_bj - sum_k G_bk p_bk)
      dL2/dg    = -(1/B) sum_b (G_b,y_b - sum_k G_bk p_bk)

  evaluated as Chainer's ``LogSoftmaxGrad.backward`` and ``LogSoftmax``'s backward
  evaluate them (``g0 = -G p r``, ``dL2/dl = g0 - p sum_k g0``), so that eq. 3's
  gradients too are the same bits as composed. A third derivative is refused.
"""
import numpy
from chainer import backend
from chainer import function_node


class CrossEntropy(function_node.FunctionNode):
    """``-(1/B) sum_b log softmax(l)_b[y_b]`` for labels ``y`` (an int array)."""

    def __init__(self, y):
        self.y = y

    def forward(self, inputs):
        self.retain_inputs((0,))
        l, = inputs
        xp = backend.get_array_module(l)
        # Chainer's _log_softmax (logsumexp) on the CPU path.
        m = l.max(axis=1, keepdims=True)
        e = l - m
        xp.exp(e, out=e)
        s = e.sum(axis=1, keepdims=True)
        xp.log(s, out=s)
        m += s
        self.ls = l - m
        picked = self.ls[xp.arange(self.y.size), self.y]
        total = xp.asarray(picked.sum())
        return xp.asarray(l.dtype.type(1. / self.y.size) * -total),

    def backward(self, indexes, grad_outputs):
        l, = self.get_retained_inputs()
        return CrossEntropyGrad(self).apply((l,) + grad_outputs)


class CrossEntropyGrad(function_node.FunctionNode):
    """``dCE/dl`` for ``g = dL/dCE``; inputs ``(l, g)``."""

    def __init__(self, ce):
        self.ls, self.y = ce.ls, ce.y

    def forward(self, inputs):
        l, g = inputs
        xp = backend.get_array_module(l)
        g = -xp.asarray(l.dtype.type(1. / self.y.size) * g)
        g4 = xp.zeros(self.ls.shape, self.ls.dtype)
        g4[xp.arange(self.y.size), self.y] = xp.broadcast_to(g, self.y.shape)
        self.p = xp.exp(self.ls)
        self.r = g4.sum(axis=1, keepdims=True)
        return g4 - self.p * self.r,

    def backward(self, indexes, grad_outputs):
        return CrossEntropyGradGrad(self).apply(grad_outputs)


class CrossEntropyGradGrad(function_node.FunctionNode):
    """The second derivative: input ``G``; outputs ``(dL2/dl, dL2/dg)``."""

    def __init__(self, grad):
        self.grad = grad

    def forward(self, inputs):
        G, = inputs
        d = self.grad
        xp = backend.get_array_module(G)
        # Chainer's LogSoftmaxGrad.backward, then LogSoftmax's backward, in order.
        g0 = -G * d.p * d.r
        gl = g0 - d.p * g0.sum(axis=1, keepdims=True)
        g1 = G - (G * d.p).sum(axis=1, keepdims=True)
        picked = g1[xp.arange(d.y.size), d.y]
        gg = xp.asarray(G.dtype.type(1. / d.y.size) * -picked.sum())
        return gl, gg

    def backward(self, indexes, grad_outputs):
        raise NotImplementedError(
            "the third derivative of v_f's cross-entropy is not implemented by "
            'chainer_vfbn.fused.cross_entropy; run with chainer.using_config('
            "'vfbn_fused_v_f', False) for the composed one")


def cross_entropy(logits, y):
    """The batch-mean cross-entropy of ``logits`` for the labels ``y``, one node
    differentiable twice (module docstring)."""
    y = getattr(y, 'array', y)
    xp = backend.get_array_module(y)
    return CrossEntropy(xp.asarray(y).astype(numpy.intp, copy=False)).apply((logits,))[0]
