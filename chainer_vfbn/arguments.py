"""``train.py``'s arguments: the parser, the checks every value passes before
anything is loaded or written, and, for ``--resume``, the run's own arguments read
back from its ``args.json`` (:mod:`chainer_vfbn.runs` keeps the folders)."""
import argparse
import os
import sys

import numpy

from chainer_vfbn import config, data, machine, methods, model, runs
from chainer_vfbn.runs import UsageError


#: Options a resumed run may change: where and how it runs, not what it computes.
#: (The thread count can change the last bits of the numbers; it is recorded.)
RESUME_MAY_CHANGE = ('resume', 'out', 'overwrite', 'progress', 'progress_every', 'device',
                     'gpu', 'data_dir', 'threads', 'pipeline_timeout')
#: The stopping point, which a resumed run may extend.
STOPPING = ('iterations', 'epoch')


class HelpFormatter(argparse.HelpFormatter):
    """Shows an option's default where it has one (not "(default: None)")."""

    def _get_help_string(self, action):
        text = action.help or ''
        if '%(default)' not in text and action.default not in (None, False, argparse.SUPPRESS) \
                and action.option_strings and 'default' not in text:
            text += ' (default: %(default)s)'
        return text


def build_parser(raising=False):
    """train.py's parser; ``raising``: a usage error raises :class:`UsageError`
    instead of ending the process (for ``python -m chainer_vfbn.table``)."""
    p = (runs.RaisingArgumentParser if raising else runs.ArgumentParser)(
        prog='train.py', description='Train ResNet-110 (the paper\'s variant) on CIFAR-10 with one of '
                    'the methods of Table 1 (Miyato et al. 2017).',
        formatter_class=HelpFormatter)
    g = p.add_argument_group('method')
    g.add_argument('--method', choices=methods.METHODS, default=None,
                   help='Table 1 method (default: bp)')
    g.add_argument('--synth', choices=methods.SYNTHESIZERS, default=None,
                   help='synthetic-gradient method: the same as --method NAME')
    g.add_argument('--alpha-gs', type=float, default=config.ALPHA_GS,
                   help="Adam's alpha for the synthesizer (0: never trained)")
    g.add_argument('--no-jaderberg-scale', dest='jaderberg_scale', action='store_false',
                   help='Jaderberg synthesizers regress delta itself, not delta / s '
                        '(SPEC section 3; diverges at the paper\'s alpha_gs)')
    g.add_argument('--vfbn-normalized-loss', action='store_true',
                   help='divide VFBN\'s eq. 3 loss by s^2')
    g.add_argument('--diag-interval', type=int, default=1,
                   help='report gradient-fidelity diagnostics every N iterations (0: off)')

    g = p.add_argument_group('network')
    g.add_argument('--depth', type=int, default=config.UNITS_PER_BLOCK,
                   help='residual units per block (18 = ResNet-110; at most %d, ResNet-%d)'
                        % (config.MAX_UNITS_PER_BLOCK,
                           model.layer_count(config.MAX_UNITS_PER_BLOCK)))
    g.add_argument('--split', type=int, default=None,
                   help='index of the first upper unit (default: middle of ResBlock-2)')

    g = p.add_argument_group('data')
    g.add_argument('--dataset', choices=data.DATASETS, default='cifar10')
    g.add_argument('--data-dir', default=None,
                   help='cifar10: cifar-10-python.tar.gz or its folder (default: Chainer '
                        'downloads it); fashion-mnist: folder of the four idx .gz files')
    g.add_argument('--train-images', type=int, default=None,
                   help='use only the first N training images (x36 views)')
    g.add_argument('--test-images', type=int, default=None,
                   help='use only the first N test images (the final centre-view error '
                        'is over all of them)')
    g.add_argument('--eval-images', type=int, default=None,
                   help='evaluations during training use the first N test images '
                        '(default: all of them)')
    g.add_argument('--tta-images', type=int, default=None,
                   help='the final 36-view error is over the first N test images and '
                        'the centre-view error over all (default: both over all; '
                        'with --eval-views 1, centre view only)')

    g = p.add_argument_group('optimisation')
    g.add_argument('--batchsize', '-b', type=int, default=config.BATCHSIZE,
                   help='at most the examples of one epoch (training images x 36)')
    g.add_argument('--epoch', '-e', type=float, default=config.EPOCHS,
                   help='epochs over the 36x augmented set')
    g.add_argument('--iterations', type=int, default=None,
                   help='stop after N iterations instead (for short runs)')
    g.add_argument('--lr', type=float, default=config.LR)
    g.add_argument('--momentum', type=float, default=config.MOMENTUM)
    g.add_argument('--weight-decay', type=float, default=config.WEIGHT_DECAY)
    g.add_argument('--lr-drop-every', type=float, default=config.LR_DROP_EVERY,
                   help='multiply the lr by 0.1 every this many epochs')
    g.add_argument('--lr-drops', type=int, nargs='+', default=None, metavar='ITER',
                   help='multiply the lr by 0.1 after these iterations instead of '
                        '--lr-drop-every (for runs sized in iterations)')
    g.add_argument('--seed', type=int, default=0, help='0 to 2**32 - 1 (default: 0)')
    g.add_argument('--threads', type=int, default=machine.usable_cpus(),
                   help='BLAS/OpenMP threads, at most the CPUs this process may use '
                        '(results are bit-for-bit repeatable for one thread count; '
                        'default: all of those CPUs)')

    g = p.add_argument_group('pipeline (K processes: mpiexec -n K python train.py ... --pipeline)')
    g.add_argument('--pipeline', action='store_true',
                   help='run the upper half in a second MPI process, concurrently with '
                        'the lower half (synthesizer methods; docs/PIPELINE.md)')
    g.add_argument('--splits', type=int, nargs='+', default=None, metavar='UNIT',
                   help='with --pipeline: cut the network before these unit indices '
                        'into len(SPLITS) + 1 modules, one MPI process each (default: '
                        'two modules, cut at --split)')
    g.add_argument('--balance', action='store_true',
                   help='with --pipeline: cut the network into as many modules as MPI '
                        'processes where the measured stage times are most even '
                        '(recorded in args.json as --splits; chainer_vfbn/balance.py)')
    g.add_argument('--lag', type=int, default=0, metavar='D',
                   help='with --pipeline: train the synthesizer on the true gradient of '
                        'the batch D steps back, so the lower half never waits for it')
    g.add_argument('--pipeline-timeout', type=float, default=600.0, metavar='SECONDS',
                   help='with --pipeline: give up when the other process has not answered '
                        'for this long')

    g = p.add_argument_group('run')
    g.add_argument('--device', '-d', default=None,
                   help='Chainer device specifier (@numpy, @cupy:0, ...)')
    g.add_argument('--gpu', '-g', type=int, default=None,
                   help='GPU id (the same as --device @cupy:ID; negative: CPU)')
    g.add_argument('--out', '-o', default=runs.DEFAULT_OUT,
                   help='output folder; it must not hold another run')
    g.add_argument('--overwrite', action='store_true',
                   help='start over in an --out that holds a run, deleting its files')
    g.add_argument('--resume', '-r', default=None, metavar='RUN_DIR_OR_SNAPSHOT',
                   help='continue a run from its folder (its latest snapshot) or from one '
                        'snapshot; its arguments come from its args.json, and only the '
                        'stopping point (--iterations, --epoch) may be extended')
    g.add_argument('--eval-views', type=int, choices=(1, config.N_VIEWS),
                   default=config.EVAL_VIEWS,
                   help='36: the paper\'s averaged test error; 1: centre view only')
    g.add_argument('--eval-every', type=int, default=None,
                   help='evaluate and log every N iterations, and at the last one '
                        '(default: every epoch)')
    g.add_argument('--snapshot-every', type=int, default=None,
                   help='trainer snapshot every N iterations (default: every epoch)')
    g.add_argument('--progress', action=argparse.BooleanOptionalAction, default=None,
                   help='progress bar (default: when printing to a terminal; otherwise '
                        'a plain line every --progress-every seconds)')
    g.add_argument('--progress-every', type=float, default=60.0, metavar='SECONDS',
                   help='print a progress line this often without a progress bar, and '
                        'during a long pass over the test images')
    return p


#: NumPy's RandomState (and so train.py's --seed) takes seeds in [0, 2**32 - 1].
SEED_MAX = 2 ** 32 - 1


def training_examples(args):
    """Examples in one epoch of the 36x augmented training set (known before the
    data is loaded: the set's size or --train-images)."""
    full = data.TRAIN_SIZES.get(args.dataset, 0)
    return config.N_VIEWS * (min(args.train_images, full) if args.train_images else full)


def validate(args):
    """Check every value before anything is loaded or written (UsageError)."""
    if args.method and args.synth and args.method != args.synth:
        raise UsageError('--method %s and --synth %s disagree: give one'
                         % (args.method, args.synth))
    args.method = args.method or args.synth or 'bp'
    for name in ('alpha_gs', 'epoch', 'lr', 'momentum', 'weight_decay', 'lr_drop_every',
                 'progress_every', 'pipeline_timeout'):
        if not runs.finite(getattr(args, name)):
            raise UsageError('--%s must be a finite number, got %r'
                             % (name.replace('_', '-'), getattr(args, name)))
    for name in ('depth', 'batchsize', 'train_images', 'test_images', 'eval_images',
                 'tta_images', 'iterations', 'eval_every', 'snapshot_every', 'threads'):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UsageError('--%s must be >= 1, got %d' % (name.replace('_', '-'), v))
    for name in ('epoch', 'lr_drop_every', 'progress_every', 'pipeline_timeout'):
        if getattr(args, name) <= 0:
            raise UsageError('--%s must be > 0, got %g'
                             % (name.replace('_', '-'), getattr(args, name)))
    for name in ('alpha_gs', 'lr', 'weight_decay'):
        if getattr(args, name) < 0:
            raise UsageError('--%s must be >= 0, got %g'
                             % (name.replace('_', '-'), getattr(args, name)))
    for name, top, why in (
            ('seed', SEED_MAX, "NumPy's RandomState takes 32-bit seeds"),
            ('depth', config.MAX_UNITS_PER_BLOCK,
             'ResNet-%d, the deepest of He et al. 2016 on CIFAR-10'
             % model.layer_count(config.MAX_UNITS_PER_BLOCK)),
            ('batchsize', training_examples(args),
             'the training examples of one epoch: %s training images x %d views'
             % (args.train_images or 'all %d' % data.TRAIN_SIZES.get(args.dataset, 0),
                config.N_VIEWS)),
            ('threads', machine.usable_cpus(), 'the CPUs this process may use')):
        if not 0 <= getattr(args, name) <= top:
            raise UsageError('--%s must be in [%d, %d] (%s), got %d'
                             % (name, 0 if name == 'seed' else 1, top, why,
                                getattr(args, name)))
    if args.diag_interval < 0:
        raise UsageError('--diag-interval must be >= 0 (0: off), got %d' % args.diag_interval)
    if not args.out:
        raise UsageError('--out must name a folder, got an empty name')
    if not 0 <= args.momentum < 1:
        raise UsageError('--momentum must be in [0, 1), got %g' % args.momentum)
    if args.lr_drops is not None and (min(args.lr_drops) < 1 or
                                      sorted(set(args.lr_drops)) != args.lr_drops):
        raise UsageError('--lr-drops must be increasing iterations >= 1')
    for name in ('eval_images', 'tta_images'):
        n = getattr(args, name)
        if n is not None and args.test_images is not None and n > args.test_images:
            raise UsageError('--%s %d is more than --test-images %d'
                             % (name.replace('_', '-'), n, args.test_images))
    if args.lag < 0:
        raise UsageError('--lag must be >= 0, got %d' % args.lag)
    if args.lag and not args.pipeline:
        raise UsageError('--lag %d needs --pipeline (a one-process run has no lag)' % args.lag)
    if args.pipeline and args.method not in methods.SYNTHESIZERS and not args.resume:
        raise UsageError('--pipeline decouples the halves with a synthesizer: give --synth '
                         '%s, not --method %s' % ('|'.join(methods.SYNTHESIZERS), args.method))
    if args.balance and not args.pipeline:
        raise UsageError('--balance chooses the cuts of a --pipeline run: give --pipeline')
    if args.balance and not args.resume and (args.splits or args.split is not None):
        raise UsageError('--balance chooses the cuts itself: leave out --split and --splits')
    if args.splits is not None:
        if not args.pipeline:
            raise UsageError('--splits cuts the network into modules for --pipeline; a '
                             'one-process run has two halves: give --split')
        if sorted(set(args.splits)) != args.splits or not \
                0 <= args.splits[0] <= args.splits[-1] <= 3 * args.depth:
            raise UsageError('--splits must be increasing unit boundaries in [0, %d] for '
                             '--depth %d, got %s' % (3 * args.depth, args.depth,
                                                     ' '.join(map(str, args.splits))))
        if args.split is not None and args.split != args.splits[0]:
            raise UsageError('--split %d and --splits %s disagree: give one'
                             % (args.split, ' '.join(map(str, args.splits))))
        args.split = args.splits[0]  # rank 0's lower half, as evaluate.py reads it
    if args.split is not None and not 0 <= args.split <= 3 * args.depth:
        raise UsageError('--split must be a unit boundary in [0, %d] for --depth %d, got %d'
                         % (3 * args.depth, args.depth, args.split))
    return args


def given_options(argv, raising=False):
    """The destinations of the options written on the command line ``argv``."""
    parser = build_parser(raising)
    unset = object()
    parser.set_defaults(**{a.dest: unset for a in parser._actions if a.dest != 'help'})
    return {k for k, v in vars(parser.parse_args(argv)).items() if v is not unset}


def option_name(dest):
    return '--' + dest.replace('_', '-')


def snapshot_iteration(path):
    """The iteration a trainer snapshot was saved at (None if it does not say)."""
    try:
        with numpy.load(path) as f:
            return int(f['updater/iteration'])
    except Exception:
        return None


def read_recorded(run_dir):
    """A run's ``args.json``, checked for what rebuilding its network needs (a JSON
    object, a known method, an integer depth and split): else a
    :class:`UsageError` naming args.json and what is wrong with it."""
    path = os.path.join(run_dir, 'args.json')
    recorded = runs.read_json(path, 'the run\'s arguments')

    def wrong(what):
        return UsageError('%s is not train.py\'s record of a run: %s' % (path, what))
    if not isinstance(recorded, dict):
        raise wrong('not a JSON object')
    if recorded.get('method', 'bp') not in methods.METHODS:
        raise wrong('\'method\' must be one of %s, got %r'
                    % (', '.join(methods.METHODS), recorded.get('method')))
    if 'depth' not in recorded:
        raise wrong('no \'depth\'')
    for key, lowest, required in (('depth', 1, True), ('split', 0, False)):
        value = recorded.get(key)
        if (value is not None or required) and not (
                type(value) is int and lowest <= value <= 3 * config.MAX_UNITS_PER_BLOCK
                and (key != 'depth' or value <= config.MAX_UNITS_PER_BLOCK)):
            raise wrong('%r must be an integer in [%d, %d], got %r'
                        % (key, lowest, config.MAX_UNITS_PER_BLOCK if key == 'depth'
                           else 3 * config.MAX_UNITS_PER_BLOCK, value))
    return recorded


def resumed_args(args, given):
    """The arguments of a resumed run: its args.json, with the options it may change
    taken from the command line. Any other option given that contradicts args.json
    is refused, naming it."""
    run_dir, snapshot = runs.resume_source(args.resume)
    check_snapshot(args.resume, snapshot, run_dir)
    recorded = read_recorded(run_dir)
    names = [dest for dest in vars(args) if dest not in ('resume', 'synth', 'method')]
    merged = argparse.Namespace(**{k: recorded.get(k, getattr(args, k)) for k in names})
    merged.method, merged.synth = recorded.get('method', 'bp'), None
    if given & {'method', 'synth'} and args.method != merged.method:
        raise UsageError('--resume %s: the run\'s method is %s, not %s; leave the method '
                         'out' % (args.resume, merged.method, args.method))
    for dest in sorted(given - {'method', 'synth'}):
        mine, theirs = getattr(args, dest), recorded.get(dest)
        if dest in RESUME_MAY_CHANGE:
            setattr(merged, dest, mine)
        elif dest in STOPPING:
            done = snapshot_iteration(snapshot)
            if dest == 'iterations' and mine is not None and done is not None and mine < done:
                raise UsageError('--resume %s: --iterations %d is before the snapshot\'s '
                                 'iteration %d; the stopping point can only be moved on'
                                 % (args.resume, mine, done))
            setattr(merged, dest, mine)
        elif mine != theirs:
            raise UsageError('--resume %s: %s %s contradicts the run\'s %s (args.json in %s); '
                             'leave it out to continue the run as it was'
                             % (args.resume, option_name(dest),
                                ' '.join(map(str, mine)) if isinstance(mine, list) else mine,
                                theirs, run_dir))
    if 'out' not in given:
        merged.out = run_dir
    if 'epoch' in given and 'iterations' not in given:
        merged.iterations = None  # the stopping point is now in epochs
    merged.resume = snapshot
    first = {'resumed_from': None, 'iterations': recorded.get('iterations'),
             'epoch': recorded.get('epoch'), 'threads': recorded.get('threads')}
    merged.parts = (recorded.get('parts') or [first]) + [
        {'resumed_from': snapshot, 'iterations': merged.iterations, 'epoch': merged.epoch,
         'threads': merged.threads}]
    return merged


def check_snapshot(given, path, run_dir):
    """Refuse a ``--resume`` file that is not a whole trainer snapshot, naming it."""
    try:
        with numpy.load(path) as f:
            trainer = 'updater/iteration' in f.files
    except Exception as e:
        raise UsageError('--resume %s: %s cannot be read as a trainer snapshot (%s: %s); it '
                         'is truncated or damaged: resume from an earlier snapshot_iter_N in '
                         '%s' % (given, path, type(e).__name__, str(e).splitlines()[0]
                                 if str(e) else '', run_dir))
    if not trainer:
        raise UsageError('--resume %s: %s is not a trainer snapshot (it has no '
                         'updater/iteration; model.npz and model_iter_N.npz hold only the '
                         'network, for evaluate.py): resume from the run folder or a '
                         'snapshot_iter_N' % (given, path))


def refuse_finished(args):
    """A finished run resumed in its own folder without a later stopping point:
    :class:`~chainer_vfbn.runs.NothingToDo`, before any file is touched."""
    run_dir = os.path.dirname(args.resume) or '.'
    path = os.path.join(run_dir, 'result.json')
    if not os.path.isfile(path):
        return
    result = runs.read_json(path, 'the run\'s result')
    if result.get('status') != 'finished':
        return
    done, done_epoch = result.get('iteration'), result.get('epoch')
    if args.iterations:
        more = done is not None and args.iterations > done
    else:
        more = done_epoch is not None and args.epoch > done_epoch
    if not more:
        raise runs.NothingToDo(
            '%s is finished (iteration %s, epoch %.4g; test error %.2f%%, result.json): '
            'nothing to do, no file touched. To train it further, give a later stopping '
            'point, recorded in args.json\'s parts: --resume %s --iterations N with N > %s, '
            'or --epoch E with E > %.4g'
            % (run_dir, done, done_epoch or 0, 100 * result.get('test_error', float('nan')),
               run_dir, done, done_epoch or 0))


def parse_args(argv=None, check_out=True, raising=False):
    """The run's arguments, checked; for ``--resume``, read back from the run's
    folder. With ``check_out``, also that ``--out`` may take the run. Raises
    :class:`UsageError` (``raising``: argparse's errors too); writes nothing."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = validate(build_parser(raising).parse_args(argv))
    if args.resume:
        args = validate(resumed_args(args, given_options(argv, raising)))
        if continues_in_place(args):
            refuse_finished(args)
    else:
        args.parts = []
    if check_out and not continues_in_place(args):
        runs.prepare_new(args.out, args.overwrite)
    return args


def continues_in_place(args):
    """A resumed run writing to the folder of the snapshot it resumes from."""
    return bool(args.resume) and \
        os.path.abspath(args.out) == os.path.abspath(os.path.dirname(args.resume) or '.')


