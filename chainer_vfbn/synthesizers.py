"""Gradient synthesizers: maps ``(h, y) -> delta_hat``, standing in for
``delta = d loss / d h`` (paper section 2, eq. 2).

* :class:`JaderbergLinear` and :class:`JaderbergResNet`: ``g([h, y])`` (eq. 4 and 7,
  appendix B.1), ``y`` as 10 constant one-hot maps concatenated to ``h``.
* :class:`VFBN`: the true gradient of the cross-entropy through a virtual forward
  network ``v_f`` (eq. 6), by automatic differentiation with the graph kept, so that
  ``v_f`` is trained on eq. 3 by double backprop.
* :class:`LinearVFBN` and :class:`MLPVFBN`: the closed forms of appendix A.2 (eq. 8
  and 9) for a vector ``h``.

Sign convention: every synthesizer returns the gradient of the *loss* (the batch-mean
cross-entropy), ``W^T (softmax(W h) - y) / B`` for a linear ``v_f``; the paper prints
eq. 8 and 9 with ``(y - softmax)``, the gradient of the log-likelihood, which is the
same vector with the opposite sign.

Every synthesizer also says how it is trained (:meth:`Synthesizer.loss`), in the units
that SPEC section 3's scale choice gives it: ``scale`` is the running RMS ``s`` of the
true delta, kept by the updater.
"""
import chainer
import chainer.functions as F
import chainer.links as L
from chainer import initializers

from chainer_vfbn import config, model
from chainer_vfbn.fused import cross_entropy as fused_cross_entropy, reductions, vf_head, vf_unit


def squared_error(a, b):
    """Eq. 3 per example, averaged over the batch: ``sum((a - b)^2) / B``. With
    ``chainer.config.vfbn_fused_reductions`` on, the same numbers in one node
    forward and one backward (:mod:`chainer_vfbn.fused.reductions`)."""
    if chainer.config.vfbn_fused_reductions:
        return reductions.squared_error(a, b)
    return F.sum(F.square(a - b)) / a.shape[0]


def label_maps(h, y, n_classes=config.N_CLASSES):
    """``[h, y]``: h with the one-hot label concatenated along the channels; for
    feature maps ``(B, C, H, W)`` the label is broadcast to ``n_classes`` constant
    maps, for a vector ``(B, D)`` it is appended as is."""
    xp = chainer.backend.get_array_module(h)
    onehot = xp.eye(n_classes, dtype=h.dtype)[xp.asarray(y)]     # (B, K)
    if h.ndim == 2:
        return F.concat((h, onehot), axis=1)
    maps = xp.broadcast_to(onehot[:, :, None, None],
                           (h.shape[0], n_classes) + h.shape[2:])
    return F.concat((h, maps), axis=1)


class Synthesizer(chainer.Chain):
    """Base of every synthesizer.

    ``synth(h, y)`` returns the synthesizer's output ``out`` with the graph to its
    parameters; :meth:`to_gradient` turns ``out`` into ``delta_hat`` given the
    running RMS ``s`` of delta, and :meth:`loss` is eq. 3 in the synthesizer's units.
    For VFBN ``out`` is ``delta_hat`` itself; Jaderberg models predict ``delta / s``.
    """

    def forward(self, h, y):
        raise NotImplementedError

    def to_gradient(self, out, scale):
        """``delta_hat`` (an array) from the output ``out`` (an array)."""
        return out

    def loss(self, out, delta, scale):
        """Eq. 3, ``||delta - delta_hat||^2`` (per example, batch mean)."""
        return squared_error(out, delta)


class _JaderbergBase(Synthesizer):
    """Jaderberg synthesizers predict in units of ``s`` (SPEC section 3, scale
    choice): ``delta_hat = s * g([h, y])``, and eq. 3's regression target is
    ``delta / s``. With ``scaled=False`` they regress ``delta`` itself (the literal
    setting, which diverges at the paper's alpha_gs; kept for the ablation)."""

    def __init__(self, scaled=True, n_classes=config.N_CLASSES):
        super().__init__()
        self.scaled, self.n_classes = scaled, n_classes

    #: ``h.ndim`` the model is built for: 4 (feature maps) or 2 (vectors).
    h_ndim = 4

    def forward(self, h, y):
        if h.ndim != self.h_ndim:
            raise ValueError(
                '%s takes h of %s, got shape %s; use %s' % (
                    type(self).__name__, 'feature maps (B, C, H, W)' if self.h_ndim == 4
                    else 'vectors (B, D)', tuple(h.shape),
                    'JaderbergLinearVector or JaderbergMLP for a vector h' if self.h_ndim == 4
                    else 'JaderbergLinear or JaderbergResNet for feature maps'))
        return self.g(label_maps(h, y, self.n_classes))

    def to_gradient(self, out, scale):
        return out * scale if self.scaled else out

    def loss(self, out, delta, scale):
        return squared_error(out, delta / scale if self.scaled else delta)


class JaderbergLinear(_JaderbergBase):
    """Table 1 "Jaderberg's Linear": ONE 5x5 convolution 74 -> 64 on ``[h, y]``,
    initialised to zero (Jaderberg et al. 2016) so that ``delta_hat`` starts at 0."""

    def __init__(self, h_channels=64, n_classes=config.N_CLASSES, scaled=True):
        super().__init__(scaled, n_classes)
        with self.init_scope():
            self.conv = L.Convolution2D(h_channels + n_classes, h_channels, 5, 1, 2,
                                        initialW=initializers.Zero())

    def g(self, hy):
        return self.conv(hy)


class _ConvBNReLU(chainer.Chain):
    """conv 3x3 (no bias, He normal) + BN + ReLU: the stem of Jaderberg's small-ResNet."""

    def __init__(self, in_ch, out_ch):
        super().__init__()
        with self.init_scope():
            self.conv = L.Convolution2D(in_ch, out_ch, 3, 1, 1, nobias=True,
                                        initialW=initializers.HeNormal())
            self.bn = L.BatchNormalization(out_ch)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class JaderbergResNet(_JaderbergBase):
    """Table 1 "Jaderberg's small-ResNet" (appendix B.1): conv 3x3 74 -> 64 + BN +
    ReLU, two residual units of 64 channels ("the skip connection occurs every 2
    layers"; the network's own :class:`~chainer_vfbn.model.ResidualUnit`), then a
    last conv 3x3 64 -> 64 with no BN and no ReLU, initialised to zero."""

    def __init__(self, h_channels=64, n_classes=config.N_CLASSES, width=64, scaled=True):
        super().__init__(scaled, n_classes)
        with self.init_scope():
            self.stem = _ConvBNReLU(h_channels + n_classes, width)
            self.res1 = model.ResidualUnit(width, width)
            self.res2 = model.ResidualUnit(width, width)
            self.out = L.Convolution2D(width, h_channels, 3, 1, 1,
                                       initialW=initializers.Zero())

    def g(self, hy):
        return self.out(self.res2(self.res1(self.stem(hy))))


class JaderbergLinearVector(_JaderbergBase):
    """Jaderberg's Linear for a vector ``h`` of size ``in_size``: ONE linear map
    ``[h, onehot(y)] -> delta / s``, initialised to zero."""

    h_ndim = 2

    def __init__(self, in_size, n_classes=config.N_CLASSES, scaled=True):
        super().__init__(scaled, n_classes)
        with self.init_scope():
            self.fc = L.Linear(in_size + n_classes, in_size, initialW=initializers.Zero())

    def g(self, hy):
        return self.fc(hy)


class JaderbergMLP(_JaderbergBase):
    """The small-ResNet's counterpart for a vector ``h``: an MLP on
    ``[h, onehot(y)]``, ``layers`` hidden layers of ``hidden`` units, each linear +
    BN + ReLU (as Jaderberg et al. 2016 use for fully connected networks), then a
    linear output initialised to zero."""

    h_ndim = 2

    def __init__(self, in_size, hidden=1024, layers=2, n_classes=config.N_CLASSES,
                 scaled=True):
        super().__init__(scaled, n_classes)
        sizes = [in_size + n_classes] + [hidden] * layers
        with self.init_scope():
            self.hidden = chainer.ChainList(*[
                chainer.Sequential(L.Linear(a, b, nobias=True), L.BatchNormalization(b), F.relu)
                for a, b in zip(sizes, sizes[1:])])
            self.out = L.Linear(sizes[-1], in_size, initialW=initializers.Zero())

    def g(self, hy):
        for layer in self.hidden:
            hy = layer(hy)
        return self.out(hy)


class VirtualForward(chainer.Chain):
    """``v_f`` of the paper's VFBN (appendix B.1): two residual units of conv 3x3
    64 -> 64 (4 convs, a skip every 2 layers), global average pooling, linear ->
    logits. The paper builds v_f "as in the original network" and describes both
    with the same sentence, so each unit is the network's own
    :class:`~chainer_vfbn.model.ResidualUnit`, ``relu(bn2(conv2(relu(bn1(conv1 x))))
    + x)``. The same architecture is the head of the "bottom half" and "layer-wise"
    rows."""

    def __init__(self, channels=64, n_classes=config.N_CLASSES):
        super().__init__()
        with self.init_scope():
            self.res1 = model.ResidualUnit(channels, channels)
            self.res2 = model.ResidualUnit(channels, channels)
            self.fc = L.Linear(channels, n_classes)

    def forward(self, h):
        return self.fc(model.global_average_pooling(self.maps(h)))

    def maps(self, h):
        """The residual units' output maps. In training, each unit as three nodes,
        however often it is differentiated (chainer_vfbn.fused.vf_unit; VFBN
        differentiates v_f twice)."""
        for unit in (self.res1, self.res2):
            h = vf_unit.residual_unit(unit, h) if vf_unit.applies(unit) else unit(h)
        return h

    def cross_entropy(self, h, y):
        """``cross_entropy(self(h), y)``; in training with ``vfbn_fused_v_f`` on, the
        head (pooling, fc, cross-entropy) as one node per derivative
        (:mod:`chainer_vfbn.fused.vf_head`)."""
        if chainer.config.train and chainer.config.vfbn_fused_v_f:
            return vf_head.cross_entropy_of_head(self.maps(h), self.fc, y)
        return cross_entropy(self(h), y)


def cross_entropy(logits, y):
    """Batch-mean softmax cross-entropy, differentiable twice, with no host sync.

    ``F.softmax_cross_entropy(..., enable_double_backprop=True)`` has the same
    gradients, bit for bit (tested; the value can differ in its last bit when the
    batch is not a power of two), but divides by ``max(count, 1.)``, a Python ``max``
    over a device scalar: on a GPU that stalls the host mid-step until every queued
    kernel has run (47 ms per VFBN step under the profiler on the H200,
    ``benchmarks/gpu/gpu_profile.txt``, ``builtins.max``). Here the divisor is the
    batch size, a Python int: there are no ignored labels.

    In training, with ``chainer.config.vfbn_fused_v_f`` on, the same numbers in
    three nodes however often differentiated (:mod:`chainer_vfbn.fused.cross_entropy`;
    VFBN differentiates it twice)."""
    if chainer.config.train and chainer.config.vfbn_fused_v_f:
        return fused_cross_entropy.cross_entropy(logits, y)
    return -F.sum(F.select_item(F.log_softmax(logits), y)) / len(y)


def loss_gradient(v_f, h, y):
    """``d CE(y, v_f(h)) / d h`` (eq. 6) for a batch-mean cross-entropy, as a
    Variable whose graph reaches ``v_f``'s parameters (double backprop). The
    network's fused unit (:mod:`chainer_vfbn.fused.unit`) has no second derivative,
    so it is off here: ``v_f``'s units run as :mod:`chainer_vfbn.fused.vf_unit`
    (:meth:`VirtualForward.forward`), or composed with that switched off too."""
    if not isinstance(h, chainer.Variable) or not h.requires_grad:
        h = chainer.Variable(h.array if isinstance(h, chainer.Variable) else h)
    with chainer.using_config('vfbn_fused_units', False):   # twice differentiable
        if isinstance(v_f, VirtualForward):
            loss = v_f.cross_entropy(h, y)
        else:
            loss = cross_entropy(v_f(h), y)
    delta_hat, = chainer.grad([loss], [h], enable_double_backprop=True)
    return delta_hat


class VFBN(Synthesizer):
    """Virtual forward-backward network (eq. 6): ``delta_hat = v_f'(h) x dCE/dv_f``.

    ``v_f``'s batch normalisation always uses batch statistics (SPEC section 3):
    v_f only produces gradients during training. ``normalized_loss`` divides eq. 3
    by ``s^2`` (an ablation switch; off by default)."""

    def __init__(self, v_f, normalized_loss=False):
        super().__init__()
        self.normalized_loss = normalized_loss
        with self.init_scope():
            self.v_f = v_f

    def forward(self, h, y):
        with chainer.using_config('train', True):
            return loss_gradient(self.v_f, h, y)

    def loss(self, out, delta, scale):
        e = squared_error(out, delta)
        return e / (scale * scale) if self.normalized_loss else e


class LinearVFBN(VFBN):
    """VFBN with a linear ``v_f(h) = W h`` for a vector ``h`` (eq. 8); ``bias=True``
    adds ``+ b``, which leaves eq. 8's gradient form unchanged."""

    def __init__(self, in_size, n_classes=config.N_CLASSES, bias=False, **kwargs):
        super().__init__(L.Linear(in_size, n_classes, nobias=not bias), **kwargs)


class _OneHidden(chainer.Chain):
    def __init__(self, in_size, hidden, n_classes, activation, bias):
        super().__init__()
        self.activation = activation
        with self.init_scope():
            self.l1 = L.Linear(in_size, hidden, nobias=not bias)
            self.l2 = L.Linear(hidden, n_classes, nobias=not bias)

    def forward(self, h):
        return self.l2(self.activation(self.l1(h)))


class MLPVFBN(VFBN):
    """VFBN with one hidden layer ``v_f(h) = W2 f(W1 h)`` (eq. 9).

    ``activation`` is ``f`` (default ``F.tanh``: smooth, so ``f'`` in eq. 9 carries
    information everywhere); ``bias=True`` gives both layers a bias. Eq. 9 leaves
    both open; the choice changes what v_f can mimic, so try it on your network."""

    def __init__(self, in_size, hidden, n_classes=config.N_CLASSES, activation=F.tanh,
                 bias=False, **kwargs):
        super().__init__(_OneHidden(in_size, hidden, n_classes, activation, bias), **kwargs)
