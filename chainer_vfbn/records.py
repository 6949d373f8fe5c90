"""The run record: what the table and the figures read from a ``train.py`` run
folder (``args.json``, ``log``, ``result.json``), with train.py's defaults filled in
for the options an older ``args.json`` predates (so it sits above
:mod:`chainer_vfbn.arguments`, which owns the parser; :mod:`chainer_vfbn.runs` keeps
the folders themselves)."""
import json
import os

from chainer_vfbn import arguments, config, data, methods

#: args.json keys that say where or on what a run ran, not what it computed.
PER_RUN_KEYS = ('seed', 'out', 'resume', 'progress', 'synth', 'versions', 'machine',
                'device', 'gpu', 'data_dir', 'threads', 'overwrite', 'progress_every',
                'parts', 'pipeline_timeout')


class RunError(Exception):
    """A folder is not a usable run folder; the message says why."""


class Run(object):
    """One ``train.py`` output folder: ``args`` (args.json), ``log`` (the LogReport
    entries, ``[]`` when there is none yet) and ``result`` (result.json or None)."""

    def __init__(self, path, args, log, result):
        self.path, self.args, self.log, self.result = path, args, log, result
        self.row = methods.find_row(args.get('method'), args.get('alpha_gs'))

    @property
    def status(self):
        """'finished', 'diverged' or 'unfinished' (no result.json: running or stopped)."""
        return self.result.get('status', 'unfinished') if self.result else 'unfinished'

    @property
    def label(self):
        if self.row is not None:
            return self.row.label
        return '%s (alpha_gs = %g)' % (self.args.get('method'), self.args.get('alpha_gs'))

    @property
    def row_key(self):
        return (self.row.method, self.row.alpha_gs) if self.row else None

    @property
    def config(self):
        """What the run computed, seed aside: runs with equal configs are seeds of
        one experiment."""
        return tuple(sorted((k, json.dumps(v)) for k, v in self.args.items()
                            if k not in PER_RUN_KEYS))

    @property
    def train_images(self):
        """Training images actually used (``--train-images`` cuts the set)."""
        full = data.TRAIN_SIZES.get(self.args.get('dataset'))
        n = self.args.get('train_images')
        return min(n, full) if n and full else (n or full)

    @property
    def last_iteration(self):
        """result.json's iteration (for a diverged run, the one that went
        non-finite), else the last logged one."""
        if self.result and self.result.get('iteration') is not None:
            return self.result['iteration']
        return self.log[-1]['iteration'] if self.log else 0

    def x(self, iteration, unit):
        """Training progress at an iteration: epochs of the 36x set, or examples seen."""
        examples = iteration * self.args['batchsize']
        if unit == 'examples':
            return examples
        return examples / float(self.train_images * config.N_VIEWS)

    def series(self, key, unit):
        """``[(x, value)]`` of one log key, in log order."""
        return [(self.x(e['iteration'], unit), e[key]) for e in self.log
                if e.get(key) is not None]


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise RunError('%s cannot be read (%s)' % (path, e))


def with_defaults(recorded):
    """A run's recorded arguments completed with train.py's defaults for the options
    its args.json predates (a run made before ``--lag`` existed ran at no lag), so
    that runs of older and newer code compare, pair and plot as one setting."""
    defaults = vars(arguments.build_parser().parse_args([]))
    return dict({k: v for k, v in defaults.items() if k not in recorded}, **recorded)


def load_run(path, need_log=False):
    """Read a run folder. It needs ``args.json``; with ``need_log`` also a ``log``,
    unless it diverged before its first evaluation."""
    if not os.path.isdir(path):
        raise RunError('%s is not a folder' % path)
    args_file = os.path.join(path, 'args.json')
    if not os.path.exists(args_file):
        raise RunError('%s is not a run folder: it has no args.json (train.py writes '
                       'args.json and log into its --out folder)' % path)
    args = with_defaults(_read_json(args_file))
    log_file, result_file = os.path.join(path, 'log'), os.path.join(path, 'result.json')
    log = _read_json(log_file) if os.path.exists(log_file) else []
    result = _read_json(result_file) if os.path.exists(result_file) else None
    run = Run(path, args, log, result)
    if need_log and not log and run.status != 'diverged':
        raise RunError('%s has no log yet: train.py writes it at the first evaluation '
                       '(--eval-every)' % path)
    return run
