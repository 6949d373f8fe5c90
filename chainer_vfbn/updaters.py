"""Updaters that train a network in two halves (SPEC section 4).

:class:`DecoupledUpdater` is the paper's synthetic-gradient training, in the
synchronous form of its footnote 1. One iteration:

1. ``h = lower(x)``, keeping the graph;
2. ``delta_hat = synthesizer(h, y)`` on a detached copy of h; ``h.grad = delta_hat``;
   ``h.backward()``; update the lower half;
3. forward the upper half from a fresh Variable on h's array, take the task loss,
   backward, update the upper half; ``delta`` is the gradient that reached that
   Variable;
4. train the synthesizer on eq. 3, ``||delta - delta_hat||^2``, reusing step 2's graph
   (the synthesizer has not changed since), unless its learning rate is 0.

:class:`LayerwiseUpdater` is Table 1's "layer-wise supervised loss": step 2's gradient
comes from an auxiliary head's own cross-entropy, and the head is trained on that
loss together with the lower half.

Both work for any lower chain, upper chain and synthesizer. Every trained network is
the target of one of the updater's optimizers, so snapshots hold all of them.

Report keys: ``main/loss`` and ``main/accuracy`` (the task loss of the upper half),
``synth/loss`` (eq. 3) or ``head/loss`` (the auxiliary loss), and every
``diag_interval`` iterations the gradient-fidelity diagnostics ``synth/cosine``
(cosine between delta_hat and delta over the batch), ``synth/rel_error``
(``|delta_hat - delta| / |delta|``), ``synth/norm_delta``, ``synth/norm_delta_hat``,
``synth/scale`` (the running RMS of delta) and ``lower/h_rms``.
"""
import chainer
import chainer.functions as F
from chainer import backend
from chainer.training import StandardUpdater

from chainer_vfbn import config


class NonFiniteError(RuntimeError):
    """Training produced a NaN or an infinity; the message names what and when."""


@chainer.dataset.converter()
def to_device(batch, device):
    """Converter for batches that :class:`chainer_vfbn.data.BatchIterator` already
    stacked into ``(x, t)`` arrays: send both to the device."""
    x, t = batch
    if device is None:
        return x, t
    return device.send(x), device.send(t)


def check_finite(method, iteration, **arrays):
    """Raise :class:`NonFiniteError` naming each array with a NaN or an inf.

    One host synchronisation: the arrays' sums are added up first (any NaN or inf
    makes the total non-finite), and only then inspected one by one. The updaters
    call it once per iteration, at its end: every synchronisation stalls the host
    until the GPU catches up, and a step is bound by the host (README, GPU)."""
    xp = backend.get_array_module(*arrays.values())
    total = sum(a.sum(dtype=xp.float64) for a in arrays.values())
    if bool(xp.isfinite(total)):
        return
    bad = [name for name, a in arrays.items() if not bool(xp.isfinite(a).all())]
    raise NonFiniteError('%s diverged at iteration %d: %s became non-finite'
                         % (method, iteration, ', '.join(bad) or 'a sum'))


def init_states(optimizer):
    """Give every parameter of ``optimizer`` its state now (Adam's zero moments), as
    its first update would: a snapshot taken before that update (alpha_gs = 0 never
    updates the synthesizer; a lagged pipeline starts late) then holds the state, and
    ``--resume`` finds what it looks for."""
    for param in optimizer.target.params():
        rule = param.update_rule
        if rule is not None and rule.state is None:
            rule._state = {}
            with chainer.using_device(param.device):
                rule.init_state(param)


class _TwoHalves(StandardUpdater):
    """What the split updaters share: the two halves behind the optimizers
    ``'lower'`` and ``'upper'``, the upper half's backprop step, the running RMS of
    delta, and the end of an iteration. The steps themselves are in each
    subclass's :meth:`update_core`.

    Args:
        iterator: yields ``(x, t)`` batches.
        optimizers (dict): ``'lower'`` and ``'upper'`` (targets: the two halves), plus
            whatever the subclass names.
        method (str): name used in error messages.
        diag_interval (int): report the gradient-fidelity diagnostics every this many
            iterations (0: never).
    """

    def __init__(self, iterator, optimizers, *, device=None, method='split',
                 diag_interval=1, delta_rms_decay=config.DELTA_RMS_DECAY):
        super().__init__(iterator, optimizers, converter=to_device, device=device)
        self.method = method
        self.diag_interval = diag_interval
        self.delta_rms_decay = delta_rms_decay
        self.delta_ms = None  # running mean of delta^2 (SPEC section 3, scale s)
        if 'synth' in optimizers:
            init_states(optimizers['synth'])

    @property
    def lower(self):
        return self.get_optimizer('lower').target

    @property
    def upper(self):
        return self.get_optimizer('upper').target

    @property
    def scale(self):
        """``s``, the running RMS of the true delta (:func:`rms_scale`)."""
        return rms_scale(self.delta_ms)

    def next_batch(self):
        return self.converter(self.get_iterator('main').next(), self.device)

    def backward_lower(self, h, gradient):
        """Drive the lower half with ``gradient`` at its output ``h``; update it."""
        self.lower.cleargrads()
        h.grad = gradient
        h.backward()
        self.get_optimizer('lower').update()

    def train_upper(self, h, t):
        """Backprop of the task loss through the upper half from h (:func:`upper_step`);
        fold delta into the running RMS ``s``. Returns ``(delta, loss)``."""
        delta, loss, accuracy = upper_step(self.upper, self.get_optimizer('upper'), h, t)
        chainer.report({'main/loss': loss, 'main/accuracy': accuracy})
        self.fold_delta(delta)
        return delta, loss

    def fold_delta(self, delta):
        """Fold a true delta into the running mean of delta^2 (SPEC section 3: after
        each upper-half backward)."""
        self.delta_ms = fold_mean_square(self.delta_ms, delta, self.delta_rms_decay)

    def finish(self, h, delta_hat, delta, **watched):
        """The end of an iteration: stop on a non-finite value, report the
        gradient-fidelity diagnostics, start the optimizers' new epoch."""
        check_finite(self.method, self.iteration + 1, h=h, delta_hat=delta_hat,
                     delta=delta, **watched)
        if self.diag_interval and (self.iteration + 1) % self.diag_interval == 0:
            report_fidelity(delta_hat, delta, h, self.scale)
        if self.get_iterator('main').is_new_epoch:
            for optimizer in self.get_all_optimizers().values():
                optimizer.new_epoch(auto=True)

    def serialize(self, serializer):
        super().serialize(serializer)
        if isinstance(serializer, chainer.serializer.Serializer):  # saving
            ms = -1.0 if self.delta_ms is None else float(self.delta_ms)
            serializer('delta_ms', ms)
        else:
            ms = float(serializer('delta_ms', -1.0))
            if ms >= 0:
                xp = self.lower.xp
                self.delta_ms = xp.asarray(ms, dtype=xp.float32)


def rms_scale(ms):
    """``s`` from the running mean square ``ms`` of delta: its root, and 1 before the
    first delta and while every delta so far was exactly zero (in a pipeline of more
    than two modules, a module under a zero-initialised Jaderberg synthesizer gets
    exactly zero gradients at first; dividing by s = 0 would make eq. 3 NaN). No
    host synchronisation on a GPU."""
    if ms is None:
        return 1.0
    xp = backend.get_array_module(ms)
    return xp.sqrt(xp.where(ms > 0, ms, 1))


def fold_mean_square(ms, delta, decay):
    """The running mean of delta^2 after one more delta (None before the first)."""
    m = (delta * delta).mean()
    return m if ms is None else decay * ms + (1 - decay) * m


def upper_step(upper, optimizer, h, t):
    """Step 3 of the decoupled iteration: backprop of the task loss through ``upper``
    from a fresh Variable on the array ``h``, and ``optimizer``'s update. Returns
    ``(delta, loss, accuracy)``, delta being the gradient that reached h."""
    h_up = chainer.Variable(h)
    logits = upper(h_up)
    loss = F.softmax_cross_entropy(logits, t)
    upper.cleargrads()
    loss.backward()
    optimizer.update()
    return h_up.grad, loss, F.accuracy(logits, t)


def report_fidelity(delta_hat, delta, h, scale):
    """The gradient-fidelity diagnostics (synth/* keys) for one batch."""
    xp = backend.get_array_module(delta)
    d, dh = delta.ravel(), delta_hat.ravel()
    norm_d, norm_dh = xp.linalg.norm(d), xp.linalg.norm(dh)
    tiny = xp.finfo(d.dtype).tiny
    chainer.report({
        'synth/cosine': (d @ dh) / xp.maximum(norm_d * norm_dh, tiny),
        'synth/rel_error': xp.linalg.norm(dh - d) / xp.maximum(norm_d, tiny),
        'synth/norm_delta': norm_d,
        'synth/norm_delta_hat': norm_dh,
        'synth/scale': xp.asarray(scale, dtype=d.dtype),
        'lower/h_rms': xp.sqrt((h * h).mean()),
    })


class DecoupledUpdater(_TwoHalves):
    """Synthetic-gradient training (paper section 2-3, SPEC section 4).

    ``optimizers``: ``'lower'``, ``'upper'`` and ``'synth'`` (target: the
    synthesizer). ``optimizers['synth']`` trains the synthesizer on eq. 3 only when
    ``train_synth`` is true (``alpha_gs > 0``); otherwise it is never updated (VFBN
    keeps its random initial ``v_f``).
    """

    def __init__(self, iterator, optimizers, *, train_synth=True, **kwargs):
        super().__init__(iterator, optimizers, **kwargs)
        self.train_synth = train_synth

    @property
    def synth(self):
        return self.get_optimizer('synth').target

    def update_core(self):
        x, t = self.next_batch()

        # 1. The lower half's forward pass, keeping its graph.
        h = self.lower(x)

        # 2. The synthetic gradient at h drives the lower half. The synthesizer sees
        #    a detached copy of h and keeps its own graph for step 4.
        out = self.synth(chainer.Variable(h.array), t)
        delta_hat = self.synth.to_gradient(out.array, self.scale)
        self.backward_lower(h, delta_hat)

        # 3. The upper half learns by backprop from h; delta is the true gradient
        #    that reaches h (and updates the running RMS s).
        delta, loss = self.train_upper(h.array, t)

        # 4. The synthesizer learns eq. 3, ||delta - delta_hat||^2, on step 2's graph
        #    (it has not changed since).
        e = self.synth.loss(out, delta, self.scale)
        chainer.report({'synth/loss': e})
        if self.train_synth:
            self.synth.cleargrads()
            e.backward()
            self.get_optimizer('synth').update()

        self.finish(h.array, delta_hat, delta, loss=loss.array, synth_loss=e.array)


class LayerwiseUpdater(_TwoHalves):
    """Table 1 "layer-wise supervised loss": the lower half is trained through an
    auxiliary head (``optimizers['head']``) with its own cross-entropy; the head is
    updated together with the lower half; the upper half learns on the detached h."""

    def update_core(self):
        x, t = self.next_batch()
        h = self.lower(x)

        # The head's loss gives both the head's update and the gradient at h.
        head = self.get_optimizer('head').target
        h_in = chainer.Variable(h.array)
        aux = F.softmax_cross_entropy(head(h_in), t)
        head.cleargrads()
        aux.backward()
        self.get_optimizer('head').update()
        chainer.report({'head/loss': aux})
        self.backward_lower(h, h_in.grad)

        delta, loss = self.train_upper(h.array, t)
        self.finish(h.array, h_in.grad, delta, loss=loss.array)


class BackpropUpdater(StandardUpdater):
    """End-to-end backprop of ``optimizers['main'].target`` (a network ``x ->
    logits``) on the task loss, with the same report keys and non-finite watch as
    the split updaters. Table 1's "BackProp" and "bottom half with back prop"."""

    def __init__(self, iterator, optimizer, *, device=None, method='bp'):
        super().__init__(iterator, optimizer, converter=to_device, device=device)
        self.method = method

    def update_core(self):
        iterator = self.get_iterator('main')
        x, t = self.converter(iterator.next(), self.device)
        optimizer = self.get_optimizer('main')
        logits = optimizer.target(x)
        loss = F.softmax_cross_entropy(logits, t)
        optimizer.target.cleargrads()
        loss.backward()
        optimizer.update()
        check_finite(self.method, self.iteration + 1, loss=loss.array)
        chainer.report({'main/loss': loss, 'main/accuracy': F.accuracy(logits, t)})
        if iterator.is_new_epoch:
            optimizer.new_epoch(auto=True)
