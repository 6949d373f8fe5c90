"""Tests of :mod:`chainer_vfbn.model`: the paper's ResNet-110 and its split in two.

The oracles come from SPEC section 2 (the paper's appendix B.1 and chainer-cifar10
2016), written out again here: the sizes of every stage, the parameter count from the
layer formula, the split point, the parameter-free shortcut as plain NumPy slicing,
a whole forward pass rebuilt from the weights with NumPy and ``F.convolution_2d``,
and He-normal statistics.
"""
import math

import numpy
import pytest

import chainer_vfbn  # noqa: F401  (before chainer)
import chainer
import chainer.functions as F
import chainer.links as L

from chainer_vfbn import model

PAPER_PARAMS = 2975594  # SPEC section 2, 18 units per block, conv1's bias included
BN_EPS = 2e-5           # L.BatchNormalization's default


def architecture(n):
    """(in_ch, out_ch, stride) of the 3n residual units, from SPEC section 2:
    16 -> 32 at stride 1, 32 -> 64 with the first unit at stride 2, 64 -> 64 with
    the first unit at stride 2."""
    units = []
    for in_ch, out_ch, stride in ((16, 32, 1), (32, 64, 2), (64, 64, 2)):
        units.append((in_ch, out_ch, stride))
        units += [(out_ch, out_ch, 1)] * (n - 1)
    return units


def all_units(lower, upper):
    return list(lower.units) + list(upper.units)


def n_params(*links):
    return sum(p.size for link in links for p in link.params())


@pytest.fixture(scope='module')
def full_net():
    """The full-depth (n = 18) network at the paper's split, seeded."""
    numpy.random.seed(0)
    return model.build_resnet(18)


# ---------------------------------------------------------------------------
# Sizes, counts and the split.

class OutputShapes(chainer.LinkHook):
    """Records the output shape of every link call in one forward pass."""

    name = 'OutputShapes'

    def __init__(self):
        self.shapes = []

    def forward_postprocess(self, args):
        self.shapes.append((args.link, args.out.shape))


def test_full_depth_shapes_at_every_stage(full_net):
    lower, upper = full_net
    x = numpy.random.RandomState(1).randn(2, 3, 24, 24).astype(numpy.float32)
    hook = OutputShapes()
    with chainer.using_config('train', False), chainer.no_backprop_mode(), hook:
        hidden = lower(x)
        logits = upper(hidden)
    shapes = dict(hook.shapes)
    assert shapes[lower.conv1] == (2, 16, 22, 22)     # conv1, no padding
    units = [shapes[u] for u in all_units(lower, upper)]
    assert len(units) == 54
    assert units[:18] == [(2, 32, 22, 22)] * 18       # ResBlock-1
    assert units[18:36] == [(2, 64, 11, 11)] * 18     # ResBlock-2, its first unit halves
    assert units[36:] == [(2, 64, 6, 6)] * 18         # ResBlock-3, its first unit halves
    assert hidden.shape == (2, 64, 11, 11)            # h at the paper's split
    assert logits.shape == (2, 10)


def test_parameter_count_from_the_layer_formula(full_net):
    def conv(c_in, c_out):
        return 3 * 3 * c_in * c_out

    def bn(c):
        return 2 * c  # gamma and beta; the running mean and variance are not parameters

    expected = conv(3, 16) + 16 + bn(16)              # conv1 with its bias, BN
    for c_in, c_out, _ in architecture(18):
        expected += conv(c_in, c_out) + bn(c_out) + conv(c_out, c_out) + bn(c_out)
    expected += 64 * 10 + 10                          # fc W and b
    assert expected == PAPER_PARAMS
    assert n_params(*full_net) == expected


def test_110_weighted_layers_55_on_each_side(full_net):
    lower, upper = full_net

    def count(link, kind):
        return sum(isinstance(l, kind) for l in link.links())
    assert count(lower, L.Convolution2D) == 1 + 2 * (18 + 9) == 55
    assert count(lower, L.Linear) == 0
    assert count(upper, L.Convolution2D) == 2 * (9 + 18) == 54
    assert count(upper, L.Linear) == 1
    assert len(lower.units) == 27 and len(upper.units) == 27
    # conv1 keeps its bias (chainer-cifar10); no other conv has one.
    assert lower.conv1.b is not None and lower.conv1.b.shape == (16,)
    convs = [l for l in lower.links() if isinstance(l, L.Convolution2D)]
    convs += [l for l in upper.links() if isinstance(l, L.Convolution2D)]
    assert sum(c.b is not None for c in convs) == 1


@pytest.mark.parametrize('n, units_below', [(1, 2), (2, 3), (3, 5), (18, 27)])
def test_default_cut_is_mid_resblock2_with_h_64x11x11(n, units_below):
    """The cut follows unit ceil(n/2) of ResBlock-2 (worked out by hand here: 55
    weighted layers below it at n = 18, as the paper says), where h is 64x11x11."""
    lower, upper = model.build_resnet(n)
    assert len(lower.units) == units_below
    assert len(lower.units) + len(upper.units) == 3 * n
    x = numpy.zeros((1, 3, 24, 24), numpy.float32)
    with chainer.using_config('train', False), chainer.no_backprop_mode():
        assert lower(x).shape == (1, 64, 11, 11)


@pytest.mark.parametrize('n, split', [(2, -1), (2, 7), (1, 4), (0, None)])
def test_out_of_range_split_or_depth_raises(n, split):
    with pytest.raises(ValueError):
        model.build_resnet(n, split)


# ---------------------------------------------------------------------------
# The shortcut and the residual unit.

def test_shortcut_subsamples_like_strided_slicing_and_pads_zero_channels():
    rng = numpy.random.RandomState(2)
    for c_in, c_out, size, stride, out_size in ((16, 32, 22, 1, 22),
                                                (32, 64, 22, 2, 11),
                                                (64, 64, 11, 2, 6)):
        x = rng.randn(2, c_in, size, size).astype(numpy.float32)
        expected = numpy.zeros((2, c_out, out_size, out_size), numpy.float32)
        expected[:, :c_in] = x[:, :, ::stride, ::stride]
        y = model.shortcut(x, c_out, stride)
        assert y.shape == expected.shape
        numpy.testing.assert_array_equal(y.array, expected)


def test_residual_unit_has_no_shortcut_parameters_and_adds_the_shortcut():
    unit = model.ResidualUnit(32, 64, stride=2)
    names = {name for name, _ in unit.namedparams()}
    assert names == {'/conv1/W', '/bn1/gamma', '/bn1/beta',
                     '/conv2/W', '/bn2/gamma', '/bn2/beta'}
    assert n_params(unit) == 9 * 32 * 64 + 9 * 64 * 64 + 4 * 64
    assert unit.conv1.stride == (2, 2) and unit.conv2.stride == (1, 1)
    # With bn2's output forced to zero the unit is relu(shortcut(x)).
    unit.bn2.gamma.array[:] = 0
    unit.bn2.beta.array[:] = 0
    x = numpy.random.RandomState(3).randn(2, 32, 22, 22).astype(numpy.float32)
    expected = numpy.zeros((2, 64, 11, 11), numpy.float32)
    expected[:, :32] = numpy.maximum(x[:, :, ::2, ::2], 0)
    with chainer.using_config('train', False):
        numpy.testing.assert_array_equal(unit(x).array, expected)


# ---------------------------------------------------------------------------
# Every cut computes the same network.

def randomise_batch_norms(link, rng):
    """Make test-mode BN a non-trivial affine map, so the reference must get it right."""
    for bn in link.links():
        if isinstance(bn, L.BatchNormalization):
            c = bn.gamma.shape[0]
            bn.gamma.array[:] = 1 + 0.2 * rng.randn(c)
            bn.beta.array[:] = 0.2 * rng.randn(c)
            bn.avg_mean[:] = 0.1 * rng.randn(c)
            bn.avg_var[:] = 1 + 0.5 * rng.rand(c)


def reference_forward(lower, upper, x, n):
    """The network of SPEC section 2 written out with NumPy, reading only weights:
    test-mode BN as ``(x - mean) / sqrt(var + eps) * gamma + beta``, shortcuts as
    ``x[:, :, ::2, ::2]`` plus zero channels, global average pooling, fc."""
    def conv(h, link, stride, pad):
        b = None if link.b is None else link.b.array
        return F.convolution_2d(h, link.W.array, b, stride, pad).array

    def bn(h, link):
        scale = link.gamma.array / numpy.sqrt(link.avg_var + BN_EPS)
        return ((h - link.avg_mean[:, None, None]) * scale[:, None, None]
                + link.beta.array[:, None, None])

    h = numpy.maximum(bn(conv(x, lower.conv1, 1, 0), lower.bn1), 0)
    for unit, (c_in, c_out, stride) in zip(all_units(lower, upper), architecture(n)):
        r = numpy.maximum(bn(conv(h, unit.conv1, stride, 1), unit.bn1), 0)
        r = bn(conv(r, unit.conv2, 1, 1), unit.bn2)
        s = numpy.zeros_like(r)
        s[:, :c_in] = h[:, :, ::stride, ::stride]
        h = numpy.maximum(r + s, 0)
    pooled = h.mean(axis=(2, 3))
    return pooled @ upper.fc.W.array.T + upper.fc.b.array


def test_every_split_composes_to_the_same_network():
    n = 2
    rng = numpy.random.RandomState(4)
    numpy.random.seed(4)
    src_lower, src_upper = model.build_resnet(n)
    randomise_batch_norms(src_lower, rng)
    randomise_batch_norms(src_upper, rng)
    src_upper.fc.b.array[:] = rng.randn(10)
    x = rng.randn(2, 3, 24, 24).astype(numpy.float32)
    expected = reference_forward(src_lower, src_upper, x, n)

    for split in range(3 * n + 1):
        lower, upper = model.build_resnet(n, split)
        assert len(lower.units) == split and len(upper.units) == 3 * n - split
        for dst, src in zip(all_units(lower, upper), all_units(src_lower, src_upper)):
            dst.copyparams(src, copy_persistent=True)
        for dst, src in ((lower.conv1, src_lower.conv1), (lower.bn1, src_lower.bn1),
                         (upper.fc, src_upper.fc)):
            dst.copyparams(src, copy_persistent=True)
        with chainer.using_config('train', False), chainer.no_backprop_mode():
            h = lower(x)
            y = model.Net(lower, upper)(x).array
        channels = 16 if split == 0 else (32 if split <= n else 64)
        size = 22 if split <= n else (11 if split <= 2 * n else 6)
        assert h.shape == (2, channels, size, size), split
        numpy.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4 * abs(expected).max(),
                                      err_msg='split %d' % split)


# ---------------------------------------------------------------------------
# Initialisation.

def test_he_normal_initial_statistics(full_net):
    """Every conv's W ~ N(0, 2 / fan_in), fan_in = 9 in_ch (3 x 3 kernels). Pooling
    all convs of one fan_in gives N samples; the sample std of N normal draws has a
    standard error sigma / sqrt(2N), the mean sigma / sqrt(N). Allow 6 standard
    errors (a false alarm has probability ~1e-9). The fc keeps Chainer's default,
    LeCun normal N(0, 1 / fan_in), and a zero bias; BN starts at gamma 1, beta 0."""
    lower, upper = full_net
    pools = {}
    for link in list(lower.links()) + list(upper.links()):
        if isinstance(link, L.Convolution2D):
            c_out, c_in, kh, kw = link.W.shape
            assert (kh, kw) == (3, 3)
            pools.setdefault(c_in * kh * kw, []).append(link.W.array.ravel())
    assert sorted(pools) == [27, 144, 288, 576]
    checks = [(fan_in, numpy.concatenate(ws), math.sqrt(2.0 / fan_in))
              for fan_in, ws in pools.items()]
    checks.append(('fc', upper.fc.W.array.ravel(), math.sqrt(1.0 / 64)))
    for name, w, sigma in checks:
        se_std, se_mean = sigma / math.sqrt(2 * w.size), sigma / math.sqrt(w.size)
        assert abs(w.std() - sigma) < 6 * se_std, (name, w.std(), sigma)
        assert abs(w.mean()) < 6 * se_mean, (name, w.mean())
    assert not upper.fc.b.array.any() and not lower.conv1.b.array.any()
    for link in list(lower.links()) + list(upper.links()):
        if isinstance(link, L.BatchNormalization):
            assert (link.gamma.array == 1).all() and not link.beta.array.any()
