"""How commands and arrays travel between the processes of a ``--pipeline`` run.

:mod:`chainer_vfbn.pipeline` says what each rank computes; this module is how they
talk, over MPI (ChainerMN's communicator on mpi4py). A :class:`Channel` is one rank's
end: it sends rank 0's commands, a batch's arrays, the last rank's loss report and a
rank's state, and receives each of them, naming the rank it waits for. Sends of
arrays and reports do not wait (they complete while the sender computes); every
receive is bounded by the channel's timeout, so that a rank that stops answering ends
the run with a message naming it rather than a hang.

Also here: starting MPI (:func:`connect`), the launch command (:func:`launcher`),
which rank a process will be before MPI starts (:func:`launched_rank`), and leaving
in a hurry (:func:`abort`).
"""
import os
import sys
import time

import chainer
import numpy
from chainer import serializers

#: MPI tags: rank 0's commands, a message's header and its arrays (consecutive tags
#: from TAG_ARRAY), the last rank's loss, a rank's state, a value rank 0 shares.
TAG_COMMAND, TAG_HEADER, TAG_MAIN, TAG_STATE, TAG_SHARE, TAG_ARRAY = range(11, 17)
#: Seconds a rank waits for another before it gives up.
DEFAULT_TIMEOUT = 600.0
POLL_SECONDS = 0.0005


class PipelineError(RuntimeError):
    """Another rank did not answer in time, or the launch does not fit."""


# -- starting and ending ----------------------------------------------------------------

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
    return _recv_object(comm.mpi_comm, 0, TAG_SHARE, timeout, rank_name(0, comm.size))


def rank_name(rank, size):
    """A rank in words, for the messages that name the rank that did not answer."""
    if rank == 0:
        return 'rank 0 (the lower half)'
    if rank < size - 1:
        return 'rank %d (a middle module)' % rank
    return 'rank %d (%s)' % (rank, 'the upper half' if size == 2 else 'the top module')


def to_host(array):
    """``array`` (any device) as a contiguous NumPy array, as MPI sends it."""
    return numpy.ascontiguousarray(chainer.backend.CpuDevice().send(array))


def state_of(link, optimizer):
    """The weights and optimizer state of ``link`` as a dict of arrays, as a rank's
    state travels."""
    s = serializers.DictionarySerializer()
    link.serialize(s['link'])
    optimizer.serialize(s['optimizer'])
    return s.target


def load_state(state, link, optimizer):
    """Load a :func:`state_of` dict into ``link`` and its ``optimizer``."""
    d = serializers.NpzDeserializer(state)
    link.serialize(d['link'])
    optimizer.serialize(d['optimizer'])


# -- waiting ------------------------------------------------------------------------------

def _poll(done, timeout, what):
    """Call ``done()`` until it is true, for at most ``timeout`` seconds (None: no
    limit)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not done():
        if deadline is not None and time.monotonic() > deadline:
            raise PipelineError('no answer from %s in %.0f s; it has stopped or is stuck '
                                '(its output above says why)' % (what, timeout))
        time.sleep(POLL_SECONDS)


def _recv_object(mpi, source, tag, timeout, what):
    """Receive a pickled message (probed first, so that a message of any size fits)."""
    _poll(lambda: mpi.Iprobe(source=source, tag=tag), timeout, what)
    return mpi.recv(source=source, tag=tag)


# -- one rank's end ---------------------------------------------------------------------

class Channel(object):
    """Rank ``comm.rank``'s end of the run's messages.

    Commands (``batch``, ``get``, ``set``, ``stop``) go from rank 0 to the others;
    arrays go up (a batch's ``h`` and ``y``) and down (a gradient, with the middle
    ranks' fidelity numbers as ``meta``); the last rank sends rank 0 its loss report;
    a rank sends rank 0 its state when asked. Sends of arrays and reports are kept
    in an outbox until they complete (:meth:`flush` waits for them all)."""

    def __init__(self, comm, timeout=DEFAULT_TIMEOUT):
        self.mpi, self.rank, self.size = comm.mpi_comm, comm.rank, comm.size
        self.timeout = timeout
        self._outbox = []       # (request, the buffer it sends from)

    def name(self, rank):
        return rank_name(rank, self.size)

    # rank 0's commands, and the answers to them
    def command(self, rank, *command):
        """Rank 0: send ``command`` (a kind and its values) to ``rank``."""
        self.mpi.send(command, dest=rank, tag=TAG_COMMAND)

    def next_command(self, timeout=DEFAULT_TIMEOUT):
        """Ranks > 0: rank 0's next command, waiting at most ``timeout`` seconds (None:
        as long as it takes)."""
        return _recv_object(self.mpi, 0, TAG_COMMAND, timeout, self.name(0))

    def send_state(self, state):
        """Ranks > 0: this rank's state, to rank 0 (which asked with ``get``)."""
        self.mpi.send(state, dest=0, tag=TAG_STATE)

    def recv_state(self, rank):
        return _recv_object(self.mpi, rank, TAG_STATE, self.timeout, self.name(rank))

    # a batch's arrays and the loss, without waiting to send
    def send_arrays(self, dest, meta, *arrays):
        """Send ``arrays`` (any device) and a small object ``meta`` to ``dest``."""
        arrays = [to_host(a) for a in arrays]
        self.mpi.send((meta, [(a.shape, a.dtype.str) for a in arrays]), dest=dest,
                      tag=TAG_HEADER)
        for i, a in enumerate(arrays):
            self._keep(self.mpi.Isend(a, dest=dest, tag=TAG_ARRAY + i), a)

    def recv_arrays(self, source):
        """The arrays of one :meth:`send_arrays` message from ``source``, and its
        ``meta``."""
        what = self.name(source)
        meta, specs = _recv_object(self.mpi, source, TAG_HEADER, self.timeout, what)
        arrays = []
        for i, (shape, dtype) in enumerate(specs):
            array = numpy.empty(shape, dtype)
            request = self.mpi.Irecv(array, source=source, tag=TAG_ARRAY + i)
            _poll(request.Test, self.timeout, what)
            arrays.append(array)
        return arrays, meta

    def send_report(self, report):
        """The last rank: a batch's loss and accuracy, to rank 0."""
        self._keep(self.mpi.isend(report, dest=0, tag=TAG_MAIN), report)

    def recv_report(self):
        """Rank 0: the last rank's report of the next batch."""
        last = self.size - 1
        return _recv_object(self.mpi, last, TAG_MAIN, self.timeout, self.name(last))

    def flush(self, rank):
        """Wait until every send has completed (``rank``: who receives them, named if
        it does not)."""
        for request, _ in self._outbox:
            _poll(request.Test, self.timeout, self.name(rank))
        self._outbox = []

    def _keep(self, request, buffer):
        self._outbox = [(r, b) for r, b in self._outbox if not r.Test()]
        self._outbox.append((request, buffer))
