"""``python -m chainer_vfbn.table``: train the rows of the paper's Table 1, several
at a time and resumably, then report them (:mod:`chainer_vfbn.report`).

Command line::

    python -m chainer_vfbn.table run --out ROOT [--dataset D] [--depth N]
        [--seeds 0 1 ...] [--claim-seeds 0 1 2 ...] [--rows bp vfbn-1e-3 ...]
        [--jobs N] [--gpus 0 1 ...] [--executor local|slurm [Slurm options]]
        [-- extra train.py arguments]
    python -m chainer_vfbn.table status ROOT
    python -m chainer_vfbn.table report ROOT

``run`` trains each seed's run of each row in ``ROOT/<slug>/seed<k>``, up to N at a
time, each a ``train.py`` process with CPUs / N BLAS threads, then writes
``ROOT/table.md`` and ``ROOT/figure3_{error,fidelity}.{png,pdf}`` (``report`` writes
only those). It is resumable: rerun the same command and finished or diverged runs
are skipped, and a run with a trainer snapshot but no result.json is resumed from its
latest snapshot. ``--gpus`` gives each concurrent run its own GPU (``--gpu G``).

``--executor slurm`` submits the runs still to do as one Slurm job array instead
(:mod:`chainer_vfbn.slurm`); each job runs what the local executor would run for its
run (:class:`SlurmTask`), and requeues itself when Slurm signals it. ``status``
prints where each planned run stands (:mod:`chainer_vfbn.status`).
"""
import concurrent.futures
import os
import queue
import shlex
import subprocess
import sys
import threading
import time

from chainer_vfbn import arguments, machine, methods, placement, records, report, slurm
from chainer_vfbn import runs as run_folders
from chainer_vfbn import status as run_states

TRAIN_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        'train.py')
#: train.py arguments that ``run`` sets itself for every run.
RUNNER_OPTIONS = ('--out', '-o', '--seed', '--method', '--synth', '--alpha-gs',
                  '--resume', '-r', '--threads', '--overwrite')
#: Environment variables that size the thread pools of BLAS and OpenMP.
THREAD_VARIABLES = ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS')

EXIT_FAILED = 1
LEFT_OUT = 'table.md and the figures are written without it'

EXIT_BAD_INPUT = run_folders.EXIT_BAD_INPUT
EXIT_INTERRUPTED = run_folders.EXIT_INTERRUPTED


# ---------------------------------------------------------------------------
# Running the rows.

def plan(seeds, slugs=None, claim_seeds=None):
    """``[(seed, row)]`` in running order: the rows that decide the paper's claim
    (:data:`chainer_vfbn.methods.CLAIM`) for each of ``claim_seeds`` (default: ``seeds``), then the
    other rows, in Table 1 order, for each of ``seeds``."""
    chosen = [row for row in methods.TABLE1 if slugs is None or row.slug in slugs]
    first = [row for s in methods.CLAIM for row in chosen if row.slug == s]
    rest = [row for row in chosen if row not in first]
    claim_seeds = seeds if claim_seeds is None else claim_seeds
    if claim_seeds == seeds:  # each seed's claim rows, then its other rows
        return [(seed, row) for seed in seeds for row in first + rest]
    return [(seed, row) for seed in claim_seeds for row in first] + \
        [(seed, row) for seed in seeds for row in rest]


def run_argv(row, seed, common, out):
    """train.py's arguments for one run."""
    return methods.row_argv(row) + common + ['--seed', str(seed), '--out', out]


def config_mismatch(recorded, argv):
    """How a folder's args.json differs from what ``argv`` would run ('' if not).
    An option the run's args.json predates counts as its default."""
    planned = vars(arguments.parse_args(argv, check_out=False))
    recorded = records.with_defaults(recorded)
    diffs = ['%s %r there, %r now' % (k, recorded.get(k), v)
             for k, v in sorted(planned.items())
             if k not in records.PER_RUN_KEYS and recorded.get(k) != v]
    return '; '.join(diffs)


def outcome(run):
    """One run's result in a few words, for the progress lines."""
    if run.status == 'diverged':
        return 'diverged at iteration %d' % run.last_iteration
    return 'test error %.2f%% after %d iterations' % (100.0 * run.result['test_error'],
                                                     run.last_iteration)


def _duration(seconds):
    seconds = int(round(seconds))
    return '%d:%02d:%02d' % (seconds // 3600, seconds // 60 % 60, seconds % 60)


class Runner(object):
    """Trains planned runs as ``train.py`` subprocesses, ``jobs`` at a time, each
    with ``threads`` BLAS/OpenMP threads; prints one progress line per step and keeps
    each run's output in its folder (``train_output.txt``). With one job, train.py's
    own output is echoed as well."""

    def __init__(self, root, common, jobs=1, threads=None, python=sys.executable,
                 train_py=TRAIN_PY):
        self.root, self.common, self.jobs = root, common, jobs
        self.threads = threads or max(1, machine.usable_cpus() // jobs)
        self.python, self.train_py = python, train_py
        self.start = time.time()
        self.failed = []
        self.process = None  # the latest train.py started (the one, in a Slurm job)
        self._lock = threading.Lock()

    def say(self, text):
        with self._lock:
            print('[table %s] %s' % (_duration(time.time() - self.start), text), flush=True)

    def run_one(self, step, total, seed, row, device=()):
        """Train (or skip, or resume) one run, with the train.py options ``device``
        (e.g. ``--gpu 1``); returns its final status."""
        out = os.path.join(self.root, row.slug, 'seed%d' % seed)
        argv = run_argv(row, seed, self.common, out) + list(device) + \
            ['--threads', str(self.threads)]
        name = '%d/%d seed %d %s (%s)' % (step, total, seed, row.slug, row.label)
        args_file = os.path.join(out, 'args.json')
        if os.path.exists(args_file):
            mismatch = config_mismatch(records.load_run(out).args, argv)
            if mismatch:
                self.say('%s: FAILED: %s holds a run with other arguments (%s); use '
                         'another --out, or delete that folder to rerun it'
                         % (name, out, mismatch))
                self.failed.append(name)
                return 'failed'
            run = records.load_run(out)
            if run.status in ('finished', 'diverged'):
                self.say('%s: skipped, already %s (%s)' % (name, run.status, outcome(run)))
                return run.status
        snapshot = run_folders.latest_snapshot(out)
        if snapshot:
            argv += ['--resume', snapshot]
            self.say('%s: resuming from %s' % (name, snapshot))
        else:
            if run_folders.run_files(out):  # stopped before its first snapshot: start over
                argv.append('--overwrite')
            self.say('%s: starting' % name)
        began = time.time()
        code = self._train(argv, out, device)
        run = records.load_run(out) if os.path.exists(args_file) else None
        status = run.status if run else 'unfinished'
        if code == 0 and status == 'finished' or \
                code == run_folders.EXIT_DIVERGED and status == 'diverged':
            self.say('%s: %s in %s: %s' % (name, status, _duration(time.time() - began),
                                           outcome(run)))
            return status
        if code == run_folders.EXIT_INTERRUPTED or code < 0:
            self.say('%s: interrupted' % name)
            return 'interrupted'
        self.say('%s: FAILED (train.py exit status %d; see %s)'
                 % (name, code, os.path.join(out, 'train_output.txt')))
        self.failed.append(name)
        return 'failed'

    def _train(self, argv, out, device=()):
        """Run train.py, appending its output to train_output.txt (and echoing it
        with one job), its process and exit status to table_job.json. A Ctrl-C
        reaches train.py too (same process group): it saves a snapshot and exits,
        and its exit status says so."""
        os.makedirs(out, exist_ok=True)
        cmd = [self.python, self.train_py] + argv
        run_states.start_record(out, cmd, device)
        code = None
        try:
            code = self._run(cmd, out)
        finally:
            run_states.update_record(out, exit_status=code, ended=time.time())
        return code

    def _run(self, cmd, out):
        env = dict(os.environ, PYTHONUNBUFFERED='1')
        for name in THREAD_VARIABLES:
            env[name] = str(self.threads)
        echo = self.jobs == 1
        with open(os.path.join(out, 'train_output.txt'), 'a') as log:
            log.write('$ %s\n' % ' '.join(shlex.quote(a) for a in cmd))
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, env=env)
            self.process = proc
            run_states.update_record(out, pid=proc.pid)
            while True:
                try:
                    for line in proc.stdout:
                        if echo:
                            sys.stdout.write(line)
                        log.write(line)
                        log.flush()
                    return proc.wait()
                except KeyboardInterrupt:  # keep reading until train.py has stopped
                    continue


def run_table(root, seeds, slugs, common, jobs=1, claim_seeds=None, devices=None,
              threads=None):
    """The ``run`` command: train the plan, ``jobs`` runs at a time, then write the
    report. ``devices``: train.py device options (e.g. ``[['--gpu', '0'], ['--gpu',
    '1']]``), at least ``jobs`` of them; each running run holds one of them, which no
    other run uses meanwhile. Returns the exit status: 0, 1 when a run failed for a
    reason other than divergence, 130 when interrupted."""
    steps = plan(seeds, slugs, claim_seeds)
    runner = Runner(root, common, jobs, threads)
    run_states.write_plan(root, steps, 'local')
    runner.say('%d runs (%s) into %s, %d at a time with %d BLAS thread(s) each%s; '
               'train.py arguments shared by all: %s'
               % (len(steps), ', '.join('seed %d %s' % (s, r.slug) for s, r in steps),
                  root, jobs, runner.threads,
                  ', on %s' % ', '.join(' '.join(d) for d in devices) if devices else '',
                  ' '.join(common) or '(none)'))
    stop = threading.Event()
    free = queue.Queue()
    for device in devices or [()]:
        free.put(device)

    def work(i, seed, row):
        if stop.is_set():
            return 'interrupted'
        device = free.get() if devices else ()
        try:
            state = runner.run_one(i + 1, len(steps), seed, row, device)
        except records.RunError as e:  # a broken run folder: say so, go on
            runner.say('%d/%d seed %d %s: FAILED: %s' % (i + 1, len(steps), seed, row.slug, e))
            runner.failed.append(row.slug)
            return 'failed'
        finally:
            if devices:
                free.put(device)
        if state == 'interrupted':
            stop.set()
        return state

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(work, i, seed, row) for i, (seed, row) in enumerate(steps)]
        while True:
            try:
                concurrent.futures.wait(futures)
                break
            except KeyboardInterrupt:  # the running train.py's stop with a snapshot
                stop.set()
                runner.say('interrupted: waiting for the running trainings to save '
                           'their snapshots')
    if stop.is_set():
        runner.say('interrupted: run the same command again to resume')
        return EXIT_INTERRUPTED
    paths, left_out = report.write_report(root)
    for path in paths:
        runner.say('wrote %s' % path)
    for folder, why in left_out:
        runner.say('left out %s: %s; %s' % (folder, why, LEFT_OUT))
        runner.failed.append(folder)
    if runner.failed:
        runner.say('%d run(s) failed: %s' % (len(runner.failed), '; '.join(runner.failed)))
        return EXIT_FAILED
    return 0


# ---------------------------------------------------------------------------
# On a Slurm cluster.

class SlurmTask(object):
    """One planned run as a task of a Slurm job array: what the local executor does
    for it (skip it, resume it or start train.py in ``ROOT/<row>/seed<k>``), with
    Slurm's stop signals passed on to train.py (:class:`slurm.ForwardSignals`). A
    run stopped by them requeues its job, whose next start resumes it. submitit
    pickles this object into the job."""

    def __init__(self, root, common, threads, total):
        self.root, self.common, self.threads, self.total = root, common, threads, total

    def __call__(self, step, seed, slug):
        row = next(r for r in methods.TABLE1 if r.slug == slug)
        runner = Runner(self.root, self.common, threads=self.threads)
        with slurm.ForwardSignals(lambda: runner.process) as signals:
            state = runner.run_one(step, self.total, seed, row)
        if state == 'interrupted' and signals.received:
            runner.say(slurm.requeue_this_job())
            sys.exit(EXIT_INTERRUPTED)  # no result for submitit: the job is not over
        if state not in ('finished', 'diverged'):
            raise RuntimeError('seed %d %s: %s; see %s' % (
                seed, slug, state, os.path.join(self.root, slug, 'seed%d' % seed,
                                                run_states.OUTPUT_FILE)))
        return state


def submit_slurm(root, steps, common, opts):
    """``run --executor slurm``: submit the runs of ``steps`` still to do as one job
    array (finished and diverged runs are skipped, runs whose job is still in the
    queue too); print how to watch them. Returns the exit status (1 when a folder
    holds a run with other arguments: that run is not submitted)."""
    root = os.path.abspath(root)
    say = Runner(root, common).say
    old = {}
    if os.path.isfile(os.path.join(root, run_states.PLAN_FILE)):
        old = {e['folder']: e.get('job') for e in run_states.read_plan(root)['runs']}
    queued = slurm.queue_states([j for j in old.values() if j]) or {}
    todo, failed = [], []
    for i, (seed, row) in enumerate(steps):
        folder = run_states.run_folder(row.slug, seed)
        out = os.path.join(root, folder)
        name = '%d/%d seed %d %s' % (i + 1, len(steps), seed, row.slug)
        if old.get(folder) in queued:
            say('%s: already in the queue as job %s (%s)' % (name, old[folder],
                                                             queued[old[folder]]))
            continue
        if os.path.exists(os.path.join(out, 'args.json')):
            mismatch = config_mismatch(records.load_run(out).args,
                                       run_argv(row, seed, common, out))
            if mismatch:
                say('%s: FAILED: %s holds a run with other arguments (%s); use another '
                    '--out, or delete that folder to rerun it' % (name, out, mismatch))
                failed.append(name)
                continue
            run = records.load_run(out)
            if run.status in ('finished', 'diverged'):
                say('%s: skipped, already %s (%s)' % (name, run.status, outcome(run)))
                continue
        todo.append((i + 1, seed, row.slug))
    jobs = {}
    if todo:
        task = SlurmTask(root, common, opts.threads or opts.cpus_per_run, len(steps))
        ids = slurm.submit_array(
            os.path.join(root, run_states.SLURM_FOLDER), task, todo, partition=opts.partition,
            time=opts.time, gpus=opts.gpus_per_run, cpus=opts.cpus_per_run, mem=opts.mem,
            account=opts.account, sbatch=opts.sbatch, signal_before=opts.signal_before,
            parallel=opts.jobs)
        jobs = {run_states.run_folder(slug, seed): job for (_, seed, slug), job in zip(todo, ids)}
        array = ids[0].split('_')[0]
        say('submitted %d run(s) as Slurm job%s %s (%s); watch them with: python -m '
            'chainer_vfbn.table status %s (or squeue -j %s); when all are done, write '
            'the table with: python -m chainer_vfbn.table report %s'
            % (len(ids), ' array' if '_' in ids[0] else '', array,
               ', '.join('%s %s' % (j, f) for f, j in jobs.items()),
               root, array, root))
    else:
        say('nothing to submit')
    run_states.write_plan(root, steps, 'slurm', jobs)
    return EXIT_FAILED if failed else 0


def build_parser():
    p = run_folders.ArgumentParser(
        prog='python -m chainer_vfbn.table',
        description='Run the rows of the paper\'s Table 1 and report them (table.md '
                    'and Figure 3).')
    sub = p.add_subparsers(dest='command', required=True)
    r = sub.add_parser('run', help='train the rows one after another (resumable), '
                                   'then report; train.py arguments may follow --',
                       epilog='Arguments after -- go to every train.py run, e.g. '
                              '-- --train-images 5000 --iterations 250 --eval-every 50. '
                              'Run the same command again to resume.')
    r.add_argument('--out', required=True, metavar='ROOT',
                   help='runs go to ROOT/<row>/seed<k>')
    r.add_argument('--dataset', choices=('cifar10', 'fashion-mnist'), default=None,
                   help="train.py's --dataset (default: train.py's, cifar10)")
    r.add_argument('--depth', type=int, default=None,
                   help="residual units per block (default: train.py's, 18)")
    r.add_argument('--seeds', type=int, nargs='+', default=[0], metavar='SEED',
                   help='train.py --seed of each run (default: 0)')
    r.add_argument('--claim-seeds', type=int, nargs='+', default=None, metavar='SEED',
                   help='seeds of the rows that decide the claim (%s), run first '
                        '(default: --seeds)' % ', '.join(methods.CLAIM))
    slugs = [row.slug for row in methods.TABLE1]
    r.add_argument('--rows', nargs='+', choices=slugs, default=None, metavar='ROW',
                   help='run only these rows (default: all seven): %s' % ', '.join(slugs))
    r.add_argument('--jobs', type=placement.positive_int, default=None, metavar='N',
                   help='train up to N runs at once, each a separate process with '
                        'CPUs / N BLAS threads (default: 1, or one per --gpus GPU); '
                        'with --executor slurm: at most N jobs of the array at once')
    r.add_argument('--threads', type=placement.positive_int, default=None, metavar='N',
                   help='BLAS threads of each run (default: CPUs / --jobs; on Slurm, '
                        '--cpus-per-run, else the CPUs of the job)')
    placement.add_options(r)
    rep = sub.add_parser('report', help='write ROOT/table.md and ROOT/figure3_*')
    rep.add_argument('root', metavar='ROOT')
    st = sub.add_parser('status', help='one line per planned run: not started, queued, '
                                       'running, finished, diverged, interrupted, failed')
    st.add_argument('root', metavar='ROOT')
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = []
    if '--' in argv:
        extra = argv[argv.index('--') + 1:]
        argv = argv[:argv.index('--')]
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == 'status':
        try:
            print('\n'.join(run_states.status_lines(args.root)))
        except run_folders.UsageError as e:
            print('%s: error: %s' % (parser.prog, e), file=sys.stderr)
            return EXIT_BAD_INPUT
        return 0
    if args.command == 'report':
        if extra:
            parser.error('report takes no train.py arguments')
        if not run_folders.find_run_dirs(args.root):
            print('%s: error: no run folders (with args.json) under %s'
                  % (parser.prog, args.root), file=sys.stderr)
            return EXIT_BAD_INPUT
        paths, left_out = report.write_report(args.root)
        for path in paths:
            print(path)
        for folder, why in left_out:
            print('%s: error: left out %s: %s; %s' % (parser.prog, folder, why, LEFT_OUT),
                  file=sys.stderr)
        return EXIT_FAILED if left_out else 0

    def bad_train_arguments(message):
        print('%s: error: train.py arguments after --: %s (train.py --help lists them)'
              % (parser.prog, message), file=sys.stderr)
        return EXIT_BAD_INPUT
    taken = [a for a in extra if a.split('=')[0] in RUNNER_OPTIONS]
    if taken:
        return bad_train_arguments('%s: the run command sets these itself' % ', '.join(taken))
    common = []
    if args.dataset:
        common += ['--dataset', args.dataset]
    if args.depth is not None:
        common += ['--depth', str(args.depth)]
    common += extra
    try:  # check the train.py arguments now, not after hours of training
        arguments.parse_args(run_argv(methods.TABLE1[0], 0, common, args.out), check_out=False,
                             raising=True)
    except run_folders.UsageError as e:
        return bad_train_arguments(e)
    if args.jobs is None and args.executor == 'local':
        args.jobs = len(args.gpus) if args.gpus else 1
    problem = placement.check(args, extra)
    if problem:
        parser.error(problem)
    if args.executor == 'slurm':
        try:
            slurm.check_available()
            return submit_slurm(args.out, plan(args.seeds, args.rows, args.claim_seeds),
                                common, args)
        except run_folders.UsageError as e:
            print('%s: error: %s' % (parser.prog, e), file=sys.stderr)
            return EXIT_BAD_INPUT
    devices = [['--gpu', str(g)] for g in args.gpus] if args.gpus else None
    return run_table(args.out, args.seeds, args.rows, common, args.jobs, args.claim_seeds,
                     devices, args.threads)


if __name__ == '__main__':
    sys.exit(main())
