"""``python -m chainer_vfbn.table``: train the rows of the paper's Table 1, several
at a time and resumably, then report them (:mod:`chainer_vfbn.report`).

Command line::

    python -m chainer_vfbn.table run --out ROOT [--dataset D] [--depth N]
        [--seeds 0 1 ...] [--claim-seeds 0 1 2 ...] [--rows bp vfbn-1e-3 ...]
        [--jobs N] [-- extra train.py arguments]
    python -m chainer_vfbn.table report ROOT

``run`` trains each seed's run of each row in ``ROOT/<slug>/seed<k>``, up to N at a
time, each a ``train.py`` process with CPUs / N BLAS threads, then writes
``ROOT/table.md`` and ``ROOT/figure3_{error,fidelity}.{png,pdf}`` (``report`` writes
only those). It is resumable: rerun the same command and finished or diverged runs
are skipped, and a run with a trainer snapshot but no result.json is resumed from its
latest snapshot.
"""
import argparse
import concurrent.futures
import os
import shlex
import subprocess
import sys
import threading
import time

from chainer_vfbn import arguments, machine, methods, records, report
from chainer_vfbn import runs as run_folders

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
        self._lock = threading.Lock()

    def say(self, text):
        with self._lock:
            print('[table %s] %s' % (_duration(time.time() - self.start), text), flush=True)

    def run_one(self, step, total, seed, row):
        """Train (or skip, or resume) one run; returns its final status."""
        out = os.path.join(self.root, row.slug, 'seed%d' % seed)
        argv = run_argv(row, seed, self.common, out) + ['--threads', str(self.threads)]
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
        code = self._train(argv, out)
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

    def _train(self, argv, out):
        """Run train.py, appending its output to train_output.txt (and echoing it
        with one job). A Ctrl-C reaches train.py too (same process group): it saves
        a snapshot and exits, and its exit status says so."""
        os.makedirs(out, exist_ok=True)
        cmd = [self.python, self.train_py] + argv
        env = dict(os.environ, PYTHONUNBUFFERED='1')
        for name in THREAD_VARIABLES:
            env[name] = str(self.threads)
        echo = self.jobs == 1
        with open(os.path.join(out, 'train_output.txt'), 'a') as log:
            log.write('$ %s\n' % ' '.join(shlex.quote(a) for a in cmd))
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, env=env)
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


def run_table(root, seeds, slugs, common, jobs=1, claim_seeds=None):
    """The ``run`` command: train the plan, ``jobs`` runs at a time, then write the
    report. Returns the exit status: 0, 1 when a run failed for a reason other than
    divergence, 130 when interrupted."""
    steps = plan(seeds, slugs, claim_seeds)
    runner = Runner(root, common, jobs)
    runner.say('%d runs (%s) into %s, %d at a time with %d BLAS thread(s) each; '
               'train.py arguments shared by all: %s'
               % (len(steps), ', '.join('seed %d %s' % (s, r.slug) for s, r in steps),
                  root, jobs, runner.threads, ' '.join(common) or '(none)'))
    stop = threading.Event()

    def work(i, seed, row):
        if stop.is_set():
            return 'interrupted'
        try:
            status = runner.run_one(i + 1, len(steps), seed, row)
        except records.RunError as e:  # a broken run folder: say so, go on
            runner.say('%d/%d seed %d %s: FAILED: %s' % (i + 1, len(steps), seed, row.slug, e))
            runner.failed.append(row.slug)
            return 'failed'
        if status == 'interrupted':
            stop.set()
        return status

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


def positive_int(text):
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError('expected an integer >= 1, got %r' % text)
    return n


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
    r.add_argument('--jobs', type=positive_int, default=1, metavar='N',
                   help='train up to N runs at once, each a separate process with '
                        'CPUs / N BLAS threads (default: 1)')
    rep = sub.add_parser('report', help='write ROOT/table.md and ROOT/figure3_*')
    rep.add_argument('root', metavar='ROOT')
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = []
    if '--' in argv:
        extra = argv[argv.index('--') + 1:]
        argv = argv[:argv.index('--')]
    parser = build_parser()
    args = parser.parse_args(argv)
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
    return run_table(args.out, args.seeds, args.rows, common, args.jobs, args.claim_seeds)


if __name__ == '__main__':
    sys.exit(main())
