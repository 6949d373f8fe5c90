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


def forward(l, y):
    """``(CE, ls)``: the value and the log-softmax ``ls`` of logits ``l``, as
    Chainer's ``log_softmax`` (logsumexp), ``select_item``, ``sum``, negation and
    ``* (1/B)`` compute them."""
    xp = backend.get_array_module(l)
    m = l.max(axis=1, keepdims=True)
    e = l - m
    xp.exp(e, out=e)
    s = e.sum(axis=1, keepdims=True)
    xp.log(s, out=s)
    m += s
    ls = l - m
    picked = ls[xp.arange(y.size), y]
    total = xp.asarray(picked.sum())
    return xp.asarray(l.dtype.type(1. / y.size) * -total), ls


def grad(ls, y, g):
    """``(dCE/dl, p, r)`` for an incoming ``g = dL/dCE``: ``g4 - p r`` (module
    docstring), ``p = exp(ls)``."""
    xp = backend.get_array_module(ls)
    g = -xp.asarray(ls.dtype.type(1. / y.size) * g)
    g4 = xp.zeros(ls.shape, ls.dtype)
    g4[xp.arange(y.size), y] = xp.broadcast_to(g, y.shape)
    p = xp.exp(ls)
    r = g4.sum(axis=1, keepdims=True)
    return g4 - p * r, p, r


def grad_grad(G, p, r, y):
    """``(dL2/dl, dL2/dg)`` for ``G = dL2/d(dCE/dl)``: Chainer's
    ``LogSoftmaxGrad.backward``, then ``LogSoftmax``'s backward, in order."""
    xp = backend.get_array_module(G)
    g0 = -G * p * r
    gl = g0 - p * g0.sum(axis=1, keepdims=True)
    g1 = G - (G * p).sum(axis=1, keepdims=True)
    picked = g1[xp.arange(y.size), y]
    return gl, xp.asarray(G.dtype.type(1. / y.size) * -picked.sum())


def refuse_third(who, switch):
    """The error of a third derivative asked through ``who``."""
    return NotImplementedError(
        "the third derivative of %s is not implemented by chainer_vfbn.fused; run "
        "with chainer.using_config('%s', False) for the composed one" % (who, switch))


class CrossEntropy(function_node.FunctionNode):
    """``-(1/B) sum_b log softmax(l)_b[y_b]`` for labels ``y`` (an int array)."""

    def __init__(self, y):
        self.y = y

    def forward(self, inputs):
        self.retain_inputs((0,))
        value, self.ls = forward(inputs[0], self.y)
        return value,

    def backward(self, indexes, grad_outputs):
        l, = self.get_retained_inputs()
        return CrossEntropyGrad(self).apply((l,) + grad_outputs)


class CrossEntropyGrad(function_node.FunctionNode):
    """``dCE/dl`` for ``g = dL/dCE``; inputs ``(l, g)``."""

    def __init__(self, ce):
        self.ls, self.y = ce.ls, ce.y

    def forward(self, inputs):
        gl, self.p, self.r = grad(self.ls, self.y, inputs[1])
        return gl,

    def backward(self, indexes, grad_outputs):
        return CrossEntropyGradGrad(self).apply(grad_outputs)


class CrossEntropyGradGrad(function_node.FunctionNode):
    """The second derivative: input ``G``; outputs ``(dL2/dl, dL2/dg)``."""

    def __init__(self, grad):
        self.grad = grad

    def forward(self, inputs):
        d = self.grad
        return grad_grad(inputs[0], d.p, d.r, d.y)

    def backward(self, indexes, grad_outputs):
        raise refuse_third("v_f's cross-entropy", 'vfbn_fused_v_f')


def cross_entropy(logits, y):
    """The batch-mean cross-entropy of ``logits`` for the labels ``y``, one node
    differentiable twice (module docstring)."""
    y = getattr(y, 'array', y)
    xp = backend.get_array_module(y)
    return CrossEntropy(xp.asarray(y).astype(numpy.intp, copy=False)).apply((logits,))[0]
