"""The Chainer extensions and triggers of ``train.py``'s trainer that Chainer lacks:
when a run stops (:class:`StopAt`) and evaluates (:class:`AlsoAtTheEnd`), the shuffle
a resumed run repeats exactly (:class:`SeededShuffle`), Ctrl-C and SIGTERM
(:class:`StopOnSignal`), and the progress lines of a run without a terminal."""
import os
import signal
import sys
import time
import zlib

import chainer
import numpy


class SeededShuffle(object):
    """Order sampler whose next permutation is a function of the seed and of the
    previous order, which the iterator's snapshot holds: a resumed run shuffles
    exactly as the uninterrupted run would."""

    def __init__(self, seed):
        self.seed = seed

    def __call__(self, current_order, current_position):
        n = len(current_order)
        key = [self.seed] if current_order is None or not hasattr(current_order, 'tobytes') \
            else [self.seed, zlib.crc32(numpy.ascontiguousarray(current_order).tobytes())]
        return numpy.random.default_rng(key).permutation(n)


#: The signals that stop a run with a snapshot: Ctrl-C, SIGTERM (a scheduler's
#: preemption) and SIGUSR1 (Slurm's warning before a job's time limit).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class StopOnSignal(chainer.training.Extension):
    """After the first of :data:`STOP_SIGNALS`, finish the current iteration, save a
    trainer snapshot, and stop the run with :class:`Interrupted`. A second Ctrl-C
    before the snapshot starts stops at once (:class:`Interrupted` with no snapshot);
    a scheduler's SIGTERM or SIGUSR1 never does (Slurm may send both, to every
    process of the job); while the snapshot is being written, signals are ignored."""

    trigger = 1, 'iteration'
    priority = chainer.training.PRIORITY_READER - 1  # after every other extension

    def __init__(self, snapshot):
        self.snapshot, self.signum, self.saving = snapshot, None, False

    def initialize(self, trainer):
        def handler(signum, frame):
            if self.saving:
                return
            if self.signum is not None:  # a second Ctrl-C: stop now
                if signum == signal.SIGINT:
                    raise Interrupted(trainer.updater.iteration, None)
                return
            self.signum = signum
        self._old = {s: signal.signal(s, handler) for s in STOP_SIGNALS}

    def __call__(self, trainer):
        if self.signum is not None:
            self.saving = True
            self.snapshot(trainer)
            raise Interrupted(trainer.updater.iteration,
                              os.path.join(trainer.out, 'snapshot_iter_%d'
                                           % trainer.updater.iteration))

    def finalize(self):
        for s, h in getattr(self, '_old', {}).items():
            signal.signal(s, h)


class Interrupted(Exception):
    """The run stopped on a signal: ``(iteration, snapshot path or None)``."""


class TestInterrupted(Interrupted):
    """The final test stopped on a signal; training's end is in the snapshot."""


class StopAt(chainer.training.triggers.IntervalTrigger):
    """The stop trigger: true once the updater is at the stopping point. Unlike
    Chainer's IntervalTrigger (whose snapshot state makes a run resumed at its end
    train a whole period more), it asks only where the updater is, so a run resumed
    at its stopping point does no iteration."""

    def __call__(self, trainer):
        updater = trainer.updater
        if self.unit == 'iteration':
            return updater.iteration >= self.period
        return updater.epoch_detail >= self.period


class AlsoAtTheEnd(object):
    """A trigger that fires as ``trigger`` does and at the stopping point, so the
    last iteration is always evaluated and logged. One per extension (an
    IntervalTrigger counts its calls)."""

    def __init__(self, trigger, stop):
        self.trigger = chainer.training.get_trigger(trigger)
        self.stop = stop

    def __call__(self, trainer):
        return self.trigger(trainer) or self.stop(trainer)

    def serialize(self, serializer):
        self.trigger.serialize(serializer)


class PlainOut(object):
    """Standard output without the terminal codes PrintReport writes to clear a
    progress bar: what a log file should hold."""

    def write(self, text):
        sys.stdout.write(text.replace('\033[J', ''))

    def flush(self):
        sys.stdout.flush()


class ProgressLines(chainer.training.Extension):
    """Without a terminal: one plain line every ``seconds`` (and after the first
    iteration), with the iteration, the speed and the time left."""

    trigger = 1, 'iteration'
    priority = chainer.training.PRIORITY_READER

    def __init__(self, seconds, stop_iteration):
        self.seconds, self.stop_iteration = seconds, stop_iteration
        self.last = None

    def __call__(self, trainer):
        now, it = time.time(), trainer.updater.iteration
        if self.last is None:
            self.last = (now, it)
            self._say(it, None)
        elif now - self.last[0] >= self.seconds:
            per = (now - self.last[0]) / max(1, it - self.last[1])
            self.last = (now, it)
            self._say(it, per)

    def _say(self, it, per):
        total = self.stop_iteration
        parts = ['iteration %d%s' % (it, '/%d (%.0f%%)' % (total, 100.0 * it / total)
                                     if total else '')]
        if per is not None:
            parts.append('%.2f s/iteration' % per)
            if total:
                parts.append('%.0f min left' % ((total - it) * per / 60.0))
        print('[progress] ' + ', '.join(parts), flush=True)
