"""Table 1 of the paper from run folders, and the one command that runs it.

:func:`results_table` turns ``train.py`` run folders into a markdown table with one
line per Table 1 row in the paper's order (:data:`chainer_vfbn.methods.TABLE1`): the
paper's CIFAR-10 test error next to ours (the final test error of ``result.json``,
mean and sample standard deviation over seeds), and the exact ``train.py`` command.
Facts shared by every row (dataset, depth, budget, test set, machine, versions) go in
a paragraph above the table; facts that differ get their own columns.

Command line::

    python -m chainer_vfbn.table run --out ROOT [--dataset D] [--depth N]
        [--seeds 0 1 ...] [--rows bp vfbn-1e-3 ...] [-- extra train.py arguments]
    python -m chainer_vfbn.table report ROOT

``run`` trains the rows one after another, each seed's run in ``ROOT/<slug>/seed<k>``,
then writes ``ROOT/table.md`` and ``ROOT/figure3_{error,fidelity}.{png,pdf}``
(``report`` writes only those). It is resumable: rerun the same command and finished
or diverged runs are skipped, and a run with a trainer snapshot but no result.json is
resumed from its latest snapshot.
"""
import argparse
import concurrent.futures
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time

from chainer_vfbn import curves, methods, model, training
from chainer_vfbn import runs as run_folders

TRAIN_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        'train.py')
#: train.py arguments that ``run`` sets itself for every run.
RUNNER_OPTIONS = ('--out', '-o', '--seed', '--method', '--synth', '--alpha-gs',
                  '--resume', '-r', '--threads', '--overwrite')
#: Environment variables that size the thread pools of BLAS and OpenMP.
THREAD_VARIABLES = ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS')

EXIT_FAILED = 1
EXIT_BAD_INPUT = run_folders.EXIT_BAD_INPUT
EXIT_INTERRUPTED = run_folders.EXIT_INTERRUPTED


# ---------------------------------------------------------------------------
# The table.

def format_number(value):
    """A number as train.py's command line takes it: 12.0 -> '12', 0.001 -> '0.001'."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def train_command(args, row):
    """The ``train.py`` command of a run: the row's arguments (``methods.row_argv``),
    then every other argument whose value differs from train.py's default, and
    ``--seed S`` (the seeds are listed beside the command). ``--out`` is left out."""
    argv = ['python', 'train.py'] + methods.row_argv(row)
    for action in training.build_parser()._actions:
        dest = action.dest
        if dest in ('help', 'method', 'synth', 'alpha_gs', 'seed', 'out', 'resume', 'progress',
                    'threads', 'overwrite', 'progress_every') or dest not in args:
            continue
        value = args[dest]
        if value == action.default:
            continue
        option = max(action.option_strings, key=len)
        if isinstance(action, argparse._StoreConstAction):  # store_true / store_false
            argv.append(option)
        elif isinstance(value, list):  # nargs='+'
            argv += [option] + [format_number(v) for v in value]
        else:
            argv += [option, format_number(value)]
    return ' '.join(shlex.quote(a) for a in argv) + ' --seed S'


def budget(args, train_images):
    """Training length, batch size and training set, as the run was given them."""
    if args.get('iterations'):
        length = '{:,} iterations'.format(args['iterations'])
    else:
        length = '%s epochs of the 36x set' % format_number(args['epoch'])
    return '%s of batch %d on %s training images x 36 views' % (
        length, args['batchsize'], '{:,}'.format(train_images))


def machine(args):
    m = args.get('machine', {})
    if m.get('gpu'):
        return 'GPU %s (%s)' % (m['gpu'], m.get('device'))
    threads = args.get('threads')
    return 'CPU %s, %s cores (%s)%s' % (
        m.get('cpu') or m.get('processor', '?'), m.get('cpus', '?'),
        m.get('device', '@numpy'),
        ', %d BLAS thread%s per run' % (threads, 's' if threads > 1 else '') if threads else '')


def test_error_fact(args):
    """Which views and test images the final errors of result.json use."""
    def count(n):
        return '{:,}'.format(n) if n else 'all'
    n = args.get('test_images')
    if args.get('tta_images'):
        return ('36-view averaged on the first %s test images; centre view on %s'
                % (count(args['tta_images']), count(n)))
    if args.get('eval_views', 36) == 36:
        return '36-view averaged, on %s test images' % count(n)
    return 'centre view only, on %s test images' % count(n)


def versions(args):
    v = args.get('versions', {})
    return ', '.join('%s %s' % (k, v[k]) for k in sorted(v))


#: The facts about a run that Table 1 must state, in the order they are printed.
FACTS = (
    ('dataset', lambda r: curves.DATASET_NAMES.get(r.args['dataset'], r.args['dataset'])),
    ('network', lambda r: '%s, split %s' % (
        curves.network_name(r.args['depth']), model.split_name(r.args['depth'],
                                                               r.args.get('split')))),
    ('budget', lambda r: budget(r.args, r.train_images)),
    ('test error', lambda r: test_error_fact(r.args)),
    ('machine', lambda r: machine(r.args)),
    ('versions', lambda r: versions(r.args)),
)


def error_text(runs, key='test_error'):
    """Our test error (%) of one row (result.json's ``key``): 'mean ± std (n seeds)'
    over the finished runs (sample standard deviation), 'diverged at iteration N' for
    diverged runs, never NaN; 'not run' without runs."""
    if not runs:
        return 'not run'
    finished = [r for r in runs if r.status == 'finished']
    if finished and not any(key in r.result for r in finished):
        return '-'  # an older result.json, without this error
    errors = [100.0 * r.result.get(key, float('nan')) for r in finished]
    diverged = [r for r in runs if r.status == 'diverged']
    unfinished = [r for r in runs if r.status == 'unfinished']
    parts = []
    if not all(math.isfinite(e) for e in errors):
        parts.append('result.json without a finite test error: %s'
                     % ', '.join(r.path for r, e in zip(finished, errors)
                                 if not math.isfinite(e)))
        errors = [e for e in errors if math.isfinite(e)]
    if len(errors) > 1:
        parts.append('%.2f ± %.2f (%d seeds)' % (statistics.mean(errors),
                                                 statistics.stdev(errors), len(errors)))
    elif errors:
        parts.append('%.2f (1 seed)' % errors[0])
    if diverged:
        at = ', '.join(str(r.last_iteration) for r in diverged)
        if len(diverged) < len(runs):
            parts.append('%d of %d seeds diverged at iteration %s'
                         % (len(diverged), len(runs), at))
        else:
            parts.append('diverged at iteration%s %s' % ('s' if len(diverged) > 1 else '', at))
    if unfinished:
        parts.append('%d unfinished (last logged iteration %s)'
                     % (len(unfinished), ', '.join(str(r.last_iteration) for r in unfinished)))
    return '; '.join(parts)


def experiments(runs):
    """A row's runs split by configuration (:attr:`curves.Run.config`): the seeds
    of one experiment together, so that no mean mixes two settings. A row without
    runs gives one empty experiment (its line says 'not run')."""
    groups = {}
    for r in runs:
        groups.setdefault(r.config, []).append(r)
    return [groups[c] for c in sorted(groups)] or [[]]


#: The comparisons that decide the paper's claim, (row, against), as folder names.
PAIRED = (('vfbn-1e-3', 'bp'), ('vfbn-1e-3', 'jaderberg-linear'))

#: Student's t, 97.5% quantile, by degrees of freedom (two-sided 95% intervals);
#: from the standard table (e.g. NIST/SEMATECH e-Handbook, table 1.3.6.7.2).
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365,
         8: 2.306, 9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145,
         15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086}


def paired_interval(differences):
    """``(mean, half_width)`` of the 95% Student's t interval of the mean of paired
    differences; half_width is None for fewer than two pairs."""
    n = len(differences)
    mean = statistics.mean(differences)
    if n < 2:
        return mean, None
    t = T_975.get(n - 1, 1.96 if n > 21 else None)
    if t is None:
        raise ValueError('no t quantile for %d degrees of freedom' % (n - 1))
    return mean, t * statistics.stdev(differences) / math.sqrt(n)


def _pairing_key(run):
    """What must match for two runs of different rows to be a pair: the seed and
    every setting but the method's own."""
    own = set(curves.PER_RUN_KEYS) - {'seed'} | {'method', 'alpha_gs'}
    return tuple(sorted((k, repr(v)) for k, v in run.args.items() if k not in own))


def paired_lines(present):
    """Markdown: for each comparison of :data:`PAIRED`, the mean over seeds of
    (row's error - other row's error) in percentage points with its 95% t interval,
    for both final errors; finished runs of one seed and one setting are paired."""
    def text(diffs):
        mean, half = paired_interval(diffs)
        if half is None:
            return '%+.2f (one pair: no interval)' % mean
        return '%+.2f [%+.2f, %+.2f]' % (mean, mean - half, mean + half)

    finished = [r for r in present if r.status == 'finished']
    by_slug = {}
    for r in finished:
        by_slug.setdefault(r.row.slug, {})[_pairing_key(r)] = r
    rows = []
    for a, b in PAIRED:
        keys = sorted(set(by_slug.get(a, {})) & set(by_slug.get(b, {})))
        if not keys:
            continue
        pairs = [(by_slug[a][k], by_slug[b][k]) for k in keys]
        cells = ['%s − %s' % (methods.row_by_slug(a).label, methods.row_by_slug(b).label),
                 '%d (%s)' % (len(pairs), ', '.join(str(x.args['seed']) for x, _ in pairs))]
        for key in ('test_error_single', 'test_error'):
            diffs = [100.0 * (x.result[key] - y.result[key]) for x, y in pairs
                     if key in x.result and key in y.result]
            cells.append(text(diffs) if diffs else '-')
        rows.append('| ' + ' | '.join(cells) + ' |')
    if not rows:
        return []
    return ['', '## Paired differences', '',
            'Runs of two rows with the same seed share the initial weights of the network '
            'and the order of the batches, so the difference of their errors is far less '
            'noisy than either error. Mean over seeds of (first row − second row), in '
            'percentage points, with its 95% Student\'s t interval (n − 1 degrees of '
            'freedom); a negative value means the first row has the lower error. An '
            'interval that contains 0 does not tell the two rows apart.', '',
            '| comparison | pairs (seeds) | centre-view error, pp | final error (as in '
            '"ours %"), pp |', '|---|---|---|---|'] + rows


def seeds_text(runs):
    return ', '.join(str(s) for s in sorted({r.args.get('seed') for r in runs})) or '-'


def results_table(run_dirs):
    """Markdown: Table 1 rows in the paper's order with the paper's CIFAR-10 error,
    ours, the seeds and the exact command; shared facts in a paragraph above. A row
    run in several configurations gets one line for each.

    ``run_dirs`` are train.py output folders (raises :class:`curves.RunError` for a
    folder without args.json). Runs of methods outside Table 1 are listed below it.
    """
    runs = [curves.load_run(d) for d in run_dirs]
    others = [r for r in runs if r.row is None]
    present = [r for r in runs if r.row is not None]

    shared, varying = [], []
    for name, get in FACTS:
        values = {get(r) for r in present}
        (shared if len(values) == 1 else varying).append((name, get))

    lines = ['# Table 1, reproduced', '',
             'Test error (%) of each Table 1 row of Miyato et al. (2017): the paper\'s '
             '(CIFAR-10, ResNet-110 split in two 55-layer halves, 12 epochs of the 36x '
             'augmented set) and ours, the final test error of each run '
             '(`result.json`: "ours %" is `test_error`, the paper\'s 36-view averaged '
             'error, and "ours, centre view %" is `test_error_single`, the centre view '
             'alone), as mean ± sample standard deviation over seeds.', '']
    if present:
        lines += ['Every row below: ' + '; '.join(
            '**%s** %s' % (name, get(present[0])) for name, get in shared) + '.', '']
    lines.append('In each command, S is one of the row\'s seeds; `--out` is left out.')
    lines.append('')
    header = ['Table 1 row', 'paper (CIFAR-10) %', 'ours %', 'ours, centre view %',
              'seeds'] + [name for name, _ in varying] + ['command']
    lines.append('| ' + ' | '.join(header) + ' |')
    lines.append('|' + '|'.join('---' for _ in header) + '|')
    for row in methods.TABLE1:
        for group in experiments([r for r in present if r.row == row]):
            cells = [row.label, '%.2f' % row.paper_error, error_text(group),
                     error_text(group, 'test_error_single'), seeds_text(group)]
            for _, get in varying:
                cells.append('<br>'.join(sorted({get(r) for r in group})) or '-')
            commands = sorted({train_command(r.args, row) for r in group})
            cells.append('<br>'.join('`%s`' % c for c in commands) or '-')
            lines.append('| ' + ' | '.join(c.replace('|', '\\|') for c in cells) + ' |')
    lines += paired_lines(present)
    if others:
        lines += ['', 'Runs of methods outside Table 1 (not in the table): ' + ', '.join(
            '%s (%s)' % (r.path, r.label) for r in others) + '.']
    return '\n'.join(lines) + '\n'


def write_report(root, run_dirs=None):
    """``ROOT/table.md`` and ``ROOT/figure3_{error,fidelity}.{png,pdf}``; returns the
    paths written. Runs without a log yet are left out of the figures."""
    run_dirs = run_folders.find_run_dirs(root) if run_dirs is None else run_dirs
    path = os.path.join(root, 'table.md')
    with open(path, 'w') as f:
        f.write(results_table(run_dirs))
    runs = [curves.load_run(d) for d in run_dirs]
    plotted = [r for r in runs if r.log or r.status == 'diverged']
    return [path] + curves.plot_all(plotted, os.path.join(root, 'figure3'))


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
    planned = vars(training.parse_args(argv, check_out=False))
    defaults = vars(training.build_parser().parse_args([]))
    diffs = ['%s %r there, %r now' % (k, recorded.get(k, defaults.get(k)), v)
             for k, v in sorted(planned.items())
             if k not in curves.PER_RUN_KEYS and recorded.get(k, defaults.get(k)) != v]
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
        self.threads = threads or max(1, training.default_threads() // jobs)
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
            mismatch = config_mismatch(curves.load_run(out).args, argv)
            if mismatch:
                self.say('%s: FAILED: %s holds a run with other arguments (%s); use '
                         'another --out, or delete that folder to rerun it'
                         % (name, out, mismatch))
                self.failed.append(name)
                return 'failed'
            run = curves.load_run(out)
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
        run = curves.load_run(out) if os.path.exists(args_file) else None
        status = run.status if run else 'unfinished'
        if code == 0 and status == 'finished' or \
                code == training.EXIT_DIVERGED and status == 'diverged':
            self.say('%s: %s in %s: %s' % (name, status, _duration(time.time() - began),
                                           outcome(run)))
            return status
        if code == training.EXIT_INTERRUPTED or code < 0:
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
        status = runner.run_one(i + 1, len(steps), seed, row)
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
    for path in write_report(root):
        runner.say('wrote %s' % path)
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
    p = argparse.ArgumentParser(
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
        for path in write_report(args.root):
            print(path)
        return 0

    taken = [a for a in extra if a.split('=')[0] in RUNNER_OPTIONS]
    if taken:
        parser.error('%s: the run command sets these itself' % ', '.join(taken))
    common = []
    if args.dataset:
        common += ['--dataset', args.dataset]
    if args.depth is not None:
        common += ['--depth', str(args.depth)]
    common += extra
    try:  # check the train.py arguments now, not after hours of training
        training.parse_args(run_argv(methods.TABLE1[0], 0, common, args.out), check_out=False)
    except training.UsageError as e:
        parser.error('train.py arguments: %s' % e)
    return run_table(args.out, args.seeds, args.rows, common, args.jobs, args.claim_seeds)


if __name__ == '__main__':
    sys.exit(main())
