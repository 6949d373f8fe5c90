"""Learning curves from ``train.py`` run folders: the paper's Figure 3 and the
gradient fidelity of the synthetic methods.

Figure 3 of Miyato et al. (2017) plots the test error (%) of BP, Jaderberg's
synthesizers and VFBN against the epochs of the 36x augmented set; the test error is
the 36-view averaged one (appendix B.1, SPEC section 5). :func:`plot_error` draws it
from the ``validation/main/error`` entries of each run's ``log``, one line per Table 1
row (the label comes from the run's ``args.json`` through
:func:`chainer_vfbn.methods.find_row`); several seeds of one row give their mean line
and a min-max band. :func:`plot_fidelity` draws ``synth/cosine`` and
``synth/rel_error`` (SPEC section 3: how well ``delta_hat`` matches the true
``delta``) for the runs that log them.

A diverged run's line ends at its last logged evaluation, with an ``x``, and its legend
entry says so. Runs are read with :func:`chainer_vfbn.records.load_run`.

``python plot_curves.py RUN_DIR [RUN_DIR ...] --out PREFIX [--x epoch|examples]``
writes ``PREFIX_error.{png,pdf}`` and ``PREFIX_fidelity.{png,pdf}``.
"""
import collections
import json
import os
import sys

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from chainer_vfbn import config, methods, model
from chainer_vfbn import runs as runs_module
from chainer_vfbn.records import RunError, load_run

EXIT_BAD_INPUT = runs_module.EXIT_BAD_INPUT

DATASET_NAMES = {'cifar10': 'CIFAR-10', 'fashion-mnist': 'Fashion-MNIST'}

OTHER_STYLE = ('tab:purple', ':')
VARIANT_STYLES = ('-', '--', '-.', ':')

FIDELITY_KEYS = (  # log key, axis label, reference line, panel title
    ('synth/cosine', r'$\cos(\hat\delta, \delta)$', 0.0,
     'cosine between synthetic and true gradient (1: same direction; dotted 0: unrelated)'),
    ('synth/rel_error', r'$\|\hat\delta - \delta\| \,/\, \|\delta\|$', 1.0,
     'relative error of the synthetic gradient (dotted 1: no better than '
     r'$\hat\delta = 0$)'),
)


def group_runs(runs):
    """Runs by curve: one group per Table 1 row and configuration, the seeds of one
    experiment together. Returns ``[(label, runs)]`` in Table 1 order; where one
    row has several configurations, each label names the arguments that differ."""
    order = {(row.method, row.alpha_gs): i for i, row in enumerate(methods.TABLE1)}
    groups = collections.OrderedDict()
    for r in sorted(runs, key=lambda r: (order.get(r.row_key, len(order)), r.label,
                                         r.config)):
        groups.setdefault((r.label, r.config), []).append(r)
    out = []
    for (label, settings), group in groups.items():
        siblings = [dict(c) for l, c in groups if l == label]
        differ = sorted(k for k in dict(settings)
                        if len({s.get(k) for s in siblings}) > 1)
        if differ:
            label += ' [%s]' % ', '.join('%s=%s' % (k, json.loads(dict(settings)[k]))
                                         for k in differ)
        out.append((label, group))
    return out


def aggregate(series_list):
    """Mean, min and max over several runs' ``[(x, value)]``, at every x that any run
    reached (averaging the runs that reached it). Returns four lists."""
    by_x = collections.defaultdict(list)
    for series in series_list:
        for x, v in series:
            by_x[x].append(v)
    xs = sorted(by_x)
    return (xs, [sum(by_x[x]) / len(by_x[x]) for x in xs],
            [min(by_x[x]) for x in xs], [max(by_x[x]) for x in xs])


def legend_label(label, runs):
    """The row label, the number of seeds, and how many diverged or are unfinished."""
    text = label
    if len(runs) > 1:
        text += ' (%d seeds, min-max band)' % len(runs)
    diverged = [r for r in runs if r.status == 'diverged']
    if diverged:
        at = ', '.join(str(r.last_iteration) for r in diverged)
        if len(diverged) == len(runs):
            text += ' - DIVERGED at iteration %s' % at
        else:
            text += ' - %d of %d diverged (iteration %s)' % (len(diverged), len(runs), at)
    unfinished = [r for r in runs if r.status == 'unfinished']
    if unfinished:
        text += ' - unfinished'
    return text


def describe(runs):
    """Title lines: dataset, network depth (6n+2 layers), the test error's views and
    test images, as the runs record them."""
    def values(get):
        return ', '.join(sorted({str(get(r)) for r in runs}))
    datasets = values(lambda r: DATASET_NAMES.get(r.args.get('dataset'), r.args.get('dataset')))
    nets = values(lambda r: network_name(r.args['depth']))
    views = values(lambda r: '36-view averaged' if r.args.get('eval_views', config.EVAL_VIEWS)
                   == config.N_VIEWS else 'centre-view')
    tests = values(lambda r: r.args.get('eval_images') or r.args.get('test_images') or 'all')
    train = values(lambda r: '{:,}'.format(r.train_images))
    return ('%s, %s, %s training images x 36 views' % (datasets, nets, train),
            '%s test error on %s test images' % (views, tests))


def network_name(depth):
    """'ResNet-110 (18 units per block)': 6n+2 weighted layers for n units."""
    return 'ResNet-%d (%d unit%s per block)' % (model.layer_count(depth), depth,
                                                's' if depth > 1 else '')


def x_label(unit):
    if unit == 'examples':
        return 'training examples seen (iteration x batch size)'
    return 'epochs of the 36x augmented training set'


def _new_figure(nrows, height):
    fig = Figure(figsize=(8.5, height), layout='constrained')
    FigureCanvasAgg(fig)  # Agg, whatever the user's default backend: no display needed
    return fig, [fig.add_subplot(nrows, 1, i + 1) for i in range(nrows)]


def _draw(ax, label, runs, key, unit, variant=0, scale=1.0):
    """One row's line (mean over seeds), its min-max band, and an x where a run
    diverged. ``variant`` > 0 (another configuration of the same row) changes the
    line style. A group that never logged ``key`` still gets its legend entry."""
    row = runs[0].row
    color, style = (row.color, row.linestyle) if row else OTHER_STYLE
    if variant:
        style = VARIANT_STYLES[(VARIANT_STYLES.index(style) + variant) % len(VARIANT_STYLES)]
    series = [[(x, scale * v) for x, v in r.series(key, unit)] for r in runs]
    xs, mean, lo, hi = aggregate(series)
    if not xs:
        ax.plot([], [], color=color, linestyle=style, label=legend_label(label, runs))
        return
    ax.plot(xs, mean, color=color, linestyle=style, linewidth=1.8, marker='.',
            markersize=4, label=legend_label(label, runs))
    if len(runs) > 1:
        ax.fill_between(xs, lo, hi, color=color, alpha=0.15, linewidth=0)
    for r, s in zip(runs, series):
        if r.status == 'diverged' and s:
            ax.plot([s[-1][0]], [s[-1][1]], marker='x', markersize=10, mew=2.5,
                    color=color, linestyle='none')


def _with_variants(groups):
    """``(label, runs, k)``: k counts the earlier groups of the same Table 1 row."""
    seen = collections.Counter()
    for label, runs in groups:
        yield label, runs, seen[runs[0].row_key]
        seen[runs[0].row_key] += 1


def _legend(fig, ax):
    """The legend below the axes, where it hides no curve; one column when the
    labels are long."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ncol = 2 if max(len(l) for l in labels) <= 50 else 1
        fig.legend(handles, labels, loc='outside lower center', ncol=ncol, fontsize=8,
                   frameon=False)


def _save(fig, prefix, name):
    """Write PREFIX_NAME.png and .pdf, each whole or not at all (a temporary file
    renamed into place)."""
    paths = []
    for ext in ('png', 'pdf'):
        path = '%s_%s.%s' % (prefix, name, ext)
        tmp = path + '.tmp'
        try:
            fig.savefig(tmp, dpi=150, format=ext)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        paths.append(path)
    return paths


def plot_error(runs, prefix, unit='epoch'):
    """Figure 3 (:func:`error_figure`) to ``PREFIX_error.png`` and ``.pdf``; returns
    their paths."""
    return _save(error_figure(runs, unit), prefix, 'error')


def error_figure(runs, unit='epoch'):
    """Figure 3: test error (%) against training progress, one line per Table 1 row."""
    fig, (ax,) = _new_figure(1, 5.5)
    for label, group, variant in _with_variants(group_runs(runs)):
        _draw(ax, label, group, 'validation/main/error', unit, variant, scale=100.0)
    what, test = describe(runs)
    ax.set_title('Test error during training (cf. the paper\'s Figure 3)\n%s\n%s'
                 % (what, test), fontsize=10)
    ax.set_xlabel(x_label(unit))
    ax.set_ylabel('test error (%)')
    ax.set_xlim(left=0)
    ax.grid(True, alpha=0.3)
    _legend(fig, ax)
    return fig


def plot_fidelity(runs, prefix, unit='epoch'):
    """The gradient fidelity (:func:`fidelity_figure`) to ``PREFIX_fidelity.png`` and
    ``.pdf``; returns their paths."""
    return _save(fidelity_figure(runs, unit), prefix, 'fidelity')


def fidelity_figure(runs, unit='epoch'):
    """How well the synthetic gradient matches the true one (SPEC section 3):
    ``synth/cosine`` and ``synth/rel_error`` for the synthetic methods and the
    layer-wise baseline."""
    fig, axes = _new_figure(len(FIDELITY_KEYS), 7.5)
    with_fidelity = [r for r in runs if any('synth/cosine' in e for e in r.log)
                     or r.args.get('method') in methods.SYNTHESIZERS + ('layerwise',)]
    groups = group_runs(with_fidelity)
    for ax, (key, name, reference, title) in zip(axes, FIDELITY_KEYS):
        for label, group, variant in _with_variants(groups):
            _draw(ax, label, group, key, unit, variant)
        ax.axhline(reference, color='0.4', linewidth=1, linestyle=':')
        values = [v for r in with_fidelity for _, v in r.series(key, unit)]
        if reference > 0 and values and max(values) > 10 * reference:
            ax.set_yscale('log')  # a diverging synthesizer's error spans decades
            title += '; log scale'
        ax.set_title(title, fontsize=9, loc='left')
        ax.set_ylabel(name)
        ax.set_xlim(left=0)
        ax.grid(True, alpha=0.3)
        if not groups:
            ax.text(0.5, 0.5, 'no synthetic-gradient or layer-wise runs', ha='center',
                    va='center', transform=ax.transAxes)
    fig.suptitle('Gradient fidelity at the split: synthetic (or auxiliary-loss) gradient '
                 r'$\hat\delta$ vs back-propagated $\delta$' + '\n%s' % describe(runs)[0],
                 fontsize=10)
    axes[-1].set_xlabel(x_label(unit))
    _legend(fig, axes[0])
    return fig


def plot_all(runs, prefix, unit='epoch'):
    """Both figures; returns the paths written."""
    folder = os.path.dirname(prefix)
    if folder:
        os.makedirs(folder, exist_ok=True)
    return plot_error(runs, prefix, unit) + plot_fidelity(runs, prefix, unit)


def build_parser():
    p = runs_module.ArgumentParser(
        description='Plot the test-error curves (the paper\'s Figure 3) and the '
                    'gradient fidelity of train.py run folders.')
    p.add_argument('runs', nargs='*', metavar='RUN_DIR',
                   help='train.py --out folders (default: every run folder under %s/, '
                        'train.py\'s default --out)' % runs_module.DEFAULT_OUT)
    p.add_argument('--out', metavar='PREFIX', default=None,
                   help='writes PREFIX_error.{png,pdf} and PREFIX_fidelity.{png,pdf} '
                        '(default without RUN_DIR: %s/figure3)' % runs_module.DEFAULT_OUT)
    p.add_argument('--x', choices=('epoch', 'examples'), default='epoch',
                   help='x axis: epochs of the 36x set, or examples seen')
    return p


def main(argv=None):
    """``plot_curves.py``: the figures, or one line on stderr and exit 2."""
    args = build_parser().parse_args(argv)
    prog = os.path.basename(sys.argv[0])
    folders, prefix = args.runs, args.out
    try:
        if not folders:
            root = runs_module.DEFAULT_OUT
            folders = runs_module.find_run_dirs(root)
            if not folders:
                raise RunError('no run folders (with args.json) under %s/, train.py\'s '
                               'default --out; give them: python plot_curves.py RUN_DIR ... '
                               '--out PREFIX' % root)
            prefix = prefix or os.path.join(root, 'figure3')
        elif prefix is None:
            raise RunError('give --out PREFIX for the figures of these run folders')
        runs = [load_run(path, need_log=True) for path in folders]
        runs_module.check_writable(os.path.dirname(prefix) or '.')
        paths = plot_all(runs, prefix, args.x)
    except (RunError, runs_module.UsageError, OSError) as e:
        print('%s: error: %s' % (prog, e), file=sys.stderr)
        return EXIT_BAD_INPUT
    print('wrote %s' % ', '.join(paths))
    return 0
