"""The decoupled step with its two halves in two processes that run at once.

Synthetic gradients exist so that the lower half need not wait for the upper half's
forward and backward pass. :class:`~chainer_vfbn.updaters.DecoupledUpdater` runs the
paper's steps one after another (its footnote 1); here the upper half lives in a
second MPI process (rank 1) and the lower half's backward runs while it works::

    mpiexec -n 2 python train.py --synth vfbn --alpha-gs 1e-3 --pipeline [--lag D]

Rank 0 holds the data, the lower half, the synthesizer and the trainer (logs,
evaluation, snapshots: everything of a one-process run). Batch i on rank 0:

1. ``h_i = lower(x_i)``; send ``(h_i, y_i)`` and the upper half's learning rate to
   rank 1 without waiting;
2. ``delta_hat_i = synth(h_i, y_i)`` drives the lower half's backward; update it;
3. train the synthesizer on eq. 3 with the true gradient of batch ``i - D``, waiting
   only if it has not arrived. At ``D = 0`` that is batch i, on step 2's graph, and
   the run is :class:`DecoupledUpdater`'s, number for number; at ``D > 0`` the
   synthesizer has changed since batch ``i - D``, so its output for the kept
   ``(h, y)`` of that batch is computed again with its present parameters (one more
   synthesizer forward per step), and only the last ``D + 1`` batches are kept.

Rank 1 (:class:`UpperServer`) takes batches in order: the upper half's forward and
backward pass and update (:func:`~chainer_vfbn.updaters.upper_step`, the code the
one-process updater runs), then it sends delta and the loss back. Rank 0 keeps a
copy of the upper half that it fills from rank 1 (weights and optimizer state)
before each evaluation and snapshot, so the trainer, the snapshots and
``evaluate.py`` see the whole network, and rank 1 is filled from that copy on
``--resume``. Every wait is bounded (``timeout``): a rank that stops answering ends
the run with a message naming it, not a hang.
"""
import collections
import os
import signal
import sys
import time

import chainer
import numpy
from chainer import serializers

from chainer_vfbn import updaters

#: MPI tags: rank 0's commands, the two arrays of a batch, rank 1's answers.
TAG_COMMAND, TAG_H, TAG_Y, TAG_DELTA, TAG_REPORT, TAG_STATE = range(11, 17)
#: Seconds a rank waits for the other before it gives up.
DEFAULT_TIMEOUT = 600.0
POLL_SECONDS = 0.0005


class PipelineError(RuntimeError):
    """The other rank did not answer in time, or the launch does not fit."""


def connect():
    """The MPI communicator of a two-process run (ChainerMN's, over mpi4py)."""
    try:
        import chainermn
        comm = chainermn.create_communicator('naive')
    except ImportError as e:
        raise PipelineError('--pipeline needs mpi4py and an MPI library (%s); ./setup.sh '
                            'installs both (mpi4py and the mpich wheel)' % e)
    if comm.size != 2:
        raise PipelineError('--pipeline runs the two halves as two MPI processes; launch '
                            'it with: mpiexec -n 2 python train.py ... --pipeline (got %d '
                            'process%s)' % (comm.size, '' if comm.size == 1 else 'es'))
    return comm


def launched_rank():
    """This process's rank in an MPI job, from the launcher's environment (MPICH,
    Open MPI), without starting MPI: 0 outside a job."""
    for name in ('PMI_RANK', 'OMPI_COMM_WORLD_RANK', 'PMIX_RANK'):
        if os.environ.get(name, '').isdigit():
            return int(os.environ[name])
    return 0


def launcher():
    """The command that starts a two-process run: ``mpiexec -n 2`` (the one beside
    this Python when there is one, as ./setup.sh installs it)."""
    beside = os.path.join(os.path.dirname(sys.executable), 'mpiexec')
    return [beside if os.path.exists(beside) else 'mpiexec', '-n', '2']


def abort(code):
    """End every process of the job now: after a rank stopped answering, MPI's
    normal shutdown would wait on messages that will never complete."""
    from mpi4py import MPI
    MPI.COMM_WORLD.Abort(code)


def stop(comm):
    """Tell rank 1 that the run is over (also when rank 0 stops on an error)."""
    comm.mpi_comm.send(('stop',), dest=1, tag=TAG_COMMAND)


class PullUpper(chainer.training.Extension):
    """Before the evaluation: fill rank 0's copy of the upper half from rank 1."""

    priority = chainer.training.PRIORITY_WRITER + 1

    def __call__(self, trainer):
        trainer.updater.pull_upper()


def _poll(done, timeout, what):
    """Call ``done()`` until it is true, for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
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


def _recv_array(mpi, source, tag, shape, dtype, timeout, what):
    array = numpy.empty(shape, dtype)
    _wait(mpi.Irecv(array, source=source, tag=tag), timeout, what)
    return array


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


class UpperServer(object):
    """Rank 1: the upper half and its optimizer, serving rank 0's commands until it
    says stop. Ctrl-C reaches every rank of an ``mpiexec`` job; rank 1 leaves it to
    rank 0, which needs rank 1's state for its snapshot and then says stop."""

    def __init__(self, comm, upper, optimizer, *, device=None, timeout=DEFAULT_TIMEOUT):
        self.mpi, self.upper, self.optimizer = comm.mpi_comm, upper, optimizer
        self.device = device or chainer.get_device('@numpy')
        self.timeout = timeout
        self.sending = []  # requests (and their buffers) still on their way

    def serve(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
        while True:
            command = _recv_object(self.mpi, 0, TAG_COMMAND, self.timeout,
                                   'rank 0 (the lower half)')
            kind = command[0]
            if kind == 'batch':
                self.train(*command[1:])
            elif kind == 'get':
                self.mpi.send(state_of(self.upper, self.optimizer), dest=0, tag=TAG_STATE)
            elif kind == 'set':
                load_state(command[1], self.upper, self.optimizer)
            elif kind == 'stop':
                for request, _ in self.sending:
                    _wait(request, self.timeout, 'rank 0 (the lower half)')
                return
            else:
                raise PipelineError('rank 1 got an unknown command %r' % (kind,))

    def train(self, h_shape, h_dtype, y_shape, y_dtype, lr, epoch):
        what = 'rank 0 (the lower half)'
        h = _recv_array(self.mpi, 0, TAG_H, h_shape, h_dtype, self.timeout, what)
        y = _recv_array(self.mpi, 0, TAG_Y, y_shape, y_dtype, self.timeout, what)
        self.optimizer.lr, self.optimizer.epoch = lr, epoch
        delta, loss, accuracy = updaters.upper_step(
            self.upper, self.optimizer, self.device.send(h), self.device.send(y))
        delta = chainer.backend.CpuDevice().send(delta)
        report = {'main/loss': chainer.backend.CpuDevice().send(loss.array),
                  'main/accuracy': chainer.backend.CpuDevice().send(accuracy.array)}
        self.sending = [(r, b) for r, b in self.sending if not r.Test()]
        self.sending.append((self.mpi.Isend(delta, dest=0, tag=TAG_DELTA), delta))
        self.sending.append((self.mpi.isend(report, dest=0, tag=TAG_REPORT), report))


_Batch = collections.namedtuple('_Batch', 'h t out delta_hat delta report')


class PipelineUpdater(updaters._TwoHalves):
    """Rank 0 of a two-process decoupled run (module docstring).

    ``optimizers`` as :class:`~chainer_vfbn.updaters.DecoupledUpdater`'s; the
    ``'upper'`` one is rank 0's copy, which the learning-rate schedule drives (its lr
    goes to rank 1 with each batch) and which holds rank 1's state after
    :meth:`pull_upper`. ``lag`` is D. Report keys as the one-process updater's, plus
    ``pipeline/lag``; at ``D > 0`` ``main/loss`` is that of batch ``i - D``.
    """

    def __init__(self, iterator, optimizers, *, comm, lag=0, train_synth=True,
                 timeout=DEFAULT_TIMEOUT, **kwargs):
        super().__init__(iterator, optimizers, **kwargs)
        if lag < 0:
            raise ValueError('the lag must be >= 0, got %r' % lag)
        self.mpi, self.lag, self.train_synth, self.timeout = comm.mpi_comm, lag, train_synth, timeout
        self.window = collections.deque()  # batches whose synthesizer step is pending
        self.sending = []
        self.upper_is_current = False  # rank 1 holds rank 0's copy of the upper half

    @property
    def synth(self):
        return self.get_optimizer('synth').target

    def update_core(self):
        if not self.upper_is_current:
            self.push_upper()
        x, t = self.next_batch()

        # 1. The lower half's forward pass; h and y go to the upper half's rank.
        h = self.lower(x)
        self.send_batch(h.array, t)

        # 2. The synthetic gradient at h drives the lower half, while rank 1 works.
        out = self.synth(chainer.Variable(h.array), t)
        delta_hat = self.synth.to_gradient(out.array, self.scale)
        self.backward_lower(h, delta_hat)
        self.window.append(_Batch(h.array, t, out if self.lag == 0 else None, delta_hat,
                                  None, None))
        chainer.report({'pipeline/lag': float(self.lag)})

        # 3. Eq. 3 with the true gradient of batch i - D (D = 0: this batch).
        if len(self.window) > self.lag:
            b = self.receive(self.window.popleft())
            chainer.report(b.report)
            self.fold_delta(b.delta)
            out = b.out
            if out is None:  # the synthesizer has moved on since batch i - D
                out = self.synth(chainer.Variable(b.h), b.t)
            e = self.synth.loss(out, b.delta, self.scale)
            chainer.report({'synth/loss': e})
            if self.train_synth:
                self.synth.cleargrads()
                e.backward()
                self.get_optimizer('synth').update()
            self.finish(b.h, b.delta_hat, b.delta, synth_loss=e.array,
                        loss=b.report['main/loss'])
        elif self.get_iterator('main').is_new_epoch:
            for optimizer in self.get_all_optimizers().values():
                optimizer.new_epoch(auto=True)

    # -- talking to rank 1 ------------------------------------------------------

    def send_batch(self, h, t):
        h, t = numpy.ascontiguousarray(chainer.backend.CpuDevice().send(h)), \
            numpy.ascontiguousarray(chainer.backend.CpuDevice().send(t))
        upper = self.get_optimizer('upper')
        self.mpi.send(('batch', h.shape, h.dtype.str, t.shape, t.dtype.str, upper.lr,
                       upper.epoch), dest=1, tag=TAG_COMMAND)
        self.sending = [(r, b) for r, b in self.sending if not r.Test()]
        self.sending += [(self.mpi.Isend(h, dest=1, tag=TAG_H), h),
                         (self.mpi.Isend(t, dest=1, tag=TAG_Y), t)]

    def receive(self, b):
        """``b`` with rank 1's delta and report (waiting for them if need be)."""
        if b.delta is not None:
            return b
        what = 'rank 1 (the upper half)'
        delta = _recv_array(self.mpi, 1, TAG_DELTA, b.h.shape, numpy.dtype(b.h.dtype),
                            self.timeout, what)
        report = _recv_object(self.mpi, 1, TAG_REPORT, self.timeout, what)
        delta = self.lower.xp.asarray(delta) if self.lower.xp is not numpy else delta
        return b._replace(delta=delta, report=report)

    def pull_upper(self):
        """Fill rank 0's copy of the upper half (weights, optimizer state) from rank 1,
        as it is after the last batch sent."""
        self.mpi.send(('get',), dest=1, tag=TAG_COMMAND)
        state = _recv_object(self.mpi, 1, TAG_STATE, self.timeout, 'rank 1 (the upper half)')
        load_state(state, self.upper, self.get_optimizer('upper'))

    def push_upper(self):
        self.mpi.send(('set', state_of(self.upper, self.get_optimizer('upper'))), dest=1,
                      tag=TAG_COMMAND)
        self.upper_is_current = True

    def finalize(self):
        """The trainer's last call: take the deltas of the batches still pending (rank
        1 waits for them to be received before it stops) and let the last sends
        complete."""
        super().finalize()
        try:
            self.window = collections.deque(self.receive(b) for b in self.window)
            for request, _ in self.sending:
                _wait(request, self.timeout, 'rank 1 (the upper half)')
        except PipelineError:
            pass  # rank 1 is gone; the error that ended the run says why
        self.sending = []

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
            for i, b in enumerate(self.window):
                w = serializer['pending%d' % i]
                for name in ('h', 't', 'delta_hat', 'delta'):
                    w(name, getattr(b, name))
                w('loss', b.report['main/loss'])
                w('accuracy', b.report['main/accuracy'])
        else:
            window = []
            for i in range(int(n)):
                w = serializer['pending%d' % i]
                arrays = {name: self.lower.device.send(w(name, None))
                          for name in ('h', 't', 'delta_hat', 'delta')}
                report = {'main/loss': w('loss', None), 'main/accuracy': w('accuracy', None)}
                window.append(_Batch(arrays['h'], arrays['t'], None, arrays['delta_hat'],
                                     arrays['delta'], report))
            self.window = collections.deque(window)
            self.upper_is_current = False
