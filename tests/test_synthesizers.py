"""Synthesizers against independent oracles (SPEC section 3; paper eq. 3, 6, 8, 9).

Sign convention pinned here: ``delta_hat`` is the gradient of the batch-mean
cross-entropy *loss*, ``W^T (softmax(W h) - y) / B``; the paper's eq. 8 and 9 print
``(y - softmax)``, the log-likelihood gradient, which is the same vector negated.
"""
import chainer_vfbn  # noqa: F401  (compat shim before chainer)

import chainer
import numpy
import pytest
from chainer import gradient_check

from chainer_vfbn import synthesizers as S

F64 = numpy.float64


def softmax(z):
    e = numpy.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def onehot(y, k=10):
    return numpy.eye(k)[y]


@pytest.fixture
def f64():
    with chainer.using_config('dtype', F64):
        yield


@pytest.mark.numpy1
def test_linear_vfbn_is_eq8_in_loss_form(f64):
    rng = numpy.random.RandomState(0)
    B, D = 7, 12
    h, y = rng.randn(B, D), rng.randint(0, 10, B).astype(numpy.int32)
    synth = S.LinearVFBN(D)
    W = synth.v_f.W.array
    got = synth(h, y).array
    paper_eq8 = (onehot(y) - softmax(h @ W.T)) @ W      # W^T (y - softmax(W h))
    numpy.testing.assert_allclose(got, -paper_eq8 / B, rtol=1e-12, atol=1e-15)


@pytest.mark.numpy1
def test_mlp_vfbn_is_eq9_in_loss_form(f64):
    rng = numpy.random.RandomState(1)
    B, D, H = 5, 9, 6
    h, y = rng.randn(B, D), rng.randint(0, 10, B).astype(numpy.int32)
    synth = S.MLPVFBN(D, H)
    W1, W2 = synth.v_f.l1.W.array, synth.v_f.l2.W.array
    a = h @ W1.T
    fprime = 1 - numpy.tanh(a) ** 2                            # f = tanh
    paper_eq9 = (fprime * ((onehot(y) - softmax(numpy.tanh(a) @ W2.T)) @ W2)) @ W1
    numpy.testing.assert_allclose(synth(h, y).array, -paper_eq9 / B, rtol=1e-12, atol=1e-15)


@pytest.mark.numpy1
def test_cross_entropy_value_gradient_and_hessian_are_the_closed_forms(f64):
    """CE(z) = mean_i -log softmax(z_i)[y_i]; dCE/dz = (p - onehot) / B; and the
    double backward gives the Hessian-vector product (p * u - p (p . u)) / B."""
    rng = numpy.random.RandomState(5)
    B = 6
    z = chainer.Variable(rng.randn(B, 10) * 3)
    y = rng.randint(0, 10, B).astype(numpy.int32)
    u = rng.randn(B, 10)
    p = softmax(z.array)
    loss = S.cross_entropy(z, y)
    numpy.testing.assert_allclose(loss.array, -numpy.log(p[numpy.arange(B), y]).mean(),
                                  rtol=1e-13)
    g, = chainer.grad([loss], [z], enable_double_backprop=True)
    numpy.testing.assert_allclose(g.array, (p - onehot(y)) / B, rtol=1e-12, atol=1e-15)
    hu, = chainer.grad([chainer.functions.sum(g * u)], [z])
    expected = (p * u - p * (p * u).sum(axis=1, keepdims=True)) / B
    numpy.testing.assert_allclose(hu.array, expected, rtol=1e-10, atol=1e-15)


@pytest.mark.numpy1
def test_vfbn_gradients_equal_those_through_chainers_cross_entropy_bit_for_bit(
        monkeypatch, device):
    """cross_entropy replaced F.softmax_cross_entropy(enable_double_backprop=True) for
    speed only: delta_hat and eq. 3's gradients are unchanged, so runs made before
    the change are reproduced exactly."""
    rng = numpy.random.RandomState(6)
    h, y, delta = (device.send(a) for a in (
        rng.randn(6, 4, 3, 3).astype(numpy.float32),
        rng.randint(0, 10, 6).astype(numpy.int32),
        (rng.randn(6, 4, 3, 3) * 1e-2).astype(numpy.float32)))
    synth = S.VFBN(S.VirtualForward(4))
    synth.to_device(device)
    results = []
    for ce in (S.cross_entropy, lambda z, t: chainer.functions.softmax_cross_entropy(
            z, t, enable_double_backprop=True)):
        monkeypatch.setattr(S, 'cross_entropy', ce)
        delta_hat = synth(h, y)
        synth.cleargrads()
        synth.loss(delta_hat, delta, 1.0).backward()
        results.append([chainer.backend.CpuDevice().send(a) for a in
                        [delta_hat.array] + [p.grad for _, p in sorted(synth.namedparams())]])
    for ours, chainers in zip(*results):
        numpy.testing.assert_array_equal(ours, chainers)
    assert numpy.abs(results[0][0]).max() > 0


def _ce_through(v_f, h, y):
    with chainer.using_config('train', True):
        return float(chainer.functions.softmax_cross_entropy(v_f(h), y).array)


@pytest.mark.numpy1
def test_conv_vfbn_delta_hat_matches_finite_differences(f64):
    rng = numpy.random.RandomState(2)
    h = rng.randn(3, 4, 3, 3)
    y = rng.randint(0, 10, 3).astype(numpy.int32)
    synth = S.VFBN(S.VirtualForward(4))
    got = synth(h, y).array
    num, = gradient_check.numerical_grad(lambda: (numpy.asarray(_ce_through(synth.v_f, h, y)),),
                                         (h,), (numpy.asarray(1.0),), eps=1e-6)
    numpy.testing.assert_allclose(got, num, rtol=1e-5, atol=1e-9)


@pytest.mark.numpy1
def test_eq3_gradient_wrt_vf_params_matches_finite_differences(f64):
    """Double backprop: d/dtheta ||delta_hat(theta) - delta||^2 / B."""
    rng = numpy.random.RandomState(3)
    h = rng.randn(3, 4, 3, 3)
    y = rng.randint(0, 10, 3).astype(numpy.int32)
    delta = rng.randn(*h.shape) * 0.05
    synth = S.VFBN(S.VirtualForward(4))
    synth.cleargrads()
    synth.loss(synth(h, y), delta, 1.0).backward()

    def e():
        return numpy.asarray(float(synth.loss(synth(h, y), delta, 1.0).array)),

    params = [synth.v_f.res1.conv1.W, synth.v_f.res2.bn2.gamma, synth.v_f.fc.W]
    for p in params:
        num, = gradient_check.numerical_grad(e, (p.array,), (numpy.asarray(1.0),), eps=1e-6)
        numpy.testing.assert_allclose(p.grad, num, rtol=1e-4, atol=1e-9, err_msg=p.name)
        assert numpy.abs(p.grad).max() > 0


def test_label_maps_are_constant_one_hot_planes():
    h = numpy.random.randn(2, 3, 4, 5).astype(numpy.float32)
    y = numpy.array([7, 2], numpy.int32)
    hy = S.label_maps(h, y).array
    assert hy.shape == (2, 13, 4, 5)
    numpy.testing.assert_array_equal(hy[:, :3], h)
    for b in range(2):
        for k in range(10):
            assert (hy[b, 3 + k] == float(k == y[b])).all()


@pytest.mark.parametrize('cls', [S.JaderbergLinear, S.JaderbergResNet])
def test_jaderberg_starts_at_zero_and_works_in_units_of_s(cls):
    rng = numpy.random.RandomState(4)
    h = rng.randn(4, 64, 11, 11).astype(numpy.float32)
    y = rng.randint(0, 10, 4).astype(numpy.int32)
    synth = cls()
    out = synth(h, y)
    assert out.shape == h.shape and not out.array.any()
    # Output in units of s: delta_hat = s * out; eq. 3's target is delta / s.
    o = rng.randn(*h.shape).astype(numpy.float32)
    delta = rng.randn(*h.shape).astype(numpy.float32) * 1e-4
    s = numpy.float32(3e-5)
    numpy.testing.assert_allclose(synth.to_gradient(o, s), o * s, rtol=1e-6)
    expected = ((o - delta / s) ** 2).sum() / 4
    numpy.testing.assert_allclose(float(synth.loss(chainer.Variable(o), delta, s).array),
                                  expected, rtol=1e-4)
    # The literal (unscaled) ablation regresses delta itself.
    raw = cls(scaled=False)
    numpy.testing.assert_array_equal(raw.to_gradient(o, s), o)
    numpy.testing.assert_allclose(float(raw.loss(chainer.Variable(o), delta, s).array),
                                  ((o - delta) ** 2).sum() / 4, rtol=1e-5)


def test_jaderberg_resnet_layout_matches_appendix_b1():
    synth = S.JaderbergResNet()
    convs = [l for l in synth.links() if isinstance(l, chainer.links.Convolution2D)]
    bns = [l for l in synth.links() if isinstance(l, chainer.links.BatchNormalization)]
    assert len(convs) == 6 and len(bns) == 5  # every conv but the last has BN
    assert convs and all(c.W.shape[2:] == (3, 3) for c in convs)
    assert synth.stem.conv.W.shape == (64, 74, 3, 3)
    assert S.JaderbergLinear().conv.W.shape == (64, 74, 5, 5)


def test_vfbn_normalized_loss_divides_by_s_squared():
    rng = numpy.random.RandomState(5)
    a = rng.randn(2, 64, 11, 11).astype(numpy.float32)
    d = rng.randn(2, 64, 11, 11).astype(numpy.float32)
    plain = S.VFBN(S.VirtualForward(64)).loss(chainer.Variable(a), d, 0.5)
    norm = S.VFBN(S.VirtualForward(64), normalized_loss=True).loss(chainer.Variable(a), d, 0.5)
    numpy.testing.assert_allclose(float(plain.array), ((a - d) ** 2).sum() / 2, rtol=1e-5)
    numpy.testing.assert_allclose(float(norm.array), float(plain.array) / 0.25, rtol=1e-6)


# ---------------------------------------------------------------------------
# One residual unit: v_f, the heads and Jaderberg's small-ResNet use the network's.

BN_EPS = 2e-5  # L.BatchNormalization's default


def _np_conv3x3(x, w):
    """3x3 convolution, stride 1, zero padding 1, written out with NumPy slices."""
    b, c, hh, ww = x.shape
    p = numpy.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = numpy.zeros((b, w.shape[0], hh, ww))
    for i in range(3):
        for j in range(3):
            out += numpy.einsum('bchw,oc->bohw', p[:, :, i:i + hh, j:j + ww], w[:, :, i, j])
    return out


def _np_bn_train(x, gamma, beta):
    """Training-mode batch normalization: batch statistics over (B, H, W)."""
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = x.var(axis=(0, 2, 3), keepdims=True)
    return (x - mean) / numpy.sqrt(var + BN_EPS) * gamma[:, None, None] + beta[:, None, None]


def _np_unit(x, unit):
    """SPEC section 2's residual unit, ``relu(bn2(conv2(relu(bn1(conv1 x)))) + x)``,
    from the unit's weights alone."""
    r = numpy.maximum(_np_bn_train(_np_conv3x3(x, unit.conv1.W.array),
                                   unit.bn1.gamma.array, unit.bn1.beta.array), 0)
    r = _np_bn_train(_np_conv3x3(r, unit.conv2.W.array), unit.bn2.gamma.array,
                     unit.bn2.beta.array)
    return numpy.maximum(r + x, 0)


def _np_unit_relu_before_add(x, unit):
    """The other reading, ``relu(bn2(conv2(...))) + x``: what the unit must NOT be."""
    r = numpy.maximum(_np_bn_train(_np_conv3x3(x, unit.conv1.W.array),
                                   unit.bn1.gamma.array, unit.bn1.beta.array), 0)
    return numpy.maximum(_np_bn_train(_np_conv3x3(r, unit.conv2.W.array),
                                      unit.bn2.gamma.array, unit.bn2.beta.array), 0) + x


def _randomise_bn(link, rng):
    for bn in link.links():
        if isinstance(bn, chainer.links.BatchNormalization):
            bn.gamma.array[:] = 1 + 0.3 * rng.randn(bn.gamma.size)
            bn.beta.array[:] = 0.3 * rng.randn(bn.beta.size)


def test_vf_and_the_heads_are_two_of_the_networks_residual_units(f64):
    """v_f (and so the bottom-half and layer-wise heads) against a NumPy forward pass
    of two SPEC section 2 units, global average pooling and fc; its units are the
    network's own unit class, which computes the same NumPy unit."""
    from chainer_vfbn import model
    rng = numpy.random.RandomState(6)
    v_f = S.VirtualForward(6)
    _randomise_bn(v_f, rng)
    v_f.fc.b.array[:] = rng.randn(10)
    h = rng.randn(4, 6, 5, 5)
    with chainer.using_config('train', True):
        got = v_f(h).array
    u = _np_unit(_np_unit(h, v_f.res1), v_f.res2)
    expected = u.mean(axis=(2, 3)) @ v_f.fc.W.array.T + v_f.fc.b.array
    numpy.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    # The other reading of "conv-BN-ReLU with a skip" gives other logits: the
    # comparison above can tell the two apart.
    u_other = _np_unit_relu_before_add(_np_unit_relu_before_add(h, v_f.res1), v_f.res2)
    other = u_other.mean(axis=(2, 3)) @ v_f.fc.W.array.T + v_f.fc.b.array
    assert numpy.abs(other - expected).max() > 1e-2
    # The network's unit with v_f's weights is the same function.
    unit = model.ResidualUnit(6, 6)
    unit.copyparams(v_f.res1)
    with chainer.using_config('train', True):
        numpy.testing.assert_allclose(unit(h).array, _np_unit(h, v_f.res1),
                                      rtol=1e-10, atol=1e-12)


def test_jaderberg_resnet_skip_pairs_are_the_networks_residual_units(f64):
    """g([h, y]) = out(unit(unit(relu(bn(conv(hy)))))) against NumPy, with the last
    conv given non-zero weights so that the whole path is checked."""
    rng = numpy.random.RandomState(7)
    synth = S.JaderbergResNet(h_channels=3, n_classes=10, width=5)
    _randomise_bn(synth, rng)
    synth.out.W.array[:] = 0.1 * rng.randn(*synth.out.W.shape)
    synth.out.b.array[:] = 0.1 * rng.randn(*synth.out.b.shape)
    h = rng.randn(4, 3, 4, 4)
    y = numpy.array([0, 3, 9, 3], numpy.int32)
    with chainer.using_config('train', True):
        got = synth(h, y).array
    hy = numpy.concatenate([h, numpy.broadcast_to(numpy.eye(10)[y][:, :, None, None],
                                                  (4, 10, 4, 4))], axis=1)
    stem = numpy.maximum(_np_bn_train(_np_conv3x3(hy, synth.stem.conv.W.array),
                                      synth.stem.bn.gamma.array, synth.stem.bn.beta.array), 0)
    r = _np_unit(_np_unit(stem, synth.res1), synth.res2)
    expected = _np_conv3x3(r, synth.out.W.array) + synth.out.b.array[:, None, None]
    numpy.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
