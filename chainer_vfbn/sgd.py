"""Momentum SGD with weight decay that updates every parameter in one operation.

chainer-cifar10 trains ResNet-110 with ``MomentumSGD`` plus a ``WeightDecay`` hook.
In Chainer that is two kernels and a few dozen Python calls per parameter, about 660
kernels per step for ResNet-110's 330 parameter arrays: 11% of a backprop step under
the profiler on the H200 (``benchmarks/gpu/gpu_profile.txt``, ``optimizer.update``),
where a step is bound by the host.

:class:`MomentumSGDWeightDecay` does the same arithmetic on one flat buffer: the
parameters become views into it (and so do the velocities), the gradients are
gathered by one concatenation, and one elementwise kernel (six NumPy operations on
the CPU) updates all of them. On the CPU the result is bit-identical to Chainer's
optimizer with the hook (tested). On a GPU the kernel evaluates the same expressions
as Chainer's two kernels, and ``benchmarks/device_check`` compares the two there.
Unlike Chainer's hook it leaves ``param.grad`` as backward made it.

As in Chainer, a parameter whose ``update_rule`` is disabled (``disable_update()``)
is left alone. Per-parameter hyperparameters are refused with a clear error. Snapshots
use Chainer's layout (``t`` and ``v`` per parameter), so a snapshot taken after the
first update loads into either optimizer. Needs CuPy 8 or later on a GPU
(``concatenate(..., out=)``); the README asks for 13 or 14.
"""
import chainer
import numpy
from chainer import backend
from chainer.backends import cuda
from chainer import optimizers

from chainer_vfbn import flat


def _kernel():
    return cuda.elementwise(
        'T grad, T lr, T momentum, T decay', 'T param, T v',
        'v = momentum * v - lr * (grad + decay * param); param += v;',
        'chainer_vfbn_momentum_sgd_weight_decay')


class _Flat(object):
    """The updated parameters as views into one buffer, their velocities as views
    into another (starting from ``previous[id(param)]`` where there is one), and a
    buffer that the gradients are gathered into."""

    def __init__(self, params, previous):
        xp = backend.get_array_module(params[0].array)
        dtype = params[0].dtype
        if any(p.dtype != dtype for p in params):
            raise TypeError('MomentumSGDWeightDecay needs parameters of one dtype, got %s'
                            % sorted({str(p.dtype) for p in params}))
        with chainer.using_device(params[0].device):
            self.param = xp.empty(sum(p.size for p in params), dtype)
            self.velocity = xp.zeros_like(self.param)
            self.grad = xp.empty_like(self.param)
            # NumPy's products go here, not into a fresh 12 MB array each step.
            self.scratch = xp.empty_like(self.param) if xp is numpy else None
        self.params, self.param_views, self.velocity_views = params, [], []
        offset = 0
        for p in params:
            end = offset + p.size
            view = self.param[offset:end].reshape(p.shape)
            view[...] = p.array
            p.array = view
            v = self.velocity[offset:end].reshape(p.shape)
            if id(p) in previous:      # the same parameter, moved or re-assigned
                v[...] = p.device.send(previous[id(p)])
            self.param_views.append(view)
            self.velocity_views.append(v)
            offset = end

    def velocities(self):
        return {id(p): v for p, v in zip(self.params, self.velocity_views)}

    def is_current(self, params):
        """Whether these are still the parameters, and each still is its view
        (moving a link to another device, or assigning ``param.array``, replaces it)."""
        return (len(params) == len(self.params)
                and all(p is q and p.array is view
                        for p, q, view in zip(params, self.params, self.param_views)))


class MomentumSGDWeightDecay(optimizers.MomentumSGD):
    """``MomentumSGD(lr, momentum)`` with ``WeightDecay(weight_decay)``, per step:
    ``g += weight_decay * param; v = momentum * v - lr * g; param += v``.

    ``lr`` and ``momentum`` are hyperparameters as in Chainer (schedules set
    ``optimizer.lr``). Optimizer hooks are refused: weight decay is built in."""

    def __init__(self, lr, momentum, weight_decay):
        super().__init__(lr=lr, momentum=momentum)
        self.weight_decay = weight_decay
        self._flat = None
        self._parked = {}  # id(param) -> velocity of a parameter disabled since

    def setup(self, link):
        self._flat, self._parked = None, {}
        return super().setup(link)

    def add_hook(self, hook, name=None, timing='auto'):
        raise TypeError('MomentumSGDWeightDecay updates every parameter in one '
                        'kernel and takes no hooks (weight decay is built in); use '
                        'chainer.optimizers.MomentumSGD for %r'
                        % (name or getattr(hook, 'name', hook)))

    def _updated_params(self):
        """The target's parameters with an enabled update rule, checked."""
        return flat.updated_params(self, 'chainer.optimizers.MomentumSGD')

    def _buffers(self):
        """The flat buffers of the parameters updated now (None if there are none),
        rebuilt when the parameters or their arrays have changed."""
        params = self._updated_params()
        if not params:
            return None
        if self._flat is None or not self._flat.is_current(params):
            previous = dict(self._parked)
            if self._flat is not None:
                previous.update(self._flat.velocities())
            self._flat = _Flat(params, previous)
            updated = {id(p) for p in params}
            # A parameter disabled mid-run keeps its velocity, as in Chainer (for
            # snapshots, and for when it is enabled again).
            self._parked = {k: v.copy() for k, v in previous.items() if k not in updated}
        return self._flat

    def update(self, lossfun=None, *args, **kwds):
        if lossfun is not None:
            loss = lossfun(*args, **kwds)
            self.target.cleargrads()
            loss.backward()
            del loss
        self.t += 1
        flat = self._buffers()
        if flat is None:
            return
        xp = backend.get_array_module(flat.param)
        lr, momentum, decay = self.hyperparam.lr, self.hyperparam.momentum, self.weight_decay
        with chainer.using_device(flat.params[0].device):
            grads = [p.grad for p in flat.params]
            if any(g is None for g in grads):     # as Chainer: a missing gradient is zero
                grads = [xp.zeros_like(p.array) if g is None else g
                         for p, g in zip(flat.params, grads)]
            xp.concatenate([g.ravel() for g in grads], out=flat.grad)
            if xp is numpy:
                # Chainer's CPU arithmetic, operation for operation: the hook's
                # ``g += rate * p``, then MomentumSGDRule.update_core_cpu.
                g, v, tmp = flat.grad, flat.velocity, flat.scratch
                g += numpy.multiply(decay, flat.param, out=tmp)
                v *= momentum
                v -= numpy.multiply(lr, g, out=tmp)
                flat.param += v
            else:
                _kernel()(flat.grad, lr, momentum, decay, flat.param, flat.velocity)
        for p in flat.params:
            p.update_rule.t += 1

    def serialize(self, serializer):
        self.t = serializer('t', self.t)
        self.epoch = serializer('epoch', self.epoch)
        flat = self._buffers()
        velocities = dict(self._parked)
        if flat is not None:
            velocities.update(flat.velocities())
        for name, param in self.target.namedparams():
            rule = param.update_rule
            if id(param) not in velocities:    # never updated here: Chainer's rule
                rule.serialize(serializer[name])
                continue
            rule.t = serializer[name]('t', rule.t)
            # In place, both ways. As in Chainer, loading needs ``v``: a snapshot
            # taken before the first update has none.
            serializer[name]('v', velocities[id(param)])


def chainer_momentum_sgd(link, lr, momentum, weight_decay):
    """The optimizer this module replaces, for comparisons: Chainer's MomentumSGD
    with a WeightDecay hook, set up on ``link``."""
    opt = optimizers.MomentumSGD(lr=lr, momentum=momentum)
    opt.setup(link)
    opt.add_hook(chainer.optimizer_hooks.WeightDecay(weight_decay))
    return opt
