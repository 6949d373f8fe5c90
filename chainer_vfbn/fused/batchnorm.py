"""Batch normalisation whose double backward is one node (v_f under eq. 3).

VFBN computes ``delta_hat = d CE(v_f(h)) / d h`` with the graph kept (eq. 6), and
eq. 3 backprops through that gradient to v_f's parameters: a second derivative.
Chainer writes the second derivative of batch normalisation
(``BatchNormalizationGrad.backward``) as about 40 elementary functions, each one
application with its Python cost; v_f has 4 BN layers, which made most of eq. 3's
applications. Here that second derivative is ONE :class:`BatchNormalizationDoubleGrad`
node that evaluates the same closed form, array operation for array operation, so
that its results are bit-identical to Chainer's on the CPU (tested). The forward pass
and the first derivative are Chainer's own code (subclasses), so they are identical
by construction; a third derivative is refused with a clear error.

Notation, per channel (gamma's axis), over its ``m`` elements (batch and space):
``x_hat = (x - mu) / sigma``, ``1/sigma = inv_std = (var + eps)^(-1/2)`` with the
batch mean ``mu`` and biased variance ``var``; ``y = gamma x_hat + beta``.

First derivative (Chainer's ``BatchNormalizationGrad`` forward), for ``gy = dL/dy``::

    g_beta  = sum(gy),      g_gamma = sum(gy x_hat),
    g_x     = (gamma/sigma) (gy - (x_hat g_gamma + g_beta) / m).

Second derivative. Eq. 3 gives gradients ``(G_x, G_gamma, G_beta)`` w.r.t. the three
outputs ``(g_x, g_gamma, g_beta)``, i.e. it differentiates
``L2 = sum(G_x g_x) + G_gamma g_gamma + G_beta g_beta`` w.r.t. the inputs
``(x, gamma, gy)``. With ``c = gamma/sigma`` and ``r = sum(G_x g_x)``:

* ``gy``: ``g_x`` depends on ``gy`` directly and through ``g_gamma`` and ``g_beta``::

      dL2/dgy = G'_gamma x_hat + G'_beta + c G_x,   where
      G'_gamma = G_gamma - (c/m) sum(x_hat G_x),   G'_beta = G_beta - (c/m) sum(G_x).

* ``gamma``: only ``g_x`` depends on it, linearly: ``dL2/dgamma = r / gamma``.
* ``x``: through ``x_hat`` (``gy`` fixed) and ``1/sigma``. Holding ``1/sigma``,
  ``dL2/dx_hat = G'_gamma gy - (c/m) g_gamma G_x =: G_xhat``; holding ``x_hat``,
  ``dL2/d(1/sigma) = r sigma`` (``g_x`` is linear in ``1/sigma``). Then, with
  ``d(1/sigma)/dx_i = -x_hat_i / (m sigma^2)`` and BN's usual backward through the
  batch statistics::

      dL2/dx = G_xhat / sigma + (G_mu + x_hat G_sigma) / m,   where
      G_mu = -sum(G_xhat) / sigma,   G_sigma = -(r + sum(x_hat G_xhat)) / sigma.

These are the expressions of Chainer's ``BatchNormalizationGrad.backward``, in its
order of evaluation (so that the floating-point results are the same bits). Like it,
``dL2/dgamma = r / gamma`` is not finite where ``gamma = 0``.

:class:`BatchNormalization` is the link: ``chainer.links.BatchNormalization`` with the
same parameters and statistics (``gamma``, ``beta``, ``avg_mean``, ``avg_var``,
``N``; snapshots are unchanged) that uses this function in training mode while
``chainer.config.vfbn_fused_bn_double_backward`` is on, and Chainer's otherwise.
"""
import chainer
import chainer.links as L
from chainer import backend
from chainer import function_node
from chainer.functions.normalization import batch_normalization as chainer_bn


def _x_hat(x, mean, inv_std):
    # Chainer's _x_hat on arrays: (x - mean), then *= inv_std.
    x_mu = x - mean
    x_mu *= inv_std
    return x_mu


def double_grad(x, gamma, gy, ggx1, gggamma1, ggbeta1, gx1, ggamma1, mean, inv_std,
                axis, expander, has_gx=True):
    """The second derivative on arrays (module docstring): ``(dL2/dx, dL2/dgamma,
    dL2/dgy)`` from the inputs ``(x, gamma, gy)`` of the first derivative, the
    gradients ``(G_x, G_gamma, G_beta)`` w.r.t. its outputs, its outputs ``g_x`` and
    ``g_gamma``, and the forward's batch ``mean`` and ``inv_std``. ``has_gx=False``:
    no ``G_x`` was given (``ggx1`` is zeros; Chainer's ``r`` is then 0)."""
    e = expander
    inv_m = gamma.dtype.type(1. / (x.size // gamma.size))
    r = (gx1 * ggx1).sum(axis=axis) if has_gx else 0
    coeff = gamma * inv_std
    coeff_m = coeff * inv_m
    x_hat = _x_hat(x, mean[e], inv_std[e])

    gggamma2 = gggamma1 - coeff_m * (x_hat * ggx1).sum(axis=axis)
    ggbeta2 = ggbeta1 - coeff_m * ggx1.sum(axis=axis)
    ggamma2 = r / gamma
    gx_hat2 = gggamma2[e] * gy - (coeff_m * ggamma1)[e] * ggx1
    gstd2 = -inv_std * (r + (x_hat * gx_hat2).sum(axis=axis))
    gmean2 = -inv_std * gx_hat2.sum(axis=axis)
    gx2 = inv_std[e] * gx_hat2 + inv_m * (gmean2[e] + x_hat * gstd2[e])
    ggy2 = gggamma2[e] * x_hat + ggbeta2[e] + coeff[e] * ggx1
    return gx2, ggamma2, ggy2


class BatchNormalizationDoubleGrad(function_node.FunctionNode):
    """The second derivative of batch normalisation as one node: inputs ``(x, gamma,
    gy, G_x, G_gamma, G_beta)``, outputs ``(dL2/dx, dL2/dgamma, dL2/dgy)``
    (:func:`double_grad`). ``g_x`` and ``g_gamma``, the first derivative's outputs,
    are given as arrays; ``has_gx`` says whether ``G_x`` was given."""

    def __init__(self, grad_node, gx, ggamma, has_gx):
        self.axis, self.expander = grad_node.axis, grad_node.expander
        self.mean, self.inv_std = grad_node.mean, grad_node.inv_std
        self.gx1, self.ggamma1, self.has_gx = gx, ggamma, has_gx

    @property
    def label(self):
        return 'BatchNormalizationDoubleGrad'

    def forward(self, inputs):
        return double_grad(*inputs, self.gx1, self.ggamma1, self.mean, self.inv_std,
                           self.axis, self.expander, self.has_gx)

    def backward(self, indexes, grad_outputs):
        raise NotImplementedError(
            'the third derivative of batch normalization is not implemented by '
            'chainer_vfbn.fused.batchnorm; run with chainer.using_config('
            "'vfbn_fused_bn_double_backward', False) for Chainer's composed one")


class BatchNormalizationGrad(chainer_bn.BatchNormalizationGrad):
    """Chainer's first derivative of batch normalisation (its forward is Chainer's);
    its own backward is one :class:`BatchNormalizationDoubleGrad` node."""

    def backward(self, indexes, grad_outputs):
        x, gamma, gy = self.get_retained_inputs()
        if gamma.dtype != x.dtype:       # Chainer's casts: its composed path
            return super().backward(indexes, grad_outputs)
        gx1, ggamma1 = self.get_retained_outputs()
        ggx1, gggamma1, ggbeta1 = grad_outputs
        xp = backend.get_array_module(x)

        def given(g, like):
            return xp.zeros(like.shape, like.dtype) if g is None else g

        node = BatchNormalizationDoubleGrad(self, gx1.array, ggamma1.array, ggx1 is not None)
        return node.apply((x, gamma, gy, given(ggx1, x), given(gggamma1, gamma),
                           given(ggbeta1, gamma)))


class BatchNormalizationFunction(chainer_bn.BatchNormalization):
    """Chainer's batch normalisation (training mode, batch statistics, running
    statistics updated in place); its backward is :class:`BatchNormalizationGrad`."""

    def backward(self, indexes, grad_outputs):
        if isinstance(self._impl, chainer_bn._IDeepBatchNormalizationImpl):
            return super().backward(indexes, grad_outputs)     # needs var; not ours
        x, gamma = self.get_retained_inputs()
        gy, = grad_outputs
        f = BatchNormalizationGrad(self.eps, self.expander, self.axis, self.mean, None,
                                   self.inv_std, self.key_axis, self._impl,
                                   self.forward_data)
        return f.apply((x, gamma, gy))


def batch_normalization(x, gamma, beta, eps=2e-5, running_mean=None, running_var=None,
                        decay=0.9, axis=None):
    """``chainer.functions.batch_normalization`` whose double backward is one node."""
    return BatchNormalizationFunction(eps, running_mean, running_var, decay,
                                      axis).apply((x, gamma, beta))[0]


class BatchNormalization(L.BatchNormalization):
    """``chainer.links.BatchNormalization`` (same parameters, statistics and
    snapshots) that trains with :func:`batch_normalization` while
    ``chainer.config.vfbn_fused_bn_double_backward`` is on."""

    def forward(self, x, **kwargs):
        if (kwargs or not chainer.config.train or chainer.config.in_recomputing
                or not chainer.config.vfbn_fused_bn_double_backward
                or self.avg_mean is None or self.gamma is None or self.beta is None):
            return super().forward(x, **kwargs)
        # L.BatchNormalization.forward's training branch (finetune off).
        return batch_normalization(x, self.gamma, self.beta, eps=self.eps,
                                   running_mean=self.avg_mean, running_var=self.avg_var,
                                   decay=self.decay, axis=self.axis)
