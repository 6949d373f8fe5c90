"""Device check: chainer-vfbn on a GPU (CuPy 14, no cuDNN) against the CPU and PyTorch.

One short run on a lent GPU machine answers what docs/GPU.md leaves open: whether
Chainer 7.8.1's kernels, compiled by CuPy 14, compute the paper's networks correctly,
and how fast they are without cuDNN, on the composed path (the code before the
speed work) and on the fused path (``chainer_vfbn.fused``; ``chainer_vfbn.hostcost``
names the variants). Sections, in order, each guarded so that a failure is recorded
and the next one still runs:

1. ``numerics`` (numerics.py): the same weights and inputs on the GPU and on the CPU,
   at small depth: logits and every parameter gradient of full backprop (Table 1
   "BackProp"), and for VFBN (paper eq. 6 and eq. 3, SPEC section 3-4) h, delta,
   delta_hat, eq. 3 and the gradients of v_f (double backprop) and of the lower half,
   in float32 (the float64 run, ``numerics64``, comes last).
2. ``paths`` (paths.py): backprop and VFBN (alpha_gs = 1e-3) at full depth, batch
   128, on the composed and the fused path (and the fused path without type checks),
   timed interleaved in one process: ms per step and paired ratios; the function
   applications of a step of each.
3. ``torch`` (torch_ref.py): the same ResNet-110 in PyTorch on the same GPU (cuDNN,
   eager), fp32 and TF32, as the yardstick of what this GPU does with this network,
   and Chainer's steps of ``paths`` (and ``timing``) over it.
4. ``numerics_fused`` (numerics.py): two training steps of the fused path on the GPU
   against the composed path on the CPU, float64: gradients, parameters, BN running
   statistics, optimizer snapshots.
5. ``kernels`` (graphs.py): the kernels one residual unit launches, composed and
   fused, counted in a captured CUDA graph.
6. ``graph`` (graphs.py), an experiment: the fused step captured as a CUDA graph and
   replayed, against the same step run eagerly.
7. ``timing`` (timing.py): one training step of BP and of VFBN with the package's
   defaults; BP again with CuPy's float32 GEMMs on TF32; a BP step split into
   forward, backward and update (until queued and until done), with its function
   count.
8. ``changes`` (changes.py): the earlier speed-ups (one-kernel optimizer, sync-free
   cross-entropy) timed against the code they replaced, interleaved, as ratios; and
   the fused optimizer's parameters against Chainer's optimizer's on the device.
9. ``methods`` (pipeline.py): 20 training steps of every Table 1 method
   (``methods.TABLE1``) through the real data pipeline.
10. ``data`` (pipeline.py): the host-side 36-view pipeline's views per second.
11. ``numerics64``: section 1 in float64, where the tolerance can be ~1e-10.

The modules import in one direction: ``common`` (helpers) below ``numerics`` and
``timing`` (helpers the sections share, and sections), the other sections above
them, ``render`` (the report) on top, then this file. The budget (``--budget-s``)
stops new sections, runs and rounds once spent; ``device_run.sh`` also bounds the
whole check with ``timeout`` so that the call, install and GPU tests included,
stays under 5 minutes.

Results go to ``OUT/device_check.json`` and ``OUT/device_check.md`` (render.py),
rewritten after every section (and every method), so a run cut off by a timeout keeps
what finished. Without CuPy or a GPU it prints ``CuPy/CUDA not available: ...``,
writes nothing and exits 0. ``--device @numpy`` dry-runs every section on the CPU
(the "GPU" side is then a second CPU copy, and the numerics must agree exactly).

Run on the device (Chainer installed from the wheels of build_device_wheels.sh;
``benchmarks/device_run.sh OUT`` does the install, this, and the GPU tests)::

    PYTHONPATH=/tmp/site:$PWD python3 benchmarks/device_check --out $OUT
"""
import argparse
import json
import os
import sys

# ``python benchmarks/device_check`` puts this folder first on sys.path; a test that
# loads this file does not, and the modules import each other by bare name.
HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

# common first: it puts the repository root on sys.path and imports chainer_vfbn
# before Chainer (whose import its repairs must precede).
import common  # noqa: E402
from common import SECTIONS, free_device_memory, log, short_error, verdict  # noqa: E402
import changes  # noqa: E402
import graphs  # noqa: E402
import numerics  # noqa: E402
import paths  # noqa: E402
import pipeline  # noqa: E402
import render  # noqa: E402
import timing  # noqa: E402
import torch_ref  # noqa: E402

import chainer  # noqa: E402
import numpy  # noqa: E402


# ---------------------------------------------------------------------------
# Arguments and the device.

def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description='Check chainer-vfbn on a GPU: numerics against the CPU, step '
                    'times, a PyTorch reference, 20 steps of every Table 1 method.',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--out', '-o', required=True, help='folder for device_check.json/.md')
    p.add_argument('--device', '-d', default='@cupy:0',
                   help='@cupy:N, or @numpy for a dry run on the CPU')
    p.add_argument('--depth', type=int, default=None,
                   help='units per block for timing, PyTorch and the methods '
                        '(default 18, the paper\'s ResNet-110; --quick: 1)')
    p.add_argument('--batch', type=int, default=None,
                   help='batch size of the same (default 128; --quick: 8)')
    p.add_argument('--steps', type=int, default=None,
                   help='training steps per method (default 20; --quick: 2)')
    p.add_argument('--warmup', type=int, default=5, help='untimed steps before timing')
    p.add_argument('--timed', type=int, default=20, help='timed steps (median)')
    p.add_argument('--numerics-depth', type=int, default=2,
                   help='units per block for the GPU-vs-CPU numerics')
    p.add_argument('--numerics-batch', type=int, default=16)
    p.add_argument('--data-batches', type=int, default=50,
                   help='batches timed in the data-pipeline section')
    p.add_argument('--sections', default=','.join(SECTIONS),
                   help='comma-separated subset of: ' + ', '.join(SECTIONS))
    p.add_argument('--budget-s', type=float, default=190.0,
                   help='start no new section, run or round after this many seconds '
                        '(what runs then still finishes: plan ~40 s more)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--quick', action='store_true',
                   help='shrink everything for a dry run: depth 1, batch 8, 2 steps, '
                        'numerics depth 1 batch 4, 1 warm-up and 2 timed steps, 3 data '
                        'batches (explicit --depth/--batch/--steps still apply)')
    args = p.parse_args(argv)
    small = {'depth': 1, 'batch': 8, 'steps': 2}
    full = {'depth': 18, 'batch': 128, 'steps': 20}
    for name in small:
        if getattr(args, name) is None:
            setattr(args, name, (small if args.quick else full)[name])
    if args.quick:
        args.numerics_depth, args.numerics_batch = 1, 4
        args.warmup, args.timed, args.data_batches = 1, 2, 3
    args.sections = [s.strip() for s in args.sections.split(',') if s.strip()]
    bad = [s for s in args.sections if s not in SECTIONS]
    if bad:
        p.error('unknown section(s) %s; choose from %s' % (', '.join(bad), ', '.join(SECTIONS)))
    for name in ('depth', 'batch', 'steps', 'warmup', 'timed', 'numerics_depth', 'numerics_batch',
                 'data_batches'):
        if getattr(args, name) < 1:
            p.error('--%s must be >= 1' % name.replace('_', '-'))
    if args.device != '@numpy' and not args.device.startswith('@cupy:'):
        p.error('--device must be @cupy:N or @numpy, got %r' % args.device)
    return args


def cuda_problem(spec):
    """Why CuPy cannot run on ``spec`` (a sentence), or None when it can."""
    try:
        import cupy
    except Exception as e:
        return 'cannot import cupy (%s: %s)' % (type(e).__name__, str(e).strip()[:200])
    try:
        gpu = int(spec.split(':', 1)[1])
        n = cupy.cuda.runtime.getDeviceCount()
        if gpu >= n:
            return 'GPU %d requested, %d CUDA device(s) found' % (gpu, n)
        with cupy.cuda.Device(gpu):
            cupy.empty(1)  # creates the context and allocates: the driver works
    except Exception as e:
        return '%s: %s' % (type(e).__name__, str(e).strip()[:200])
    return None


# ---------------------------------------------------------------------------
# The sections in order, each guarded.

def main(argv=None):
    args = parse_args(argv)
    common.CLOCK = common.Clock(args.budget_s)
    gpu = args.device != '@numpy'
    if gpu:
        problem = cuda_problem(args.device)
        if problem:
            print('CuPy/CUDA not available: %s' % problem, flush=True)
            return 0

    os.makedirs(args.out, exist_ok=True)
    report = render.Report(args.out, args)
    log('device check on %s: sections %s, budget %.0f s'
        % (args.device, ', '.join(args.sections), args.budget_s))
    report.data['status'] = status = {}
    try:
        report.data['sections']['environment'] = common.environment(args.device, gpu)
        log('environment: ' + json.dumps(report.data['sections']['environment']))
    except Exception as e:
        report.data['sections']['environment'] = short_error(e)
    try:
        device = chainer.get_device(args.device)
        device.use()
    except Exception as e:
        # CuPy works (checked above) but Chainer cannot use it: every Chainer section
        # fails with this error; the PyTorch reference still runs.
        device = None
        report.data['device_error'] = short_error(e)
        log('Chainer cannot use %s: %s' % (args.device, report.data['device_error']['error']))
    report.save()

    # Looked up when called, so that a test can replace a section's function.
    runners = {'numerics': lambda: numerics.numerics(args, device, report, numpy.float32),
               'numerics64': lambda: numerics.numerics(args, device, report, numpy.float64),
               'numerics_fused': lambda: numerics.numerics_fused(args, device, report),
               'paths': lambda: paths.paths(args, device, report),
               'kernels': lambda: graphs.kernels(args, device, report),
               'graph': lambda: graphs.graph(args, device, report),
               'timing': lambda: timing.timing(args, device, report),
               'changes': lambda: changes.changes(args, device, report),
               'torch': lambda: torch_ref.torch_reference(args, gpu, report),
               'methods': lambda: pipeline.all_methods(args, device, report),
               'data': lambda: pipeline.data_pipeline(args, device, report)}
    for name in SECTIONS:
        if name not in args.sections:
            continue
        if common.CLOCK.left() <= 0:
            status[name] = 'skipped (time budget)'
            report.save()
            continue
        log('--- section %s' % name)
        status[name] = 'running'
        report.save()
        try:
            if device is None and name != 'torch':
                raise RuntimeError('Chainer cannot use %s: %s'
                                   % (args.device, report.data['device_error']['error']))
            runners[name]()
            status[name] = 'done'
        except Exception as e:
            report.section(name).update(short_error(e))
            status[name] = 'error'
            log('%s: ERROR %s' % (name, report.section(name)['error']))
        if device is not None:
            free_device_memory(device)
        report.save()
    for name in ('numerics', 'numerics_fused', 'numerics64'):
        num = report.data['sections'].get(name, {})
        if 'passed' in num:
            log('%s (%s): %s' % (name, num['dtype'], verdict(num['passed'])))
    log('done; wrote %s and %s' % (report.json_path, report.md_path))
    return 0


if __name__ == '__main__':
    sys.exit(main())
