"""The synthesizer's one-update Adam against Chainer's own Adam."""
import chainer_vfbn  # noqa: F401  (compat shim before chainer)

import copy
import io

import chainer
import numpy
import pytest
from chainer import optimizer, optimizers, serializers

from chainer_vfbn import methods, synthesizers
from chainer_vfbn.adam import FlatAdam

pytestmark = pytest.mark.numpy1

ALPHA = 1e-3


def small_synth(dtype=numpy.float32):
    """VFBN's synthesizer with 4 channels: v_f's 14 parameter arrays."""
    numpy.random.seed(0)
    with chainer.using_config('dtype', dtype):
        return synthesizers.VFBN(synthesizers.VirtualForward(4))


def chainers(link, alpha=ALPHA):
    opt = optimizers.Adam(alpha=alpha)
    opt.setup(link)
    return opt


def ours(link, alpha=ALPHA):
    opt = FlatAdam(alpha=alpha)
    opt.setup(link)
    return opt


def set_grads(step, *links):
    """The same random gradients in every link, on its device; ``fc/b`` gets none."""
    rng = numpy.random.RandomState(step)
    for named in zip(*(sorted(n.namedparams()) for n in links)):
        g = rng.randn(*named[0][1].shape).astype(named[0][1].dtype)
        for name, p in named:
            p.grad = None if name.endswith('fc/b') else p.device.send(g.copy())


def host(array):
    return chainer.backend.CpuDevice().send(array)


def state(link, opt):
    """Every parameter and all the optimizer's state (t, and t, m, v per parameter)."""
    s = serializers.DictionarySerializer()
    link.serialize(s['link'])
    opt.serialize(s['optimizer'])
    return {k: numpy.array(host(v)) for k, v in s.target.items()}


def assert_same_state(a, b, device=None):
    """Bit for bit on the CPU. On a GPU both run one kernel of the same expressions;
    the same bits are expected, one rounding allowed."""
    assert a.keys() == b.keys()
    assert any(k.endswith('/m') for k in a)
    for key in a:
        if device is not None and device.xp is not numpy and a[key].dtype.kind == 'f':
            numpy.testing.assert_allclose(a[key], b[key], rtol=1e-6, atol=1e-12, err_msg=key)
        else:
            numpy.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize('dtype', [numpy.float32, numpy.float64])
def test_bit_identical_to_chainers_adam_over_steps_with_an_alpha_change(dtype, device):
    ref_link = small_synth(dtype)
    link = copy.deepcopy(ref_link)
    ref, opt = chainers(ref_link), ours(link)
    ref_link.to_device(device)         # after setup, as the updater does
    link.to_device(device)
    for step in range(6):
        if step == 4:
            ref.alpha = opt.alpha = ALPHA * 0.1
        set_grads(step, ref_link, link)
        ref.update()
        opt.update()
    assert_same_state(state(ref_link, ref), state(link, opt), device)
    assert opt.t == ref.t == 6
    moved = max(float(abs(host(p.array) - q.array).max())
                for (_, p), (_, q) in zip(sorted(link.namedparams()),
                                          sorted(small_synth(dtype).namedparams())))
    assert moved > 0


def test_parameters_and_moments_are_views_of_flat_buffers():
    link = small_synth()
    opt = ours(link)
    set_grads(0, link)
    opt.update()
    flat = opt._flat
    for p in link.params():
        assert p.array.base is flat.param
        assert p.update_rule.state['m'].base is flat.m
        assert p.update_rule.state['v'].base is flat.v


def test_one_update_per_step_instead_of_one_rule_call_per_parameter(monkeypatch):
    """The count the issue asks to cut: Chainer's Adam calls an update rule per
    parameter array (14 for VFBN's v_f); FlatAdam calls none and runs one update."""
    calls = []
    rule_update = optimizer.UpdateRule.update
    monkeypatch.setattr(optimizer.UpdateRule, 'update',
                        lambda self, param: calls.append(1) or rule_update(self, param))
    ref_link = small_synth()
    link = copy.deepcopy(ref_link)
    ref, opt = chainers(ref_link), ours(link)
    n_params = len(list(link.params()))
    assert n_params == 14
    for step in range(2):
        set_grads(step, ref_link, link)
        del calls[:]
        ref.update()
        assert len(calls) == n_params
        del calls[:]
        before = opt.flat_updates
        opt.update()
        assert len(calls) == 0 and opt.flat_updates == before + 1
    assert_same_state(state(ref_link, ref), state(link, opt))


def _save(link, opt):
    buf = io.BytesIO()
    serializers.save_npz(buf, opt)
    buf.seek(0)
    return buf


@pytest.mark.parametrize('saver', ['ours', 'chainer'])
@pytest.mark.parametrize('at_step', [0, 2])
def test_snapshots_are_interchangeable_with_chainers(saver, at_step, device):
    """Save one kind after ``at_step`` steps (0: the zero moments the updater gives
    every rule before the first update), load it into the other kind, take the
    remaining steps: all state equal to 4 uninterrupted steps of Chainer's."""
    from chainer_vfbn.updaters import init_states
    ref_link = small_synth()
    ref = chainers(ref_link)
    ref_link.to_device(device)
    for step in range(4):
        set_grads(step, ref_link)
        ref.update()

    first_link = small_synth()
    first = ours(first_link) if saver == 'ours' else chainers(first_link)
    first_link.to_device(device)
    init_states(first)
    for step in range(at_step):
        set_grads(step, first_link)
        first.update()
    buf = _save(first_link, first)

    link = copy.deepcopy(first_link)
    second = chainers(link) if saver == 'ours' else ours(link)
    init_states(second)
    serializers.load_npz(buf, second)
    assert second.t == at_step
    for step in range(at_step, 4):
        set_grads(step, link)
        second.update()
    assert_same_state(state(ref_link, ref), state(link, second), device)


def test_a_snapshot_loaded_into_rules_without_state_resumes_exactly():
    """A fresh FlatAdam with no state yet (a resume in a new process, without
    init_states) takes the loaded moments, not zeros."""
    ref_link = small_synth()
    ref = chainers(ref_link)
    for step in range(3):
        set_grads(step, ref_link)
        ref.update()
    link = copy.deepcopy(ref_link)
    opt = ours(link)
    serializers.load_npz(_save(ref_link, ref), opt)
    for step in (3, 4):
        set_grads(step, ref_link, link)
        ref.update()
        opt.update()
    assert_same_state(state(ref_link, ref), state(link, opt))


def test_frozen_parameters_and_different_step_counts_as_in_chainer():
    """A frozen v_f unit keeps its parameters and moments and its own step count;
    unfrozen, its bias correction uses that count (two stretches of the buffers)."""
    ref_link = small_synth()
    link = copy.deepcopy(ref_link)
    ref, opt = chainers(ref_link), ours(link)
    for step in range(5):
        if step == 1:
            ref_link.v_f.res1.disable_update()
            link.v_f.res1.disable_update()
        if step == 3:
            ref_link.v_f.res1.enable_update()
            link.v_f.res1.enable_update()
        set_grads(step, ref_link, link)
        ref.update()
        opt.update()
        assert_same_state(state(ref_link, ref), state(link, opt))
    assert link.v_f.res1.conv1.W.update_rule.t == 3
    assert link.v_f.fc.W.update_rule.t == 5
    assert len(opt._flat.runs()) > 1


def test_synthesizer_optimizer_follows_the_switch_and_alpha_gs_zero_keeps_v_f():
    link = small_synth()
    assert type(methods.synthesizer_optimizer(link, 1e-3)) is FlatAdam
    with chainer.using_config('vfbn_fused_adam', False):
        assert type(methods.synthesizer_optimizer(link, 1e-3)) is optimizers.Adam
    # alpha_gs = 0: the updater never updates the synthesizer (train_synth=False);
    # were it updated, alpha_t = 0 would leave it unchanged, in both.
    ref_link = copy.deepcopy(link)
    ref = chainers(ref_link, 0.0)
    opt = methods.synthesizer_optimizer(link, 0.0)
    before = {name: p.array.copy() for name, p in link.namedparams()}
    set_grads(0, ref_link, link)
    ref.update()
    opt.update()
    assert_same_state(state(ref_link, ref), state(link, opt))
    for name, p in link.namedparams():
        numpy.testing.assert_array_equal(p.array, before[name], err_msg=name)


def test_what_it_does_not_do_is_refused_with_a_clear_message():
    link = small_synth()
    opt = ours(link)
    with pytest.raises(TypeError, match='takes no hooks'):
        opt.add_hook(chainer.optimizer_hooks.WeightDecay(1e-4))
    set_grads(0, link)
    opt.amsgrad = True
    with pytest.raises(ValueError, match='does not do amsgrad'):
        opt.update()
    opt = ours(link)
    link.v_f.fc.W.update_rule.hyperparam.alpha = 0.0
    with pytest.raises(ValueError, match='/v_f/fc/W has its own hyperparameters'):
        opt.update()
    with chainer.using_config('dtype', numpy.float16):
        half = synthesizers.VirtualForward(4)
    opt = ours(half)
    set_grads(0, half)
    with pytest.raises(TypeError, match='float32 or float64'):
        opt.update()
