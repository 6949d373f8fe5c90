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

The fidelity of a middle rank's synthesizer is logged as ``synthK/loss``,
``synthK/cosine``, ... (K its rank), one batch later than rank 0's ``synth/...``: it
travels down with the next gradient.
"""
import collections
import os
import pickle
import signal
import sys
import time

import chainer
import numpy
from chainer import serializers

from chainer_vfbn import config, updaters

#: MPI tags: rank 0's commands, a message's header and its arrays (consecutive tags
#: from TAG_ARRAY), the last rank's loss, a rank's state.
TAG_COMMAND, TAG_HEADER, TAG_MAIN, TAG_STATE, TAG_SHARE, TAG_ARRAY = range(11, 17)
#: Seconds a rank waits for another before it gives up.
DEFAULT_TIMEOUT = 600.0
POLL_SECONDS = 0.0005


class PipelineError(RuntimeError):
    """Another rank did not answer in time, or the launch does not fit."""


def connect(modules=2):
    """The MPI communicator of a run of ``modules`` processes (ChainerMN's, over
    mpi4py); ``modules`` None: of any number above one."""
    try:
        import chainermn
        comm = chainermn.create_communicator('naive')
    except ImportError as e:
        raise PipelineError('--pipeline needs mpi4py and an MPI library (%s); ./setup.sh '
                            'installs both (mpi4py and the mpich wheel)' % e)
    if modules is None and comm.size < 2:
        raise PipelineError('--balance cuts the network into as many modules as there are '
                            'MPI processes; launch it with: mpiexec -n K python train.py '
                            '... --pipeline --balance, K >= 2 (got 1 process)')
    if modules is not None and comm.size != modules:
        raise PipelineError('--pipeline runs the network\'s %d modules as %d MPI processes; '
                            'launch it with: mpiexec -n %d python train.py ... --pipeline '
                            '(got %d process%s)' % (modules, modules, modules, comm.size,
                                                    '' if comm.size == 1 else 'es'))
    return comm


def launched_rank():
    """This process's rank in an MPI job, from the launcher's environment (MPICH,
    Open MPI), without starting MPI: 0 outside a job."""
    for name in ('PMI_RANK', 'OMPI_COMM_WORLD_RANK', 'PMIX_RANK'):
        if os.environ.get(name, '').isdigit():
            return int(os.environ[name])
    return 0


def launcher(modules=2):
    """The command that starts a run of ``modules`` processes: ``mpiexec -n K`` (the
    one beside this Python when there is one, as ./setup.sh installs it)."""
    beside = os.path.join(os.path.dirname(sys.executable), 'mpiexec')
    return [beside if os.path.exists(beside) else 'mpiexec', '-n', str(modules)]


def abort(code):
    """End this process now, without MPI's shutdown (after a rank stopped answering it
    would wait on messages that never complete). The launcher then ends the other
    ranks. Not ``MPI_Abort``: with it, MPICH's launcher could stop the job before it
    had passed on what this rank had just written to stderr."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def stop(comm):
    """Tell the other ranks that the run is over (also when rank 0 stops on an error)."""
    for rank in range(1, comm.size):
        comm.mpi_comm.send(('stop',), dest=rank, tag=TAG_COMMAND)


def share(comm, value, timeout=DEFAULT_TIMEOUT):
    """Rank 0's ``value`` on every rank (the others wait for it, without spinning)."""
    if comm.rank == 0:
        for rank in range(1, comm.size):
            comm.mpi_comm.send(value, dest=rank, tag=TAG_SHARE)
        return value
    return _recv_object(comm.mpi_comm, 0, TAG_SHARE, timeout, _rank_name(0, comm.size))


class PullUpper(chainer.training.Extension):
    """Before the evaluation: fill rank 0's copy of the upper half from the others."""

    priority = chainer.training.PRIORITY_WRITER + 1

    def __call__(self, trainer):
        trainer.updater.pull_upper()


# -- messages ------------------------------------------------------------------------

def _poll(done, timeout, what):
    """Call ``done()`` until it is true, for at most ``timeout`` seconds (None: no
    limit)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not done():
        if deadline is not None and time.monotonic() > deadline:
            raise PipelineError('no answer from %s in %.0f s; it has stopped or is stuck '
                                '(its output above says why)' % (what, timeout))
        time.sleep(POLL_SECONDS)


def _wait(request, timeout, what):
    """Complete an MPI send or receive request."""
    _poll(request.Test, timeout, what)


def _recv_object(mpi, source, tag, timeout, what):
    """Receive a pickled message (probed first, so that a message of any size fits)."""
    _poll(lambda: mpi.Iprobe(source=source, tag=tag), timeout, what)
    return mpi.recv(source=source, tag=tag)


def _rank_name(rank, size):
    if rank == 0:
        return 'rank 0 (the lower half)'
    if rank < size - 1:
        return 'rank %d (a middle module)' % rank
    return 'rank %d (%s)' % (rank, 'the upper half' if size == 2 else 'the top module')


def _host(array):
    return numpy.ascontiguousarray(chainer.backend.CpuDevice().send(array))


def recv_arrays(mpi, source, timeout, what):
    """The arrays of one :meth:`Outbox.arrays` message, and the object sent with them."""
    meta, specs = _recv_object(mpi, source, TAG_HEADER, timeout, what)
    arrays = []
    for i, (shape, dtype) in enumerate(specs):
        array = numpy.empty(shape, dtype)
        _wait(mpi.Irecv(array, source=source, tag=TAG_ARRAY + i), timeout, what)
        arrays.append(array)
    return arrays, meta


class Outbox(object):
    """Messages sent without waiting, kept (with their buffers) until they complete."""

    def __init__(self, mpi, timeout):
        self.mpi, self.timeout, self.requests = mpi, timeout, []

    def _keep(self, request, buffer):
        self.requests = [(r, b) for r, b in self.requests if not r.Test()]
        self.requests.append((request, buffer))

    def arrays(self, dest, meta, *arrays):
        """Send ``arrays`` (any device) and a small object ``meta`` to ``dest``."""
        arrays = [_host(a) for a in arrays]
        self.mpi.send((meta, [(a.shape, a.dtype.str) for a in arrays]), dest=dest,
                      tag=TAG_HEADER)
        for i, a in enumerate(arrays):
            self._keep(self.mpi.Isend(a, dest=dest, tag=TAG_ARRAY + i), a)

    def object(self, dest, tag, obj):
        self._keep(self.mpi.isend(obj, dest=dest, tag=tag), obj)

    def flush(self, what):
        for request, _ in self.requests:
            _wait(request, self.timeout, what)
        self.requests = []


# -- state -----------------------------------------------------------------------------

def state_of(link, optimizer):
    """The weights and optimizer state of ``link`` as a dict of arrays."""
    s = serializers.DictionarySerializer()
    link.serialize(s['link'])
    optimizer.serialize(s['optimizer'])
    return s.target


def load_state(state, link, optimizer):
    d = serializers.NpzDeserializer(state)
    link.serialize(d['link'])
    optimizer.serialize(d['optimizer'])


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


# -- the synthesizer's side of a rank ---------------------------------------------------

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


def _window_state(window):
    return [{name: _host(getattr(b, name)) for name in ('h', 't', 'delta_hat', 'delta')}
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


class StageServer(object):
    """Rank k > 0: its module, its optimizer and (below the top) its synthesizer,
    serving rank 0's commands until it says stop. Ctrl-C reaches every rank of an
    ``mpiexec`` job; these ranks leave it to rank 0, which needs their state for its
    snapshot and then says stop."""

    def __init__(self, comm, stage, optimizer, *, synth_optimizer=None, train_synth=True,
                 lag=0, device=None, timeout=DEFAULT_TIMEOUT, diag_interval=1,
                 delta_rms_decay=config.DELTA_RMS_DECAY):
        self.mpi, self.rank, self.size = comm.mpi_comm, comm.rank, comm.size
        self.stage, self.optimizer, self.synth_optimizer = stage, optimizer, synth_optimizer
        self.train_synth, self.lag, self.timeout = train_synth, lag, timeout
        self.device = device or chainer.get_device('@numpy')
        self.delta_rms_decay = delta_rms_decay
        self.diag_interval = diag_interval
        self.delta_ms = None        # the running mean of the true delta^2 at the output
        self.window = collections.deque()
        self.stats = {}             # fidelity to send down with the next gradient
        self.outbox = Outbox(self.mpi, timeout)
        self.below = _rank_name(self.rank - 1, self.size)
        self.above = _rank_name(self.rank + 1, self.size)
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
            command = _recv_object(self.mpi, 0, TAG_COMMAND, timeout, _rank_name(0, 1))
            kind, timeout = command[0], self.timeout
            if kind == 'batch':
                self.optimizer.lr, self.optimizer.epoch, iteration = command[1:]
                (h, t), _ = recv_arrays(self.mpi, self.rank - 1, self.timeout, self.below)
                h, t = self.device.send(h), self.device.send(t)
                if self.synth_optimizer is None:
                    self.top_step(h, t)
                else:
                    self.middle_step(h, t, iteration)
            elif kind == 'get':
                self.mpi.send(self.state(), dest=0, tag=TAG_STATE)
                # Rank 0 now evaluates or writes a snapshot, alone, for as long as
                # that takes (a 36-view test can take an hour on a CPU); if it fails
                # meanwhile, it exits and the launcher ends this rank.
                timeout = None
            elif kind == 'set':
                self.load(*command[1:])
            elif kind == 'stop':
                self.window = collections.deque(self.receive(b) for b in self.window)
                self.outbox.flush(self.below)
                return
            else:
                raise PipelineError('rank %d got an unknown command %r' % (self.rank, kind))

    def top_step(self, h, t):
        """The last rank: backprop of the task loss, delta down, the loss to rank 0."""
        delta, loss, accuracy = updaters.upper_step(self.stage, self.optimizer, h, t)
        self.outbox.arrays(self.rank - 1, {}, delta)
        cpu = chainer.backend.CpuDevice()
        self.outbox.object(0, TAG_MAIN, {'main/loss': cpu.send(loss.array),
                                         'main/accuracy': cpu.send(accuracy.array)})

    def middle_step(self, h_in, t, iteration):
        """Steps 1 to 3 of the module docstring on a middle rank; ``iteration`` is rank
        0's (the fidelity is reported on the iterations on which rank 0 reports its
        own)."""
        h_in = chainer.Variable(h_in)
        h = self.stage(h_in)
        self.outbox.arrays(self.rank + 1, None, h.array, t)

        out, delta_hat = synthetic_gradient(self.synth, h.array, t, self.scale,
                                            self.lag == 0)
        self.stage.cleargrads()
        h.grad = delta_hat
        h.backward()
        self.optimizer.update()
        self.outbox.arrays(self.rank - 1, self.stats, h_in.grad)
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
        (delta,), stats = recv_arrays(self.mpi, self.rank + 1, self.timeout, self.above)
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
    from chainer_vfbn import methods, model  # methods imports this module
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
        self.mpi, self.lag, self.train_synth, self.timeout = comm.mpi_comm, lag, train_synth, timeout
        self.size = comm.size
        self.window = collections.deque()  # batches whose synthesizer step is pending
        self.outbox = Outbox(self.mpi, timeout)
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
            self.mpi.send(('batch', upper.lr, upper.epoch, self.iteration), dest=rank,
                          tag=TAG_COMMAND)
        self.outbox.arrays(1, None, h, t)

    def receive(self, b):
        """``b`` with rank 1's delta and the last rank's loss (waiting for them if
        need be)."""
        if b.delta is not None:
            return b
        (delta,), stats = recv_arrays(self.mpi, 1, self.timeout, _rank_name(1, self.size))
        report = _recv_object(self.mpi, self.size - 1, TAG_MAIN, self.timeout,
                              _rank_name(self.size - 1, self.size))
        report.update(stats)
        return b._replace(delta=self.lower.device.send(delta), report=report)

    def pull_upper(self):
        """Fill rank 0's copy of the upper half (weights, optimizer state) from the
        other ranks, as it is after the last batch sent; keep the middle ranks'
        synthesizer sides for the snapshot."""
        for rank in range(1, self.size):
            self.mpi.send(('get',), dest=rank, tag=TAG_COMMAND)
        upper, optimizer = self.upper, self.get_optimizer('upper')
        state = state_of(upper, optimizer)
        for rank in range(1, self.size):
            own, side = _recv_object(self.mpi, rank, TAG_STATE, self.timeout,
                                     _rank_name(rank, self.size))
            state.update(own)
            if side is not None:
                self.sides[rank] = side
        load_state(state, upper, optimizer)

    def push_upper(self):
        state = state_of(self.upper, self.get_optimizer('upper'))
        for rank in range(1, self.size):
            self.mpi.send(('set', state, self.sides.get(rank)), dest=rank, tag=TAG_COMMAND)
        self.upper_is_current = True

    def finalize(self):
        """The trainer's last call: take the deltas of the batches still pending (the
        others wait for them to be received before they stop) and let the last sends
        complete."""
        super().finalize()
        try:
            self.window = collections.deque(self.receive(b) for b in self.window)
            self.outbox.flush(_rank_name(1, self.size))
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
