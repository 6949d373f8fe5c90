"""Where the runs of ``python -m chainer_vfbn.table run`` train: on this machine's
GPUs (``--gpus``: each run that trains at once holds its own) or as Slurm jobs
(``--executor slurm``, :mod:`chainer_vfbn.slurm`): their options, and the one-line
refusals of those that do not go together (docs/RUNNING.md, "On a cluster")."""
import argparse

from chainer_vfbn import slurm

#: train.py's device options, which ``--gpus`` sets for each run.
DEVICE_OPTIONS = ('--gpu', '-g', '--device')


def positive_int(text):
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError('expected an integer >= 1, got %r' % text)
    return n


def argument_type(convert):
    """An argparse type from a function that raises ValueError with the reason."""
    def parse(text):
        try:
            return convert(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e))
    parse.__name__ = convert.__name__
    return parse


def gpu_id(text):
    if not text.isdigit():
        raise ValueError('expected a GPU number >= 0, got %r' % text)
    return int(text)


def add_options(r):
    """``run``'s options for GPUs and for Slurm (docs/RUNNING.md)."""
    r.add_argument('--gpus', type=argument_type(gpu_id), nargs='+', default=None,
                   metavar='GPU', help='give each run that trains at once its own GPU '
                                       'from this list (train.py --gpu G)')
    r.add_argument('--executor', choices=('local', 'slurm'), default='local',
                   help='local: train here; slurm: submit the runs as one Slurm job '
                        'array and return (default: local)')
    g = r.add_argument_group('Slurm (--executor slurm)')
    g.add_argument('--partition', help='partition of every job (default: the cluster\'s)')
    g.add_argument('--account', help='account charged (default: yours)')
    g.add_argument('--time', type=argument_type(slurm.minutes), metavar='LIMIT',
                   help='time limit of each job, e.g. 4:00:00 or 1-00:00:00; a run that '
                        'needs longer is requeued and resumed (default: the partition\'s)')
    g.add_argument('--gpus-per-run', type=positive_int, metavar='N',
                   help='GPUs of each job (sbatch --gpus-per-node); add -- --gpu 0')
    g.add_argument('--cpus-per-run', type=positive_int, metavar='N',
                   help='CPUs of each job, and its BLAS threads (default: the cluster\'s)')
    g.add_argument('--mem', metavar='SIZE', help='memory of each job, e.g. 16G')
    g.add_argument('--sbatch', type=argument_type(slurm.sbatch_setting), action='append',
                   default=[], metavar='KEY=VALUE',
                   help='any other sbatch option, e.g. --sbatch qos=high --sbatch '
                        'gres=gpu:a100:1 (repeatable)')
    g.add_argument('--signal-before', type=positive_int, default=300, metavar='SECONDS',
                   help='Slurm signals a job this long before its time limit; the run '
                        'saves a snapshot and the job requeues itself (default: 300)')


def gpu_count():
    """GPUs CuPy sees on this machine, or None when that is unknown (no CuPy)."""
    try:
        import cupy  # optional: only a GPU machine has it
        return cupy.cuda.runtime.getDeviceCount()
    except Exception:
        return None


def check(args, extra):
    """One-line refusals of ``run`` options that do not go together."""
    slurm_only = [o for o, v in (('--partition', args.partition), ('--account', args.account),
                                 ('--time', args.time), ('--gpus-per-run', args.gpus_per_run),
                                 ('--cpus-per-run', args.cpus_per_run), ('--mem', args.mem),
                                 ('--sbatch', args.sbatch)) if v]
    device = [a for a in extra if a.split('=')[0] in DEVICE_OPTIONS]
    if args.executor == 'local' and slurm_only:
        return '%s: only with --executor slurm' % ', '.join(slurm_only)
    if args.executor == 'slurm':
        if args.gpus is not None:
            return '--gpus is for --executor local; on Slurm give --gpus-per-run N ' \
                   '(Slurm picks the GPUs) and -- --gpu 0'
        if args.gpus_per_run and not device:
            return '--gpus-per-run %d gives each job GPUs, but train.py would run on the ' \
                   'CPU: add -- --gpu 0' % args.gpus_per_run
        return None
    if args.gpus is None:
        return None
    if device:
        return '--gpus gives each run its GPU; leave %s out of the train.py arguments' \
            % ' '.join(device)
    if len(set(args.gpus)) < len(args.gpus):
        return '--gpus %s names a GPU twice' % ' '.join(map(str, args.gpus))
    if args.jobs > len(args.gpus):
        return '--jobs %d runs %d at once but --gpus names only %d GPU(s)' % (
            args.jobs, args.jobs, len(args.gpus))
    count = gpu_count()
    missing = [g for g in args.gpus if count is not None and g >= count]
    if missing:
        return '--gpus: this machine has %d GPU(s) (0 to %d); there is no GPU %s' % (
            count, count - 1, ' '.join(map(str, missing)))
    return None
