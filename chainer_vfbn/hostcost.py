"""The host cost of a training step, counted: Chainer function applications per
phase of the paper's step, and the optimizers' update-rule calls.

A GPU step of this package is bound by the host, by Chainer's Python cost per
function application (docs/GPU.md). The number of applications does not depend on
the device, the batch or the widths, so it can be counted exactly on a CPU, on a
tiny network, while anything else runs on the machine. ``benchmarks/bench_host.py``
reports these counts beside its timings; ``tests/test_host_cost.py`` pins them, so
that new host cost fails the tests without any timing.

:class:`PhaseCounter` counts every ``FunctionNode.apply`` (a global
:class:`chainer.FunctionHook`; those that a backward pass makes included) under the
phase of :meth:`DecoupledUpdater.update_core <chainer_vfbn.updaters.DecoupledUpdater.update_core>`
(or of :class:`~chainer_vfbn.updaters.BackpropUpdater`) in which it happens:

==========================  ==========================================================
``forward lower``           step 1, ``h = lower(x)``
``synthesizer forward``     step 2, the synthesizer's forward pass on the detached h
``delta_hat's gradient``    step 2, applications made inside a backward pass while
                            the synthesizer runs (VFBN's ``chainer.grad`` of eq. 6)
``backward lower``          step 2, ``h.backward()`` with delta_hat (for backprop:
                            the backward of the lower half's functions)
``forward upper``           step 3, the upper half's forward pass
``backward upper``          step 3, the task loss, its backward through the upper
                            half, the accuracy
``eq. 3``                   step 4, eq. 3 and its backward (double backprop for VFBN)
``other``                   anything else (nothing, in this package's updaters)
==========================  ==========================================================

Phases are found from the outside, without code in the updater: a
:class:`chainer.LinkHook` on the lower half, the upper half and the synthesizer
marks their forward passes; after the synthesizer's forward comes step 2's backward,
after the upper half's step 3's loss and backward, and after the updater's
``train_upper`` returns, eq. 3 (an instance attribute wraps it while counting). An
application inside a backward pass belongs to the backward of the half whose forward
made the function it differentiates.

:func:`build_updater` makes the updater of ``bp``, ``jaderberg-linear`` or ``vfbn``
at any depth and at a fraction of the paper's widths, on a few fixed batches, under
one of the :data:`VARIANTS` of the fast paths (:mod:`chainer_vfbn.fused`).
"""
import collections
import contextlib
import weakref

import chainer
import numpy

from chainer_vfbn import config, fused, methods, model

PHASES = ('forward lower', 'synthesizer forward', "delta_hat's gradient", 'backward lower',
          'forward upper', 'backward upper', 'eq. 3', 'other')
HOST_METHODS = ('bp', 'jaderberg-linear', 'vfbn')

#: The fast paths' switches (:data:`chainer_vfbn.fused.SWITCHES`) and Chainer's type
#: check, per variant: ``composed`` is the code before the speed work (every switch
#: off, type checks on as in Chainer), ``fused`` every fast path on (type checks on,
#: as training runs), ``fused, no type check`` everything; the others one lever each.
_OFF = {key: False for key in fused.SWITCHES}
VARIANTS = collections.OrderedDict([
    ('composed', dict(_OFF, type_check=True)),
    ('fused', dict({key: True for key in fused.SWITCHES}, type_check=True)),
    ('fused, no type check', dict({key: True for key in fused.SWITCHES}, type_check=False)),
    ('units only', dict(_OFF, vfbn_fused_units=True, type_check=True)),
    ('bn double backward only', dict(_OFF, vfbn_fused_bn_double_backward=True,
                                     type_check=True)),
    ('v_f only', dict(_OFF, vfbn_fused_v_f=True, type_check=True)),
    ('reductions only', dict(_OFF, vfbn_fused_reductions=True, type_check=True)),
    ('adam only', dict(_OFF, vfbn_fused_adam=True, type_check=True)),
    ('no type check only', dict(_OFF, type_check=False)),
])


@contextlib.contextmanager
def variant_config(variant):
    """Chainer's configuration for ``variant`` (a key of :data:`VARIANTS`) inside the
    block. ``vfbn_fused_adam`` is read when the optimizer is built, the others at
    every step: build and step inside it."""
    with contextlib.ExitStack() as stack:
        for key, value in VARIANTS[variant].items():
            stack.enter_context(chainer.using_config(key, value))
        yield


class _Marks(chainer.LinkHook):
    """Sets the counter's phase around the forward pass of the links it is added to."""
    name = 'hostcost_marks'

    def __init__(self, counter, during, after):
        self.counter, self.during, self.after = counter, during, after

    def forward_preprocess(self, args):
        self.counter.links.append(self.during[id(args.link)])

    def forward_postprocess(self, args):
        self.counter.links.pop()
        self.counter.phase = self.after[id(args.link)]


class PhaseCounter(chainer.FunctionHook):
    """Function applications per phase (:data:`PHASES`) and update-rule calls per
    optimizer, while :meth:`counting` is active. ``functions[phase]`` counts them by
    the function's label too."""
    name = 'hostcost_phases'

    def __init__(self):
        self.reset()
        self.links = []            # phases of the marked forward passes running now
        self.backwards = []        # the function nodes whose backward runs now
        self.origin = weakref.WeakKeyDictionary()   # function node -> its phase

    def reset(self):
        self.phase = 'other'
        self.applications = collections.OrderedDict((p, 0) for p in PHASES)
        self.functions = collections.defaultdict(collections.Counter)
        self.rule_calls = collections.Counter()
        self.optimizer_updates = collections.Counter()

    def current(self):
        if self.links:
            inner = self.links[-1]
            if inner == 'synthesizer forward' and self.backwards:
                return "delta_hat's gradient"
            return inner
        if self.backwards:
            made = self.origin.get(self.backwards[-1])
            if made in ('forward lower', 'backward lower'):
                return 'backward lower'
            if made in ('forward upper', 'backward upper'):
                return 'backward upper'
        return self.phase

    def forward_preprocess(self, function, in_data):
        phase = self.current()
        self.applications[phase] += 1
        self.functions[phase][function.label] += 1
        self.origin[function] = phase

    def backward_preprocess(self, function, in_data, out_grad):
        self.backwards.append(function)

    def backward_postprocess(self, function, in_data, out_grad):
        self.backwards.pop()

    def total(self):
        return sum(self.applications.values())

    @contextlib.contextmanager
    def counting(self, updater):
        """Count what ``updater``'s steps do inside the block (one or more
        ``updater.update()``; :meth:`reset` in between to count steps apart)."""
        halves = _halves(updater)
        during = {id(link): phase for phase, link in halves.items()}
        after = {id(halves['forward lower']): 'other',
                 id(halves['forward upper']): 'backward upper'}
        if 'synthesizer forward' in halves:
            after[id(halves['synthesizer forward'])] = 'backward lower'
        marks = _Marks(self, during, after)
        with contextlib.ExitStack() as stack:
            for link in halves.values():
                link.add_hook(marks)
                stack.callback(link.delete_hook, marks.name)
            for name, optimizer in updater.get_all_optimizers().items():
                _count_rules(self, name, optimizer, stack)
            if 'synthesizer forward' in halves:
                train_upper = updater.train_upper

                def marked(*args, **kwargs):
                    out = train_upper(*args, **kwargs)
                    self.phase = 'eq. 3'
                    return out
                updater.train_upper = marked
                stack.callback(delattr, updater, 'train_upper')
            stack.enter_context(self)        # the global function hook
            yield self


def _halves(updater):
    """The links whose forward passes mark phases, by the phase they mark."""
    if 'main' in updater.get_all_optimizers():       # BackpropUpdater: a model.Net
        net = updater.get_optimizer('main').target
        return {'forward lower': net.lower, 'forward upper': net.upper}
    return {'forward lower': updater.lower, 'synthesizer forward': updater.synth,
            'forward upper': updater.upper}


def _count_rules(counter, name, optimizer, stack):
    """Count ``optimizer``'s update-rule calls (a pre-update hook on each rule) and
    its ``update()`` calls (an instance attribute wrapping it) under ``name``."""
    def rule_hook(rule, param):
        counter.rule_calls[name] += 1
    for param in optimizer.target.params():
        rule = param.update_rule
        if rule is not None:
            rule.add_hook(rule_hook, name='hostcost_rule_calls', timing='pre')
            stack.callback(rule.remove_hook, 'hostcost_rule_calls')
    update = optimizer.update

    def counted(*args, **kwargs):
        counter.optimizer_updates[name] += 1
        return update(*args, **kwargs)
    optimizer.update = counted
    stack.callback(delattr, optimizer, 'update')


def count_step(updater):
    """One ``updater.update()`` counted: ``(applications per phase, update-rule calls
    per optimizer, optimizer updates per optimizer, the counter)``."""
    counter = PhaseCounter()
    with counter.counting(updater):
        updater.update()
    return (dict(counter.applications), dict(counter.rule_calls),
            dict(counter.optimizer_updates), counter)


# ---------------------------------------------------------------------------
# Updaters for the count and the CPU proxy of the host cost.

class FixedBatches(chainer.dataset.Iterator):
    """Cycles through a few fixed ``(x, t)`` batches (no epochs end)."""

    def __init__(self, batches):
        self.batches, self.count = batches, 0
        self.epoch, self.is_new_epoch, self.epoch_detail = 0, False, 0.0

    def __next__(self):
        batch = self.batches[self.count % len(self.batches)]
        self.count += 1
        return batch

    next = __next__


def fixed_batches(batch, size, dtype=numpy.float32, seed=0, count=2):
    rng = numpy.random.RandomState(seed)
    return [(rng.standard_normal((batch, 3, size, size)).astype(dtype),
             rng.randint(0, config.N_CLASSES, batch).astype(numpy.int32))
            for _ in range(count)]


def build_networks(method, n, width_divisor=1):
    """:func:`chainer_vfbn.methods.build_networks` for ``method`` with every width
    (conv1's, each block's, and so the synthesizer's) divided by ``width_divisor``.
    The graph, and so every count, is that of the paper's network; only the arrays
    shrink. Same structure as ``methods.build_networks``: the paper's split, the
    synthesizer on the lower half's last channels."""
    if width_divisor == 1:
        return methods.build_networks(method, depth=n)
    stem = config.STEM_CHANNELS // width_divisor
    channels = tuple(c // width_divisor for c in config.BLOCK_CHANNELS)
    specs, split = model.unit_specs(n, channels, stem), model.paper_split(n)
    lower = model.Lower(specs[:split], stem)
    upper = model.Upper(specs[split:], specs[split - 1][1])
    if method == 'bp':
        net = model.Net(lower, upper)
        return methods.Networks(method, {'main': net}, net)
    synth = methods.make_synthesizer(method, specs[split - 1][1])
    return methods.Networks(method, {'lower': lower, 'upper': upper, 'synth': synth},
                            model.Net(lower, upper))


def build_updater(method, variant='composed', *, n=1, width_divisor=1, batch=2, size=8,
                  dtype=numpy.float32, seed=0, alpha_gs=config.ALPHA_GS, device=None):
    """The updater of ``method`` (one of :data:`HOST_METHODS`) under ``variant``, its
    networks initialised from ``seed`` (on the host, then sent to ``device``), on
    fixed ``batch`` x 3 x ``size`` x ``size`` batches. 8 x 8 images go through the
    paper's network (conv1 without padding: 6 x 6, then 3 x 3 and 2 x 2 after the two
    stride-2 stages). Step it inside :func:`variant_config` of the same variant."""
    if method not in HOST_METHODS:
        raise ValueError('unknown method %r; choose one of: %s'
                         % (method, ', '.join(HOST_METHODS)))
    numpy.random.seed(seed)
    with variant_config(variant), chainer.using_config('dtype', dtype):
        networks = build_networks(method, n, width_divisor)
        if device is not None:
            for link in networks.trained.values():
                link.to_device(device)
        iterator = FixedBatches(fixed_batches(batch, size, dtype, seed))
        updater, _ = methods.build_updater(networks, iterator=iterator, alpha_gs=alpha_gs,
                                           device=device)
    return updater


def count_method(method, variant='composed', **kwargs):
    """:func:`count_step` of the second step of a fresh updater (the first step makes
    optimizer states; the second is the steady state), under ``variant``."""
    updater = build_updater(method, variant, **kwargs)
    with variant_config(variant):
        updater.update()
        return count_step(updater)[:3]
