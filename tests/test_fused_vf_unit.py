"""v_f's residual unit, its cross-entropy and its head (pooling, fc, cross-entropy)
as three nodes each against the composed ones, against finite differences, and
inside VFBN's eq. 3 (float64)."""
import chainer_vfbn  # noqa: F401  (compat shim before chainer)

import contextlib
import copy

import chainer
import chainer.functions as F
import chainer.links as L
import numpy
import pytest
from chainer import gradient_check, serializers

from chainer_vfbn import data, fused, methods, model, synthesizers
from chainer_vfbn.fused import cross_entropy as vf_cross_entropy, vf_head, vf_unit
from conftest import Applications

pytestmark = pytest.mark.numpy1

F64 = numpy.float64
SWITCH = 'vfbn_fused_v_f'
PARAMS = ('conv1/W', 'bn1/gamma', 'bn1/beta', 'conv2/W', 'bn2/gamma', 'bn2/beta')


def unit(channels=3, seed=0):
    numpy.random.seed(seed)
    with chainer.using_config('dtype', F64):
        u = model.ResidualUnit(channels, channels)
    rng = numpy.random.RandomState(seed + 1)
    for bn in (u.bn1, u.bn2):
        bn.gamma.array[...] = rng.uniform(0.5, 1.5, channels)
        bn.beta.array[...] = rng.randn(channels) * 0.3
    return u


def params(u):
    return [dict(u.namedparams())['/' + name] for name in PARAMS]


def run(u, x, gy, weights, fused):
    """y; the first derivatives w.r.t. x and the 6 parameters for ``gy``; the
    derivatives of ``sum(weights . first)`` w.r.t. x, the parameters and gy."""
    u = copy.deepcopy(u)
    x, gy = chainer.Variable(x), chainer.Variable(gy)
    # The composed reference: model.ResidualUnit with its own single-derivative twin
    # (chainer_vfbn.fused.unit) off.
    with chainer.using_config('train', True), chainer.using_config('vfbn_fused_units', False):
        y = vf_unit.residual_unit(u, x) if fused else u(x)
        first = chainer.grad([y], [x] + params(u), [gy], enable_double_backprop=True)
        terms = [F.sum(w * g) for w, g in zip(weights, first) if w is not None]
        second = chainer.grad([sum(terms)], [x] + params(u) + [gy]) if terms else []
    stats = [getattr(bn, s).copy() for bn in (u.bn1, u.bn2) for s in ('avg_mean', 'avg_var')]
    second = [None if g is None else g.array for g in second]
    return y.array, [g.array for g in first], second, stats


def assert_same(got, want, name):
    """Bit for bit, and not trivially (not all zero)."""
    assert float(abs(want).max()) > 0, name
    numpy.testing.assert_array_equal(got, want, err_msg=name)


@pytest.mark.parametrize('given', ['all', 'gx only'])
def test_forward_first_and_second_derivatives_bit_identical_to_the_composed_unit(given):
    rng = numpy.random.RandomState(2)
    u = unit()
    x, gy = rng.randn(4, 3, 5, 5), rng.randn(4, 3, 5, 5)
    firsts = run(u, x, gy, [None] * 7, True)[1]
    weights = [rng.randn(*g.shape) for g in firsts]
    if given == 'gx only':
        weights[1:] = [None] * 6
    got, want = run(u, x, gy, weights, True), run(u, x, gy, weights, False)
    numpy.testing.assert_array_equal(got[0], want[0], err_msg='y')
    for name, a, b in zip(['x'] + list(PARAMS), got[1], want[1]):
        numpy.testing.assert_array_equal(a, b, err_msg='first derivative ' + name)
    for a, b in zip(got[3], want[3]):
        numpy.testing.assert_array_equal(a, b, err_msg='running statistics')
    for name, a, b in zip(['x'] + list(PARAMS) + ['gy'], got[2], want[2]):
        if name == 'bn2/beta':           # enters the first derivative through a mask only
            assert a is None or not a.any()
            assert b is None or not b.any()
            continue
        assert_same(a, b, 'second derivative ' + name)


def test_three_nodes_against_finite_differences():
    rng = numpy.random.RandomState(3)
    u = unit(channels=2, seed=4)
    x = rng.randn(3, 2, 3, 3)
    inputs = [x] + [p.array.copy() for p in params(u)]

    def f(x, W1, g1, b1, W2, g2, b2):
        return vf_unit.UnitFunction(u.bn1, u.bn2).apply((x, W1, g1, b1, W2, g2, b2))[0]

    gy = rng.randn(3, 2, 3, 3)
    ggs = [rng.randn(*a.shape) for a in inputs]
    with chainer.using_config('train', True):
        gradient_check.check_double_backward(f, inputs, gy, ggs, dtype=F64,
                                             atol=1e-5, rtol=1e-4)


def test_a_third_derivative_is_refused_with_a_clear_message():
    """Through the second-derivative node (w.r.t. gy) and through the first
    derivative that carries eq. 3's gradients (w.r.t. x)."""
    rng = numpy.random.RandomState(5)
    u = unit()
    for wrt in ('gy', 'x'):
        x = chainer.Variable(rng.randn(2, 3, 4, 4))
        gy = chainer.Variable(rng.randn(2, 3, 4, 4))
        target = gy if wrt == 'gy' else x
        with chainer.using_config('train', True):
            gx, = chainer.grad([vf_unit.residual_unit(u, x)], [x], [gy],
                               enable_double_backprop=True)
            g2, = chainer.grad([F.sum(gx * gx)], [target], enable_double_backprop=True)
            with pytest.raises(NotImplementedError, match='third derivative'):
                chainer.grad([F.sum(g2)], [target])


def test_only_identity_shortcut_units_in_training_are_fused():
    with chainer.using_config('train', True):
        assert vf_unit.applies(unit())
        assert not vf_unit.applies(model.ResidualUnit(3, 3, stride=2))
        assert not vf_unit.applies(model.ResidualUnit(3, 6))
        with chainer.using_config(SWITCH, False):
            assert not vf_unit.applies(unit())
    with chainer.using_config('train', False):
        assert not vf_unit.applies(unit())


def synth_and_batch(channels=4, seed=6):
    rng = numpy.random.RandomState(seed)
    with chainer.using_config('dtype', F64):
        numpy.random.seed(seed)
        synth = synthesizers.VFBN(synthesizers.VirtualForward(channels))
    h, delta = rng.randn(3, channels, 5, 5), rng.randn(3, channels, 5, 5)
    return synth, h, numpy.array([1, 7, 3], numpy.int32), delta


def vfbn_eq3(fused, synth, h, y, delta):
    """delta_hat (eq. 6), eq. 3's gradients for v_f's parameters, the running
    statistics, and the applications counted in both phases; ``fused=False``: the
    composed unit with Chainer's batch normalisation."""
    synth = copy.deepcopy(synth)
    with chainer.using_config(SWITCH, fused), Applications() as count, \
            chainer.using_config('vfbn_fused_bn_double_backward', fused), \
            chainer.using_config('vfbn_fused_reductions', fused):
        delta_hat = synth(chainer.Variable(h), y)
        e = synth.loss(delta_hat, delta, 1.0)
        synth.cleargrads()
        e.backward()
    grads = {name: p.grad for name, p in synth.namedparams()}
    stats = {name + s: getattr(link, s).copy() for name, link in synth.namedlinks()
             if isinstance(link, L.BatchNormalization) for s in ('avg_mean', 'avg_var')}
    return delta_hat.array, grads, stats, count


def test_vfbn_eq3_with_fused_v_f_bit_identical_to_composed_in_few_applications():
    synth, h, y, delta = synth_and_batch()
    got, want = vfbn_eq3(True, synth, h, y, delta), vfbn_eq3(False, synth, h, y, delta)
    numpy.testing.assert_array_equal(got[0], want[0], err_msg='delta_hat')
    assert got[1].keys() == want[1].keys() and len(got[1]) == 14
    for name in got[1]:
        assert_same(got[1][name], want[1][name], name)
    assert got[2].keys() == want[2].keys() and len(got[2]) == 8
    for name in got[2]:
        numpy.testing.assert_array_equal(got[2][name], want[2][name], err_msg=name)
    assert got[3].count('UnitFunction') == got[3].count('UnitGradGrad') == 2
    assert got[3].count('UnitGrad') == 4
    assert got[3].count('Head') == got[3].count('HeadGrad') == got[3].count('HeadGradGrad') == 1
    assert got[3].total <= 25 < 250 < want[3].total


def test_vfbn_eq3_with_fused_v_f_against_finite_differences():
    """d eq.3 / d theta for a few of v_f's parameters, by central differences of the
    eq. 3 loss (the running statistics do not feed back: batch statistics)."""
    synth, h, y, delta = synth_and_batch(channels=2, seed=8)
    _, grads, _, _ = vfbn_eq3(True, synth, h, y, delta)

    def loss():
        s = copy.deepcopy(synth)
        return float(s.loss(s(chainer.Variable(h), y), delta, 1.0).array)

    named = dict(synth.namedparams())
    for name in ('/v_f/res1/conv1/W', '/v_f/res1/bn1/beta', '/v_f/res2/bn1/gamma',
                 '/v_f/res2/conv2/W', '/v_f/res1/bn2/gamma', '/v_f/fc/W', '/v_f/fc/b'):
        p = named[name].array
        for index in ((0,) * p.ndim, (1,) + (0,) * (p.ndim - 1)):
            old, eps = p[index], 1e-5
            p[index] = old + eps
            up = loss()
            p[index] = old - eps
            down = loss()
            p[index] = old
            numpy.testing.assert_allclose(grads[name][index], (up - down) / (2 * eps),
                                          rtol=1e-5, atol=1e-8, err_msg=name)


def ce_run(logits, y, weights, fused):
    """CE; dCE/dl; d sum(weights * dCE/dl) / dl."""
    l = chainer.Variable(logits)
    with chainer.using_config(SWITCH, fused), chainer.using_config('train', True):
        ce = synthesizers.cross_entropy(l, y)
        gl, = chainer.grad([ce], [l], enable_double_backprop=True)
        g2, = chainer.grad([F.sum(weights * gl)], [l])
    return ce.array, gl.array, g2.array


@pytest.mark.parametrize('dtype', [numpy.float32, F64])
def test_cross_entropy_value_first_and_second_derivatives_bit_identical(dtype):
    rng = numpy.random.RandomState(9)
    logits, weights = rng.randn(5, 10).astype(dtype), rng.randn(5, 10).astype(dtype)
    y = numpy.array([0, 9, 3, 3, 7], numpy.int32)
    got, want = ce_run(logits, y, weights, True), ce_run(logits, y, weights, False)
    for name, a, b in zip(('CE', 'dCE/dl', 'second derivative'), got, want):
        assert_same(a, b, name)
    counts = []
    for on in (True, False):
        with Applications() as count:
            ce_run(logits, y, weights, on)
        counts.append(count)
    # 3 nodes, and 4 for the weighted sum and its backward (composed: 21 in all).
    assert counts[0].count('CrossEntropyGradGrad') == 1 and counts[0].total == 7
    assert counts[1].total >= 20


def test_cross_entropy_against_finite_differences():
    rng = numpy.random.RandomState(10)
    y = numpy.array([2, 0, 4], numpy.int32)

    def f(l):
        return vf_cross_entropy.cross_entropy(l, y)

    gradient_check.check_double_backward(f, rng.randn(3, 5), numpy.array(rng.randn()),
                                         rng.randn(3, 5), dtype=F64, atol=1e-6, rtol=1e-5)


def test_a_third_derivative_of_the_cross_entropy_is_refused():
    l = chainer.Variable(numpy.random.RandomState(11).randn(3, 5))
    ce = vf_cross_entropy.cross_entropy(l, numpy.array([1, 2, 3], numpy.int32))
    gl, = chainer.grad([ce], [l], enable_double_backprop=True)
    g2, = chainer.grad([F.sum(gl * gl)], [l], enable_double_backprop=True)
    with pytest.raises(NotImplementedError, match='third derivative'):
        chainer.grad([F.sum(g2)], [l])


def head_run(u, y, weights, fused, dtype):
    """The head's CE; its first derivatives w.r.t. u, W, b; the derivatives of
    ``sum(weights * dCE/du)`` w.r.t. u, W, b (eq. 3's route)."""
    with chainer.using_config('dtype', dtype):
        numpy.random.seed(3)
        fc = L.Linear(u.shape[1], 5)
    u = chainer.Variable(u)
    with chainer.using_config('train', True), chainer.using_config(SWITCH, fused):
        if fused:
            ce = vf_head.cross_entropy_of_head(u, fc, y)
        else:
            ce = synthesizers.cross_entropy(fc(F.average(u, axis=(2, 3))), y)
        first = chainer.grad([ce], [u, fc.W, fc.b], enable_double_backprop=True)
        second = chainer.grad([F.sum(weights * first[0])], [u, fc.W, fc.b])
    return [ce.array] + [g.array for g in first] + [g.array for g in second]


@pytest.mark.parametrize('dtype', [numpy.float32, F64])
def test_head_value_first_and_second_derivatives_bit_identical(dtype):
    rng = numpy.random.RandomState(13)
    u = rng.randn(3, 4, 3, 3).astype(dtype)
    weights = rng.randn(3, 4, 3, 3).astype(dtype)
    y = numpy.array([4, 0, 2], numpy.int32)
    got, want = head_run(u, y, weights, True, dtype), head_run(u, y, weights, False, dtype)
    names = ['CE', 'dCE/du', 'dCE/dW', 'dCE/db', 'd2/du', 'd2/dW', 'd2/db']
    for name, g, w in zip(names, got, want):
        assert g.dtype == w.dtype == dtype
        assert_same(g, w, name)


def test_head_against_finite_differences():
    """The first derivatives (u, W, b), and eq. 3's route: the derivatives of
    ``sum(weights * dCE/du)`` w.r.t. u, W and b, by central differences."""
    rng = numpy.random.RandomState(14)
    y = numpy.array([1, 3], numpy.intp)
    weights = rng.randn(2, 3, 2, 2)

    def ce(u, W, b):
        return vf_head.Head(y).apply((u, W, b))[0]

    def eq3_route(u, W, b):
        gu, = chainer.grad([ce(u, W, b)], [u], enable_double_backprop=True)
        return F.sum(weights * gu)

    inputs = (rng.randn(2, 3, 2, 2), rng.randn(5, 3), rng.randn(5))
    gradient_check.check_backward(ce, inputs, numpy.array(rng.randn()), dtype=F64,
                                  atol=1e-7, rtol=1e-6)
    gradient_check.check_backward(eq3_route, inputs, numpy.array(rng.randn()), dtype=F64,
                                  atol=1e-7, rtol=1e-6)


def test_head_refuses_what_it_does_not_compute():
    rng = numpy.random.RandomState(15)
    numpy.random.seed(5)
    fc = L.Linear(3, 5)
    u = chainer.Variable(rng.randn(2, 3, 2, 2).astype(numpy.float32))
    y = numpy.array([1, 3], numpy.int32)
    with chainer.using_config('train', True):
        ce = vf_head.cross_entropy_of_head(u, fc, y)
        gu, gW = chainer.grad([ce], [u, fc.W], enable_double_backprop=True)
        with pytest.raises(NotImplementedError, match="weight or bias gradient"):
            chainer.grad([F.sum(gW * gW)], [u])
        g2, = chainer.grad([F.sum(gu * gu)], [u], enable_double_backprop=True)
        with pytest.raises(NotImplementedError, match='third derivative'):
            chainer.grad([F.sum(g2)], [u])
    with pytest.raises(ValueError, match='bias'):
        vf_head.cross_entropy_of_head(u, L.Linear(3, 5, nobias=True), y)


def _iterator():
    rng = numpy.random.RandomState(12)
    images = rng.randint(0, 256, (6, 3, 32, 32)).astype(numpy.uint8)
    labels = rng.randint(0, 10, 6).astype(numpy.int32)
    return data.BatchIterator(data.AugmentedDataset(images, labels), 3, shuffle=False)


def test_vfbn_training_steps_with_every_synthesizer_fast_path_equal_composed():
    """Three VFBN training steps (alpha_gs = 1e-3, depth 1, float32) with every fast
    path of chainer_vfbn.fused on (v_f's units and head, the reductions,
    fused.batchnorm, the one-update Adam, the network's units), then all off: every
    network, BN statistic, optimizer state and reported value the same bits."""
    runs = []
    for on in (True, False):
        with contextlib.ExitStack() as switches:
            for key in fused.SWITCHES:
                switches.enter_context(chainer.using_config(key, on))
            numpy.random.seed(0)
            setup = methods.build('vfbn', iterator=_iterator(), depth=1, alpha_gs=1e-3)
            reports = []
            for _ in range(3):
                observed = {}
                with chainer.Reporter().scope(observed):
                    setup.updater.update()
                reports.append({k: float(getattr(v, 'array', v)) for k, v in observed.items()})
            s = serializers.DictionarySerializer()
            setup.updater.serialize(s)
            runs.append(({k: numpy.array(v) for k, v in s.target.items()}, reports))
    (state, reports), (want_state, want_reports) = runs
    assert state.keys() == want_state.keys()
    assert any(k.startswith('optimizer:synth/') and k.endswith('/m') for k in state)
    assert any(k.startswith('model:synth/') and 'avg_var' in k for k in state)
    for key in state:
        numpy.testing.assert_array_equal(state[key], want_state[key], err_msg=key)
    assert all(state[k].any() for k in state if k.startswith('optimizer:synth/') and k.endswith('/m'))
    assert reports == want_reports and 'synth/loss' in reports[-1]
