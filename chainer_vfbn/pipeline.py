"""The decoupled step with the network's modules in MPI processes that run at once.

Synthetic gradients exist so that a module need not wait for the forward and backward
pass above it. :class:`~chainer_vfbn.updaters.DecoupledUpdater` runs the paper's
steps one after another (its footnote 1); here the network is cut into K modules at
unit boundaries, module k lives in MPI process (rank) k, and they work at once::

    mpiexec -n 2 python train.py --synth vfbn --alpha-gs 1e-3 --pipeline [--lag D]
    mpiexec -n 3 python train.py --synth vfbn --alpha-gs 1e-3 --pipeline --splits 3 6

K = 2 cuts at ``--split`` (the paper's split by default); ``--splits`` gives the K - 1
cuts. Rank 0 holds the data, module 0 (the lower half) and the trainer (logs,
evaluation, snapshots: everything of a one-process run). Every rank k < K - 1 has a
synthesizer at its output, of the kind ``--synth`` names, and does for batch i:

1. receive ``(h_in, y)`` from rank k - 1 (rank 0: take the batch); ``h = module(h_in)``;
   send ``(h, y)`` to rank k + 1 without waiting;
2. ``delta_hat = synth(h, y)`` drives the module's backward; update it; send the
   gradient that reaches ``h_in`` back to rank k - 1, where it is the true delta
   (Jaderberg et al.'s DNI: the gradient of module k + 1's own backward);
3. train the synthesizer on eq. 3 with the true delta of batch ``i - D``, waiting
   only if it has not arrived. At ``D = 0`` that is batch i, on step 2's graph; at
   ``D > 0`` the synthesizer has changed since batch ``i - D``, so its output for the
   kept ``(h, y)`` of that batch is computed again with its present parameters (one
   more synthesizer forward per step), and only the last ``D + 1`` batches are kept.

The last rank takes batches in order: its module's forward and backward pass with the
task loss, and the update (:func:`~chainer_vfbn.updaters.upper_step`, the code the
one-process updater runs); it sends delta back and the loss to rank 0. At K = 2 and
``D = 0`` the run is :class:`DecoupledUpdater`'s, number for number.

Every rank builds the whole upper half (the same seed makes the same weights) and
updates only its own units. Rank 0 keeps a copy of the upper half that it fills from
the other ranks (weights and optimizer state) before each evaluation and snapshot, so
the trainer, the snapshots and ``evaluate.py`` see the whole network; a snapshot also
holds each middle rank's synthesizer, its Adam state, its running RMS and its pending
batches, and ``--resume`` sends all of it back. Every wait for another rank's step is
bounded (``timeout``): a rank that stops answering ends the run with a message naming
it, not a hang. The exception is the other ranks' wait while rank 0 evaluates or
writes a snapshot (after a ``get``): that takes as long as it takes.

Here is what each rank computes: rank 0's ``PipelineUpdater.update_core`` and the
others' ``StageServer.middle_step`` are steps 1 to 3; how the ranks talk (MPI, the
non-blocking sends, the bounded waits) is :mod:`chainer_vfbn.transport`.

The fidelity of a middle rank's synthesizer is logged as ``synthK/loss``,
``synthK/cosine``, ... (K its rank), one batch later than rank 0's ``synth/...``: it
travels down with the next gradient.
"""
import collections
import pickle
import signal

import chainer
import numpy

from chainer_vfbn import config, methods, model, updaters
from chainer_vfbn.transport import (DEFAULT_TIMEOUT, Channel, PipelineError, load_state,
                                    state_of, to_host)


# -- steps 2 and 3, the same on every rank that has a synthesizer ------------------------

Batch = collections.namedtuple('Batch', 'h t out delta_hat delta report')


def synthetic_gradient(synth, h, t, scale, keep):
    """Step 2's ``delta_hat`` for the array ``h``, and the synthesizer's output with
    its graph if ``keep`` (lag 0: eq. 3 reuses it)."""
    out = synth(chainer.Variable(h), t)
    return (out if keep else None), synth.to_gradient(out.array, scale)


def learn_synth(synth, optimizer, b, scale, train):
    """Step 3: eq. 3 on the kept batch ``b`` (its output computed again if it was not
    kept); the synthesizer's update if ``train``. Returns the eq. 3 loss."""
    out = b.out if b.out is not None else synth(chainer.Variable(b.h), b.t)
    e = synth.loss(out, b.delta, scale)
    if train:
        synth.cleargrads()
        e.backward()
        optimizer.update()
    return e


# -- rank 0 ------------------------------------------------------------------------------

class PipelineUpdater(updaters._TwoHalves):
    """Rank 0 of a decoupled run in K processes (module docstring).

    ``optimizers`` as :class:`~chainer_vfbn.updaters.DecoupledUpdater`'s; the
    ``'upper'`` one is rank 0's copy, which the learning-rate schedule drives (its lr
    goes to the other ranks with each batch) and which holds their state after
    :meth:`pull_upper`. ``lag`` is D. Report keys as the one-process updater's, plus
    ``pipeline/lag`` and the middle ranks' ``synthK/...``; at ``D > 0`` ``main/loss``
    is that of batch ``i - D``.
    """

    def __init__(self, iterator, optimizers, *, comm, lag=0, train_synth=True,
                 timeout=DEFAULT_TIMEOUT, **kwargs):
        super().__init__(iterator, optimizers, **kwargs)
        if lag < 0:
            raise ValueError('the lag must be >= 0, got %r' % lag)
        self.channel, self.size = Channel(comm, timeout), comm.size
        self.lag, self.train_synth = lag, train_synth
        self.window = collections.deque()  # batches whose synthesizer step is pending
        self.sides = {}                    # the middle ranks' synthesizer sides
        self.upper_is_current = False      # the other ranks hold rank 0's copy

    @property
    def synth(self):
        return self.get_optimizer('synth').target

    def update_core(self):
        if not self.upper_is_current:
            self.push_upper()
        x, t = self.next_batch()

        # 1. The lower half's forward pass; h and y go to rank 1.
        h = self.lower(x)
        self.send_batch(h.array, t)

        # 2. The synthetic gradient at h drives the lower half, while the others work.
        out, delta_hat = synthetic_gradient(self.synth, h.array, t, self.scale,
                                            self.lag == 0)
        self.backward_lower(h, delta_hat)
        self.window.append(Batch(h.array, t, out, delta_hat, None, None))
        chainer.report({'pipeline/lag': float(self.lag)})

        # 3. Eq. 3 with the true gradient of batch i - D (D = 0: this batch).
        if len(self.window) > self.lag:
            b = self.receive(self.window.popleft())
            chainer.report(b.report)
            self.fold_delta(b.delta)
            e = learn_synth(self.synth, self.get_optimizer('synth'), b, self.scale,
                            self.train_synth)
            chainer.report({'synth/loss': e})
            self.finish(b.h, b.delta_hat, b.delta, synth_loss=e.array,
                        loss=b.report['main/loss'])
        elif self.get_iterator('main').is_new_epoch:
            for optimizer in self.get_all_optimizers().values():
                optimizer.new_epoch(auto=True)

    # -- talking to the other ranks ---------------------------------------------------

    def send_batch(self, h, t):
        upper = self.get_optimizer('upper')
        for rank in range(1, self.size):
            self.channel.command(rank, 'batch', upper.lr, upper.epoch, self.iteration)
        self.channel.send_arrays(1, None, h, t)

    def receive(self, b):
        """``b`` with rank 1's delta and the last rank's loss (waiting for them if
        need be)."""
        if b.delta is not None:
            return b
        (delta,), stats = self.channel.recv_arrays(1)
        report = self.channel.recv_report()
        report.update(stats)
        return b._replace(delta=self.lower.device.send(delta), report=report)

    def pull_upper(self):
        """Fill rank 0's copy of the upper half (weights, optimizer state) from the
        other ranks, as it is after the last batch sent; keep the middle ranks'
        synthesizer sides for the snapshot."""
        for rank in range(1, self.size):
            self.channel.command(rank, 'get')
        upper, optimizer = self.upper, self.get_optimizer('upper')
        state = state_of(upper, optimizer)
        for rank in range(1, self.size):
            own, side = self.channel.recv_state(rank)
            state.update(own)
            if side is not None:
                self.sides[rank] = side
        load_state(state, upper, optimizer)

    def push_upper(self):
        state = state_of(self.upper, self.get_optimizer('upper'))
        for rank in range(1, self.size):
            self.channel.command(rank, 'set', state, self.sides.get(rank))
        self.upper_is_current = True

    def finalize(self):
        """The trainer's last call: take the deltas of the batches still pending (the
        others wait for them to be received before they stop) and let the last sends
        complete."""
        super().finalize()
        try:
            self.window = collections.deque(self.receive(b) for b in self.window)
            self.channel.flush(1)
        except PipelineError:
            pass  # a rank is gone; the error that ended the run says why

    # -- snapshots ----------------------------------------------------------------

    def serialize(self, serializer):
        saving = isinstance(serializer, chainer.serializer.Serializer)
        if saving:
            self.pull_upper()
            self.window = collections.deque(self.receive(b) for b in self.window)
        super().serialize(serializer)
        # The batches whose synthesizer step is still to come (D of them).
        n = serializer('pending', len(self.window) if saving else 0)
        if saving:
            for i, (b, w) in enumerate(zip(self.window, _window_state(self.window))):
                s = serializer['pending%d' % i]
                for name, array in w.items():
                    s(name, array)
                # What came with its delta: the loss and the middle ranks' fidelity.
                keys = sorted(b.report)
                s('report_keys', numpy.array(keys))
                for key in keys:
                    s['report'](key, numpy.asarray(b.report[key]))
        else:
            window = []
            for i in range(int(n)):
                s = serializer['pending%d' % i]
                arrays = {name: self.lower.device.send(s(name, None))
                          for name in ('h', 't', 'delta_hat', 'delta')}
                report = _pending_report(s)
                window.append(Batch(arrays['h'], arrays['t'], None, arrays['delta_hat'],
                                     arrays['delta'], report))
            self.window = collections.deque(window)
            self.upper_is_current = False
        # Each middle rank's synthesizer side, as one pickled record.
        for rank in range(1, self.size - 1):
            if saving:
                serializer('side%d' % rank,
                           numpy.frombuffer(pickle.dumps(self.sides[rank]), numpy.uint8))
            else:
                self.sides[rank] = pickle.loads(serializer('side%d' % rank, None).tobytes())


# -- ranks 1 to K - 1 --------------------------------------------------------------------

class StageServer(object):
    """Rank k > 0: its module, its optimizer and (below the top) its synthesizer,
    serving rank 0's commands until it says stop. Ctrl-C reaches every rank of an
    ``mpiexec`` job; these ranks leave it to rank 0, which needs their state for its
    snapshot and then says stop."""

    def __init__(self, comm, stage, optimizer, *, synth_optimizer=None, train_synth=True,
                 lag=0, device=None, timeout=DEFAULT_TIMEOUT, diag_interval=1,
                 delta_rms_decay=config.DELTA_RMS_DECAY):
        self.channel, self.rank = Channel(comm, timeout), comm.rank
        self.stage, self.optimizer, self.synth_optimizer = stage, optimizer, synth_optimizer
        self.train_synth, self.lag, self.timeout = train_synth, lag, timeout
        self.device = device or chainer.get_device('@numpy')
        self.delta_rms_decay = delta_rms_decay
        self.diag_interval = diag_interval
        self.delta_ms = None        # the running mean of the true delta^2 at the output
        self.window = collections.deque()
        self.stats = {}             # fidelity to send down with the next gradient
        if synth_optimizer is not None:
            updaters.init_states(synth_optimizer)

    @property
    def synth(self):
        return self.synth_optimizer.target

    @property
    def scale(self):
        return updaters.rms_scale(self.delta_ms)

    def serve(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
        timeout = self.timeout
        while True:
            command = self.channel.next_command(timeout)
            kind, timeout = command[0], self.timeout
            if kind == 'batch':
                self.optimizer.lr, self.optimizer.epoch, iteration = command[1:]
                (h, t), _ = self.channel.recv_arrays(self.rank - 1)
                h, t = self.device.send(h), self.device.send(t)
                if self.synth_optimizer is None:
                    self.top_step(h, t)
                else:
                    self.middle_step(h, t, iteration)
            elif kind == 'get':
                self.channel.send_state(self.state())
                # Rank 0 now evaluates or writes a snapshot, alone, for as long as
                # that takes (a 36-view test can take an hour on a CPU); if it fails
                # meanwhile, it exits and the launcher ends this rank.
                timeout = None
            elif kind == 'set':
                self.load(*command[1:])
            elif kind == 'stop':
                self.window = collections.deque(self.receive(b) for b in self.window)
                self.channel.flush(self.rank - 1)
                return
            else:
                raise PipelineError('rank %d got an unknown command %r' % (self.rank, kind))

    def top_step(self, h, t):
        """The last rank: backprop of the task loss, delta down, the loss to rank 0."""
        delta, loss, accuracy = updaters.upper_step(self.stage, self.optimizer, h, t)
        self.channel.send_arrays(self.rank - 1, {}, delta)
        cpu = chainer.backend.CpuDevice()
        self.channel.send_report({'main/loss': cpu.send(loss.array),
                                  'main/accuracy': cpu.send(accuracy.array)})

    def middle_step(self, h_in, t, iteration):
        """Steps 1 to 3 of the module docstring on a middle rank; ``iteration`` is rank
        0's (the fidelity is reported on the iterations on which rank 0 reports its
        own)."""
        h_in = chainer.Variable(h_in)
        h = self.stage(h_in)
        self.channel.send_arrays(self.rank + 1, None, h.array, t)

        out, delta_hat = synthetic_gradient(self.synth, h.array, t, self.scale,
                                            self.lag == 0)
        self.stage.cleargrads()
        h.grad = delta_hat
        h.backward()
        self.optimizer.update()
        self.channel.send_arrays(self.rank - 1, self.stats, h_in.grad)
        self.stats = {}
        self.window.append(Batch(h.array, t, out, delta_hat, None, None))

        if len(self.window) > self.lag:
            b = self.receive(self.window.popleft())
            self.delta_ms = updaters.fold_mean_square(self.delta_ms, b.delta,
                                                      self.delta_rms_decay)
            e = learn_synth(self.synth, self.synth_optimizer, b, self.scale, self.train_synth)
            observed = {'synth/loss': e.array}
            if self.diag_interval and (iteration + 1) % self.diag_interval == 0:
                with chainer.Reporter().scope(observed):
                    updaters.report_fidelity(b.delta_hat, b.delta, b.h, self.scale)
            prefix = 'synth%d/' % self.rank
            self.stats.update({prefix + k.split('/', 1)[1]: float(v)
                               for k, v in observed.items()})

    def receive(self, b):
        """``b`` with the true delta from the rank above (and its fidelity numbers,
        passed on down with the next gradient)."""
        if b.delta is not None:
            return b
        (delta,), stats = self.channel.recv_arrays(self.rank + 1)
        self.stats.update(stats)
        return b._replace(delta=self.device.send(delta))

    def state(self):
        """This rank's part of a snapshot: its module's weights and optimizer state,
        and its synthesizer's side (with the fidelity numbers not yet sent down)."""
        own = {k: v for k, v in state_of(self.stage.upper, self.optimizer).items()
               if self.stage.owns(k)}
        if self.synth_optimizer is None:
            return own, None
        self.window = collections.deque(self.receive(b) for b in self.window)
        cpu = chainer.backend.CpuDevice()
        return own, {'synth': {k: cpu.send(v) for k, v in
                               state_of(self.synth, self.synth_optimizer).items()},
                     'delta_ms': None if self.delta_ms is None else float(self.delta_ms),
                     'window': _window_state(self.window), 'stats': dict(self.stats)}

    def load(self, upper_state, side):
        load_state(upper_state, self.stage.upper, self.optimizer)
        if side is not None:
            load_state(side['synth'], self.synth, self.synth_optimizer)
            self.delta_ms = None if side['delta_ms'] is None else \
                self.device.xp.asarray(side['delta_ms'], dtype=numpy.float32)
            self.window = _window_from(side['window'], self.device)
            self.stats = dict(side['stats'])


class Stage(object):
    """The module one rank > 0 runs: residual units ``[start, stop)`` of the upper
    half, and its head (pooling and fc) on the last rank. Every rank builds the whole
    upper half; :meth:`own` leaves the optimizer only this module's parameters."""

    def __init__(self, upper, start, stop, head):
        self.upper, self.start, self.stop, self.head = upper, start, stop, head
        self.units = list(upper.units)[start:stop]

    def __call__(self, h):
        for unit in self.units:
            h = unit(h)
        return self.upper.head(h) if self.head else h

    def cleargrads(self):
        self.upper.cleargrads()

    def own(self):
        """Leave the optimizer set up on the upper half only this module's parameters."""
        for i, unit in enumerate(self.upper.units):
            if not self.start <= i < self.stop:
                unit.disable_update()
        if not self.head:
            self.upper.fc.disable_update()

    def owns(self, key):
        """Whether a :func:`state_of` key (``link/units/3/...``) is this module's;
        keys of no parameter (the optimizer's step count) are everybody's."""
        path = key.split('/')[1:]
        if path[0] == 'units':
            return self.start <= int(path[1]) < self.stop
        return self.head if path[0] == 'fc' else True


# -- building them -----------------------------------------------------------------------

def stage_server(comm, method, *, depth, splits, alpha_gs, lag=0, lr=config.LR,
                 momentum=config.MOMENTUM, weight_decay=config.WEIGHT_DECAY,
                 jaderberg_scaled=True, vfbn_normalized_loss=False, device=None,
                 timeout=DEFAULT_TIMEOUT, diag_interval=1):
    """The :class:`StageServer` of rank ``comm.rank`` > 0 in a run cut before the units
    ``splits`` (None: the paper's split): the upper half built as rank 0 builds it
    (seed the random numbers as rank 0 does first), its module of it, and below the
    top a synthesizer of the kind ``method`` at the module's output (one per middle
    cut is made, in order, on every rank, so that each rank's is the same in every
    run)."""
    device = device or chainer.get_device('@numpy')
    splits = [model.paper_split(depth)] if splits in (None, [None]) else list(splits)
    networks = methods.build_networks(method, depth=depth, split=splits[0],
                                      jaderberg_scaled=jaderberg_scaled,
                                      vfbn_normalized_loss=vfbn_normalized_loss)
    upper = networks.trained['upper']
    upper.to_device(device)
    optimizer = methods.network_optimizer(upper, lr, momentum, weight_decay)
    # Module k is units [cuts[k - 1], cuts[k]) of the upper half.
    cuts = [s - splits[0] for s in splits] + [len(upper.units)]
    top = comm.rank == comm.size - 1
    stage = Stage(upper, cuts[comm.rank - 1], cuts[comm.rank], head=top)
    stage.own()
    synth_optimizer = None
    if not top:
        synths = [methods.make_synthesizer(method, model.channels_at(depth, cut),
                                           jaderberg_scaled=jaderberg_scaled,
                                           vfbn_normalized_loss=vfbn_normalized_loss)
                  for cut in splits[1:]]
        synth = synths[comm.rank - 1]
        synth.to_device(device)
        synth_optimizer = methods.synthesizer_optimizer(synth, alpha_gs)
    return StageServer(comm, stage, optimizer, synth_optimizer=synth_optimizer,
                       train_synth=alpha_gs > 0, lag=lag, device=device, timeout=timeout,
                       diag_interval=diag_interval)


def build_updater(networks, *, comm, iterator, lag=0, timeout=DEFAULT_TIMEOUT, device=None,
                  alpha_gs=config.ALPHA_GS, lr=config.LR, momentum=config.MOMENTUM,
                  weight_decay=config.WEIGHT_DECAY, diag_interval=1):
    """Rank 0's :class:`PipelineUpdater` for the synthetic-gradient method of
    ``networks``, with the optimizers of :func:`chainer_vfbn.methods.build_updater`:
    ``(updater, scheduled)``."""
    if networks.method not in methods.SYNTHESIZERS:
        raise ValueError('--pipeline runs a synthetic-gradient method (%s), not %s'
                         % (', '.join(methods.SYNTHESIZERS), networks.method))
    opts = methods.build_optimizers(networks, alpha_gs=alpha_gs, lr=lr, momentum=momentum,
                                    weight_decay=weight_decay)
    updater = PipelineUpdater(iterator, opts, comm=comm, lag=lag, timeout=timeout,
                              train_synth=alpha_gs > 0, device=device,
                              method=methods.describe(networks.method, alpha_gs),
                              diag_interval=diag_interval)
    return updater, methods.scheduled_optimizers(opts)


# -- state, for the evaluation and the snapshots -----------------------------------------

class PullUpper(chainer.training.Extension):
    """Before the evaluation: fill rank 0's copy of the upper half from the others."""

    priority = chainer.training.PRIORITY_WRITER + 1

    def __call__(self, trainer):
        trainer.updater.pull_upper()


def _window_state(window):
    return [{name: to_host(getattr(b, name)) for name in ('h', 't', 'delta_hat', 'delta')}
            for b in window]


def _pending_report(s):
    """The report of a pending batch in rank 0's snapshot. Snapshots written before
    it kept the middle ranks' fidelity (b00b095 and earlier) have only the loss and
    the accuracy."""
    try:
        keys = s('report_keys', None)
    except KeyError:
        return {'main/loss': s('loss', None), 'main/accuracy': s('accuracy', None)}
    return {str(key): s['report'](str(key), None) for key in keys}


def _window_from(state, device):
    return collections.deque(
        Batch(device.send(w['h']), device.send(w['t']), None, device.send(w['delta_hat']),
              device.send(w['delta']), {}) for w in state)
