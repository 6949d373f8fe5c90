"""Tests of the evidence tools: Table 1 (:mod:`chainer_vfbn.table`) and Figure 3
(:mod:`chainer_vfbn.curves`, ``plot_curves.py``).

The table and the plots are checked on small run folders written here by hand, in the
format ``train.py`` writes (``args.json``, ``log``, ``result.json``; see
``chainer_vfbn/training.py``): two seeds of BackProp, a diverged Jaderberg run, and a
few others. The ``run`` command is checked for real on two rows at depth 1 with the
generated CIFAR-10 archive of ``conftest.py``, two iterations each: a second ``run``
must retrain nothing, and a run whose result.json is gone resumes from its snapshot.
"""
import json
import math
import os
import re
import statistics
import shlex
import subprocess
import sys

import chainer_vfbn  # noqa: F401  (the NumPy-2 shim precedes `import chainer`)
import numpy
import pytest

from chainer_vfbn import arguments, curves, machine, methods, records, report, table
from conftest import run_main

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: The budget of the hand-written runs, as train.py arguments.
BUDGET = ['--dataset', 'fashion-mnist', '--depth', '2', '--train-images', '1000',
          '--test-images', '100', '--batchsize', '32', '--iterations', '100',
          '--eval-every', '25']
SYNTH_KEYS = ('synth/cosine', 'synth/rel_error')


def row(slug):
    return methods.row_by_slug(slug)


def write_run(folder, slug, seed, errors, diverged_at=None, extra=()):
    """A run folder as train.py leaves it: ``errors`` are the logged test errors
    (fractions) at iterations 25, 50, ...; with ``diverged_at`` the run stops there
    and its result.json says diverged, else the last error is the final one."""
    os.makedirs(folder)
    argv = methods.row_argv(row(slug)) + BUDGET + list(extra) + [
        '--seed', str(seed), '--out', str(folder)]
    args = dict(vars(arguments.parse_args(argv)),
                versions={'python': '3.11.7', 'chainer': '7.8.1', 'numpy': '2.4.6'},
                machine={'processor': 'x86_64', 'cpus': 2, 'device': '@numpy'})
    log = []
    for i, error in enumerate(errors):
        entry = {'epoch': 0, 'iteration': 25 * (i + 1), 'elapsed_time': 10.0 * (i + 1),
                 'main/loss': 1.0, 'validation/main/error': error,
                 'validation/main/views': 36.0}
        if args['method'] in methods.SYNTHESIZERS + ('layerwise',):
            entry.update({'synth/cosine': 0.1 * (i + 1), 'synth/rel_error': 1.0 - 0.05 * i})
        log.append(entry)
    if diverged_at is None:
        result = {'status': 'finished', 'test_error': errors[-1], 'iteration': 100,
                  'eval_views': 36, 'test_images': 100}
    else:
        result = {'status': 'diverged', 'iteration': diverged_at,
                  'message': '%s diverged at iteration %d: delta_hat became non-finite'
                             % (args['method'], diverged_at)}
    for name, content in (('args.json', args), ('log', log), ('result.json', result)):
        with open(os.path.join(str(folder), name), 'w') as f:
            json.dump(content, f)
    return str(folder)


@pytest.fixture
def runs(tmp_path):
    """Hand-written runs: {name: folder}."""
    return {
        'bp0': write_run(tmp_path / 'bp0', 'bp', 0, [0.5, 0.3, 0.25, 0.20]),
        'bp1': write_run(tmp_path / 'bp1', 'bp', 1, [0.6, 0.35, 0.3, 0.25]),
        'bottom': write_run(tmp_path / 'bottom', 'bottom', 0, [0.5, 0.4, 0.3, 0.27]),
        'linear': write_run(tmp_path / 'linear', 'jaderberg-linear', 0, [0.7, 0.6],
                            diverged_at=60),
        'vfbn': write_run(tmp_path / 'vfbn', 'vfbn-1e-3', 0, [0.5, 0.3, 0.26, 0.21]),
    }


def table_rows(markdown):
    """The table's body as lists of cells (the header and rule left out)."""
    table1 = markdown.split('## Paired differences')[0]
    lines = [l for l in table1.splitlines() if l.startswith('| ')]
    return [[c.strip() for c in l.strip('|').split(' | ')] for l in lines[1:]]


# ---------------------------------------------------------------------------
# Table 1.

def test_table_rows_in_paper_order_with_paper_numbers(runs):
    md = report.results_table(list(runs.values()))
    rows = table_rows(md)
    assert [r[0] for r in rows] == [r.label for r in methods.TABLE1]
    assert [float(r[1]) for r in rows] == [5.15, 5.76, 5.71, 20.45, 15.56, 5.73, 5.51]
    assert not re.search(r'\bnan\b', md, re.IGNORECASE)


def test_table_mean_std_diverged_not_run(runs):
    rows = {r[0]: r for r in table_rows(report.results_table(list(runs.values())))}
    bp_errors = numpy.array([20.0, 25.0])
    assert rows['BackProp'][2] == '%.2f ± %.2f (2 seeds)' % (bp_errors.mean(),
                                                             bp_errors.std(ddof=1))
    assert rows['BackProp'][4] == '0, 1'
    assert rows['VFBN (alpha_gs = 1e-3)'][2] == '21.00 (1 seed)'
    assert rows["Jaderberg's Linear"][2] == 'diverged at iteration 60'
    for label in ('Layer-wise supervised loss', "Jaderberg's small-ResNet",
                  'VFBN (alpha_gs = 0)'):
        assert rows[label][2] == 'not run'


def test_table_shared_facts_and_exact_commands(runs):
    md = report.results_table(list(runs.values()))
    header = next(l for l in md.splitlines() if l.startswith('Every row below'))
    for fact in ('Fashion-MNIST', 'ResNet-14', '100 iterations of batch 32',
                 '1,000 training images', '36-view', '100 test images', 'CPU x86_64',
                 'chainer 7.8.1'):
        assert fact in header
    rows = {r[0]: r for r in table_rows(md)}
    command = rows['VFBN (alpha_gs = 1e-3)'][-1].strip('`')
    argv = shlex.split(command)
    assert argv[:2] == ['python', 'train.py']
    assert argv[-2:] == ['--seed', 'S']
    # The command parses back to exactly the arguments the run recorded.
    rerun = vars(arguments.parse_args(argv[2:-1] + ['0', '--out', runs['vfbn']], check_out=False))
    with open(os.path.join(runs['vfbn'], 'args.json')) as f:
        recorded = json.load(f)
    assert {k: recorded[k] for k in rerun} == rerun


def test_table_gives_each_configuration_its_own_line(runs, tmp_path):
    other = write_run(tmp_path / 'bp_long', 'bp', 0, [0.4, 0.2, 0.1, 0.12],
                      extra=['--iterations', '200'])
    md = report.results_table(list(runs.values()) + [other])
    bp = [r for r in table_rows(md) if r[0] == 'BackProp']
    assert sorted(r[2] for r in bp) == ['12.00 (1 seed)', '22.50 ± 3.54 (2 seeds)']
    header = next(l for l in md.splitlines() if l.startswith('| '))
    assert '| budget |' in header  # no longer shared: a column of its own


def test_table_refuses_a_folder_without_args(tmp_path):
    with pytest.raises(records.RunError, match='no args.json'):
        report.results_table([str(tmp_path)])


def test_plan_runs_the_claim_first_for_each_seed():
    assert len({r.slug for r in methods.TABLE1}) == len(methods.TABLE1)
    steps = [(seed, r.slug) for seed, r in table.plan([0, 1])]
    order = ['bp', 'vfbn-1e-3', 'jaderberg-linear', 'bottom', 'layerwise',
             'jaderberg-resnet', 'vfbn-0']
    assert steps == [(0, s) for s in order] + [(1, s) for s in order]
    steps = [r.slug for _, r in table.plan([0], ['vfbn-0', 'bp'])]
    assert steps == ['bp', 'vfbn-0']


def test_claim_seeds_run_the_claim_rows_on_every_seed_first():
    steps = [(seed, r.slug) for seed, r in
             table.plan([0], ['bp', 'vfbn-1e-3', 'bottom'], claim_seeds=[0, 1, 2])]
    assert steps == [(0, 'bp'), (0, 'vfbn-1e-3'), (1, 'bp'), (1, 'vfbn-1e-3'),
                     (2, 'bp'), (2, 'vfbn-1e-3'), (0, 'bottom')]


# ---------------------------------------------------------------------------
# Paired differences.

def _t_coverage(q, df, steps=20000):
    """P(|T| <= q) for Student's t with ``df`` degrees of freedom, by Simpson's rule
    on the density (an oracle independent of the quantile table)."""
    c = math.exp(math.lgamma((df + 1) / 2.0) - math.lgamma(df / 2.0)) / math.sqrt(df * math.pi)
    h = q / steps
    f = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2.0) for i in range(steps + 1)]
    simpson = h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))
    return 2 * simpson


def test_t_quantiles_cover_95_percent():
    for df, q in report.T_975.items():
        assert abs(_t_coverage(q, df) - 0.95) < 2e-4, df


def test_paired_interval_is_the_t_interval_of_the_differences():
    mean, half = report.paired_interval([1.0, 2.0, 3.0, 4.0])
    sd = math.sqrt(((1.5 ** 2) * 2 + (0.5 ** 2) * 2) / 3)   # sample std of 1..4
    assert mean == 2.5
    assert abs(half - 3.182 * sd / 2) < 1e-12
    assert report.paired_interval([0.7]) == (0.7, None)


def test_table_pairs_runs_by_seed(tmp_path):
    """VFBN - BP over seeds 0, 1, 2 with known final errors; a BP run of seed 3 has
    no partner and is left out of the pairs."""
    def run(slug, seed, error, single):
        folder = write_run(tmp_path / ('%s%d' % (slug, seed)), slug, seed, [error])
        path = os.path.join(folder, 'result.json')
        with open(path) as f:
            result = json.load(f)
        result['test_error_single'] = single
        with open(path, 'w') as f:
            json.dump(result, f)
        return folder
    folders = [run('bp', 0, 0.20, 0.22), run('bp', 1, 0.30, 0.31), run('bp', 2, 0.25, 0.25),
               run('bp', 3, 0.90, 0.90),
               run('vfbn-1e-3', 0, 0.21, 0.23), run('vfbn-1e-3', 1, 0.33, 0.32),
               run('vfbn-1e-3', 2, 0.26, 0.27)]
    # A run from before --pipeline and --lag existed pairs with one that records them.
    path = os.path.join(folders[0], 'args.json')
    with open(path) as f:
        args = json.load(f)
    assert args.pop('pipeline') is False and args.pop('lag') == 0
    with open(path, 'w') as f:
        json.dump(args, f)
    md = report.results_table(folders)
    line = next(l for l in md.splitlines() if l.startswith('| VFBN (alpha_gs = 1e-3) − BackProp'))
    cells = [c.strip() for c in line.strip('|').split(' | ')]
    assert cells[1] == '3 (0, 1, 2)'
    for cell, diffs in ((cells[2], [1.0, 1.0, 2.0]), (cells[3], [1.0, 3.0, 1.0])):
        m = statistics.mean(diffs)
        half = 4.303 * statistics.stdev(diffs) / math.sqrt(3)
        assert cell == '%+.2f [%+.2f, %+.2f]' % (m, m - half, m + half)
    assert "Jaderberg's Linear" not in md.split('## Paired differences')[1]  # no such runs


# ---------------------------------------------------------------------------
# Figure 3.

def curves_of(ax):
    """``{legend label: (xs, ys)}`` of the labelled lines of an axes."""
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
            for line in ax.lines if not line.get_label().startswith('_')}


def test_plot_draws_each_row_mean_over_seeds_and_writes_png_and_pdf(runs, tmp_path):
    """Figure 3 draws, for each row run, the mean over seeds of its logged test
    errors (%) at the epochs of its iterations, a diverged run's last point marked
    with an x; the fidelity figure the logged cosines. Both are written as a PNG of
    the figure's size at 150 dpi and a PDF page of it."""
    from PIL import Image
    loaded = [records.load_run(p) for p in runs.values()]
    epochs = [25 * k * 32 / (1000 * 36.0) for k in (1, 2, 3, 4)]  # iteration x batch / set
    lines = curves_of(curves.error_figure(loaded).axes[0])
    assert sorted(lines) == ['BackProp (2 seeds, min-max band)', 'Bottom half with back prop',
                             "Jaderberg's Linear - DIVERGED at iteration 60",
                             'VFBN (alpha_gs = 1e-3)']
    for label, errors in (('BackProp (2 seeds, min-max band)', [55.0, 32.5, 27.5, 22.5]),
                          ('Bottom half with back prop', [50.0, 40.0, 30.0, 27.0]),
                          ("Jaderberg's Linear - DIVERGED at iteration 60", [70.0, 60.0]),
                          ('VFBN (alpha_gs = 1e-3)', [50.0, 30.0, 26.0, 21.0])):
        xs, ys = lines[label]
        assert xs == pytest.approx(epochs[:len(errors)]) and ys == pytest.approx(errors), label
    crosses = [l for l in curves.error_figure(loaded).axes[0].lines if l.get_marker() == 'x']
    assert [(list(l.get_xdata()), list(l.get_ydata())) for l in crosses] == \
        [(pytest.approx([epochs[1]]), pytest.approx([60.0]))]
    cosine = curves_of(curves.fidelity_figure(loaded).axes[0])
    assert cosine['VFBN (alpha_gs = 1e-3)'] == (pytest.approx(epochs),
                                                pytest.approx([0.1, 0.2, 0.3, 0.4]))
    assert 'BackProp (2 seeds, min-max band)' not in cosine  # no synthetic gradient to compare

    prefix = str(tmp_path / 'figs' / 'fig3')
    assert curves.main(list(runs.values()) + ['--out', prefix]) == 0
    assert curves.main(list(runs.values()) + ['--out', prefix + 'x', '--x', 'examples']) == 0
    for name, inches in (('error', (8.5, 5.5)), ('fidelity', (8.5, 7.5))):
        with Image.open('%s_%s.png' % (prefix, name)) as png:
            assert png.size == (round(150 * inches[0]), round(150 * inches[1]))
            assert len(png.getcolors(1 << 20)) > 50  # drawn, not blank
        with open('%s_%s.pdf' % (prefix, name), 'rb') as f:
            pdf = f.read()
        assert pdf.startswith(b'%PDF-')
        assert b'/MediaBox [ 0 0 %d %d ]' % (72 * inches[0], 72 * inches[1]) in pdf


def test_plot_curves_groups_seeds_and_marks_divergence(runs):
    loaded = [records.load_run(p) for p in runs.values()]
    groups = dict(curves.group_runs(loaded))
    assert list(groups) == ['BackProp', 'Bottom half with back prop', "Jaderberg's Linear",
                            'VFBN (alpha_gs = 1e-3)']
    assert len(groups['BackProp']) == 2
    xs, mean, lo, hi = curves.aggregate(
        [r.series('validation/main/error', 'epoch') for r in groups['BackProp']])
    assert xs[-1] == pytest.approx(100 * 32 / (1000 * 36.0))
    assert (mean[-1], lo[-1], hi[-1]) == (pytest.approx(0.225), 0.20, 0.25)
    label = curves.legend_label("Jaderberg's Linear", groups["Jaderberg's Linear"])
    assert 'DIVERGED at iteration 60' in label


def test_plot_curves_exits_2_without_a_log(runs, tmp_path):
    no_log = tmp_path / 'no_log'
    no_log.mkdir()
    with open(os.path.join(runs['bp0'], 'args.json')) as f:
        (no_log / 'args.json').write_text(f.read())
    empty = tmp_path / 'empty'
    empty.mkdir()
    for folder, says in ((no_log, 'has no log'), (empty, 'no args.json')):
        proc = run_main('plot_curves.py', runs['bp0'], folder, '--out', tmp_path / 'x')
        assert proc.returncode == 2, proc.stderr
        assert says in proc.stderr and 'Traceback' not in proc.stderr
        assert not os.path.exists(str(tmp_path / 'x_error.png'))


# ---------------------------------------------------------------------------
# The run command, for real at depth 1.

def run_table(*argv):
    return subprocess.run([sys.executable, '-m', 'chainer_vfbn.table'] + [str(a) for a in argv],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def test_run_jobs_in_parallel_with_their_share_of_threads(tmp_path, cifar_archive):
    root = tmp_path / 'root'
    proc = run_table('run', '--out', root, '--dataset', 'cifar10', '--depth', '1',
                     '--rows', 'vfbn-1e-3', 'bp', '--jobs', '2', '--', '--data-dir',
                     cifar_archive, '--train-images', '16', '--test-images', '4',
                     '--batchsize', '4', '--iterations', '2')
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert '2 at a time' in proc.stdout
    assert 'final test error' not in proc.stdout  # train.py's own output stays in its folder
    # Both started before either ended: they ran at the same time.
    steps = [l.split('] ', 1)[1] for l in proc.stdout.splitlines() if l.startswith('[table')]
    said = [s.split(': ')[1].split(' ')[0] for s in steps if re.match(r'\d/2 seed 0 ', s)]
    assert said[:2] == ['starting', 'starting'] and said[2:] == ['finished', 'finished'], steps
    share = max(1, machine.usable_cpus() // 2)
    rows = {r[0]: r for r in table_rows((root / 'table.md').read_text())}
    for name in ('bp', 'vfbn-1e-3'):
        folder = root / name / 'seed0'
        assert json.loads((folder / 'args.json').read_text())['threads'] == share
        result = json.loads((folder / 'result.json').read_text())
        assert result['status'] == 'finished' and result['iteration'] == 2
        assert 'final test error' in (folder / 'train_output.txt').read_text()
        # The table reports each run's own final error.
        assert rows[row(name).label][2] == '%.2f (1 seed)' % (100 * result['test_error'])


def test_run_is_resumable(tmp_path, cifar_archive):
    root = tmp_path / 'root'
    argv = ['run', '--out', root, '--dataset', 'cifar10', '--depth', '1',
            '--rows', 'vfbn-1e-3', 'bp', '--', '--data-dir', cifar_archive,
            '--train-images', '16', '--test-images', '4', '--batchsize', '4',
            '--iterations', '2']
    first = run_table(*argv)
    assert first.returncode == 0, first.stdout + first.stderr
    progress = [l for l in first.stdout.splitlines() if l.startswith('[table')]
    assert re.search(r'1/2 seed 0 bp .*: starting', progress[1])
    assert re.search(r'2/2 seed 0 vfbn-1e-3 .*: starting', progress[3])
    results = {s: root / s / 'seed0' / 'result.json' for s in ('bp', 'vfbn-1e-3')}
    mtimes = {s: os.path.getmtime(str(p)) for s, p in results.items()}
    for name in ('table.md', 'figure3_error.png', 'figure3_error.pdf',
                 'figure3_fidelity.png', 'figure3_fidelity.pdf'):
        assert os.path.getsize(str(root / name)) > 0
    md = (root / 'table.md').read_text()
    assert not re.search(r'\bnan\b', md, re.IGNORECASE)
    assert md.count('(1 seed)') == 4 and md.count('not run') == 10

    again = run_table(*argv)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count('skipped, already finished') == 2
    assert {s: os.path.getmtime(str(p)) for s, p in results.items()} == mtimes

    # An interrupted run (a snapshot, no result.json) resumes from its snapshot.
    os.remove(str(results['bp']))
    resumed = run_table(*argv)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert re.search(r'seed 0 bp .*: resuming from .*snapshot_iter_2', resumed.stdout)
    assert json.loads(results['bp'].read_text())['status'] == 'finished'
    assert os.path.getmtime(str(results['vfbn-1e-3'])) == mtimes['vfbn-1e-3']

    # Another budget into the same folders is refused, not mixed in.
    other = run_table(*(argv[:-1] + ['3']))
    assert other.returncode == table.EXIT_FAILED
    assert other.stdout.count('holds a run with other arguments') == 2
    assert os.path.getmtime(str(results['vfbn-1e-3'])) == mtimes['vfbn-1e-3']


def test_run_diverged_rows_do_not_stop_the_others(tmp_path, cifar_archive):
    """An lr of 1e30 makes both end-to-end rows diverge at once (as in test_cli)."""
    root = tmp_path / 'root'
    proc = run_table('run', '--out', root, '--depth', '1', '--rows', 'bp', 'bottom', '--',
                     '--data-dir', cifar_archive, '--train-images', '16',
                     '--test-images', '4', '--batchsize', '4', '--iterations', '3',
                     '--lr', '1e30')
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(': diverged in ') == 2
    rows = {r[0]: r for r in table_rows((root / 'table.md').read_text())}
    for label in ('BackProp', 'Bottom half with back prop'):
        assert re.fullmatch(r'diverged at iteration \d+', rows[label][2])


def test_run_fails_for_other_reasons(tmp_path):
    proc = run_table('run', '--out', tmp_path / 'root', '--depth', '1', '--rows', 'bp',
                     '--', '--data-dir', tmp_path / 'nothing-here')
    assert proc.returncode == table.EXIT_FAILED
    assert 'FAILED (train.py exit status 2' in proc.stdout
    assert '1 run(s) failed' in proc.stdout


def test_run_checks_train_arguments_first(tmp_path):
    for extra in (['--seed', '3'], ['--iterations', '0']):
        proc = run_table('run', '--out', tmp_path / 'root', '--', *extra)
        assert proc.returncode == 2
        assert not (tmp_path / 'root').exists()


# ---------------------------------------------------------------------------
# A broken run folder never costs the table.

def test_report_leaves_out_a_garbage_result_and_keeps_the_old_table(runs, tmp_path):
    """One result.json is garbage: ``report`` names that folder in one line, exit 1,
    and writes the table of the others with the folder marked as left out; the
    table it replaces is only ever replaced whole."""
    root = tmp_path
    proc = run_table('report', root)
    assert proc.returncode == 0, proc.stderr
    old = (root / 'table.md').read_text()
    assert '22.50 ± 3.54 (2 seeds)' in old  # BackProp, seeds 0 and 1
    bad = runs['bp0']
    with open(os.path.join(bad, 'result.json'), 'w') as f:
        f.write('{"status": "fini')
    proc = run_table('report', root)
    assert proc.returncode == table.EXIT_FAILED, proc.stdout + proc.stderr
    assert 'Traceback' not in proc.stderr
    line, = proc.stderr.strip().splitlines()
    assert line.startswith('python -m chainer_vfbn.table: error: left out %s: ' % bad), line
    assert os.path.join(bad, 'result.json') + ' cannot be read' in line
    md = (root / 'table.md').read_text()
    rows = {r[0]: r for r in table_rows(md)}
    assert rows['BackProp'][2] == '25.00 (1 seed)'  # seed 1 alone
    assert rows['VFBN (alpha_gs = 1e-3)'][2] == '21.00 (1 seed)'
    assert 'Left out, unreadable: %s (%s' % (bad, os.path.join(bad, 'result.json')) in md
    assert not [n for n in os.listdir(str(root)) if n.endswith('.tmp')]


def test_table_errors_about_train_arguments_point_to_train_help(tmp_path):
    for extra, says in ((['--bogus'], 'unrecognized arguments: --bogus'),
                        (['--lr', 'nan'], '--lr must be a finite number'),
                        (['--seed', '3'], '--seed: the run command sets these itself')):
        proc = run_table('run', '--out', tmp_path / 'root', '--', *extra)
        assert proc.returncode == 2
        line, = proc.stderr.strip().splitlines()
        assert line.startswith('python -m chainer_vfbn.table: error: train.py arguments '
                               'after --: '), line
        assert says in line and line.endswith('(train.py --help lists them)'), line
        assert not (tmp_path / 'root').exists()
