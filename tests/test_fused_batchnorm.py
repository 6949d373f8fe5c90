"""Batch normalisation with a one-node double backward against Chainer's composed
one, against finite differences, and inside VFBN's eq. 3 (float64)."""
import chainer_vfbn  # noqa: F401  (compat shim before chainer)

import copy

import chainer
import chainer.functions as F
import chainer.links as L
import numpy
import pytest
from chainer import gradient_check, serializers

from chainer_vfbn import synthesizers
from chainer_vfbn.fused import batchnorm
from conftest import Applications

pytestmark = pytest.mark.numpy1

F64 = numpy.float64
SWITCH = 'vfbn_fused_bn_double_backward'


def data(shape=(3, 4, 5, 5), seed=0):
    rng = numpy.random.RandomState(seed)
    return [rng.randn(*shape) for _ in range(3)]


def links():
    """A fused link and Chainer's, with the same random gamma, beta and statistics."""
    rng = numpy.random.RandomState(1)
    with chainer.using_config('dtype', F64):
        ours, ref = batchnorm.BatchNormalization(4), L.BatchNormalization(4)
    ours.gamma.array[...] = rng.uniform(0.5, 1.5, 4)
    ours.beta.array[...] = rng.randn(4)
    ours.avg_mean[...], ours.avg_var[...] = 0.3, 2.0
    ref.copyparams(ours, copy_persistent=True)
    return ours, ref


def first_and_second(link, x, gy, weights, enabled=True):
    """y; the first derivatives (gx, ggamma, gbeta) for ``gy``; then the derivatives
    of ``sum(weights . (gx, ggamma, gbeta))`` w.r.t. x, gamma and gy."""
    x, gy = chainer.Variable(x), chainer.Variable(gy)
    with chainer.using_config(SWITCH, enabled), chainer.using_config('train', True):
        y = link(x)
        first = chainer.grad([y], [x, link.gamma, link.beta], [gy],
                             enable_double_backprop=True)
        l2 = sum(F.sum(w * g) for w, g in zip(weights, first) if w is not None)
        second = chainer.grad([l2], [x, link.gamma, gy])
    return [y.array] + [g.array for g in first] + [g.array for g in second]


@pytest.mark.parametrize('given', ['all', 'gx only', 'gamma and beta only'])
def test_forward_first_and_second_derivatives_bit_identical_to_chainers(given):
    x, gy, ggx = data()
    rng = numpy.random.RandomState(2)
    weights = [ggx, rng.randn(4), rng.randn(4)]
    if given == 'gx only':
        weights[1:] = [None, None]
    elif given == 'gamma and beta only':
        weights[0] = None
    ours, ref = links()
    got = first_and_second(ours, x, gy, weights)
    want = first_and_second(ref, x, gy, weights)
    names = ['y', 'gx', 'ggamma', 'gbeta', 'd/dx', 'd/dgamma', 'd/dgy']
    for name, a, b in zip(names, got, want):
        numpy.testing.assert_array_equal(a, b, err_msg=name)
    for stat in ('avg_mean', 'avg_var'):
        numpy.testing.assert_array_equal(getattr(ours, stat), getattr(ref, stat))
        assert not numpy.array_equal(getattr(ours, stat), getattr(links()[0], stat))
    assert numpy.abs(got[4]).max() > 0 and numpy.abs(got[6]).max() > 0


def test_second_derivative_is_one_node_and_the_switch_turns_it_off():
    x, gy, ggx = data()
    weights = [ggx, numpy.ones(4), numpy.ones(4)]
    ours, _ = links()
    for enabled in (True, False):
        with Applications() as count:
            first_and_second(ours, x, gy, weights, enabled)
        assert count.count('BatchNormalizationDoubleGrad') == (1 if enabled else 0)
        if enabled:
            assert count.total < 20
        else:
            assert count.total > 40


def test_second_derivative_against_finite_differences():
    x, gy, ggx = data((4, 3, 2, 2), seed=3)
    rng = numpy.random.RandomState(4)
    gamma, beta = rng.uniform(0.5, 1.5, 3), rng.randn(3)

    def f(x, gamma, beta):
        return batchnorm.batch_normalization(x, gamma, beta)

    gradient_check.check_double_backward(
        f, (x, gamma, beta), gy, (ggx, rng.randn(3), rng.randn(3)),
        dtype=F64, atol=1e-6, rtol=1e-5)


def test_a_third_derivative_is_refused_with_a_clear_message():
    x, gy, ggx = data()
    ours, _ = links()
    x = chainer.Variable(x)
    with chainer.using_config('train', True):
        gx, = chainer.grad([ours(x)], [x], [chainer.Variable(gy)],
                           enable_double_backprop=True)
        g2, = chainer.grad([F.sum(gx * gx)], [x], enable_double_backprop=True)
        with pytest.raises(NotImplementedError, match='third derivative'):
            chainer.grad([F.sum(g2)], [x])


def test_the_link_keeps_chainers_names_in_snapshots():
    ours, ref = links()
    keys = []
    for link in (ours, ref):
        s = serializers.DictionarySerializer()
        link.serialize(s)
        keys.append(sorted(s.target))
    assert keys[0] == keys[1] and 'avg_mean' in keys[0] and 'N' in keys[0]
    assert [n for n, _ in ours.namedparams()] == [n for n, _ in ref.namedparams()]


def vfbn_eq3(enabled, synth, h, y, delta):
    """delta_hat (eq. 6) and eq. 3's gradients for v_f's parameters."""
    synth = copy.deepcopy(synth)
    with chainer.using_config(SWITCH, enabled), Applications() as count, \
            chainer.using_config('vfbn_fused_v_f', False):   # v_f's composed units
        delta_hat = synth(chainer.Variable(h), y)
        e = synth.loss(delta_hat, delta, 1.0)
        synth.cleargrads()
        e.backward()
    grads = {name: p.grad for name, p in synth.namedparams()}
    stats = {name: getattr(link, stat).copy() for name, link in synth.namedlinks()
             if isinstance(link, L.BatchNormalization) for stat in ('avg_mean', 'avg_var')}
    return delta_hat.array, grads, stats, count


def test_eq3_gradients_of_v_f_bit_identical_with_the_fused_second_derivative():
    rng = numpy.random.RandomState(5)
    with chainer.using_config('dtype', F64):
        numpy.random.seed(6)
        synth = synthesizers.VFBN(synthesizers.VirtualForward(4))
    h, delta = rng.randn(3, 4, 5, 5), rng.randn(3, 4, 5, 5)
    y = numpy.array([1, 7, 3], numpy.int32)
    got, want = vfbn_eq3(True, synth, h, y, delta), vfbn_eq3(False, synth, h, y, delta)
    numpy.testing.assert_array_equal(got[0], want[0])
    assert got[1].keys() == want[1].keys() and len(got[1]) == 14
    for name in got[1]:
        numpy.testing.assert_array_equal(got[1][name], want[1][name], err_msg=name)
        assert numpy.abs(got[1][name]).max() > 0, name
    assert len(got[2]) == 4
    for name in got[2]:
        numpy.testing.assert_array_equal(got[2][name], want[2][name], err_msg=name)
    assert got[3].count('BatchNormalizationDoubleGrad') == 4
    assert got[3].total < want[3].total - 4 * 30


def test_eq3_gradients_of_v_f_against_finite_differences():
    """d eq.3 / d theta for a few of v_f's parameters, by central differences of
    the eq. 3 loss (float64, the fused path)."""
    rng = numpy.random.RandomState(7)
    with chainer.using_config('dtype', F64):
        numpy.random.seed(8)
        synth = synthesizers.VFBN(synthesizers.VirtualForward(2))
    h, delta = rng.randn(2, 2, 3, 3), rng.randn(2, 2, 3, 3)
    y = numpy.array([4, 0], numpy.int32)
    _, grads, _, _ = vfbn_eq3(True, synth, h, y, delta)

    def loss():
        s = copy.deepcopy(synth)       # the running statistics stay as they were
        return float(s.loss(s(chainer.Variable(h), y), delta, 1.0).array)

    params = dict(synth.namedparams())
    for name in ('/v_f/res1/bn1/gamma', '/v_f/res2/bn2/gamma', '/v_f/res1/conv1/W',
                 '/v_f/fc/W'):
        p = params[name].array
        for index in [(0,), (1,)] if p.ndim == 1 else [(0,) * p.ndim, (1,) + (0,) * (p.ndim - 1)]:
            old, eps = p[index], 1e-5
            p[index] = old + eps
            up = loss()
            p[index] = old - eps
            down = loss()
            p[index] = old
            numpy.testing.assert_allclose(grads[name][index], (up - down) / (2 * eps),
                                          rtol=1e-5, atol=1e-8, err_msg=name)
