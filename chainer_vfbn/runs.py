"""Run folders: what ``train.py`` writes, how a run is continued, and the small
things every command line shares (the usage error, exit codes, atomic files, the
device). What the table and the figures read from a folder is
:mod:`chainer_vfbn.records`; the machine and versions recorded beside a run,
:mod:`chainer_vfbn.machine`.

A run folder holds ``args.json`` (every argument, the versions and the machine),
``log``, trainer snapshots ``snapshot_iter_N``, predictor snapshots
``model_iter_N.npz``, ``model.npz`` and ``result.json``. Two runs never share one:
a new run into a folder that holds a run is refused unless the user asks to start
over (:func:`prepare_new`), and a resumed run takes its arguments from its own
``args.json`` (:func:`resume_source`).
"""
import argparse
import glob
import json
import math
import os
import re

import chainer
import numpy
from chainer.training.extensions import snapshot_writers


#: Where ``train.py`` writes when no ``--out`` is given, and where ``evaluate.py``
#: and ``plot_curves.py`` look when given nothing.
DEFAULT_OUT = 'result'

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130

#: The files of one run, as glob patterns inside its folder.
RUN_FILES = ('args.json', 'log', 'result.json', 'snapshot_iter_*', 'model_iter_*.npz',
             'model.npz', '*.tmp')


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose usage errors are one line, like every other bad
    input: ``PROG: error: MESSAGE (PROG --help lists the options)``, exit 2."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, '%s: error: %s (%s --help lists the options)\n'
                  % (self.prog, message, self.prog))


class RaisingArgumentParser(ArgumentParser):
    """A parser whose usage errors raise :class:`UsageError` (the message alone):
    for a command that checks another's arguments and says so in its own line."""

    def error(self, message):
        raise UsageError(message)


class UsageError(Exception):
    """Bad arguments or environment; the message says what to do instead."""


class NothingToDo(Exception):
    """The command has nothing to do (a finished run resumed without a later
    stopping point); the message says so and what to give instead. Exit 0."""


# ---------------------------------------------------------------------------
# JSON.

def replace_atomically(path, write):
    """Make ``path`` with ``write(temporary path)``, then rename it into place: a
    reader (or a resumed run) sees the old file or the whole new one, never half of
    one. The temporary, ``path + '.tmp'`` in the same folder, is removed whatever
    happens (a full disk, Ctrl-C)."""
    tmp = path + '.tmp'
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:  # a write to an open file does not say which (a full disk)
        e.filename = e.filename or path
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    """Write strict JSON atomically; a NaN or infinity is refused rather than written
    as invalid JSON."""
    def write(tmp):
        with open(tmp, 'w') as f:
            json.dump(obj, f, indent=2, sort_keys=True, allow_nan=False)
            f.write('\n')
    replace_atomically(path, write)


def write_text(path, text):
    """Write a text file atomically."""
    def write(tmp):
        with open(tmp, 'w') as f:
            f.write(text)
    replace_atomically(path, write)


def save_npz(path, obj):
    """``chainer.serializers.save_npz``, atomically."""
    replace_atomically(path, lambda tmp: chainer.serializers.save_npz(tmp, obj))


class AtomicWriter(snapshot_writers.Writer):
    """The writer of the trainer's snapshots: each written to ``NAME.tmp`` beside
    its final name and renamed into place (:func:`replace_atomically`); older
    snapshots are pruned only after the new one is whole."""

    def __call__(self, filename, outdir, target):
        save_npz(os.path.join(outdir, filename), target)
        self._post_save()


def read_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError('cannot read %s %s (%s)' % (what, path, e))


# ---------------------------------------------------------------------------
# Run folders.

def run_files(folder):
    """The files of a run in ``folder`` (sorted paths; empty if none)."""
    found = set()
    for pattern in RUN_FILES:
        found.update(glob.glob(os.path.join(glob.escape(folder), pattern)))
    return sorted(found)


def find_run_dirs(root):
    """Every folder under ``root`` (itself included) that holds an args.json, sorted."""
    found = []
    for folder, subdirs, files in os.walk(root):
        subdirs.sort()
        if 'args.json' in files:
            found.append(folder)
    return found


def latest_snapshot(folder):
    """Path of the ``snapshot_iter_N`` with the largest N in ``folder``, or None."""
    found = []
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        m = re.fullmatch(r'snapshot_iter_(\d+)', name)
        if m:
            found.append((int(m.group(1)), os.path.join(folder, name)))
    return max(found)[1] if found else None


def check_writable(folder):
    """Refuse a folder that cannot be created or written, without creating it."""
    path = os.path.abspath(folder)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError('--out %s is a file, not a folder' % folder)
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UsageError('--out %s: %s is a file, not a folder' % (folder, probe))
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError('--out %s: %s is not writable' % (folder, probe))


def prepare_new(folder, overwrite):
    """Check that a new run may be written to ``folder``; with ``overwrite``, remove
    the files of the run it holds. Nothing is removed unless the check passes."""
    check_writable(folder)
    old = run_files(folder)
    if old and not overwrite:
        raise UsageError('%s holds a run already (%s); continue it with --resume %s, '
                         'write the new run to another --out, or start over with '
                         '--overwrite' % (folder, ', '.join(os.path.basename(p) for p in
                                                            old[:3]) +
                                          (', ...' if len(old) > 3 else ''), folder))
    return old


def clear(paths):
    for path in paths:
        os.remove(path)


def resume_source(path):
    """``(run folder, snapshot)`` from ``--resume PATH``: a run folder (its latest
    trainer snapshot) or a trainer snapshot inside one."""
    if os.path.isdir(path):
        snapshot = latest_snapshot(path)
        if snapshot is None:
            raise UsageError('--resume %s: the folder has no trainer snapshot '
                             '(snapshot_iter_N)' % path)
        run_dir = path
    elif os.path.isfile(path):
        run_dir, snapshot = os.path.dirname(path) or '.', path
    else:
        raise UsageError('--resume %s: no such run folder or snapshot file' % path)
    if not os.path.isfile(os.path.join(run_dir, 'args.json')):
        raise UsageError('--resume %s: no args.json in %s, so the run\'s arguments are '
                         'unknown' % (path, run_dir))
    return run_dir, snapshot


# ---------------------------------------------------------------------------
# Device.

def resolve_device(spec=None, gpu=None):
    """The Chainer device; a missing GPU is an error, never a silent CPU run."""
    if gpu is not None:
        if spec is not None:
            raise UsageError('give --gpu or --device, not both')
        spec = '@cupy:%d' % gpu if gpu >= 0 else '@numpy'
    spec = spec or '@numpy'
    if not re.fullmatch(r'@numpy|@intel64|@cupy:\d+|native(:0)?|cuda:\d+', spec):
        raise UsageError('unknown device %r: give @numpy (the CPU), @cupy:N or --gpu N '
                         '(GPU N)' % spec)
    try:
        device = chainer.get_device(spec)
        if device.xp is not numpy:
            device.use()
            device.xp.zeros(1).sum()  # touch the GPU now, not mid-run
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError('device %s is not available (%s). Install CuPy for your CUDA '
                         '(README, GPU) or run on the CPU: leave out --gpu/--device'
                         % (spec, first))
    return device


def finite(value):
    """True for a real number that is neither NaN nor infinite."""
    return isinstance(value, (int, float)) and math.isfinite(value)
