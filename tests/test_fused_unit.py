"""The fused residual unit (:mod:`chainer_vfbn.fused.unit`) against the composed
:class:`chainer_vfbn.model.ResidualUnit`, its definition.

On the CPU the fused unit does Chainer's own array work, operation for operation, so
the comparisons are exact (``assert_array_equal``, in float64): the output, BN's
running mean and variance, every gradient, and the memory layout of the output and of
the input gradient (the next unit's sums run in that layout, so a different one
changes their last bits); in float32 too, and on a GPU within float32 roundings.
Finite differences are the independent oracle of the fused backward, and whole
training steps of four Table 1 methods end with the same state either way.
"""
import copy

import chainer_vfbn  # noqa: F401  (the NumPy-2 shim precedes `import chainer`)
import chainer
import chainer.functions as F
import numpy
import pytest
from chainer import gradient_check
from chainer.utils import conv

from chainer_vfbn import data, methods, model
from chainer_vfbn.fused import kernels, unit as fused_unit
from conftest import Applications

F64 = numpy.float64


def make_unit(c_in, c_out, stride, rng, dtype=F64):
    """A unit (float64 unless told) whose BNs are non-trivial: gamma, beta and the
    running statistics random."""
    with chainer.using_config('dtype', dtype):
        unit = model.ResidualUnit(c_in, c_out, stride)
    for bn in (unit.bn1, unit.bn2):
        bn.gamma.array[:] = 1 + 0.3 * rng.randn(c_out)
        bn.beta.array[:] = 0.3 * rng.randn(c_out)
        bn.avg_mean[:] = 0.1 * rng.randn(c_out)
        bn.avg_var[:] = 1 + 0.5 * rng.rand(c_out)
    return unit


def forward_backward(unit, x, gy, fused, device=None):
    """Train-mode forward and backward of a copy of ``unit`` (on ``device``): its
    output, input gradient, parameter gradients, running statistics, and the
    applications made."""
    unit = copy.deepcopy(unit)
    unit.cleargrads()
    if device is not None:
        unit.to_device(device)
        x, gy = device.send(x), device.send(gy)
    x = chainer.Variable(x.copy())
    hook = Applications()
    with chainer.using_config('train', True), \
            chainer.using_config('vfbn_fused_units', fused), hook:
        y = unit(x)
        y.grad = gy.copy()
        y.backward()
    state = {'y': y.array, 'gx': x.grad}
    state.update(('grad ' + name, p.grad) for name, p in unit.namedparams())
    state.update(link_state(unit))
    return state, hook.labels


def link_state(link):
    """What a snapshot of ``link`` holds: parameters and persistent values."""
    snapshot = chainer.serializers.DictionarySerializer()
    snapshot.save(link)
    return snapshot.target


@pytest.mark.parametrize('c_in, c_out, stride, batch, size', [
    (4, 4, 1, 2, 5),        # same channels: the shortcut is x
    (4, 6, 1, 3, 5),        # channels grow: zero channels
    (4, 6, 2, 3, 6),        # stride 2 and growth (ResBlock-2's first unit)
    (5, 5, 2, 4, 7),        # stride 2, same channels (ResBlock-3's first unit), odd size
    (16, 32, 2, 4, 34),     # maps over 256 KiB, where NumPy reuses temporaries
])
def test_fused_unit_is_bit_identical_to_the_composed_unit(c_in, c_out, stride, batch, size):
    rng = numpy.random.RandomState(c_in + c_out + stride + size)
    unit = make_unit(c_in, c_out, stride, rng)
    x = rng.randn(batch, c_in, size, size)
    out = (size - 1) // stride + 1
    gy = rng.randn(batch, c_out, out, out)
    composed, composed_labels = forward_backward(unit, x, gy, fused=False)
    fused, fused_labels = forward_backward(unit, x, gy, fused=True)

    assert fused_labels == ['FusedResidualUnit', 'FusedResidualUnitGrad']
    assert len(composed_labels) >= 16
    assert sorted(fused) == sorted(composed)
    assert {'gx', 'grad /conv1/W', 'grad /bn2/beta', 'bn1/avg_mean',
            'bn2/avg_var'} <= set(composed)
    for name, want in composed.items():
        got = fused[name]
        assert numpy.isfinite(want).all(), name
        numpy.testing.assert_array_equal(got, want, err_msg=name)
        if isinstance(want, numpy.ndarray):
            assert got.dtype == want.dtype, name
    for name in ('y', 'gx'):
        assert fused[name].strides == composed[name].strides, name
    # The running statistics moved, and the ReLUs cut: nothing here is trivial.
    assert not numpy.array_equal(composed['bn2/avg_var'], unit.bn2.avg_var)
    assert 0 < (composed['y'] == 0).mean() < 1


@pytest.mark.parametrize('c_in, c_out, stride', [(4, 4, 1), (4, 6, 2)])
def test_fused_unit_in_float32_on_each_device(c_in, c_out, stride, device):
    """float32, the training dtype, on the CPU (bit for bit) and on a GPU, where the
    fused kernels (chainer_vfbn.fused.kernels) replace Chainer's: one float32
    rounding apart at most, times the sums' lengths."""
    rng = numpy.random.RandomState(30 + stride)
    unit = make_unit(c_in, c_out, stride, rng, numpy.float32)
    x = rng.randn(4, c_in, 8, 8).astype(numpy.float32)
    gy = rng.randn(4, c_out, 8 // stride, 8 // stride).astype(numpy.float32)
    composed, _ = forward_backward(unit, x, gy, fused=False, device=device)
    fused, labels = forward_backward(unit, x, gy, fused=True, device=device)
    assert labels == ['FusedResidualUnit', 'FusedResidualUnitGrad']
    assert sorted(fused) == sorted(composed)
    for name in composed:
        want, got = (chainer.backend.CpuDevice().send(a[name]) for a in (composed, fused))
        assert got.dtype == want.dtype, name
        assert want.dtype == numpy.float32 or name.endswith('/N'), name
        if device.xp is numpy:
            numpy.testing.assert_array_equal(got, want, err_msg=name)
        else:
            numpy.testing.assert_allclose(got, want, rtol=1e-4,
                                          atol=1e-5 * float(abs(want).max()), err_msg=name)


@pytest.mark.parametrize('dtype', [numpy.float32, F64])
@pytest.mark.parametrize('k, stride, pad, shape', [
    (3, 1, 1, (2, 3, 5, 5)), (3, 2, 1, (3, 4, 7, 6)), (1, 2, 0, (2, 3, 6, 6)),
    (3, 1, 1, (2, 8, 16, 16)),      # col2im: 2**12 elements, gathered
    (3, 1, 1, (4, 16, 24, 24)),     # col2im: 36864 > GATHER_MAX, Chainer's adds
])
def test_im2col_and_col2im_are_chainers_bit_for_bit(dtype, k, stride, pad, shape):
    """The fewer-call CPU im2col and col2im against Chainer's: the same values and
    layout (im2col copies, negative zeros included); col2im the same sums, on random
    terms whose last bits show any change of order (a reversed order fails), on
    both sides of GATHER_MAX."""
    rng = numpy.random.RandomState(sum(shape))
    x = rng.randn(*shape).astype(dtype)
    x[0, 0, 0, :2] = -0.0
    want = conv.im2col_cpu(x, k, k, stride, stride, pad, pad)
    got = kernels.im2col_cpu(x, k, stride, pad)
    assert got.dtype == want.dtype and got.strides == want.strides
    numpy.testing.assert_array_equal(got, want)
    numpy.testing.assert_array_equal(numpy.signbit(got), numpy.signbit(want))  # copies
    col = rng.randn(*want.shape).astype(dtype)
    h, w = shape[2:]
    want = conv.col2im_cpu(col, stride, stride, pad, pad, h, w)
    got = kernels.col2im_cpu(col, stride, pad, h, w)
    assert got.dtype == want.dtype and got.shape == want.shape
    numpy.testing.assert_array_equal(got, want)
    assert (shape[0] * shape[1] * h * w > kernels.GATHER_MAX) == (shape[1] == 16)


@pytest.mark.parametrize('c_in, c_out, stride', [(3, 3, 1), (3, 4, 2)])
def test_fused_backward_matches_finite_differences(c_in, c_out, stride):
    """The fused node alone (no composed link involved) against central differences
    of its own forward, every input at once, float64."""
    rng = numpy.random.RandomState(10 + stride)
    unit = make_unit(c_in, c_out, stride, rng)
    x = rng.randn(3, c_in, 5, 5)
    params = [p.array.copy() for p in (unit.conv1.W, unit.bn1.gamma, unit.bn1.beta,
                                       unit.conv2.W, unit.bn2.gamma, unit.bn2.beta)]
    out = (5 - 1) // stride + 1
    gy = rng.randn(3, c_out, out, out)

    def f(*inputs):
        return fused_unit.FusedResidualUnit(unit).apply(inputs)

    with chainer.using_config('train', True):
        gradient_check.check_backward(f, [x] + params, gy, dtype=F64, eps=1e-6,
                                      atol=1e-6, rtol=1e-5)


def test_second_derivative_through_a_fused_unit_raises_naming_the_switch():
    rng = numpy.random.RandomState(20)
    unit = make_unit(3, 3, 1, rng)
    x = rng.randn(2, 3, 4, 4)
    firsts = []
    for fused in (False, True):
        u, xv = copy.deepcopy(unit), chainer.Variable(x.copy())
        u.cleargrads()
        with chainer.using_config('train', True), \
                chainer.using_config('vfbn_fused_units', fused):
            gx, = chainer.grad([F.sum(F.square(u(xv)))], [xv], enable_double_backprop=True)
        firsts.append(gx)
    # The first derivative is right even with the graph kept ...
    numpy.testing.assert_array_equal(firsts[1].array, firsts[0].array)
    F.sum(F.square(firsts[0])).backward()              # composed: twice differentiable
    # ... the second one refuses.
    with pytest.raises(RuntimeError, match="using_config.'vfbn_fused_units', False."):
        F.sum(F.square(firsts[1])).backward()


def test_evaluation_and_no_backprop_run_composed():
    rng = numpy.random.RandomState(21)
    unit = make_unit(3, 3, 1, rng)
    x = rng.randn(2, 3, 4, 4)
    for train, backprop in ((False, True), (True, False)):
        hook = Applications()
        with chainer.using_config('train', train), \
                chainer.using_config('enable_backprop', backprop), hook:
            unit(x)
        assert 'FusedResidualUnit' not in hook.labels
        assert ('FixedBatchNormalization' in hook.labels) == (not train)


# ---------------------------------------------------------------------------
# Whole training steps.

def batch_iterator(seed=0, batchsize=8):
    rng = numpy.random.RandomState(seed)
    images = rng.randint(0, 256, (4, 3, 32, 32)).astype(numpy.uint8)
    labels = rng.randint(0, 10, 4).astype(numpy.int32)
    ds = data.AugmentedDataset(images, labels)
    get = ds.get_batch
    ds.get_batch = lambda idx: (get(idx)[0].astype(F64), get(idx)[1])
    return data.BatchIterator(ds, batchsize, shuffle=False)


def trained_state(method, fused, steps=2):
    """Everything an updater snapshot holds (every network, every optimizer's state,
    the iterator) after ``steps`` updates of ``method`` at depth 1, float64 (the
    second update uses the momenta and Adam's moments); and the units that ran fused
    in the last update. The first unit's maps exceed 256 KiB."""
    numpy.random.seed(0)
    with chainer.using_config('dtype', F64):
        networks = methods.build_networks(method, depth=1)
    updater, _ = methods.build_updater(networks, iterator=batch_iterator(), alpha_gs=1e-3)
    hook = Applications()
    with chainer.using_config('vfbn_fused_units', fused):
        for _ in range(steps - 1):
            updater.update()
        with hook:
            updater.update()
    snapshot = chainer.serializers.DictionarySerializer()
    snapshot.save(updater)
    return snapshot.target, hook.count('FusedResidualUnit')


@pytest.mark.parametrize('method, fused_units', [
    pytest.param('bp', 3, marks=pytest.mark.numpy1),
    ('vfbn', 3),                # the network's 3 units; v_f's 2 units run composed
    ('jaderberg-resnet', 5),    # the synthesizer's 2 units come along
    ('layerwise', 3),           # the head's 2 units run as v_f's (fused.vf_unit)
])
def test_training_steps_with_fused_units_equal_the_composed_steps(method, fused_units):
    composed, none = trained_state(method, fused=False)
    fused, count = trained_state(method, fused=True)
    assert (none, count) == (0, fused_units)
    assert sorted(fused) == sorted(composed)
    assert any('avg_var' in k for k in composed) and any('/v' in k for k in composed)
    for key, want in composed.items():
        numpy.testing.assert_array_equal(numpy.asarray(fused[key]), numpy.asarray(want),
                                         err_msg=key)
