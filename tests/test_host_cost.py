"""The host cost of a step, counted (chainer_vfbn.hostcost): Chainer function
applications per phase of the paper's step and the optimizers' update-rule calls,
pinned at n = 1, so that new host cost fails here without any timing.

``benchmarks/bench_host.py`` reports the same counts at n = 18 beside its timings.
"""
import chainer
import chainer.functions as F
import numpy
import pytest

from chainer_vfbn import hostcost, model, updaters

# The pinned counts: one steady-state step (the second) at n = 1, full width, batch
# 2, 8x8 images; phases with no application are left out. After a change that
# changes them on purpose, regenerate with
#     .venv/bin/python benchmarks/bench_host.py --print-pins
# and paste its output here (say in the commit why the counts moved).
PINS = {
    "composed": {
        "bp": {
            "applications": {"forward lower": 20, "backward lower": 25, "forward upper": 10,
                             "backward upper": 19},
            "rule_calls": {}},
        "jaderberg-linear": {
            "applications": {"forward lower": 20, "synthesizer forward": 2, "backward lower": 25,
                             "forward upper": 10, "backward upper": 19, "eq. 3": 12},
            "rule_calls": {"synth": 2}},
        "vfbn": {
            "applications": {"forward lower": 20, "synthesizer forward": 21, "delta_hat's gradient": 24,
                             "backward lower": 25, "forward upper": 10, "backward upper": 19,
                             "eq. 3": 231},
            "rule_calls": {"synth": 14}},
    },
    "fused": {
        "bp": {
            "applications": {"forward lower": 5, "backward lower": 6, "forward upper": 3,
                             "backward upper": 8},
            "rule_calls": {}},
        "jaderberg-linear": {
            "applications": {"forward lower": 5, "synthesizer forward": 2, "backward lower": 6,
                             "forward upper": 3, "backward upper": 8, "eq. 3": 6},
            "rule_calls": {}},
        "vfbn": {
            "applications": {"forward lower": 5, "synthesizer forward": 3, "delta_hat's gradient": 3,
                             "backward lower": 6, "forward upper": 3, "backward upper": 8,
                             "eq. 3": 15},
            "rule_calls": {}},
    },
}


@pytest.mark.parametrize('variant', sorted(PINS))
@pytest.mark.parametrize('method', hostcost.HOST_METHODS)
def test_counts_per_phase_are_pinned(variant, method):
    apps, rules, updates = hostcost.count_method(method, variant, n=1)
    assert {p: c for p, c in apps.items() if c} == PINS[variant][method]['applications']
    assert rules == PINS[variant][method]['rule_calls']
    # every optimizer updates once per step
    names = ['main'] if method == 'bp' else ['lower', 'synth', 'upper']
    assert updates == {name: 1 for name in names}


def _unit_forward(in_ch, out_ch, stride):
    """Applications of one composed unit's forward, read from model.ResidualUnit:
    conv, BN, ReLU, conv, BN, the add, ReLU; the shortcut's average pooling where
    the resolution halves and its concatenation where the channels grow."""
    return 7 + (stride != 1) + (out_ch > in_ch)


@pytest.mark.parametrize('method', hostcost.HOST_METHODS)
def test_forward_counts_follow_the_architecture(method):
    """An oracle written from the model's definition, at a depth the pins do not
    cover: conv1 + BN + ReLU and the lower units; the upper units, the average
    pooling and fc."""
    n = 2
    specs, split = model.unit_specs(n), model.paper_split(n)
    apps, _, _ = hostcost.count_method(method, 'composed', n=n)
    assert apps['forward lower'] == 3 + sum(_unit_forward(*s) for s in specs[:split])
    assert apps['forward upper'] == sum(_unit_forward(*s) for s in specs[split:]) + 2
    assert apps['other'] == 0
    if method == 'jaderberg-linear':       # [h, y] concatenated, one convolution
        assert apps['synthesizer forward'] == 2


def test_backprop_and_decoupled_backward_agree():
    """Two ways of telling phases apart give the same backward of each half: for
    backprop, by which half made the function differentiated (one loss.backward());
    for the decoupled step, by the step that runs (two backward passes)."""
    bp, _, _ = hostcost.count_method('bp', n=2)
    for method in ('jaderberg-linear', 'vfbn'):
        split, _, _ = hostcost.count_method(method, n=2)
        for phase in ('forward lower', 'backward lower', 'forward upper', 'backward upper'):
            assert split[phase] == bp[phase], (method, phase)


def _params(updater):
    return {name + p: q.array.copy() for name, opt in updater.get_all_optimizers().items()
            for p, q in opt.target.namedparams()}


def test_counting_changes_nothing_and_leaves_no_trace():
    counted, plain = (hostcost.build_updater('vfbn', n=1) for _ in range(2))
    plain.update()
    apps, _, _, counter = hostcost.count_step(counted)
    assert sum(apps.values()) == counter.total() > 0
    a, b = _params(counted), _params(plain)
    assert set(a) == set(b) and all(numpy.array_equal(a[k], b[k]) for k in a)
    # hooks and wrappers gone
    assert 'train_upper' not in vars(counted)
    assert not chainer.get_function_hooks()
    for name, opt in counted.get_all_optimizers().items():
        assert 'update' not in vars(opt)
        assert all(not p.update_rule._hookable._pre_update_hooks for p in opt.target.params())
    for link in (counted.lower, counted.upper, counted.synth):
        assert not link.local_link_hooks
    # and counting again counts the same
    again, _, _, _ = hostcost.count_step(counted)
    assert again == apps


def test_extra_application_is_counted_in_its_phase(monkeypatch):
    """One more function in the task loss shows as one more in 'backward upper'."""
    before, _, _ = hostcost.count_method('bp', n=1)
    loss = F.softmax_cross_entropy
    monkeypatch.setattr(updaters.F, 'softmax_cross_entropy',
                        lambda y, t: F.identity(loss(y, t)))
    after, _, _ = hostcost.count_method('bp', n=1)
    # F.identity's backward passes the gradient on without applying anything
    assert after['backward upper'] == before['backward upper'] + 1
    assert {p: c for p, c in after.items() if p != 'backward upper'} == \
        {p: c for p, c in before.items() if p != 'backward upper'}


def test_narrow_network_has_the_paper_graph_at_an_eighth_of_the_width():
    nets = hostcost.build_networks('vfbn', 18, width_divisor=8)
    lower, upper, synth = (nets.trained[k] for k in ('lower', 'upper', 'synth'))
    assert lower.conv1.W.shape == (2, 3, 3, 3)
    assert [u.out_ch for u in lower.units] == [4] * 18 + [8] * 9
    assert len(upper.units) == 27 and upper.fc.W.shape == (10, 8)
    assert synth.v_f.res1.conv1.W.shape == (8, 8, 3, 3)
    h = lower(numpy.zeros((2, 3, 8, 8), numpy.float32))
    assert h.shape == (2, 8, 3, 3)       # 8 -> 6 (conv1, no padding) -> 3 (stride 2)
    assert upper(h).shape == (2, 10)
    assert hostcost.count_method('vfbn', n=1, width_divisor=8) == \
        hostcost.count_method('vfbn', n=1)
