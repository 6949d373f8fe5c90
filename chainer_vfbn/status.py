"""Where a table's runs stand: ``python -m chainer_vfbn.table status ROOT``.

``table run`` writes the plan, ``ROOT/table_plan.json``: every planned run (row,
seed, folder), the executor, the process that runs them (local) or each run's Slurm
job (``ARRAY_TASK``). Each time it starts ``train.py`` for a run it writes that
run's ``table_job.json``: the process, host, Slurm job, command, and at the end
train.py's exit status. From these, the run folder (``result.json``, ``log``,
``train_output.txt``) and, for Slurm jobs, ``squeue``, each run is one of:

=============  ==============================================================
not started    nothing ran yet, and no table process or Slurm job will run it
queued         a Slurm job waits for its (next) start, or the local table
               process that will run it is still working through the plan
running        its Slurm job runs, or its train.py process lives (local)
finished       result.json says so
diverged       result.json says so
interrupted    stopped with a snapshot (Ctrl-C, a signal); rerun ``table run``
failed         train.py ended otherwise, or its job ended without a word: the
               last line of its output (or of the job's error log) says why
=============  ==============================================================

Without Slurm on the machine (the runs were local, or squeue is missing) the folders
alone decide. Nothing here needs a GPU, Chainer's trainer or submitit.
"""
import json
import os
import socket
import time

from chainer_vfbn import runs as run_folders
from chainer_vfbn import records, slurm
from chainer_vfbn.runs import UsageError

PLAN_FILE = 'table_plan.json'
JOB_FILE = 'table_job.json'
OUTPUT_FILE = 'train_output.txt'
#: Where the Slurm executor keeps submitit's job files and logs, under ROOT.
SLURM_FOLDER = 'slurm'
STATES = ('not started', 'queued', 'running', 'finished', 'diverged', 'interrupted', 'failed')


# ---------------------------------------------------------------------------
# What ``table run`` writes.

def write_plan(root, runs, executor, jobs=None):
    """Record the plan: ``runs`` is ``[(seed, row)]``; ``jobs`` maps a run's folder
    (``slug/seed<k>``) to its Slurm job. A run a Slurm submission leaves out keeps
    the job an earlier plan gave it."""
    old = {}
    if executor == 'slurm' and os.path.isfile(os.path.join(root, PLAN_FILE)):
        try:
            old = {e['folder']: e.get('job') for e in read_plan(root)['runs']}
        except (UsageError, KeyError, TypeError):
            old = {}
    jobs = jobs or {}
    entries = []
    for seed, row in runs:
        folder = run_folder(row.slug, seed)
        entries.append({'row': row.slug, 'seed': seed, 'folder': folder,
                        'job': jobs.get(folder, old.get(folder))})
    os.makedirs(root, exist_ok=True)
    run_folders.write_json(os.path.join(root, PLAN_FILE), {
        'executor': executor, 'runs': entries, 'pid': os.getpid(),
        'host': socket.gethostname(), 'written': time.time()})


def run_folder(slug, seed):
    return os.path.join(slug, 'seed%d' % seed)


def read_plan(root):
    path = os.path.join(root, PLAN_FILE)
    if not os.path.isfile(path):
        raise UsageError('%s holds no table plan (%s): start its runs with python -m '
                         'chainer_vfbn.table run --out %s' % (root, PLAN_FILE, root))
    plan = run_folders.read_json(path, 'the table plan')
    if not isinstance(plan, dict) or not isinstance(plan.get('runs'), list):
        raise UsageError('%s is not a table plan (no list of runs)' % path)
    return plan


def start_record(folder, command, device=()):
    """A run's train.py starts (in this process's care)."""
    run_folders.write_json(os.path.join(folder, JOB_FILE), {
        'pid': None, 'table_pid': os.getpid(), 'host': socket.gethostname(),
        'slurm_job': slurm.this_job(), 'command': command, 'device': list(device),
        'started': time.time(), 'ended': None, 'exit_status': None})


def update_record(folder, **fields):
    path = os.path.join(folder, JOB_FILE)
    record = read_record(folder) or {}
    record.update(fields)
    run_folders.write_json(path, record)


def read_record(folder):
    try:
        with open(os.path.join(folder, JOB_FILE)) as f:
            record = json.load(f)
        return record if isinstance(record, dict) else None
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------
# Reading it back.

def alive(pid, host, needle):
    """Whether process ``pid`` on ``host`` runs a command containing ``needle``
    (False when it is on another host: it cannot be seen from here)."""
    if not pid or host != socket.gethostname():
        return False
    try:
        with open('/proc/%d/cmdline' % pid, 'rb') as f:
            return needle in f.read().replace(b'\0', b' ').decode(errors='replace')
    except OSError:
        return False


def last_line(path):
    """The last non-empty line of a text file ('' if none)."""
    try:
        with open(path, errors='replace') as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return ''
    return lines[-1] if lines else ''


def when(seconds):
    return time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(seconds))


def progress(folder):
    """'iteration N at TIME' of the last log entry ('-' before the first)."""
    path = os.path.join(folder, 'log')
    try:
        with open(path) as f:
            log = json.load(f)
        return 'iteration %d at %s' % (log[-1]['iteration'], when(os.path.getmtime(path)))
    except (OSError, ValueError, LookupError, TypeError):
        return '-'


def run_state(root, entry, queue, table_alive):
    """``(state, note)`` of one planned run (:data:`STATES`)."""
    folder = os.path.join(root, entry['folder'])
    job = entry.get('job')
    if os.path.isfile(os.path.join(folder, 'args.json')):
        try:
            run = records.load_run(folder)
        except records.RunError as e:
            return 'failed', str(e)
        if run.status == 'finished':
            error = run.result.get('test_error')
            return 'finished', ('test error %.2f%%' % (100 * error)
                                if run_folders.finite(error) else '')
        if run.status == 'diverged':
            return 'diverged', run.result.get('message', '')
    if job and queue is not None and job in queue:
        state = queue[job]
        if state in slurm.QUEUED_STATES:
            return 'queued', 'Slurm: %s' % state
        if state in slurm.RUNNING_STATES:
            return 'running', ''
    record = read_record(folder)
    output = last_line(os.path.join(folder, OUTPUT_FILE))
    if record is not None:
        code = record.get('exit_status')
        if code is None:
            if job is None and alive(record.get('pid'), record.get('host'), 'train.py'):
                return 'running', ''
            if job and queue is None:
                return 'running', 'no squeue here to check it'
            return 'failed', 'stopped without an exit status; last output: %s' % output
        if code == run_folders.EXIT_INTERRUPTED or code < 0:
            return 'interrupted', 'run `table run` again to resume it'
        return 'failed', 'exit status %d: %s' % (code, output)
    if job:
        if queue is None:
            return 'queued', 'no squeue here to check it'
        err = os.path.join(root, SLURM_FOLDER, '%s_0_log.err' % job)
        return 'failed', 'its job ended before train.py started: %s' % (
            last_line(err) or 'no error log (%s)' % err)
    if run_folders.latest_snapshot(folder):
        return 'interrupted', ''
    return ('queued' if table_alive else 'not started'), ''


def status_lines(root):
    """The ``status`` command's lines: a summary, then one line per planned run."""
    plan = read_plan(root)
    entries = plan['runs']
    jobs = [e.get('job') for e in entries if e.get('job')]
    queue = slurm.queue_states(jobs) if jobs else {}
    table_alive = alive(plan.get('pid'), plan.get('host'), 'chainer_vfbn.table')
    rows = []
    for entry in entries:
        state, note = run_state(root, entry, queue, table_alive)
        rows.append((entry['folder'], state,
                     progress(os.path.join(root, entry['folder'])),
                     'job %s' % entry['job'] if entry.get('job') else '-', note))
    counts = [(s, sum(r[1] == s for r in rows)) for s in STATES]
    lines = ['%s: %d planned runs (%s executor): %s' % (
        root, len(rows), plan.get('executor', '?'),
        ', '.join('%d %s' % (n, s) for s, n in counts if n))]
    width = max([len(r[0]) for r in rows] + [3])
    for r in rows:
        lines.append(('%-*s  %-11s  %-34s  %-10s  %s' % ((width,) + r)).rstrip())
    return lines
