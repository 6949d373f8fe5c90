"""``train.py``: one Table 1 method, trained with Chainer's Trainer.

Everything the run needs to be understood later is written beside its log in the
output folder: ``args.json`` (the arguments, versions and machine), ``log`` (JSON,
one entry per evaluation), snapshots of the trainer (``snapshot_iter_N``) and of the
predicting network (``model_iter_N.npz``, ``model.npz`` at the end), and
``result.json`` (status and final test errors), written last and atomically.
"""
import argparse
import json
import os
import platform
import signal
import sys
import time
import zlib

import chainer
import numpy
from chainer.training import extensions

from chainer_vfbn import config, data, methods, updaters
from chainer_vfbn.evaluation import TestErrorEvaluator, final_test_errors

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """Bad arguments or environment; the message says what to do instead."""


def build_parser():
    p = argparse.ArgumentParser(
        description='Train ResNet-110 (the paper\'s variant) on CIFAR-10 with one of '
                    'the methods of Table 1 (Miyato et al. 2017).',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group('method')
    g.add_argument('--method', choices=methods.METHODS, default=None,
                   help='Table 1 method (default bp)')
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
                   help='residual units per block (18 = ResNet-110)')
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
    g.add_argument('--batchsize', '-b', type=int, default=config.BATCHSIZE)
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
    g.add_argument('--seed', type=int, default=0)
    g.add_argument('--threads', type=int, default=default_threads(),
                   help='BLAS/OpenMP threads (results are bit-for-bit repeatable for '
                        'one thread count; default: the CPUs this process may use)')

    g = p.add_argument_group('run')
    g.add_argument('--device', '-d', default=None,
                   help='Chainer device specifier (@numpy, @cupy:0, ...)')
    g.add_argument('--gpu', '-g', type=int, default=None,
                   help='GPU id (the same as --device @cupy:ID; negative: CPU)')
    g.add_argument('--out', '-o', default='result', help='output folder')
    g.add_argument('--resume', '-r', default=None, help='trainer snapshot to resume from')
    g.add_argument('--eval-views', type=int, choices=(1, config.N_VIEWS),
                   default=config.EVAL_VIEWS,
                   help='36: the paper\'s averaged test error; 1: centre view only')
    g.add_argument('--eval-every', type=int, default=None,
                   help='evaluate and log every N iterations (default: every epoch)')
    g.add_argument('--snapshot-every', type=int, default=None,
                   help='trainer snapshot every N iterations (default: every epoch)')
    g.add_argument('--progress', action=argparse.BooleanOptionalAction, default=None,
                   help='progress bar (default: when printing to a terminal)')
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if args.method and args.synth and args.method != args.synth:
        raise UsageError('--method %s and --synth %s disagree: give one'
                         % (args.method, args.synth))
    args.method = args.method or args.synth or 'bp'
    for name in ('depth', 'batchsize'):
        if getattr(args, name) < 1:
            raise UsageError('--%s must be >= 1' % name)
    for name in ('train_images', 'test_images', 'eval_images', 'tta_images', 'iterations',
                 'eval_every', 'snapshot_every', 'threads'):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UsageError('--%s must be >= 1' % name.replace('_', '-'))
    if args.alpha_gs < 0:
        raise UsageError('--alpha-gs must be >= 0')
    if args.lr_drops is not None and (min(args.lr_drops) < 1 or
                                      sorted(set(args.lr_drops)) != args.lr_drops):
        raise UsageError('--lr-drops must be increasing iterations >= 1')
    for name in ('eval_images', 'tta_images'):
        n = getattr(args, name)
        if n is not None and args.test_images is not None and n > args.test_images:
            raise UsageError('--%s %d is more than --test-images %d'
                             % (name.replace('_', '-'), n, args.test_images))
    if args.resume and not os.path.isfile(args.resume):
        raise UsageError('--resume %s: no such snapshot file' % args.resume)
    return args


def resolve_device(args):
    """The Chainer device; a missing GPU is an error, never a silent CPU run."""
    spec = args.device
    if args.gpu is not None:
        if spec is not None:
            raise UsageError('give --gpu or --device, not both')
        spec = '@cupy:%d' % args.gpu if args.gpu >= 0 else '@numpy'
    spec = spec or '@numpy'
    try:
        device = chainer.get_device(spec)
        if device.xp is not numpy:
            device.use()
            device.xp.zeros(1).sum()  # touch the GPU now, not mid-run
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError('device %s is not available (%s). Install CuPy for your CUDA '
                         '(README, GPU) or run on the CPU: leave out --gpu/--device'
                         % (spec, first))
    return device


def default_threads():
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def set_threads(n):
    """Limit NumPy's BLAS and any OpenMP pool to ``n`` threads for this process."""
    import threadpoolctl
    threadpoolctl.threadpool_limits(limits=n)


class SeededShuffle(object):
    """Order sampler whose next permutation is a function of the seed and of the
    previous order, which the iterator's snapshot holds: a resumed run shuffles
    exactly as the uninterrupted run would."""

    def __init__(self, seed):
        self.seed = seed

    def __call__(self, current_order, current_position):
        n = len(current_order)
        key = [self.seed] if current_order is None or not hasattr(current_order, 'tobytes') \
            else [self.seed, zlib.crc32(numpy.ascontiguousarray(current_order).tobytes())]
        return numpy.random.default_rng(key).permutation(n)


def seed_everything(seed, device):
    numpy.random.seed(seed)
    if device.xp is not numpy:
        device.xp.random.seed(seed)


def versions():
    """Versions of what computes the numbers (recorded in args.json)."""
    v = {'python': platform.python_version(), 'chainer': chainer.__version__,
         'numpy': numpy.__version__}
    try:
        import cupy
        v['cupy'] = cupy.__version__
    except Exception:
        pass
    return v


def cpu_name():
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device):
    m = {'platform': platform.platform(), 'cpu': cpu_name(), 'cpus': os.cpu_count(),
         'device': str(device)}
    if device.xp is not numpy:
        try:
            import cupy
            props = cupy.cuda.runtime.getDeviceProperties(device.device.id)
            m['gpu'] = props['name'].decode() if isinstance(props['name'], bytes) else props['name']
        except Exception:
            pass
    return m


def write_json(path, obj):
    """Write JSON atomically: a reader sees the old file or the whole new one."""
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write('\n')
    os.replace(tmp, path)


class StopOnSignal(chainer.training.Extension):
    """After the first Ctrl-C (SIGINT) or SIGTERM, finish the current iteration, save
    a trainer snapshot, and stop the run with :class:`Interrupted`."""

    trigger = 1, 'iteration'
    priority = chainer.training.PRIORITY_READER - 1  # after every other extension

    def __init__(self, snapshot):
        self.snapshot, self.signum = snapshot, None

    def initialize(self, trainer):
        def handler(signum, frame):
            if self.signum is not None:  # second signal: stop now
                raise KeyboardInterrupt
            self.signum = signum
        self._old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def __call__(self, trainer):
        if self.signum is not None:
            self.snapshot(trainer)
            raise Interrupted(trainer.updater.iteration)

    def finalize(self):
        for s, h in getattr(self, '_old', {}).items():
            signal.signal(s, h)


class Interrupted(Exception):
    pass


def load_data(args):
    (train_x, train_y), (test_x, test_y) = data.load(args.dataset, args.data_dir)
    if args.train_images:
        train_x, train_y = train_x[:args.train_images], train_y[:args.train_images]
    if args.test_images:
        test_x, test_y = test_x[:args.test_images], test_y[:args.test_images]
    return data.AugmentedDataset(train_x, train_y), (test_x, test_y)


def header(args, device, train, test_images):
    row = methods.find_row(args.method, args.alpha_gs)
    lines = [
        '# chainer-vfbn: %s%s' % (row.label if row else args.method,
                                  ' (paper: %.2f%% on CIFAR-10)' % row.paper_error if row else ''),
        '# method %s%s, depth %d units/block (%d layers), split %s'
        % (args.method,
           ', alpha_gs %g' % args.alpha_gs if args.method in methods.SYNTHESIZERS else '',
           args.depth, 6 * args.depth + 2,
           args.split if args.split is not None else 'middle of ResBlock-2'),
        '# data %s: %d images x 36 views = %d training examples, %d test images, %d-view test error'
        % (args.dataset, len(train.images), len(train), len(test_images), args.eval_views),
        '# device %s, batch %d, %s, seed %d, out %s'
        % (device, args.batchsize,
           '%d iterations' % args.iterations if args.iterations else '%g epochs' % args.epoch,
           args.seed, args.out),
    ]
    print('\n'.join(lines), flush=True)


def train(args):
    """Train one method; return the result dictionary (also in result.json)."""
    device = resolve_device(args)
    set_threads(args.threads)
    seed_everything(args.seed, device)
    train_set, (test_x, test_y) = load_data(args)
    header(args, device, train_set, test_x)

    iterator = data.BatchIterator(train_set, args.batchsize, repeat=True,
                                  order_sampler=SeededShuffle(args.seed))
    try:
        setup = methods.build(args.method, iterator, device, args.depth, args.split,
                              args.alpha_gs, args.lr, args.momentum, args.weight_decay,
                              args.diag_interval, args.jaderberg_scale,
                              args.vfbn_normalized_loss)
    except ValueError as e:
        raise UsageError(str(e))
    stop = (args.iterations, 'iteration') if args.iterations else (args.epoch, 'epoch')
    trainer = chainer.training.Trainer(setup.updater, stop, out=args.out)

    epoch_iters = -(-len(train_set) // args.batchsize)
    eval_trigger = (args.eval_every, 'iteration') if args.eval_every else (1, 'epoch')
    if args.iterations and not args.eval_every:
        eval_trigger = (min(args.iterations, epoch_iters), 'iteration')
    snap_trigger = (args.snapshot_every, 'iteration') if args.snapshot_every else (1, 'epoch')

    for opt in setup.scheduled:
        if args.lr_drops:
            drop = chainer.training.triggers.ManualScheduleTrigger(args.lr_drops, 'iteration')
        else:
            drop = chainer.training.triggers.IntervalTrigger(args.lr_drop_every, 'epoch')
        trainer.extend(extensions.ExponentialShift('lr', config.LR_DROP_FACTOR, optimizer=opt),
                       trigger=drop)
    n_eval = args.eval_images or len(test_x)
    evaluator = TestErrorEvaluator(setup.predictor, test_x[:n_eval], test_y[:n_eval], device,
                                   args.eval_views)
    trainer.extend(evaluator, trigger=eval_trigger)
    snapshot = extensions.snapshot(filename='snapshot_iter_{.updater.iteration}', n_retains=2)
    trainer.extend(snapshot, trigger=snap_trigger)
    trainer.extend(extensions.snapshot_object(setup.predictor, 'model_iter_{.updater.iteration}.npz',
                                              n_retains=2), trigger=snap_trigger)
    lr_name = 'main' if args.method in ('bp', 'bottom') else 'lower'
    trainer.extend(extensions.observe_lr(lr_name), trigger=eval_trigger)
    trainer.extend(extensions.LogReport(trigger=eval_trigger))
    keys = ['epoch', 'iteration', 'main/loss', 'main/accuracy']
    if args.method in methods.SYNTHESIZERS:
        keys += ['synth/loss', 'synth/cosine', 'synth/rel_error']
    elif args.method == 'layerwise':
        keys += ['head/loss', 'synth/cosine']
    keys += ['validation/main/error', 'lr', 'elapsed_time']
    trainer.extend(extensions.PrintReport(keys), trigger=eval_trigger)
    progress = sys.stdout.isatty() if args.progress is None else args.progress
    if progress:
        trainer.extend(extensions.ProgressBar(update_interval=10))
    trainer.extend(StopOnSignal(snapshot))

    if args.resume:
        try:
            chainer.serializers.load_npz(args.resume, trainer)
        except Exception as e:
            raise UsageError('--resume %s does not fit this run (%s: %s); resume with the '
                             'same method, depth and split as args.json records'
                             % (args.resume, type(e).__name__, str(e).splitlines()[0]))

    # Only now, with every input checked, touch the output folder.
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, 'args.json'),
               dict(vars(args), versions=versions(), machine=machine(device)))
    if os.path.exists(os.path.join(args.out, 'result.json')):
        os.remove(os.path.join(args.out, 'result.json'))

    result = {'method': args.method, 'alpha_gs': args.alpha_gs, 'dataset': args.dataset,
              'depth': args.depth, 'seed': args.seed}
    start = time.time()
    try:
        with numpy.errstate(over='ignore', invalid='ignore'):  # NonFiniteError says it
            trainer.run(show_loop_exception_msg=False)
    except updaters.NonFiniteError as e:
        result.update(status='diverged', message=str(e),
                      iteration=setup.updater.iteration + 1)
        write_json(os.path.join(args.out, 'result.json'), result)
        raise
    if args.tta_images is None and n_eval == len(test_x):
        final = evaluator.final(trainer)
    else:
        tta = args.tta_images or (len(test_x) if args.eval_views == config.N_VIEWS else 0)
        final = final_test_errors(setup.predictor, test_x, test_y, device, tta)
    snapshot(trainer)
    chainer.serializers.save_npz(os.path.join(args.out, 'model.npz'), setup.predictor)
    result.update(status='finished', iteration=setup.updater.iteration,
                  epoch=setup.updater.epoch_detail, seconds=time.time() - start,
                  test_error=final['error'], test_error_single=final['error_single'],
                  eval_views=final['views'], test_images=len(test_x),
                  tta_images=final.get('tta_images', len(test_x) if final['views'] > 1 else 0))
    write_json(os.path.join(args.out, 'result.json'), result)
    print('final test error %.2f%% (%d-view), %.2f%% (single view), %d iterations'
          % (100 * final['error'], final['views'], 100 * final['error_single'],
             setup.updater.iteration), flush=True)
    return result


def main(argv=None):
    """Command-line entry point: exit 0 on success; one clear line and a non-zero
    status on bad input (2), divergence (3) or interruption (130)."""
    prog = os.path.basename(sys.argv[0])
    try:
        args = parse_args(argv)
        train(args)
    except (UsageError, data.DataError) as e:
        print('%s: error: %s' % (prog, e), file=sys.stderr)
        return EXIT_BAD_INPUT
    except updaters.NonFiniteError as e:
        print('%s: error: %s (see result.json)' % (prog, e), file=sys.stderr)
        return EXIT_DIVERGED
    except Interrupted as e:
        print('%s: interrupted at iteration %s; a snapshot was saved: continue with '
              '--resume %s' % (prog, e.args[0], os.path.join(args.out, 'snapshot_iter_%s'
                                                               % e.args[0])), file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0
