"""The one-kernel optimizer against Chainer's own MomentumSGD + WeightDecay hook."""
import chainer_vfbn  # noqa: F401  (compat shim before chainer)

import copy
import io

import chainer
import numpy
import pytest
from chainer import optimizers, serializers

from chainer_vfbn import model
from chainer_vfbn.sgd import MomentumSGDWeightDecay

pytestmark = pytest.mark.numpy1

LR, MOMENTUM, WD = 0.1, 0.9, 1e-4


def small_net():
    numpy.random.seed(0)
    lower, upper = model.build_resnet(1, None)
    return model.Net(lower, upper)


def chainer_optimizer(net):
    opt = optimizers.MomentumSGD(lr=LR, momentum=MOMENTUM)
    opt.setup(net)
    opt.add_hook(chainer.optimizer_hooks.WeightDecay(WD))
    return opt


def ours(net):
    opt = MomentumSGDWeightDecay(LR, MOMENTUM, WD)
    opt.setup(net)
    return opt


def set_grads(step, *nets):
    """The same random gradients in every net, on its device; one parameter gets none."""
    rng = numpy.random.RandomState(step)
    for named in zip(*(sorted(n.namedparams()) for n in nets)):
        g = rng.randn(*named[0][1].shape).astype(numpy.float32)
        for i, (name, p) in enumerate(named):
            p.grad = None if name.endswith('fc/b') else p.device.send(g.copy())


def host(array):
    return chainer.backend.CpuDevice().send(array)


def assert_same_params(a, b):
    """Bit for bit on the CPU. On a GPU the fused kernel evaluates Chainer's two
    expressions in one; the same bits are expected, one float32 rounding allowed."""
    for (name, p), (_, q) in zip(sorted(a.namedparams()), sorted(b.namedparams())):
        if p.device.xp is numpy:
            numpy.testing.assert_array_equal(p.array, q.array, err_msg=name)
        else:
            numpy.testing.assert_allclose(host(p.array), host(q.array), rtol=0,
                                          atol=1e-6 * float(abs(host(p.array)).max()),
                                          err_msg=name)


def test_bit_identical_to_chainer_with_a_schedule_and_a_missing_gradient(device):
    ref_net = small_net()
    net = copy.deepcopy(ref_net)
    ref, opt = chainer_optimizer(ref_net), ours(net)
    ref_net.to_device(device)      # after setup, as the updater does
    net.to_device(device)
    for step in range(6):
        if step == 3:
            ref.lr = opt.lr = LR * 0.1
        set_grads(step, ref_net, net)
        ref.update()
        opt.update()
    assert_same_params(ref_net, net)
    assert opt.t == ref.t == 6
    moved = sum(numpy.abs(host(p.array) - q.array).sum()
                for (_, p), (_, q) in zip(sorted(net.namedparams()),
                                          sorted(small_net().namedparams())))
    assert moved > 0


def test_parameters_are_views_of_one_buffer_and_survive_replacement():
    ref_net = small_net()
    net = copy.deepcopy(ref_net)
    ref, opt = chainer_optimizer(ref_net), ours(net)
    set_grads(0, ref_net, net)
    ref.update()
    opt.update()
    buffer = opt._flat.param
    assert all(p.array.base is buffer for p in net.params())
    # What moving to a device does: every parameter gets a new array.
    for p in net.params():
        p.array = p.array.copy()
    for step in (1, 2):
        set_grads(step, ref_net, net)
        ref.update()
        opt.update()
    assert opt._flat.param is not buffer
    assert_same_params(ref_net, net)       # the velocity was carried over


@pytest.mark.parametrize('saver', ['ours', 'chainer'])
def test_snapshots_are_interchangeable_with_chainers(saver, device):
    """Save one optimizer after 2 steps, load it into the other kind, take 2 more
    steps in both: the same parameters as 4 uninterrupted steps of Chainer's."""
    ref_net = small_net()
    ref = chainer_optimizer(ref_net)
    ref_net.to_device(device)
    for step in range(4):
        set_grads(step, ref_net)
        ref.update()

    first_net = small_net()
    first = ours(first_net) if saver == 'ours' else chainer_optimizer(first_net)
    first_net.to_device(device)
    for step in range(2):
        set_grads(step, first_net)
        first.update()
    buf = io.BytesIO()
    serializers.save_npz(buf, first)
    buf.seek(0)

    net = copy.deepcopy(first_net)
    second = chainer_optimizer(net) if saver == 'ours' else ours(net)
    serializers.load_npz(buf, second)
    assert second.t == 2
    for step in (2, 3):
        set_grads(step, net)
        second.update()
    assert_same_params(ref_net, net)


def test_hooks_are_refused_with_a_clear_message():
    opt = ours(small_net())
    with pytest.raises(TypeError, match='weight decay is built in'):
        opt.add_hook(chainer.optimizer_hooks.WeightDecay(WD))


def test_frozen_parameters_are_left_alone_as_in_chainer():
    ref_net = small_net()
    net = copy.deepcopy(ref_net)
    ref, opt = chainer_optimizer(ref_net), ours(net)
    for step in range(3):
        if step == 1:                        # freeze the lower half mid-run
            ref_net.lower.disable_update()
            net.lower.disable_update()
        set_grads(step, ref_net, net)
        ref.update()
        opt.update()
    assert_same_params(ref_net, net)
    frozen = {name: p.array.copy() for name, p in net.lower.namedparams()}
    set_grads(3, net)
    opt.update()
    for name, p in net.lower.namedparams():
        numpy.testing.assert_array_equal(p.array, frozen[name], err_msg=name)
    # A snapshot with frozen parameters loads into Chainer's optimizer.
    buf = io.BytesIO()
    serializers.save_npz(buf, opt)
    buf.seek(0)
    serializers.load_npz(buf, ref)
    assert ref.t == opt.t == 4
    # Unfrozen, the lower half resumes with the velocity it had, in both.
    ref_net.copyparams(net)
    ref_net.lower.enable_update()
    net.lower.enable_update()
    set_grads(4, ref_net, net)
    ref.update()
    opt.update()
    assert_same_params(ref_net, net)


def test_setup_on_another_link_starts_from_zero_velocity():
    net = small_net()
    opt = ours(net)
    set_grads(0, net)
    opt.update()                              # velocity now nonzero
    other = small_net()
    opt.setup(other)
    before = {name: p.array.copy() for name, p in other.namedparams()}
    opt.weight_decay = 0.0
    for p in other.params():
        p.grad = numpy.zeros_like(p.array)
    opt.update()                              # zero gradient, zero velocity: no move
    for name, p in other.namedparams():
        numpy.testing.assert_array_equal(p.array, before[name], err_msg=name)


def test_per_parameter_hyperparameters_and_late_parameters_are_refused():
    net = small_net()
    opt = ours(net)
    set_grads(0, net)
    net.upper.fc.W.update_rule.hyperparam.lr = 0.0
    with pytest.raises(ValueError, match='/upper/fc/W has its own hyperparameters'):
        opt.update()
    net = small_net()
    opt = ours(net)
    with net.upper.init_scope():
        net.upper.extra = chainer.Parameter(numpy.zeros(3, numpy.float32))
    with pytest.raises(RuntimeError, match='/upper/extra was added to the link after setup'):
        opt.update()


def test_a_link_without_parameters_is_a_no_op():
    opt = MomentumSGDWeightDecay(LR, MOMENTUM, WD)
    opt.setup(chainer.Chain())
    opt.update()
    assert opt.t == 1
