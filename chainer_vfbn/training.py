"""``train.py``: one Table 1 method, trained with Chainer's Trainer.

Everything the run needs to be understood later is written beside its log in the
output folder: ``args.json`` (the arguments, versions and machine), ``log`` (JSON,
one entry per evaluation), snapshots of the trainer (``snapshot_iter_N``) and of the
predicting network (``model_iter_N.npz``, ``model.npz`` at the end), and
``result.json`` (status and final test errors), written last and atomically.
"""
import errno
import math
import os
import shlex
import shutil
import signal
import sys

import chainer
import numpy
from chainer.training import extensions

from chainer_vfbn import (arguments, balance, config, data, machine, methods, model, pipeline,
                          runs, transport, updaters)
from chainer_vfbn.evaluation import PassProgress, TestErrorEvaluator, final_test_errors
from chainer_vfbn.runs import EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_INTERRUPTED, UsageError
from chainer_vfbn.trainer_extensions import (AlsoAtTheEnd, Interrupted, PlainOut, ProgressLines,
                                             SeededShuffle, StopAt, StopOnSignal,
                                             TestInterrupted)


def resolve_device(args):
    return runs.resolve_device(args.device, args.gpu)


def set_threads(n):
    """Limit NumPy's BLAS and any OpenMP pool to ``n`` threads for this process."""
    import threadpoolctl
    threadpoolctl.threadpool_limits(limits=n)


def seed_everything(seed, device):
    numpy.random.seed(seed)
    if device.xp is not numpy:
        device.xp.random.seed(seed)


class NoSpace(Exception):
    """The disk of the run folder is full; the message says what did not fit."""


def stop_iteration(args, n_examples):
    """The iteration the run stops after."""
    if args.iterations:
        return args.iterations
    return int(math.ceil(args.epoch * n_examples / float(args.batchsize)))


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
           args.depth, model.layer_count(args.depth),
           model.split_name(args.depth, args.split, args.splits)),
        '# data %s: %d images x 36 views = %d training examples, %d test images, %d-view test error'
        % (args.dataset, len(train.images), len(train), len(test_images), args.eval_views),
        '# device %s, batch %d, %s, seed %d, out %s'
        % (device, args.batchsize,
           '%d iterations' % args.iterations if args.iterations else '%g epochs' % args.epoch,
           args.seed, args.out),
    ]
    print('\n'.join(lines), flush=True)


def train(args):
    """Train one method; return the result dictionary (also in result.json). With
    ``--pipeline``, the other ranks of the MPI job serve their modules and return
    None."""
    if not args.pipeline:
        return train_on(args, None)
    choose = args.balance and args.splits is None  # not when resuming: args.json has them
    try:
        comm = transport.connect(None if choose else modules(args))
    except transport.PipelineError as e:
        raise UsageError(str(e))
    if choose:
        args.splits = transport.share(comm, balanced_cuts(args, comm.size) if comm.rank == 0
                                     else None, args.pipeline_timeout)
        args.split = args.splits[0]
    if comm.rank:
        return serve_stage(args, comm)
    try:
        return train_on(args, comm)
    finally:
        transport.stop(comm)


def balanced_cuts(args, modules):
    """``--balance``: the cuts that make the slowest of ``modules`` modules fastest,
    from stage times measured here, now (:mod:`chainer_vfbn.balance`)."""
    device = resolve_device(args)
    set_threads(args.threads)
    print('# --balance: timing the stages (%d thread%s, batch %d) ...'
          % (args.threads, '' if args.threads == 1 else 's', args.batchsize), flush=True)
    costs = balance.stage_costs(args.method, args.depth, args.batchsize, device=device,
                                jaderberg_scaled=args.jaderberg_scale,
                                vfbn_normalized_loss=args.vfbn_normalized_loss,
                                alpha_gs=args.alpha_gs)
    try:
        cuts, _ = balance.best_cuts(costs, modules)
    except ValueError as e:
        raise UsageError('--balance: %s' % e)

    def times(cuts):
        bounds = [0] + list(cuts) + [3 * args.depth]
        return ', '.join('%.2f' % balance.module_time(costs, a, b, i == modules - 1)
                         for i, (a, b) in enumerate(zip(bounds, bounds[1:])))

    paper = model.paper_split(args.depth)
    print('# --balance: cuts %s, modules %s s per batch%s'
          % (' '.join(map(str, cuts)), times(cuts),
             ' (the paper\'s cut %d: %s s)' % (paper, times([paper])) if modules == 2 else ''),
          flush=True)
    if args.lag == 0:
        print('# --balance: its model lets each synthesizer\'s work overlap with the modules '
              'above, as at --lag 1 or more; at lag 0 eq. 3 waits for the gradient of its '
              'own batch and these cuts can be slower than the paper\'s (docs/PIPELINE.md)',
              flush=True)
    return cuts


def modules(args):
    """How many modules (MPI processes) a ``--pipeline`` run has."""
    return len(args.splits) + 1 if args.splits else 2


def serve_stage(args, comm):
    """Rank k > 0 of a ``--pipeline`` run: module k of the upper half, built as rank
    0 builds the upper half, and (below the top) a synthesizer at its output."""
    device = resolve_device(args)
    set_threads(args.threads)
    seed_everything(args.seed, device)
    pipeline.stage_server(
        comm, args.method, depth=args.depth, splits=args.splits or [args.split],
        alpha_gs=args.alpha_gs, lag=args.lag, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, jaderberg_scaled=args.jaderberg_scale,
        vfbn_normalized_loss=args.vfbn_normalized_loss, device=device,
        timeout=args.pipeline_timeout, diag_interval=args.diag_interval).serve()


def train_on(args, comm):
    """Train on rank 0 (of a ``--pipeline`` run whose communicator is ``comm``) or in
    this one process (``comm`` None)."""
    device = resolve_device(args)
    set_threads(args.threads)
    seed_everything(args.seed, device)
    train_set, (test_x, test_y) = load_data(args)
    header(args, device, train_set, test_x)

    iterator = data.BatchIterator(train_set, args.batchsize, repeat=True,
                                  order_sampler=SeededShuffle(args.seed))
    try:
        networks = methods.build_networks(
            args.method, depth=args.depth, split=args.split,
            jaderberg_scaled=args.jaderberg_scale,
            vfbn_normalized_loss=args.vfbn_normalized_loss)
        hyper = dict(iterator=iterator, device=device, alpha_gs=args.alpha_gs, lr=args.lr,
                     momentum=args.momentum, weight_decay=args.weight_decay,
                     diag_interval=args.diag_interval)
        if comm is None:
            updater, scheduled = methods.build_updater(networks, **hyper)
        else:
            updater, scheduled = pipeline.build_updater(
                networks, comm=comm, lag=args.lag, timeout=args.pipeline_timeout, **hyper)
    except ValueError as e:
        raise UsageError(str(e))
    setup = methods.Setup(updater, networks.predictor, scheduled)
    stop = StopAt(*(
        (args.iterations, 'iteration') if args.iterations else (args.epoch, 'epoch')))
    trainer = chainer.training.Trainer(setup.updater, stop, out=args.out)

    epoch_iters = -(-len(train_set) // args.batchsize)
    every = (args.eval_every, 'iteration') if args.eval_every else (1, 'epoch')
    if args.iterations and not args.eval_every:
        every = (min(args.iterations, epoch_iters), 'iteration')

    def eval_trigger():
        return AlsoAtTheEnd(every, stop)
    snap_trigger = (args.snapshot_every, 'iteration') if args.snapshot_every else (1, 'epoch')

    lr_shifts = []
    for opt in setup.scheduled:
        if args.lr_drops:
            drop = chainer.training.triggers.ManualScheduleTrigger(args.lr_drops, 'iteration')
        else:
            drop = chainer.training.triggers.IntervalTrigger(args.lr_drop_every, 'epoch')
        lr_shifts.append(extensions.ExponentialShift('lr', config.LR_DROP_FACTOR, optimizer=opt))
        trainer.extend(lr_shifts[-1], trigger=drop)
    n_eval = args.eval_images or len(test_x)
    test_progress = PassProgress(sys.stdout, args.progress_every)
    evaluator = TestErrorEvaluator(setup.predictor, test_x[:n_eval], test_y[:n_eval], device,
                                   args.eval_views, progress=test_progress)
    if comm is not None:  # rank 0's copy of the upper half, from rank 1
        trainer.extend(pipeline.PullUpper(), trigger=eval_trigger())
    trainer.extend(evaluator, trigger=eval_trigger())
    # The predictor's snapshot first: the trainer's snapshot, taken after it, then
    # holds its trigger's state of the same iteration (else a resumed run would save
    # a model_iter_N at the next iteration).
    trainer.extend(extensions.snapshot_object(
        setup.predictor, 'model_iter_{.updater.iteration}.npz', n_retains=2,
        writer=runs.AtomicWriter()), trigger=snap_trigger)
    snapshot = extensions.snapshot(filename='snapshot_iter_{.updater.iteration}', n_retains=2,
                                   writer=runs.AtomicWriter())
    trainer.extend(snapshot, trigger=snap_trigger)
    lr_name = 'main' if args.method in ('bp', 'bottom') else 'lower'
    trainer.extend(extensions.observe_lr(lr_name), trigger=eval_trigger())
    trainer.extend(extensions.LogReport(trigger=eval_trigger()))
    keys = ['epoch', 'iteration', 'main/loss', 'main/accuracy']
    if args.method in methods.SYNTHESIZERS:
        keys += ['synth/loss', 'synth/cosine', 'synth/rel_error']
    elif args.method == 'layerwise':
        keys += ['head/loss', 'synth/cosine']
    keys += ['validation/main/error', 'lr', 'elapsed_time']
    progress = sys.stdout.isatty() if args.progress is None else args.progress
    trainer.extend(extensions.PrintReport(keys, out=sys.stdout if progress else PlainOut()),
                   trigger=eval_trigger())
    if progress:
        trainer.extend(extensions.ProgressBar(update_interval=10))
    else:
        trainer.extend(ProgressLines(args.progress_every, stop_iteration(args, len(train_set))))
    trainer.extend(StopOnSignal(snapshot))

    if args.resume:
        try:
            chainer.serializers.load_npz(args.resume, trainer)
        except (KeyError, ValueError) as e:
            raise UsageError('--resume %s does not fit this run (%s: %s); the run\'s '
                             'args.json does not describe the network the snapshot holds'
                             % (args.resume, type(e).__name__, str(e).splitlines()[0]))
        except Exception as e:
            raise UsageError('--resume %s cannot be read (%s: %s); the snapshot is damaged: '
                             'resume from an earlier snapshot_iter_N'
                             % (args.resume, type(e).__name__, str(e).splitlines()[0]))
        # Chainer's Trainer skips an extension's initialize() once its trigger has
        # finished, which a ManualScheduleTrigger has after its last point: without
        # this, a run resumed after its last --lr-drops point would go on at the
        # starting learning rate.
        for shift in lr_shifts:
            if shift._last_value is not None:
                shift._optimizer.lr = shift._last_value

    # Only now, with every input checked, touch the output folder: a new run (or a
    # resumed one written elsewhere) starts in a folder without another run's files.
    if arguments.continues_in_place(args):
        stale = [os.path.join(args.out, 'result.json')]  # the run goes on
    else:
        stale = runs.run_files(args.out)  # parse_args refused them without --overwrite
    runs.clear(p for p in stale if os.path.exists(p))
    created = not os.path.isdir(args.out)
    try:
        os.makedirs(args.out, exist_ok=True)
        runs.write_json(os.path.join(args.out, 'args.json'),
                        dict(vars(args), versions=machine.versions(),
                             machine=machine.machine(device)))
        return run_and_test(args, trainer, setup, snapshot, evaluator, comm, created,
                            (test_x, test_y, n_eval, device, test_progress))
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise NoSpace('no space left on the device of %s (writing %s): a snapshot of this '
                      'run needs about %.1f MB, %.1f MB are free'
                      % (args.out, os.path.basename(e.filename or '') or 'a file',
                         snapshot_bytes(args, setup) / 1e6,
                         shutil.disk_usage(args.out).free / 1e6))


def run_and_test(args, trainer, setup, snapshot, evaluator, comm, created, test):
    """Train to the stopping point, save training's end, then the final test and
    result.json (written last)."""
    test_x, test_y, n_eval, device, test_progress = test
    result = {'method': args.method, 'alpha_gs': args.alpha_gs, 'dataset': args.dataset,
              'depth': args.depth, 'seed': args.seed}
    try:
        with numpy.errstate(over='ignore', invalid='ignore'):  # NonFiniteError says it
            trainer.run(show_loop_exception_msg=False)
    except updaters.NonFiniteError as e:
        result.update(status='diverged', message=str(e),
                      iteration=setup.updater.iteration + 1)
        runs.write_json(os.path.join(args.out, 'result.json'), result)
        raise
    except MemoryError as e:
        forgotten = not args.resume and runs.latest_snapshot(args.out) is None
        if forgotten:  # a run that never started leaves nothing behind
            runs.clear(runs.run_files(args.out))
            if created and not os.listdir(args.out):
                os.rmdir(args.out)
        raise UsageError('out of memory at iteration %d (--batchsize %d, --depth %d): %s; '
                         '%s' % (setup.updater.iteration + 1, args.batchsize, args.depth,
                                 str(e).splitlines()[0] if str(e) else 'MemoryError',
                                 'nothing was kept' if forgotten else
                                 'the run can be resumed from its latest snapshot'))
    if comm is not None:
        setup.updater.pull_upper()
    # Training's end is saved before the final test, which can take many minutes: a
    # run stopped in the test is resumed at its end, and the resumed run only tests.
    end = os.path.join(args.out, 'snapshot_iter_%d' % setup.updater.iteration)
    if not os.path.isfile(end):
        snapshot(trainer)
    runs.save_npz(os.path.join(args.out, 'model.npz'), setup.predictor)
    # SIGINT and SIGTERM stop the test, as they stop training (StopOnSignal handles
    # both there, whatever the process inherited: a job started in the background
    # has SIGINT ignored, and Python would then keep ignoring it).
    old = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if args.tta_images is None and n_eval == len(test_x):
            final = evaluator.final(trainer)
        else:
            tta = args.tta_images or (len(test_x) if args.eval_views == config.N_VIEWS else 0)
            final = final_test_errors(setup.predictor, test_x, test_y, device, tta,
                                      progress=test_progress)
    except KeyboardInterrupt:
        raise TestInterrupted(setup.updater.iteration, end)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    result.update(status='finished', iteration=setup.updater.iteration,
                  epoch=setup.updater.epoch_detail, seconds=trainer.elapsed_time,
                  test_error=final['error'], test_error_single=final['error_single'],
                  eval_views=final['views'], test_images=len(test_x),
                  tta_images=final.get('tta_images', len(test_x) if final['views'] > 1 else 0))
    runs.write_json(os.path.join(args.out, 'result.json'), result)
    print('final test error %.2f%% (%d-view), %.2f%% (single view), %d iterations'
          % (100 * final['error'], final['views'], 100 * final['error_single'],
             setup.updater.iteration), flush=True)
    return result


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def snapshot_bytes(args, setup):
    """About how many bytes one more snapshot takes: the latest trainer snapshot
    and predictor beside it, or, before the first, the arrays of every network and
    optimizer (uncompressed) and the predictor's."""
    latest = runs.latest_snapshot(args.out)
    if latest:
        model = os.path.join(args.out, 'model_iter_%s.npz' % latest.rsplit('_', 1)[1])
        return sum(os.path.getsize(p) for p in (latest, model) if os.path.isfile(p))
    s = chainer.serializers.DictionarySerializer()
    for name, optimizer in setup.updater.get_all_optimizers().items():
        optimizer.target.serialize(s['model:' + name])
        optimizer.serialize(s[name])
    setup.predictor.serialize(s['predictor'])
    return sum(numpy.asarray(v).nbytes for v in s.target.values())


def mpi_world_size():
    """The processes of the MPI job this process was started in; 1 outside one.
    mpi4py starts MPI when imported, which a run outside ``mpiexec`` must not pay
    for, so it is imported only inside a job (the launcher's variables say so)."""
    if not any(os.environ.get(name) for name in ('PMI_RANK', 'OMPI_COMM_WORLD_RANK',
                                                 'PMIX_RANK')):
        return 1
    try:
        from mpi4py import MPI
    except ImportError:  # no MPI here: the --pipeline run says so when it connects
        return 1
    return MPI.COMM_WORLD.Get_size()


def check_launch(args, size):
    """Refuse, at start, a job of ``size`` processes that does not fit the run."""
    if not args.pipeline:
        if size > 1:
            raise UsageError('this is an mpiexec job of %d processes, but only --pipeline '
                             'runs on several processes: add --pipeline, or run python '
                             'train.py without mpiexec' % size)
        return
    if args.balance and args.splits is None:
        if size < 2:
            raise UsageError('--balance cuts the network into as many modules as there are '
                             'MPI processes; launch it with: mpiexec -n K python train.py '
                             '... --pipeline --balance, K >= 2 (got 1 process)')
    elif size != modules(args):
        raise UsageError('--pipeline runs the network\'s %d modules as %d MPI processes; '
                         'launch it with: mpiexec -n %d python train.py ... --pipeline '
                         '(got %d process%s)' % (modules(args), modules(args), modules(args),
                                                 size, '' if size == 1 else 'es'))


def resume_command(args):
    command = [sys.executable, sys.argv[0], '--resume', args.out]
    if args.pipeline:
        command = transport.launcher(modules(args)) + command
    return ' '.join(shlex.quote(a) for a in command)


def main(argv=None):
    """Command-line entry point: exit 0 on success (or nothing to do); one clear line
    and a non-zero status on bad input (2), divergence (3), a full disk (1) or
    interruption (130). In an mpiexec job, rank 0 alone reports a bad launch."""
    prog = os.path.basename(sys.argv[0])
    rank = transport.launched_rank()
    try:
        # Every rank checks everything, --out included (rank 0 writes to it only
        # after all have connected), so that all stop together on bad input.
        args = arguments.parse_args(argv)
        check_launch(args, mpi_world_size())
    except UsageError as e:
        if not rank:
            print('%s: error: %s' % (prog, e), file=sys.stderr)
        return EXIT_BAD_INPUT
    except runs.NothingToDo as e:
        if not rank:
            print('%s: %s' % (prog, e), flush=True)
        return 0
    if rank:
        prog = '%s (rank %d)' % (prog, rank)
    try:
        train(args)
    except (UsageError, data.DataError) as e:
        print('%s: error: %s' % (prog, e), file=sys.stderr)
        return EXIT_BAD_INPUT
    except updaters.NonFiniteError as e:
        print('%s: error: %s (see result.json)' % (prog, e), file=sys.stderr)
        return EXIT_DIVERGED
    except NoSpace as e:
        latest = runs.latest_snapshot(args.out)
        print('%s: error: %s; %s' % (prog, e, 'the latest whole snapshot is %s: free some '
                                     'space, then continue with: %s'
                                     % (latest, resume_command(args)) if latest else
                                     'no snapshot was written yet: free some space, then '
                                     'start again with --overwrite'), file=sys.stderr)
        return 1
    except MemoryError as e:
        print('%s: error: out of memory: %s' % (prog, str(e).splitlines()[0] if str(e)
                                                else 'MemoryError'), file=sys.stderr)
        return EXIT_BAD_INPUT
    except transport.PipelineError as e:
        print('%s: error: %s' % (prog, e), file=sys.stderr, flush=True)
        transport.abort(1)
    except (Interrupted, KeyboardInterrupt) as e:
        iteration, snapshot = e.args if isinstance(e, Interrupted) else (None, None)
        latest = runs.latest_snapshot(args.out)
        if isinstance(e, TestInterrupted):
            said = ('interrupted in the final test; training\'s end (iteration %d) is saved '
                    'in %s, and resuming it runs only the test' % (iteration, snapshot))
        elif snapshot:
            said = 'interrupted at iteration %d; a snapshot was saved' % iteration
        elif latest:
            said = 'interrupted again before the snapshot; the latest snapshot is %s' % latest
        else:
            print('%s: interrupted before the first snapshot; nothing to resume'
                  % prog, file=sys.stderr)
            return EXIT_INTERRUPTED
        print('%s: %s: continue with: %s' % (prog, said, resume_command(args)),
              file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0
