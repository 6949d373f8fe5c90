"""The two-half updaters (SPEC section 4) against independent computations."""
import chainer_vfbn  # noqa: F401  (compat shim before chainer)

import copy
import os

import chainer
import chainer.functions as F

import numpy
import pytest

from chainer_vfbn import data, methods, model, synthesizers, updaters

F64 = numpy.float64


def batch_iterator(n_images=4, batchsize=8, seed=0, dtype=numpy.float32):
    rng = numpy.random.RandomState(seed)
    images = rng.randint(0, 256, (n_images, 3, 32, 32)).astype(numpy.uint8)
    labels = rng.randint(0, 10, n_images).astype(numpy.int32)
    ds = data.AugmentedDataset(images, labels)
    if dtype != numpy.float32:
        get = ds.get_batch
        ds.get_batch = lambda idx: (get(idx)[0].astype(dtype), get(idx)[1])
    return data.BatchIterator(ds, batchsize, shuffle=False)


def params(link):
    return {name: p.array.copy() for name, p in link.namedparams()}


class TrueGradient(synthesizers.Synthesizer):
    """A perfect synthesizer: backprop through a private copy of the upper half."""

    def __init__(self, upper):
        super().__init__()
        self.upper = copy.deepcopy(upper)

    def forward(self, h, y):
        h = chainer.Variable(h.array)
        loss = F.softmax_cross_entropy(self.upper(h), y)
        g, = chainer.grad([loss], [h])
        return g


def sgd(link, weight_decay=1e-4):
    return methods.network_optimizer(link, weight_decay=weight_decay)


@pytest.mark.numpy1
def test_perfect_synthesizer_step_equals_backprop_step():
    with chainer.using_config('dtype', F64):
        lower, upper = model.build_resnet(1)
        bp_net = model.Net(copy.deepcopy(lower), copy.deepcopy(upper))
        synth = TrueGradient(upper)
    adam = chainer.optimizers.Adam(alpha=0)
    adam.setup(synth)
    dec = updaters.DecoupledUpdater(
        batch_iterator(dtype=F64), {'lower': sgd(lower), 'upper': sgd(upper), 'synth': adam},
        train_synth=False)
    bp = updaters.BackpropUpdater(batch_iterator(dtype=F64), sgd(bp_net))
    for _ in range(2):  # the second step also exercises momentum
        synth.upper.copyparams(upper)
        dec.update()
        bp.update()
    got = dict(params(lower), **{'u' + k: v for k, v in params(upper).items()})
    want = {k.replace('/lower', '', 1).replace('/upper', 'u', 1): v
            for k, v in params(bp_net).items()}
    assert got.keys() == want.keys()
    for k in want:
        numpy.testing.assert_allclose(got[k], want[k], rtol=1e-10, atol=1e-12, err_msg=k)


@pytest.mark.numpy1
@pytest.mark.parametrize('name', ['vfbn', 'jaderberg-linear'])
def test_half_gradients_are_the_independent_backprops(name):
    """Lower: the vector-Jacobian product of delta_hat; upper: backprop of the loss."""
    with chainer.using_config('dtype', F64):
        lower, upper = model.build_resnet(1)
        synth = methods.make_synthesizer(name, 64)
    # No weight decay here: its hook adds rate * W to the gradients in place.
    opts = {'lower': sgd(lower, 0), 'upper': sgd(upper, 0)}
    opts['synth'] = chainer.optimizers.Adam(alpha=1e-3)
    opts['synth'].setup(synth)
    it = batch_iterator(dtype=F64)
    dec = updaters.DecoupledUpdater(it, opts)
    dec.update()   # first step: Jaderberg outputs 0, so check the second one
    x, t = it.dataset.get_batch(numpy.arange(8, 16))
    lower0, upper0, synth0 = (copy.deepcopy(m) for m in (lower, upper, synth))
    s = dec.scale
    dec.update()

    h = lower0(x)
    out = synth0(chainer.Variable(h.array), t)
    delta_hat = synth0.to_gradient(out.array, s)
    assert numpy.abs(delta_hat).max() > 0
    vjp = chainer.grad([F.sum(h * delta_hat)], [p for _, p in lower0.namedparams()])
    for (name_, p), g in zip(lower.namedparams(), vjp):
        numpy.testing.assert_allclose(p.grad, g.array, rtol=1e-9, atol=1e-14, err_msg=name_)
    loss = F.softmax_cross_entropy(upper0(chainer.Variable(h.array)), t)
    ups = chainer.grad([loss], [p for _, p in upper0.namedparams()])
    for (name_, p), g in zip(upper.namedparams(), ups):
        numpy.testing.assert_allclose(p.grad, g.array, rtol=1e-9, atol=1e-14, err_msg=name_)


def _decoupled(alpha_gs, name='vfbn', lr=0.1, n_images=4, batchsize=8):
    lower, upper = model.build_resnet(1)
    opts = {'lower': methods.network_optimizer(lower, lr=lr),
            'upper': methods.network_optimizer(upper, lr=lr)}
    synth = methods.make_synthesizer(name, 64)
    opts['synth'] = chainer.optimizers.Adam(alpha=alpha_gs)
    opts['synth'].setup(synth)
    return updaters.DecoupledUpdater(batch_iterator(n_images, batchsize), opts,
                                     train_synth=alpha_gs > 0), synth


def test_alpha_gs_zero_never_changes_the_synthesizer():
    dec, synth = _decoupled(0.0)
    before = params(synth)
    for _ in range(3):
        dec.update()
    for k, v in params(synth).items():
        assert v.tobytes() == before[k].tobytes(), k


def _synth_losses(name, steps):
    # lr = 0 freezes both halves, and one batch holds the whole set: every iteration
    # sees the same h and delta, so only the synthesizer changes.
    dec, synth = _decoupled(1e-3, name, lr=0.0, n_images=1, batchsize=36)
    losses = []
    for _ in range(steps):
        rep, obs = chainer.Reporter(), {}
        with rep.scope(obs):
            dec.update()
        losses.append(float(obs['synth/loss'].array))
    return losses


def test_positive_alpha_gs_lowers_eq3_on_a_fixed_batch_vfbn():
    losses = _synth_losses('vfbn', 6)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


def test_positive_alpha_gs_lowers_eq3_on_a_fixed_batch_jaderberg():
    # Adam at alpha 1e-3 moves each of the 5x5x74 weights feeding an output by
    # 1e-3 per step, so the loss zig-zags at first; its trend is what must fall.
    losses = _synth_losses('jaderberg-linear', 12)
    assert numpy.mean(losses[-4:]) < 0.95 * losses[0], losses


def test_first_synthesizer_update_keeps_delta_hat_on_deltas_scale():
    """SPEC section 3's required check: rms(delta_hat) / rms(delta) < 10 after the
    first update of a Jaderberg synthesizer at the paper's alpha_gs."""
    dec, synth = _decoupled(1e-3, 'jaderberg-linear', n_images=8, batchsize=32)
    ratios = []
    for _ in range(3):
        rep, obs = chainer.Reporter(), {}
        with rep.scope(obs):
            dec.update()
        ratios.append(float(obs['synth/norm_delta_hat']) / float(obs['synth/norm_delta']))
    assert ratios[0] == 0            # zero-initialised output
    assert 0 < ratios[1] < 10 and ratios[2] < 10, ratios


class NaNSynth(synthesizers.Synthesizer):
    def forward(self, h, y):
        return chainer.Variable(numpy.full(h.shape, numpy.nan, h.dtype))


def test_non_finite_synthetic_gradient_stops_with_a_clear_message():
    lower, upper = model.build_resnet(1)
    synth = NaNSynth()
    opts = {'lower': sgd(lower), 'upper': sgd(upper), 'synth': chainer.optimizers.Adam()}
    opts['synth'].setup(synth)
    dec = updaters.DecoupledUpdater(batch_iterator(), opts, method='nan-synth')
    with pytest.raises(updaters.NonFiniteError, match=r'nan-synth diverged at iteration 1: delta_hat'):
        dec.update()


def test_layerwise_lower_gradient_is_the_heads_loss_gradient():
    with chainer.using_config('dtype', F64):
        setup = methods.build('layerwise', iterator=batch_iterator(dtype=F64), depth=1,
                              weight_decay=0)
    upd = setup.updater
    lower, head = upd.lower, upd.get_optimizer('head').target
    lower0, head0 = copy.deepcopy(lower), copy.deepcopy(head)
    x, t = upd.get_iterator('main').dataset.get_batch(numpy.arange(8))
    upd.update()
    aux = F.softmax_cross_entropy(head0(lower0(x)), t)
    ps = [p for _, p in lower0.namedparams()] + [p for _, p in head0.namedparams()]
    grads = chainer.grad([aux], ps)
    got = [p.grad for _, p in lower.namedparams()] + [p.grad for _, p in head.namedparams()]
    for g_got, g in zip(got, grads):
        numpy.testing.assert_allclose(g_got, g.array, rtol=1e-9, atol=1e-14)


def test_delta_rms_scale_is_a_running_average_and_survives_serialization(tmp_path):
    dec, _ = _decoupled(1e-3, 'jaderberg-linear')
    ms = []
    for _ in range(3):
        rep, obs = chainer.Reporter(), {}
        with rep.scope(obs):
            dec.update()
        n = dec.lower.units[-1].out_ch * 11 * 11 * 8      # elements of delta
        ms.append(float(obs['synth/norm_delta']) ** 2 / n)
    want = ms[0]
    for m in ms[1:]:
        want = 0.99 * want + 0.01 * m
    assert float(dec.delta_ms) == pytest.approx(want, rel=1e-5)
    assert float(dec.scale) == pytest.approx(want ** 0.5, rel=1e-5)
    path = str(tmp_path / 'snap.npz')
    chainer.serializers.save_npz(path, dec)
    dec2, _ = _decoupled(1e-3, 'jaderberg-linear')
    chainer.serializers.load_npz(path, dec2)
    assert float(dec2.delta_ms) == pytest.approx(float(dec.delta_ms), rel=1e-6)
    assert dec2.iteration == 3


class VectorData(object):
    """A dataset of vectors with ``get_batch``, as the README's example assumes."""

    def __init__(self, n=256, seed=0):
        rng = numpy.random.RandomState(seed)
        self.t = rng.randint(0, 10, n).astype(numpy.int32)
        self.x = (rng.randn(n, 20) + 2 * numpy.eye(10, 20)[self.t]).astype(numpy.float32)

    def __len__(self):
        return len(self.x)

    def get_batch(self, idx):
        return self.x[idx], self.t[idx]


EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      'docs', 'DECOUPLE.md')
EXAMPLE_SYNTH = 'synth = synthesizers.MLPVFBN(256, hidden=64, activation=F.tanh, bias=False)'


def decouple_example():
    """The Python block of docs/DECOUPLE.md (linked from the README), as printed."""
    with open(EXAMPLE) as f:
        text = f.read()
    section = text[text.index('# Decouple your own network'):]
    start = section.index('```python\n') + len('```python\n')
    return section[start:section.index('\n```', start)]


@pytest.mark.parametrize('synth', [EXAMPLE_SYNTH,
                                   'synth = synthesizers.JaderbergLinearVector(256)',
                                   'synth = synthesizers.JaderbergMLP(256, hidden=128)'])
def test_decouple_example_runs_as_printed_for_each_synthesizer_kind(synth, tmp_path,
                                                                   monkeypatch):
    """The example's text, run as is (and with the synthesizer line swapped for each
    Jaderberg kind): the decoupled MLP learns, and its lower half moves."""
    monkeypatch.chdir(tmp_path)  # it writes its log into the working folder
    code = decouple_example()
    assert EXAMPLE_SYNTH in code
    scope = {}
    exec(compile(code.replace(EXAMPLE_SYNTH, synth), 'docs/DECOUPLE.md', 'exec'), scope)
    log = scope['trainer'].get_extension('LogReport').log
    assert len(log) == 3
    losses = [e['main/loss'] for e in log]
    assert all(numpy.isfinite(losses)) and losses[-1] < 0.5 * losses[0], losses
    assert scope['synth'].xp is numpy and scope['updater'].iteration == 60


def test_jaderberg_feature_map_synthesizers_refuse_a_vector_h():
    h = numpy.zeros((2, 64), numpy.float32)
    y = numpy.zeros(2, numpy.int32)
    for cls in (synthesizers.JaderbergLinear, synthesizers.JaderbergResNet):
        with pytest.raises(ValueError, match='JaderbergLinearVector or JaderbergMLP'):
            cls()(h, y)
    with pytest.raises(ValueError, match='JaderbergLinear or JaderbergResNet'):
        synthesizers.JaderbergLinearVector(8)(numpy.zeros((2, 8, 3, 3), numpy.float32), y)


def test_vector_jaderberg_synthesizers_start_at_zero_on_h_and_onehot():
    rng = numpy.random.RandomState(0)
    h = rng.randn(4, 6).astype(numpy.float32)
    y = numpy.array([1, 0, 9, 1], numpy.int32)
    hy = synthesizers.label_maps(h, y).array
    numpy.testing.assert_array_equal(hy, numpy.concatenate([h, numpy.eye(10)[y]], axis=1))
    for synth in (synthesizers.JaderbergLinearVector(6), synthesizers.JaderbergMLP(6, 8)):
        out = synth(h, y)
        assert out.shape == h.shape and not out.array.any()
