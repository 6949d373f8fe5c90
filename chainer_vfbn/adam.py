"""Adam that updates every parameter of a synthesizer in one operation.

Every synthesizer is trained on eq. 3 by Adam with ``alpha = alpha_gs``
(:func:`chainer_vfbn.methods.synthesizer_optimizer`). Chainer's Adam calls one update
rule per parameter array: 14 rule calls, each a few dozen Python calls and (on a GPU)
one kernel, per VFBN step, where a step is bound by the host (docs/GPU.md).

:class:`FlatAdam` does the same arithmetic on flat buffers, as
:mod:`chainer_vfbn.sgd` does for the network's MomentumSGD: the parameters become
views into one buffer, their first and second moments ``m`` and ``v`` views into two
more, the gradients are gathered by one concatenation, and one update runs over all
of them. On the CPU that update is Chainer's ``AdamRule.update_core_cpu``, operation
for operation, so the result is bit-identical to ``chainer.optimizers.Adam`` (tested,
float32 and float64). On a GPU it is one elementwise kernel with the expressions of
Chainer's Adam kernel (``benchmarks/device_check`` compares the two there).

Per step, for every parameter ``p`` with gradient ``g`` and its own step count ``t``
(as in Chainer, ``alpha_t = alpha sqrt(1 - beta2^t) / (1 - beta1^t)``)::

    m += (1 - beta1) (g - m)
    v += (1 - beta2) (g^2 - v)
    p -= eta (alpha_t m / (sqrt(v) + eps) + weight_decay_rate p)

The moments stay where Chainer keeps them, in each parameter's update rule
(``rule.state['m']``, ``rule.state['v']``), now as views into the buffers; so a
snapshot has Chainer's layout (``t``, ``m``, ``v`` per parameter) and loads into
either optimizer, before or after the first update. As in Chainer, a parameter whose
update rule is disabled is left alone (its moments kept), and a missing gradient
counts as zero (Chainer fills ``param.grad`` with zeros; this leaves it ``None``).
Refused with a clear error: hooks, per-parameter hyperparameters, ``amsgrad`` and
``adabound``, parameters of mixed or half precision.
"""
import chainer
import numpy
from chainer import backend
from chainer.backends import cuda
from chainer import optimizers
from chainer.optimizers import adam as chainer_adam

from chainer_vfbn import flat


def _kernel():
    # Chainer's Adam kernel (amsgrad and adabound off) with P = T.
    return cuda.elementwise(
        'T grad, T alpha_t, T one_minus_beta1, T one_minus_beta2, '
        'T eps, T eta, T weight_decay_rate',
        'T param, T m, T v',
        '''m += one_minus_beta1 * (grad - m);
           v += one_minus_beta2 * (grad * grad - v);
           param -= eta * (alpha_t * m / (sqrt(v) + eps) +
                           weight_decay_rate * param);''',
        'chainer_vfbn_flat_adam')


def _axpby(x, a, b, y):
    """``x = a x + b y`` in place, as Chainer's Adam writes it."""
    if a == 1:
        x += b * y
    else:
        x[...] = a * x + b * y


def update_cpu(param, m, v, grad, alpha_t, hp):
    """Chainer's ``AdamRule.update_core_cpu`` (amsgrad and adabound off) on arrays."""
    _axpby(m, 1.0, 1.0 - hp.beta1, grad - m)
    _axpby(v, 1.0, 1.0 - hp.beta2, grad * grad - v)
    step = alpha_t / (numpy.sqrt(v) + hp.eps)
    _axpby(param, 1.0 - hp.eta * hp.weight_decay_rate, -hp.eta, step * m)


def update_gpu(param, m, v, grad, alpha_t, hp):
    """Chainer's Adam kernel on arrays."""
    _kernel()(grad, alpha_t, 1 - hp.beta1, 1 - hp.beta2, hp.eps, hp.eta,
              hp.weight_decay_rate, param, m, v)


class _Flat(object):
    """The updated parameters as views into one buffer, their rules' moments as views
    into two more (holding the values the rules had), and a buffer that the
    gradients are gathered into."""

    def __init__(self, params):
        xp = backend.get_array_module(params[0].array)
        dtype = params[0].dtype
        if any(p.dtype != dtype for p in params) or dtype.kind != 'f' or dtype.itemsize < 4:
            raise TypeError('FlatAdam needs parameters of one dtype, float32 or float64, '
                            'got %s' % sorted({str(p.dtype) for p in params}))
        with chainer.using_device(params[0].device):
            size = sum(p.size for p in params)
            self.param, self.grad = xp.empty(size, dtype), xp.empty(size, dtype)
            self.m, self.v = xp.zeros(size, dtype), xp.zeros(size, dtype)
        self.params, self.views, self.bounds = params, [], []
        offset = 0
        for p in params:
            end = offset + p.size
            rule = p.update_rule
            if rule.state is None:
                rule._state = {}      # zero moments, as AdamRule.init_state makes them
            views = []
            for buffer, old in ((self.param, p.array), (self.m, rule.state.get('m')),
                                (self.v, rule.state.get('v'))):
                view = buffer[offset:end].reshape(p.shape)
                if old is not None:
                    view[...] = p.device.send(old)
                views.append(view)
            p.array, rule.state['m'], rule.state['v'] = views
            self.views.append(tuple(views))
            self.bounds.append((offset, end))
            offset = end

    def is_current(self, params):
        """Whether these are still the parameters and each array still is its view
        (moving a link to another device, assigning ``param.array`` or loading a
        snapshot into a rule without state replaces one)."""
        return (len(params) == len(self.params)
                and all(p is q and p.array is a and p.update_rule.state is not None
                        and p.update_rule.state.get('m') is m
                        and p.update_rule.state.get('v') is v
                        for p, q, (a, m, v) in zip(params, self.params, self.views)))

    def runs(self):
        """``(start, end, t)``: the stretches of the buffers whose parameters share
        a step count ``t`` (one stretch, unless a snapshot gave them different ones)."""
        runs = []
        for p, (start, end) in zip(self.params, self.bounds):
            t = p.update_rule.t
            if runs and runs[-1][2] == t:
                runs[-1] = (runs[-1][0], end, t)
            else:
                runs.append((start, end, t))
        return runs


class FlatAdam(optimizers.Adam):
    """``chainer.optimizers.Adam(alpha, beta1, beta2, eps, eta, weight_decay_rate)``,
    every parameter updated at once. ``alpha`` and the rest are hyperparameters as in
    Chainer (an extension may set ``optimizer.alpha``)."""

    #: How many times :meth:`update` has run the one update over the buffers (a
    #: count for tests and benchmarks; Chainer's Adam makes one rule call per
    #: parameter instead).
    flat_updates = 0

    def __init__(self, alpha=chainer_adam._default_hyperparam.alpha,
                 beta1=chainer_adam._default_hyperparam.beta1,
                 beta2=chainer_adam._default_hyperparam.beta2,
                 eps=chainer_adam._default_hyperparam.eps,
                 eta=chainer_adam._default_hyperparam.eta,
                 weight_decay_rate=chainer_adam._default_hyperparam.weight_decay_rate):
        super().__init__(alpha=alpha, beta1=beta1, beta2=beta2, eps=eps, eta=eta,
                         weight_decay_rate=weight_decay_rate)
        self._flat = None

    def setup(self, link):
        self._flat = None
        return super().setup(link)

    def add_hook(self, hook, name=None, timing='auto'):
        raise TypeError('FlatAdam updates every parameter in one operation and takes '
                        'no hooks; use chainer.optimizers.Adam for %r'
                        % (name or getattr(hook, 'name', hook)))

    def _updated_params(self):
        """The target's parameters with an enabled update rule, checked."""
        hp = self.hyperparam
        if hp.amsgrad or hp.adabound:
            raise ValueError('FlatAdam does not do amsgrad or adabound; use '
                             'chainer.optimizers.Adam')
        return flat.updated_params(self, 'chainer.optimizers.Adam')

    def _buffers(self):
        """The flat buffers of the parameters updated now (None if there are none),
        rebuilt when the parameters or their arrays have changed."""
        params = self._updated_params()
        if not params:
            return None
        if self._flat is None or not self._flat.is_current(params):
            self._flat = _Flat(params)
        return self._flat

    def update(self, lossfun=None, *args, **kwds):
        if lossfun is not None:
            loss = lossfun(*args, **kwds)
            self.target.cleargrads()
            loss.backward()
            del loss
        self.t += 1
        buffers = self._buffers()
        if buffers is None:
            return
        hp = self.hyperparam
        if hp.eps != 0 and buffers.param.dtype.type(hp.eps) == 0:   # as AdamRule
            raise ValueError('eps of Adam optimizer is too small for {} ({})'.format(
                buffers.param.dtype.name, hp.eps))
        for p in buffers.params:
            p.update_rule.t += 1
        xp = backend.get_array_module(buffers.param)
        with chainer.using_device(buffers.params[0].device):
            grads = [p.grad for p in buffers.params]
            if any(g is None for g in grads):     # as Chainer: a missing gradient is zero
                grads = [xp.zeros_like(p.array) if g is None else g
                         for p, g in zip(buffers.params, grads)]
            xp.concatenate([g.ravel() for g in grads], out=buffers.grad)
            update = update_cpu if xp is numpy else update_gpu
            for start, end, t in buffers.runs():
                update(buffers.param[start:end], buffers.m[start:end], buffers.v[start:end],
                       buffers.grad[start:end], chainer_adam._learning_rate(hp, t), hp)
        self.flat_updates += 1


def chainer_adam_optimizer(link, alpha):
    """The optimizer this module replaces, for comparisons: Chainer's Adam with
    ``alpha``, set up on ``link``."""
    opt = optimizers.Adam(alpha=alpha)
    opt.setup(link)
    return opt
