"""``table.md``: the rows of the paper's Table 1 from ``train.py`` run folders.

:func:`results_table` puts one line per Table 1 row in the paper's order
(:data:`chainer_vfbn.methods.TABLE1`): the paper's CIFAR-10 test error next to ours
(the final errors of ``result.json``, mean and sample standard deviation over seeds),
the seeds, and the exact ``train.py`` command. Facts shared by every row (dataset,
depth, budget, test set, machine, versions) go in a paragraph above the table; facts
that differ get their own columns. Below it, the paired differences of the rows that
decide the claim (:data:`PAIRED`): runs of one seed share the initial weights and the
order of the batches, so their difference is far less noisy than either number.
"""
import argparse
import math
import os
import shlex
import statistics

from chainer_vfbn import arguments, curves, methods, model, records
from chainer_vfbn import runs as run_folders


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
    for action in arguments.build_parser()._actions:
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
    """A row's runs split by configuration (:attr:`chainer_vfbn.records.Run.config`): the seeds
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
    own = set(records.PER_RUN_KEYS) - {'seed'} | {'method', 'alpha_gs'}
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


def results_table(run_dirs, left_out=()):
    """Markdown: Table 1 rows in the paper's order with the paper's CIFAR-10 error,
    ours, the seeds and the exact command; shared facts in a paragraph above. A row
    run in several configurations gets one line for each.

    ``run_dirs`` are train.py output folders or their :class:`~chainer_vfbn.records.Run`
    (raises :class:`~chainer_vfbn.records.RunError` for a folder without args.json).
    Runs of methods outside Table 1 are listed below it; ``left_out``, ``[(folder,
    why)]`` of folders that could not be read, below that.
    """
    runs = [d if isinstance(d, records.Run) else records.load_run(d) for d in run_dirs]
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
    if left_out:
        lines += ['', 'Left out, unreadable: ' + '; '.join('%s (%s)' % (folder, why)
                                                          for folder, why in left_out) + '.']
    return '\n'.join(lines) + '\n'


def write_report(root, run_dirs=None):
    """``ROOT/table.md`` (atomically: the old table is replaced whole or not at all)
    and ``ROOT/figure3_{error,fidelity}.{png,pdf}``. A folder that cannot be read
    (a garbage result.json) is left out and marked in the table. Returns ``(paths
    written, [(folder left out, why)])``. Runs without a log yet are left out of the
    figures."""
    run_dirs = run_folders.find_run_dirs(root) if run_dirs is None else run_dirs
    runs, left_out = [], []
    for folder in run_dirs:
        try:
            runs.append(records.load_run(folder))
        except records.RunError as e:
            left_out.append((folder, str(e)))
    path = os.path.join(root, 'table.md')
    run_folders.write_text(path, results_table(runs, left_out))
    plotted = [r for r in runs if r.log or r.status == 'diverged']
    return [path] + curves.plot_all(plotted, os.path.join(root, 'figure3')), left_out
