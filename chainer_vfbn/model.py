"""The paper's ResNet-110 (appendix B.1, Figure 2) as Chainer links, split in two.

Input 24x24x3 -> conv1 3x3 (no padding, 16 maps, 22x22) -> ResBlock-1 (n units, 32
maps, 22x22) -> ResBlock-2 (n units, 64 maps, 11x11) -> ResBlock-3 (n units, 64 maps,
6x6) -> global average pooling -> fc 64->10. With n = 18: 1 + 3*2n + 1 = 110 weighted
layers. Shortcuts have no parameters (chainer-cifar10, 2016): a 1x1 average pooling
of stride 2 where the resolution halves, zero channels where the channels grow.

The 3n residual units are numbered 0..3n-1; :func:`build_resnet` cuts the network at
any unit boundary into a :class:`Lower` (conv1 + units[:k]) and an :class:`Upper`
(units[k:] + fc). The paper cuts "right at the middle of ResBlock-2", after its
ceil(n/2)-th unit (:func:`paper_split`), which makes h 64x11x11.
"""
import math

import chainer
import chainer.functions as F
import chainer.links as L
from chainer import initializers

from chainer_vfbn import config
from chainer_vfbn.fused import batchnorm, reductions
from chainer_vfbn.fused import unit as fused_unit


def _conv3x3(in_ch, out_ch, stride=1):
    return L.Convolution2D(in_ch, out_ch, 3, stride, 1, nobias=True,
                           initialW=initializers.HeNormal())


def shortcut(x, out_channels, stride):
    """The parameter-free shortcut: subsample, then pad the channels with zeros."""
    if stride != 1:
        x = F.average_pooling_2d(x, 1, stride)
    pad = out_channels - x.shape[1]
    if pad > 0:
        xp = chainer.backend.get_array_module(x)
        zeros = xp.zeros((x.shape[0], pad) + x.shape[2:], dtype=x.dtype)
        x = F.concat((x, zeros), axis=1)
    return x


class ResidualUnit(chainer.Chain):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``, stride on conv1.
    The BN links are Chainer's with a one-node double backward
    (:mod:`chainer_vfbn.fused.batchnorm`; v_f's units are differentiated twice)."""

    def __init__(self, in_ch, out_ch, stride=1):
        super().__init__()
        self.out_ch, self.stride = out_ch, stride
        with self.init_scope():
            self.conv1 = _conv3x3(in_ch, out_ch, stride)
            self.bn1 = batchnorm.BatchNormalization(out_ch)
            self.conv2 = _conv3x3(out_ch, out_ch)
            self.bn2 = batchnorm.BatchNormalization(out_ch)

    def forward(self, x):
        if fused_unit.applies():   # training: the same numbers, in 2 applications
            return fused_unit.residual_unit(self, x)   # (tests/test_fused_unit.py)
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + shortcut(x, self.out_ch, self.stride))


def unit_specs(n=config.UNITS_PER_BLOCK, channels=config.BLOCK_CHANNELS,
               stem=config.STEM_CHANNELS):
    """(in_ch, out_ch, stride) of each of the 3n units, in order."""
    specs, in_ch = [], stem
    for block, out_ch in enumerate(channels):
        for i in range(n):
            stride = 2 if (block > 0 and i == 0) else 1
            specs.append((in_ch, out_ch, stride))
            in_ch = out_ch
    return specs


def paper_split(n=config.UNITS_PER_BLOCK):
    """Index of the first upper unit: after unit ceil(n/2) of ResBlock-2."""
    return n + int(math.ceil(n / 2.0))


def layer_count(n=config.UNITS_PER_BLOCK):
    """Weighted layers of the network with ``n`` units per block: conv1, 2 convs per
    unit, fc (110 for n = 18)."""
    return 6 * n + 2


def split_name(n, split=None, splits=None):
    """Where the network is cut, in words."""
    if splits and len(splits) > 1:
        return 'in %d modules, before unit indices %s' % (
            len(splits) + 1, ', '.join(map(str, splits)))
    if split is None:
        return 'after unit %d of ResBlock-2' % (paper_split(n) - n)
    return 'before unit index %d' % split


class Lower(chainer.Chain):
    """conv1 (+ BN + ReLU) and residual units ``[0, split)``: x -> h. ``stem``: conv1's
    channels (the paper's 16; narrower for the host-cost proxy)."""

    def __init__(self, specs, stem=config.STEM_CHANNELS):
        super().__init__()
        with self.init_scope():
            self.conv1 = L.Convolution2D(3, stem, 3, 1, 0, initialW=initializers.HeNormal())
            self.bn1 = L.BatchNormalization(stem)
            self.units = chainer.ChainList(*[ResidualUnit(*s) for s in specs])

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        for unit in self.units:
            h = unit(h)
        return h


class Upper(chainer.Chain):
    """Residual units ``[split, 3n)``, global average pooling and fc: h -> logits."""

    def __init__(self, specs, in_ch, n_classes=config.N_CLASSES):
        super().__init__()
        out_ch = specs[-1][1] if specs else in_ch
        with self.init_scope():
            self.units = chainer.ChainList(*[ResidualUnit(*s) for s in specs])
            self.fc = L.Linear(out_ch, n_classes)

    def forward(self, h):
        for unit in self.units:
            h = unit(h)
        return self.head(h)

    def head(self, h):
        """Global average pooling and fc: the last units' maps -> logits."""
        return self.fc(global_average_pooling(h))


def global_average_pooling(h):
    """The mean of ``(B, C, H, W)`` maps over the positions, ``(B, C)``: the network's
    head and v_f's (:class:`chainer_vfbn.synthesizers.VirtualForward`). With
    ``chainer.config.vfbn_fused_reductions`` on, one node per derivative
    (:mod:`chainer_vfbn.fused.reductions`; v_f's is differentiated twice)."""
    if chainer.config.vfbn_fused_reductions:
        return reductions.global_average(h)
    return F.average(h, axis=(2, 3))


class Net(chainer.Chain):
    """Two halves run one after the other: ``upper(lower(x))``."""

    def __init__(self, lower, upper):
        super().__init__()
        with self.init_scope():
            self.lower = lower
            self.upper = upper

    def forward(self, x):
        return self.upper(self.lower(x))


def build_resnet(n=config.UNITS_PER_BLOCK, split=None):
    """The paper's ResNet with ``n`` units per block, cut before unit ``split``.

    Returns ``(lower, upper)``. ``split`` defaults to :func:`paper_split`; any value
    in ``[0, 3n]`` is a unit boundary.
    """
    if n < 1:
        raise ValueError('units per block must be >= 1, got %d' % n)
    specs = unit_specs(n)
    split = paper_split(n) if split is None else split
    if not 0 <= split <= len(specs):
        raise ValueError('split must be a unit boundary in [0, %d], got %d'
                         % (len(specs), split))
    return Lower(specs[:split]), Upper(specs[split:], channels_at(n, split))


def channels_at(n, split):
    """The channels of the maps between units ``split - 1`` and ``split``."""
    return unit_specs(n)[split - 1][1] if split > 0 else config.STEM_CHANNELS
