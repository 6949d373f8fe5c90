"""Slurm, through submitit: submitting a job array, reading the queue, and, inside a
job, stopping the training on Slurm's signal and requeueing the job.

The table (:mod:`chainer_vfbn.table`) gives this module a picklable callable and one
argument tuple per run; each becomes one task of a Slurm job array (``sbatch
--array``), submitted with submitit. What a job must survive:

* **the time limit**: every job asks Slurm for ``SIGUSR1`` ``signal_before`` seconds
  before its limit (``--signal=B:USR1@T``: the batch process, which is the job's
  Python because the batch script ``exec``-s it);
* **preemption**: Slurm sends ``SIGTERM`` to every process of the job;
* **``scancel --signal=USR1 --batch JOB``**, which signals the batch process only.

:class:`ForwardSignals` passes either signal on to ``train.py`` (which then finishes
the iteration, writes its snapshot and exits 130), and the job calls
:func:`requeue_this_job`: ``scontrol requeue Incomplete`` puts it back in the queue
(not a job a user cancelled: its state is no longer incomplete), and the next start
of the same job resumes from the run folder's latest snapshot. Jobs are submitted
``--requeue``.

submitit is optional (``--executor slurm`` only): it is imported where a job array
is made, with a one-line message when it is missing.
"""
import contextlib
import io
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys

from chainer_vfbn.runs import UsageError

#: The signal Slurm sends before the time limit (and ``scancel --signal=USR1``).
STOP_SIGNAL = signal.SIGUSR1
#: squeue states of a job that waits for its (next) start, and of one that runs.
QUEUED_STATES = ('PENDING', 'REQUEUED', 'REQUEUE_HOLD', 'REQUEUE_FED', 'RESV_DEL_HOLD',
                 'SUSPENDED', 'STOPPED', 'CONFIGURING')
RUNNING_STATES = ('RUNNING', 'COMPLETING', 'SIGNALING', 'STAGE_OUT')
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def check_available():
    """Refuse ``--executor slurm`` on a machine without Slurm or without submitit."""
    if shutil.which('sbatch') is None:
        raise UsageError('--executor slurm: sbatch is not on PATH (no Slurm on this '
                         'machine); train here with --executor local')
    try:
        import submitit  # noqa: F401  (optional: only the Slurm executor needs it)
    except ImportError:
        raise UsageError('--executor slurm needs submitit: pip install submitit==1.5.4 '
                         '(requirements.txt)')


def minutes(text):
    """A Slurm time limit (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``,
    ``D-HH:MM:SS``) in whole minutes, rounded up; ValueError if it is none of these."""
    m = re.fullmatch(r'(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?', text.strip())
    if not m:
        raise ValueError('not a Slurm time limit: %r' % text)
    days, a, b, c = (int(x) if x else None for x in m.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # HH:MM:SS
        seconds = a * 3600 + b * 60 + c
    elif b is not None:  # MM:SS
        seconds = a * 60 + b
    else:  # MM
        seconds = a * 60
    if seconds <= 0:
        raise ValueError('a time limit must be positive: %r' % text)
    return -(-seconds // 60)


def sbatch_setting(text):
    """``KEY=VALUE`` (or a bare ``KEY`` for a flag) of ``--sbatch``: ``(key, value)``."""
    key, _, value = text.partition('=')
    key = key.strip().lstrip('-')
    if not re.fullmatch(r'[A-Za-z][A-Za-z0-9_-]*', key):
        raise ValueError('expected an sbatch option as KEY=VALUE (e.g. qos=high), got %r'
                         % text)
    return key.replace('_', '-'), (value if _ else True)


def job_script_setup(folder):
    """The lines that start the job's Python: submitit's own command, ``exec``-ed so
    that the job's Python *is* the batch process (``--signal=B:...`` and ``scancel
    --batch`` reach it; a bash waiting on it would die of SIGUSR1 instead). submitit
    writes its command after these lines; the exec replaces the script before it."""
    python = os.path.abspath(sys.executable)
    path = REPO_ROOT + '${PYTHONPATH:+:$PYTHONPATH}'
    return ['export PYTHONPATH=%s' % path, 'export SUBMITIT_EXECUTOR=slurm',
            'exec %s -u -m submitit.core._submit %s' % (shlex.quote(python),
                                                         shlex.quote(str(folder)))]


def submit_array(folder, fn, arguments, name='vfbn-table', partition=None, time=None,
                 gpus=None, cpus=None, mem=None, account=None, sbatch=(), signal_before=300,
                 parallel=None):
    """Submit ``fn(*arguments[i])`` as task i of one Slurm job array; return the task
    ids (``ARRAY_TASK``). Refused by sbatch (a partition or account Slurm does not
    know, ...): :class:`UsageError` with sbatch's own message, and nothing of the
    submission is left in ``folder``."""
    import submitit  # optional; check_available() said how to install it
    made = []  # the folders this submission makes, deepest last
    probe = os.path.abspath(folder)
    while not os.path.exists(probe):
        made.insert(0, probe)
        probe = os.path.dirname(probe)
    os.makedirs(folder, exist_ok=True)
    before = set(os.listdir(folder))
    ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=0)
    extra = {'requeue': True, 'signal': 'B:%s@%d' % (STOP_SIGNAL.name[3:], signal_before)}
    if mem:
        extra['mem'] = mem
    extra.update(dict(sbatch))
    # None leaves a setting out of the script; time=None: the partition's default
    # limit, not submitit's 5 minutes.
    params = dict(job_name=name, use_srun=False, setup=job_script_setup(folder),
                  additional_parameters=extra, array_parallelism=parallel or len(arguments),
                  partition=partition, time=time, gpus_per_node=gpus, cpus_per_task=cpus,
                  account=account)
    try:  # submitit prints sbatch's complaint to stderr too: it goes in our one line
        with contextlib.redirect_stderr(io.StringIO()):
            ex.update_parameters(**params)
            jobs = ex.map_array(fn, *zip(*arguments))
    except Exception as e:
        for name in set(os.listdir(folder)) - before:
            path = os.path.join(folder, name)
            if os.path.isfile(path) or os.path.islink(path):
                os.remove(path)
        for path in reversed(made):
            if not os.listdir(path):
                os.rmdir(path)
        raise UsageError(sbatch_message(e))
    return [job.job_id for job in jobs]


def sbatch_message(error):
    """sbatch's own complaint in one line (its last ``sbatch: error:`` line)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    said = [line for line in lines if 'sbatch: error' in line]
    return 'Slurm refused the job array: %s' % (said[-1] if said else
                                                 lines[-1] if lines else type(error).__name__)


def queue_states(job_ids):
    """``{task id: squeue state}`` of the jobs (array tasks one by one) that Slurm
    still lists; jobs it no longer lists are absent. None without squeue (or when it
    fails: no Slurm here)."""
    arrays = sorted({str(j).split('_')[0] for j in job_ids if j})
    if not arrays:
        return {}
    try:
        out = subprocess.run(['squeue', '-h', '-r', '-o', '%i %T', '-j', ','.join(arrays)],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        # squeue refuses a list whose jobs all left the queue ("Invalid job id")
        return {} if 'Invalid job id' in out.stderr else None
    states = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            states[parts[0]] = parts[1]
    return states


def this_job():
    """The id of the Slurm job (``ARRAY_TASK`` for an array task) this process runs
    in, or None outside Slurm."""
    env = os.environ
    if env.get('SLURM_ARRAY_JOB_ID') and env.get('SLURM_ARRAY_TASK_ID'):
        return '%s_%s' % (env['SLURM_ARRAY_JOB_ID'], env['SLURM_ARRAY_TASK_ID'])
    return env.get('SLURM_JOB_ID')


def requeue_this_job():
    """Put this job back in the queue (it restarts from its beginning); one line
    saying what happened."""
    job = this_job()
    out = subprocess.run(['scontrol', 'requeue', 'Incomplete', job], capture_output=True,
                         text=True, timeout=60)
    if out.returncode == 0:
        return 'requeued job %s (restart %d); it resumes from the latest snapshot' % (
            job, int(os.environ.get('SLURM_RESTART_COUNT', '0')) + 1)
    return 'job %s not requeued (%s)' % (job, (out.stderr or out.stdout).strip())


class ForwardSignals(object):
    """Within ``with``: ``SIGUSR1`` and ``SIGTERM`` to this process are passed on to
    the process ``child()`` returns (if it runs), and remembered in ``received``."""

    def __init__(self, child):
        self.child, self.received, self._old = child, [], {}

    def _handler(self, signum, frame):
        self.received.append(signum)
        proc = self.child()
        if proc is not None and proc.poll() is None:
            proc.send_signal(signum)

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handler) for s in (STOP_SIGNAL, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False
