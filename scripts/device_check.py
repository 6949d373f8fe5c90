#!/usr/bin/env python3
"""Device check: chainer-vfbn on a GPU (CuPy 14, no cuDNN) against the CPU and PyTorch.

One short run on a lent GPU machine answers what ``../shared/COMPAT.md`` ("CuPy")
lists as not yet seen: whether Chainer 7.8.1's kernels, compiled by CuPy 14, compute
the paper's networks correctly, and how fast they are without cuDNN. Sections, in
order, each guarded so that a failure is recorded and the next one still runs:

1. ``numerics``: the same weights and inputs on the GPU and on the CPU, at small depth:
   logits and every parameter gradient of full backprop (Table 1 "BackProp"), and for
   VFBN (paper eq. 6 and eq. 3, SPEC section 3-4) h, delta, delta_hat, eq. 3 and the
   gradients of v_f (double backprop) and of the lower half (``h.backward()`` with
   delta_hat); in float32 (the float64 run, ``numerics64``, comes last).
2. ``timing``: one training step of BP and of VFBN (alpha_gs = 1e-3) at full depth,
   batch 128, the batches already on the device: median over synchronised steps;
   then BP again with CuPy's float32 GEMMs on TF32 (PyTorch's TF32 counterpart);
   then a BP step split into forward, backward and update, each timed until the
   host has queued it and until the device has run it, with its function count.
2b. ``changes``: each speed-up (``chainer_vfbn.sgd``'s one-kernel optimizer,
   ``synthesizers.cross_entropy`` without a host sync) timed against the code it
   replaced, runs interleaved in one process, as ratios; and the fused optimizer's
   parameters against Chainer's optimizer's on the device.
3. ``torch``: the same ResNet-110 in PyTorch on the same GPU (cuDNN, eager), fp32 and
   TF32, as the yardstick of what this GPU does with this network.
4. ``methods``: 20 training steps of every Table 1 method (``methods.TABLE1``) through
   the real data pipeline (``AugmentedDataset`` + ``BatchIterator``).
5. ``data``: the host-side 36-view pipeline's views per second at batch 128.
6. ``numerics64``: section 1 in float64, where the tolerance can be ~1e-10.

Results go to ``OUT/device_check.json`` and ``OUT/device_check.md``, rewritten after
every section (and every method), so a run cut off by a timeout keeps what finished.
Without CuPy or a GPU the script prints ``CuPy/CUDA not available: ...``, writes
nothing and exits 0. ``--device @numpy`` dry-runs every section on the CPU (the
"GPU" side is then a second CPU copy, and the numerics must agree exactly).

Run on the device (Chainer installed from the wheels of build_device_wheels.sh;
``scripts/device_run.sh OUT`` does the install, this, and the GPU tests)::

    PYTHONPATH=/tmp/site:$PWD python3 scripts/device_check.py --out $OUT
"""
import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

# Before CuPy and Chainer are imported: CuPy reads CUPY_TF32 once, at the first
# float32 GEMM. TF32 (10-bit mantissa) would make the GPU's float32 GEMMs differ from
# the CPU's by ~1e-3 relative, drowning the rounding-order differences the numerics
# compare; CuPy's default is off, we make it explicit (and time Chainer in true fp32).
os.environ['CUPY_TF32'] = '0'
# CuPy 14 has no cuDNN; say so to Chainer instead of having it warn (COMPAT.md).
os.environ.setdefault('CHAINER_CUDNN', '0')

import numpy  # noqa: E402

import chainer_vfbn  # noqa: E402  (first: its repairs must precede Chainer's import)
import chainer  # noqa: E402
import chainer.functions as F  # noqa: E402

from chainer_vfbn import config, data, methods, model, sgd, synthesizers, updaters  # noqa: E402

# Run in this order. float64 comes last: its GPU kernels are compiled for it alone
# (CuPy compiles every kernel once per dtype), so where compilation is slow it must
# not delay the float32 timings; a timeout then costs only the float64 check.
SECTIONS = ('numerics', 'timing', 'changes', 'torch', 'methods', 'data', 'numerics64')
RESNET110_PARAMS = 2975594  # SPEC section 2: parameters at 18 units per block

# ---------------------------------------------------------------------------
# Tolerances of the numerics (section 1). Errors are normwise: for a quantity q,
#   err(q) = max|q_gpu - q_cpu| / max|q_cpu|,
# because an element-wise relative error is meaningless for the many entries of a
# gradient that are near zero. A gradient that is zero in exact arithmetic (conv1's
# bias feeds straight into BN, SPEC section 2) is pure rounding noise (~1e-8 against
# gradients ~1e-1); so a gradient's denominator is at least GROUP_FLOOR x the largest
# gradient of the same network (lower half, upper half or v_f).
GROUP_FLOOR = 1e-3
# float32: the GPU and the CPU round differently (cuBLAS and OpenBLAS split and order
# the sums of the im2col GEMMs differently; CuPy's reductions for BN's batch mean and
# variance use another order than NumPy's pairwise sums), so they differ by float32
# rounding noise, amplified by the network's conditioning (BN divides by batch
# standard deviations; its backward subtracts nearly equal terms). The size of that
# noise is measured, not guessed: NOISE32(q) is the error of the CPU's own float32
# result against the CPU's float64 result from the same weights (on the CPU at depth
# 2, batch 16: 2e-8 for the loss, ~1e-6 for logits, h, delta and delta_hat, 3e-7 to
# 1.4e-5 for the parameter gradients). The GPU's float32 error is another draw of
# the same kind of noise; a different summation order (blocked or sequential partial
# sums instead of pairwise) can make it larger by a few times, so NOISE_FACTOR x
# NOISE32(q) is allowed, and never less than RTOL32 (~80 float32 ulps, 2^-23 ~
# 1.2e-7). That still fails anything systematic: TF32 GEMMs (10-bit mantissa) give
# ~1e-3, a wrong kernel or a dropped term O(1).
NOISE_FACTOR = 30.0
RTOL32 = 1e-5
# float64: the same rounding-order differences at 2^-52 ~ 2.2e-16 per operation, that
# is 2^-29 ~ 2e-9 times the float32 noise above: ~3e-14 for the worst gradient. Even
# the worst conditioning seen on this network (COMPAT.md: float32 gradients ~1e-2
# apart across BLAS builds, an amplification of ~1e5 over float32's eps) gives ~2e-11
# in float64; RTOL64 stays above that and far below any real difference.
RTOL64 = 1e-10


class Clock(object):
    """Wall time since the start, for timestamps and the time budget."""

    def __init__(self, budget_s):
        self.start, self.budget_s = time.time(), budget_s

    def elapsed(self):
        return time.time() - self.start

    def left(self):
        return self.budget_s - self.elapsed()


CLOCK = Clock(float('inf'))


def log(msg):
    print('[%6.1fs] %s' % (CLOCK.elapsed(), msg), flush=True)


def short_error(e):
    """``Type: first line`` of an exception, and the end of its traceback."""
    tb = traceback.format_exc().strip().splitlines()
    first = str(e).strip().splitlines()[0] if str(e).strip() else ''
    return {'error': '%s: %s' % (type(e).__name__, first), 'traceback': tb[-20:]}


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
    p.add_argument('--budget-s', type=float, default=240.0,
                   help='start no new section or method after this many seconds '
                        '(what runs then still finishes: plan ~60 s more)')
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


def synchronize(device):
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.xp is not numpy:
        device.xp.cuda.get_current_stream().synchronize()


def free_device_memory(device):
    if device.xp is not numpy:
        synchronize(device)
        device.xp.get_default_memory_pool().free_all_blocks()


def to_host(array):
    return None if array is None else numpy.asarray(chainer.backend.CpuDevice().send(array))


# ---------------------------------------------------------------------------
# Results: one dict, saved as JSON and rendered as Markdown after every step.

class Report(object):
    def __init__(self, out, args):
        self.json_path = os.path.join(out, 'device_check.json')
        self.md_path = os.path.join(out, 'device_check.md')
        self.data = {'started': datetime.datetime.now(datetime.timezone.utc).isoformat(),
                     'argv': sys.argv, 'args': {k: v for k, v in vars(args).items()},
                     'sections': {}}

    def section(self, name):
        return self.data['sections'].setdefault(name, {})

    def save(self):
        self.data['elapsed_s'] = round(CLOCK.elapsed(), 2)
        for path, text in ((self.json_path, json.dumps(self.data, indent=2, default=_jsonable)),
                           (self.md_path, render_markdown(self.data))):
            tmp = path + '.tmp'
            with open(tmp, 'w') as f:
                f.write(text + '\n')
            os.replace(tmp, path)


def _jsonable(x):
    if isinstance(x, (numpy.floating, numpy.integer)):
        return x.item()
    if isinstance(x, numpy.ndarray):
        return x.tolist()
    return str(x)


def environment(spec, gpu):
    """Versions, GPU and the Chainer/CuPy settings that change what is measured."""
    cuda = chainer.backends.cuda
    env = {'python': platform.python_version(), 'numpy': numpy.__version__,
           'chainer': chainer.__version__, 'platform': platform.platform(),
           'cpus': os.cpu_count(), 'device': spec,
           'chainer_cuda_available': bool(cuda.available),
           'chainer_cudnn_enabled': bool(chainer.backends.cuda.cudnn_enabled),
           'CUPY_TF32': os.environ.get('CUPY_TF32'),
           'CHAINER_CUDNN': os.environ.get('CHAINER_CUDNN'),
           # others that change what GPU kernels do (None: not set, the default)
           'CUPY_ACCELERATORS': os.environ.get('CUPY_ACCELERATORS'),
           'NVIDIA_TF32_OVERRIDE': os.environ.get('NVIDIA_TF32_OVERRIDE'),
           'compat_repairs': list(chainer_vfbn._compat.applied)}
    if getattr(cuda, '_resolution_error', None) is not None:
        # Why Chainer found no CuPy, or (CuPy 14) no cuDNN.
        env['chainer_cuda_note'] = '%s: %s' % (type(cuda._resolution_error).__name__,
                                               cuda._resolution_error)
    if gpu:
        import cupy
        props = cupy.cuda.runtime.getDeviceProperties(int(spec.split(':')[1]))
        name = props['name']
        env.update(
            gpu=name.decode() if isinstance(name, bytes) else name,
            compute_capability='%d.%d' % (props['major'], props['minor']),
            gpu_memory_gib=round(props['totalGlobalMem'] / 2.0 ** 30, 1),
            cupy=cupy.__version__,
            cuda_runtime=cupy.cuda.runtime.runtimeGetVersion(),
            cuda_driver_api=cupy.cuda.runtime.driverGetVersion(),
            cupy_cudnn=_has_module('cupy.cudnn'))
        try:
            smi = subprocess.run(['nvidia-smi', '--query-gpu=driver_version',
                                  '--format=csv,noheader'], capture_output=True,
                                 text=True, timeout=20)
            env['nvidia_driver'] = smi.stdout.strip().splitlines()[0]
        except Exception as e:
            env['nvidia_driver'] = 'unknown (%s)' % type(e).__name__
    try:
        import torch
        env['torch'] = torch.__version__
        env['torch_cuda'] = torch.version.cuda
    except Exception as e:
        env['torch'] = 'not available (%s)' % type(e).__name__
    return env


def _has_module(name):
    try:
        __import__(name)
        return True
    except Exception:
        return False


# ---------------------------------------------------------------------------
# 1. Numerics: GPU against CPU, same weights, same inputs.

def build_nets(depth, dtype, seed):
    """The lower and upper half of the paper's ResNet and a VFBN synthesizer, in
    ``dtype``, with the weights that ``seed`` gives the float32 build (the float64
    build gets the same values, cast)."""
    numpy.random.seed(seed)
    lower, upper = model.build_resnet(depth)
    synth = synthesizers.VFBN(synthesizers.VirtualForward(lower.units[-1].out_ch))
    if dtype != numpy.float32:
        with chainer.using_config('dtype', dtype):
            cast = model.build_resnet(depth) + (
                synthesizers.VFBN(synthesizers.VirtualForward(lower.units[-1].out_ch)),)
        for src, dst in zip((lower, upper, synth), cast):
            dst_params = dict(dst.namedparams())
            for name, p in src.namedparams():
                dst_params[name].array[...] = p.array
        lower, upper, synth = cast
    return {'lower': lower, 'upper': upper, 'synth': synth, 'net': model.Net(lower, upper)}


def numerics_inputs(batch, seed):
    rng = numpy.random.RandomState(seed + 1)
    x = rng.standard_normal((batch, 3, config.INPUT_SIZE, config.INPUT_SIZE))
    t = rng.randint(0, config.N_CLASSES, batch).astype(numpy.int32)
    return x.astype(numpy.float32), t


def backprop_quantities(nets, x, t):
    """Table 1 "BackProp": logits, loss and every parameter's gradient."""
    net = nets['net']
    logits = net(x)
    loss = F.softmax_cross_entropy(logits, t)
    net.cleargrads()
    loss.backward()
    out = {'logits': logits.array, 'loss': loss.array}
    out.update(('grad %s' % name[1:], p.grad) for name, p in net.namedparams())
    return out


def vfbn_quantities(nets, x, t):
    """One VFBN iteration (DecoupledUpdater's steps 1-4, SPEC section 4) without
    the optimizer updates: h, delta_hat (eq. 6), delta, eq. 3, the gradient of eq. 3
    w.r.t. v_f's parameters (double backprop) and the lower half's gradients after
    ``h.backward()`` with delta_hat."""
    lower, upper, synth = nets['lower'], nets['upper'], nets['synth']
    h = lower(x)
    delta_hat = synth(chainer.Variable(h.array), t)
    lower.cleargrads()
    h.grad = delta_hat.array
    h.backward()
    h_up = chainer.Variable(h.array)
    loss = F.softmax_cross_entropy(upper(h_up), t)
    upper.cleargrads()
    loss.backward()
    delta = h_up.grad
    scale = synth.xp.sqrt((delta * delta).mean())
    e = synth.loss(delta_hat, delta, scale)
    synth.cleargrads()
    e.backward()
    out = {'h': h.array, 'delta': delta, 'delta_hat': delta_hat.array, 'eq3': e.array}
    out.update(('grad lower%s' % name, p.grad) for name, p in lower.namedparams())
    out.update(('grad v_f%s' % name[len('/v_f'):], p.grad)
               for name, p in synth.namedparams())
    return out


CHECKS = {'bp': backprop_quantities, 'vfbn': vfbn_quantities}


def run_check(check, depth, batch, dtype, devices, seed):
    """The check's quantities computed on each of ``devices``, as host arrays, from
    the same weights and inputs."""
    x, t = numerics_inputs(batch, seed)
    x = x.astype(dtype)
    results = []
    for dev in devices:
        nets = build_nets(depth, dtype, seed)
        for link in nets.values():
            link.to_device(dev)
        with chainer.using_device(dev), chainer.using_config('train', True):
            q = CHECKS[check](nets, dev.send(x), dev.send(t))
        synchronize(dev)
        results.append({k: to_host(v) for k, v in q.items()})
    return results


def grad_group(name):
    """``'grad lower/units/0/conv1/W'`` -> ``'grad lower'`` (the network it belongs to);
    None for a quantity that is not a gradient."""
    return name.split('/')[0] if name.startswith('grad ') else None


def normwise_errors(ref, got):
    """``{name: (max abs error, err, max |ref|)}`` with err as in the module's
    tolerance notes: the denominator of a gradient is at least GROUP_FLOOR x the
    largest gradient of the same network (lower half, upper half or v_f)."""
    largest = {}
    for name, r in ref.items():
        if grad_group(name) and r is not None and r.size:
            largest[grad_group(name)] = max(largest.get(grad_group(name), 0.0),
                                            float(numpy.abs(r).max()))
    errors = {}
    for name, r in ref.items():
        g = got.get(name)
        if r is None or g is None:
            errors[name] = (0.0, 0.0 if r is None and g is None else math.inf, 0.0)
            continue
        r, g = r.astype(numpy.float64), g.astype(numpy.float64)
        diff = float(numpy.abs(g - r).max()) if r.size else 0.0
        scale = float(numpy.abs(r).max()) if r.size else 0.0
        denom = max(scale, GROUP_FLOOR * largest.get(grad_group(name), 0.0))
        err = diff / denom if denom > 0 else (0.0 if diff == 0 else math.inf)
        errors[name] = (diff, err, scale)
    return errors


def numerics(args, device, report, dtype):
    """Section ``numerics`` (float32) or ``numerics64`` (float64): every quantity of
    both checks on the device against the CPU, with the tolerances above."""
    f32 = dtype == numpy.float32
    sec = report.section('numerics' if f32 else 'numerics64')
    sec.update(dtype=numpy.dtype(dtype).name, depth=args.numerics_depth,
               batch=args.numerics_batch, group_floor=GROUP_FLOOR, checks={})
    sec.update(rtol=RTOL32, noise_factor=NOISE_FACTOR) if f32 else sec.update(rtol=RTOL64)
    cpu = chainer.get_device('@numpy')
    for check in CHECKS:
        log('numerics %s, %s: depth %d, batch %d' % (
            check, sec['dtype'], args.numerics_depth, args.numerics_batch))
        entry = sec['checks'].setdefault(check, {})
        try:
            ref, got = run_check(check, args.numerics_depth, args.numerics_batch, dtype,
                                 (cpu, device), args.seed)
            if f32:  # the float32 rounding noise, measured on the CPU (NOISE_FACTOR)
                ref64, = run_check(check, args.numerics_depth, args.numerics_batch,
                                   numpy.float64, (cpu,), args.seed)
                noise = normwise_errors(ref64, ref)
        except Exception as e:
            entry.update(short_error(e), passed=False)
            log('numerics %s: ERROR %s' % (check, entry['error']))
            report.save()
            continue
        rows = []
        for name, (max_abs, err, scale) in normwise_errors(ref, got).items():
            row = {'quantity': name, 'shape': None if ref[name] is None else list(ref[name].shape),
                   'scale': scale, 'max_abs': max_abs, 'err': err}
            if f32:
                row.update(noise=noise[name][1], tol=max(RTOL32, NOISE_FACTOR * noise[name][1]))
            else:
                row['tol'] = RTOL64
            row['passed'] = err <= row['tol']
            rows.append(row)
        entry.update(quantities=rows, passed=all(r['passed'] for r in rows))
        worst = max(rows, key=lambda r: r['err'] / r['tol'])
        log('numerics %s, %s: %s (worst %s: err %.2e, tol %.2e)' % (
            check, sec['dtype'], _verdict(entry['passed']), worst['quantity'],
            worst['err'], worst['tol']))
        report.save()
    sec['passed'] = all(c.get('passed') for c in sec['checks'].values())


# ---------------------------------------------------------------------------
# Data for the training sections.

def generated_images(n, seed):
    """``n`` uint8 CIFAR-shaped images whose class is learnable: a per-class 4x4
    colour pattern (upsampled to 32x32) plus noise. 20 steps should lower the loss."""
    rng = numpy.random.RandomState(seed + 2)
    templates = rng.standard_normal((config.N_CLASSES, 3, 4, 4))
    templates = templates.repeat(8, axis=2).repeat(8, axis=3)
    labels = rng.randint(0, config.N_CLASSES, n).astype(numpy.int32)
    images = 128 + 40 * templates[labels] + 30 * rng.standard_normal((n, 3, 32, 32))
    return numpy.clip(numpy.rint(images), 0, 255).astype(numpy.uint8), labels


class ResidentBatches(chainer.dataset.Iterator):
    """Cycles through a few batches already on the device, so that a timed step is
    the network's work alone (the host pipeline is timed in section 5)."""

    def __init__(self, batches):
        self.batches, self.count = batches, 0
        self.epoch, self.is_new_epoch, self.epoch_detail = 0, False, 0.0

    def __next__(self):
        batch = self.batches[self.count % len(self.batches)]
        self.count += 1
        return batch

    next = __next__


def timed_update(updater, device, observation):
    """One ``updater.update()`` between two synchronisations; seconds."""
    synchronize(device)
    start = time.perf_counter()
    with chainer.Reporter().scope(observation):
        updater.update()
    synchronize(device)
    return time.perf_counter() - start


def summarize_times(times):
    return {'median_ms': 1e3 * statistics.median(times), 'min_ms': 1e3 * min(times),
            'mean_ms': 1e3 * statistics.fmean(times), 'n': len(times)}


# ---------------------------------------------------------------------------
# 2. Step time of BP and VFBN, batches resident on the device.

@contextlib.contextmanager
def cupy_tf32():
    """CuPy's float32 GEMMs (and so Chainer's convolutions, im2col + ``cupy.tensordot``
    without cuDNN) on TF32 tensor cores inside the block; CUPY_TF32=0 outside it.
    Uses CuPy's ``_core._routines_linalg.set_compute_type``."""
    from cupy._core import _routines_linalg as linalg
    linalg.set_compute_type(numpy.float32, linalg.COMPUTE_TYPE_TF32)
    try:
        yield
    finally:
        linalg.set_compute_type(numpy.float32, linalg.COMPUTE_TYPE_DEFAULT)


def cupy_fp32_compute_type():
    from cupy._core import _routines_linalg as linalg
    return linalg.compute_type_to_str(linalg.get_compute_type(numpy.float32))


def timing(args, device, report):
    sec = report.section('timing')
    sec.update(depth=args.depth, batch=args.batch, warmup=args.warmup, timed=args.timed,
               what='updater.update() of methods.build(...), batches already on the '
                    'device; median of synchronised steps after the warm-up',
               results={})
    gpu = device.xp is not numpy
    images, labels = generated_images(4 * args.batch, args.seed)
    it = data.BatchIterator(data.AugmentedDataset(images, labels), args.batch)
    batches = [tuple(device.send(a) for a in it.next()) for _ in range(4)]
    # (key, method, alpha_gs, TF32): the paper's comparison in true float32, then BP
    # with TF32 GEMMs, the setting PyTorch's TF32 timing is compared with.
    runs = [('bp', 'bp', config.ALPHA_GS, False), ('vfbn (alpha_gs=0.001)', 'vfbn', 1e-3, False)]
    if gpu:
        runs.append(('bp (TF32 GEMMs)', 'bp', config.ALPHA_GS, True))
    for key, method, alpha_gs, tf32 in runs:
        if CLOCK.left() <= 0:
            sec['results'][key] = {'skipped': 'time budget spent'}
            continue
        try:
            numpy.random.seed(args.seed)
            setup = methods.build(method, iterator=ResidentBatches(batches), device=device,
                                  depth=args.depth, alpha_gs=alpha_gs)
            obs = {}
            with (cupy_tf32() if tf32 else contextlib.nullcontext()):
                first = timed_update(setup.updater, device, obs)
                for _ in range(args.warmup - 1):
                    timed_update(setup.updater, device, obs)
                times = [timed_update(setup.updater, device, obs) for _ in range(args.timed)]
                res = summarize_times(times)
                if gpu:
                    res.update(cupy_fp32_compute_type=cupy_fp32_compute_type(),
                               memory_pool_mib=device.xp.get_default_memory_pool()
                               .total_bytes() / 2 ** 20)
            res.update(first_step_s=first, final_loss=float(obs['main/loss'].array))
            sec['results'][key] = res
            log('timing %s: median %.1f ms/step (first step %.1f s), %.0f images/s'
                % (key, res['median_ms'], first, args.batch / res['median_ms'] * 1e3))
            del setup
        except Exception as e:
            sec['results'][key] = short_error(e)
            log('timing %s: ERROR %s' % (key, sec['results'][key]['error']))
        free_device_memory(device)
        report.save()
    bp, vf = sec['results'].get('bp', {}), sec['results'].get('vfbn (alpha_gs=0.001)', {})
    if 'median_ms' in bp and 'median_ms' in vf:
        sec['vfbn_over_bp'] = vf['median_ms'] / bp['median_ms']
    if CLOCK.left() > 0:
        try:
            sec['bp_phases'] = bp_phases(args, device, batches)
        except Exception as e:
            sec['bp_phases'] = short_error(e)
        free_device_memory(device)


class CountApplies(chainer.FunctionHook):
    """Counts function applications (``FunctionNode.apply``), those that backward
    makes included: each costs Chainer's Python, whatever the device."""
    name = 'CountApplies'

    def __init__(self):
        self.count = 0

    def forward_preprocess(self, function, in_data):
        self.count += 1


def bp_phases(args, device, batches):
    """Where a backprop step's time goes: forward (with the loss), backward and the
    optimizer update, each timed twice from a synchronisation: until the host has
    queued its work (``host_ms``) and until the device has done it (``done_ms``).
    ``done`` close to ``host`` means that phase is bound by the host. Also the number
    of function applications in each phase (device-independent)."""
    numpy.random.seed(args.seed)
    setup = methods.build('bp', iterator=ResidentBatches(batches), device=device, depth=args.depth)
    opt = setup.updater.get_optimizer('main')
    net, (x, t) = opt.target, batches[0]
    names = ('forward', 'backward', 'update')
    host, done = ({n: [] for n in names} for _ in range(2))
    applies = {n: CountApplies() for n in names}

    def step(phase_hook):
        """One step, each phase wrapped by ``phase_hook(name)``."""
        with phase_hook('forward'):
            loss = F.softmax_cross_entropy(net(x), t)
        net.cleargrads()
        with phase_hook('backward'):
            loss.backward()
        with phase_hook('update'):
            opt.update()

    @contextlib.contextmanager
    def timed(name):
        synchronize(device)
        start = time.perf_counter()
        yield
        host[name].append(time.perf_counter() - start)
        synchronize(device)
        done[name].append(time.perf_counter() - start)

    for _ in range(args.warmup):
        step(lambda name: contextlib.nullcontext())
    for _ in range(args.timed):
        step(timed)
    step(lambda name: applies[name])       # untimed: counts the applications
    out = {n: {'host_ms': 1e3 * statistics.median(host[n]),
               'done_ms': 1e3 * statistics.median(done[n]), 'applies': applies[n].count}
           for n in names}
    log('timing bp phases: ' + ', '.join('%s %.1f ms host / %.1f ms done, %d applies' % (
        n, out[n]['host_ms'], out[n]['done_ms'], out[n]['applies']) for n in names))
    return out


# ---------------------------------------------------------------------------
# 2b. Changes made to speed up the step, each timed against the code it replaced.

@contextlib.contextmanager
def chainer_optimizer():
    """``methods.build`` with Chainer's MomentumSGD and WeightDecay hook, the
    optimizer that ``chainer_vfbn.sgd`` replaced (two kernels per parameter)."""
    def network_optimizer(link, lr=config.LR, momentum=config.MOMENTUM,
                          weight_decay=config.WEIGHT_DECAY):
        return sgd.chainer_momentum_sgd(link, lr, momentum, weight_decay)
    saved, methods.network_optimizer = methods.network_optimizer, network_optimizer
    try:
        yield
    finally:
        methods.network_optimizer = saved


@contextlib.contextmanager
def chainer_cross_entropy():
    """VFBN's delta_hat through Chainer's double-backprop cross-entropy, which
    ``synthesizers.cross_entropy`` replaced (a host sync in ``max(count, 1.)``)."""
    saved = synthesizers.cross_entropy
    synthesizers.cross_entropy = (
        lambda z, y: F.softmax_cross_entropy(z, y, enable_double_backprop=True))
    try:
        yield
    finally:
        synthesizers.cross_entropy = saved


#: (key, method, the replaced code to put back for it). Keys name what is current.
CHANGE_RUNS = (
    ('bp, Chainer optimizer', 'bp', (chainer_optimizer,)),
    ('bp', 'bp', ()),
    ('vfbn, Chainer optimizer and cross-entropy', 'vfbn',
     (chainer_optimizer, chainer_cross_entropy)),
    ('vfbn, Chainer optimizer', 'vfbn', (chainer_optimizer,)),
    ('vfbn', 'vfbn', ()),
)
#: (what changed, run after, run before): the ratios the section reports.
CHANGE_RATIOS = (
    ('one-kernel optimizer, BP', 'bp', 'bp, Chainer optimizer'),
    ('sync-free cross-entropy, VFBN', 'vfbn, Chainer optimizer',
     'vfbn, Chainer optimizer and cross-entropy'),
    ('one-kernel optimizer, VFBN', 'vfbn', 'vfbn, Chainer optimizer'),
    ('VFBN / BP before both changes', 'vfbn, Chainer optimizer and cross-entropy',
     'bp, Chainer optimizer'),
    ('VFBN / BP now', 'vfbn', 'bp'),
)
#: Fused optimizer vs Chainer's on the same device and gradients: the kernel
#: evaluates Chainer's two expressions in one, so the same bits are expected; the
#: tolerance allows one float32 rounding (eps 1.2e-7) per step, relative to max |p|.
OPTIMIZER_RTOL = 1e-6


def optimizer_agreement(device, seed, steps=6):
    """Ours against Chainer's optimizer for a depth-2 network, set up on the host and
    then moved to ``device`` as in training, over ``steps`` updates with the same
    gradients, with a save and a load of our optimizer halfway: ``max |p_ours -
    p_chainer|`` (absolute, relative to ``max |p|``) and how many values differ."""
    nets = []
    for replaced in (True, False):
        numpy.random.seed(seed)
        net = model.Net(*model.build_resnet(2))
        with (chainer_optimizer() if replaced else contextlib.nullcontext()):
            opt = methods.network_optimizer(net)
        net.to_device(device)
        nets.append((net, opt))
    rng = numpy.random.RandomState(seed)
    for step in range(steps):
        grads = {name: rng.standard_normal(p.shape).astype(p.dtype)
                 for name, p in nets[0][0].namedparams()}
        for net, opt in nets:
            for name, p in net.namedparams():
                p.grad = device.send(grads[name].copy())   # updates write to it
            opt.update()
        if step == steps // 2:      # a snapshot round trip of ours, on the device
            saved = {}
            chainer.serializers.DictionarySerializer(saved).save(nets[1][1])
            chainer.serializers.NpzDeserializer(saved).load(nets[1][1])
    ref, got = ({name: to_host(p.array) for name, p in net.namedparams()} for net, _ in nets)
    diff = max(float(numpy.abs(got[k] - ref[k]).max()) for k in ref)
    scale = max(float(numpy.abs(ref[k]).max()) for k in ref)
    return {'steps': steps, 'max_abs': diff, 'err': diff / scale, 'tol': OPTIMIZER_RTOL,
            'values_differing': int(sum((got[k] != ref[k]).sum() for k in ref)),
            'values': int(sum(ref[k].size for k in ref)), 'passed': diff / scale <= OPTIMIZER_RTOL}


def quartiles(values):
    q1, q2, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
    return {'median': q2, 'q1': q1, 'q3': q3}


def changes(args, device, report):
    """Each speed-up against the code it replaced: all runs built side by side and
    timed in rounds (one step of each, in an order rotated every round), so that a
    slow spell of the machine hits every run alike. A ratio is taken within each
    round (paired) and summarised by its median and quartiles over the rounds."""
    sec = report.section('changes')
    sec.update(depth=args.depth, batch=args.batch, warmup=args.warmup, timed=args.timed,
               what='updater.update(), batches on the device, runs interleaved in rotated '
                    'order; median of synchronised steps after the warm-up', results={})
    try:
        sec['optimizer_agreement'] = agreement = optimizer_agreement(device, args.seed)
        log('changes: one-kernel optimizer vs Chainer\'s on %s: err %.1e (tol %.0e), %d of '
            '%d values differ: %s' % (device, agreement['err'], OPTIMIZER_RTOL,
                                      agreement['values_differing'], agreement['values'],
                                      _verdict(agreement['passed'])))
    except Exception as e:
        sec['optimizer_agreement'] = dict(short_error(e), passed=False)
        log('changes: optimizer agreement ERROR %s' % sec['optimizer_agreement']['error'])
    report.save()
    images, labels = generated_images(4 * args.batch, args.seed)
    it = data.BatchIterator(data.AugmentedDataset(images, labels), args.batch)
    batches = [tuple(device.send(a) for a in it.next()) for _ in range(4)]
    runs = {}
    for key, method, replaced in CHANGE_RUNS:
        try:
            numpy.random.seed(args.seed)
            with contextlib.ExitStack() as stack:
                for patch in replaced:
                    stack.enter_context(patch())
                setup = methods.build(method, iterator=ResidentBatches(batches), device=device,
                                      depth=args.depth, alpha_gs=1e-3)
            runs[key] = {'updater': setup.updater, 'replaced': replaced, 'times': [],
                         'obs': {}}
        except Exception as e:
            sec['results'][key] = short_error(e)

    def step(run):
        with contextlib.ExitStack() as stack:
            for patch in run['replaced']:
                stack.enter_context(patch())
            return timed_update(run['updater'], device, run['obs'])

    for i in range(args.warmup + args.timed):
        if CLOCK.left() <= 0:
            sec['skipped'] = 'time budget spent after %d rounds' % i
            break
        keys = list(runs)
        for key in keys[i % len(keys):] + keys[:i % len(keys)]:
            try:
                seconds = step(runs[key])
            except Exception as e:       # e.g. divergence: this run stops, others go on
                sec['results'][key] = short_error(e)
                del runs[key]
                continue
            if i >= args.warmup:
                runs[key]['times'].append(seconds)
    for key, run in runs.items():
        if run['times']:
            sec['results'][key] = dict(summarize_times(run['times']), times_ms=[
                1e3 * t for t in run['times']], final_loss=float(run['obs']['main/loss'].array))
            log('changes %s: median %.1f ms/step' % (key, sec['results'][key]['median_ms']))
    sec['ratios'] = {}
    for name, a, b in CHANGE_RATIOS:
        ta = sec['results'].get(a, {}).get('times_ms')
        tb = sec['results'].get(b, {}).get('times_ms')
        if ta and tb:
            sec['ratios'][name] = quartiles([x / y for x, y in zip(ta, tb)])
            log('changes %s: %.3f (quartiles %.3f-%.3f)' % (
                name, sec['ratios'][name]['median'], sec['ratios'][name]['q1'],
                sec['ratios'][name]['q3']))
    del runs


# ---------------------------------------------------------------------------
# 3. PyTorch reference: the same network, cuDNN, eager.

def torch_resnet(depth):
    """The paper's ResNet-110 variant (SPEC section 2) in PyTorch, written to match
    chainer_vfbn.model layer for layer (parameter count included)."""
    import torch
    from torch import nn

    def bn(ch):  # Chainer's BatchNormalization defaults: eps 2e-5, decay 0.9
        return nn.BatchNorm2d(ch, eps=2e-5, momentum=0.1)

    class Unit(nn.Module):
        def __init__(self, in_ch, out_ch, stride):
            super().__init__()
            self.pad, self.stride = out_ch - in_ch, stride
            self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
            self.bn1 = bn(out_ch)
            self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
            self.bn2 = bn(out_ch)

        def forward(self, x):
            h = torch.relu(self.bn1(self.conv1(x)))
            h = self.bn2(self.conv2(h))
            s = x[:, :, ::self.stride, ::self.stride] if self.stride != 1 else x
            if self.pad:  # parameter-free shortcut: zero channels appended
                s = nn.functional.pad(s, (0, 0, 0, 0, 0, self.pad))
            return torch.relu(h + s)

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, config.STEM_CHANNELS, 3, 1, 0, bias=True)
            self.bn1 = bn(config.STEM_CHANNELS)
            self.units = nn.Sequential(*[Unit(*s) for s in model.unit_specs(depth)])
            self.fc = nn.Linear(config.BLOCK_CHANNELS[-1], config.N_CLASSES)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):  # He-normal, as the Chainer model
                    nn.init.kaiming_normal_(m.weight, mode='fan_in', nonlinearity='relu')

        def forward(self, x):
            h = self.units(torch.relu(self.bn1(self.conv1(x))))
            return self.fc(h.mean(dim=(2, 3)))

    return ResNet()


def copy_chainer_weights(tnet, net):
    """Load a Chainer ``model.Net``'s parameters into :func:`torch_resnet`'s module
    (``/upper/units/j`` is unit ``split + j`` of the whole network)."""
    import torch
    split, leaf = len(net.lower.units), {'W': 'weight', 'b': 'bias',
                                         'gamma': 'weight', 'beta': 'bias'}
    copied = {}
    for name, p in net.namedparams():
        half, *path = name.strip('/').split('/')
        if path[0] == 'units' and half == 'upper':
            path[1] = str(int(path[1]) + split)
        copied['.'.join(path[:-1] + [leaf[path[-1]]])] = torch.from_numpy(to_host(p.array))
    params = dict(tnet.named_parameters())
    if set(copied) != set(params):
        raise ValueError('parameter names differ: %s' % sorted(set(copied) ^ set(params)))
    with torch.no_grad():
        for name, value in copied.items():
            params[name].copy_(value)


def torch_same_network(torch, depth, batch, seed):
    """Normwise difference of the logits and the loss of the Chainer and the PyTorch
    network with the same float64 weights and inputs, both on the CPU in train mode:
    ~1e-15 when the two are the same function."""
    nets = build_nets(depth, numpy.float64, seed)
    tnet = torch_resnet(depth).double()
    copy_chainer_weights(tnet, nets['net'])
    x, t = numerics_inputs(batch, seed)
    x = x.astype(numpy.float64)
    with chainer.using_config('train', True):
        logits = nets['net'](x)
    loss = F.softmax_cross_entropy(logits, t).array
    t_logits = tnet(torch.from_numpy(x))
    t_loss = torch.nn.functional.cross_entropy(t_logits, torch.from_numpy(t).long())
    ref, got = logits.array, t_logits.detach().numpy()
    return {'depth': depth, 'batch': batch,
            'logits_err': float(numpy.abs(got - ref).max() / numpy.abs(ref).max()),
            'loss_err': float(abs(t_loss.item() - loss) / abs(loss))}


def set_tf32(torch, on):
    """TF32 for cuBLAS and cuDNN on or off (the legacy flags, which PyTorch >= 2.9
    maps onto its ``fp32_precision`` settings); returns the settings as PyTorch then
    reports them, in both vocabularies where it has them."""
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on
    flags = {'matmul.allow_tf32': torch.backends.cuda.matmul.allow_tf32,
             'cudnn.allow_tf32': torch.backends.cudnn.allow_tf32}
    for name, obj in (('matmul', torch.backends.cuda.matmul),
                      ('cudnn.conv', getattr(torch.backends.cudnn, 'conv', None))):
        if hasattr(obj, 'fp32_precision'):
            flags[name + '.fp32_precision'] = obj.fp32_precision
    return flags


def torch_reference(args, gpu, report):
    sec = report.section('torch')
    try:
        import torch
    except Exception as e:
        sec['skipped'] = 'PyTorch not importable (%s: %s)' % (type(e).__name__, e)
        log('torch: skipped, ' + sec['skipped'])
        return
    if gpu and not torch.cuda.is_available():
        sec['skipped'] = 'torch.cuda.is_available() is False'
        log('torch: skipped, ' + sec['skipped'])
        return
    dev = torch.device('cuda' if gpu else 'cpu')
    torch.manual_seed(args.seed)
    net = torch_resnet(args.depth).to(dev)
    n_params = sum(p.numel() for p in net.parameters())
    lower, upper = model.build_resnet(args.depth)
    chainer_params = sum(p.size for p in model.Net(lower, upper).params())
    sec.update(torch=torch.__version__, device=str(dev), depth=args.depth,
               batch=args.batch, warmup=args.warmup, timed=args.timed,
               params=n_params, chainer_params=chainer_params,
               params_match=n_params == chainer_params
               and (args.depth != 18 or n_params == RESNET110_PARAMS),
               what='forward + backward + SGD(momentum 0.9, weight decay 1e-4) step, '
                    'eager (no torch.compile), cudnn.benchmark, NCHW', results={})
    log('torch: %s on %s, %d parameters (Chainer: %d)'
        % (torch.__version__, dev, n_params, chainer_params))
    try:
        same = torch_same_network(torch, args.numerics_depth, args.numerics_batch, args.seed)
        same['passed'] = max(same['logits_err'], same['loss_err']) <= RTOL64
        log('torch: same function as the Chainer network (float64, CPU, depth %d): '
            'logits err %.1e, loss err %.1e: %s' % (same['depth'], same['logits_err'],
                                                    same['loss_err'], _verdict(same['passed'])))
    except Exception as e:
        same = short_error(e)
        log('torch: same-network check: ERROR ' + same['error'])
    sec['same_network'] = same
    report.save()
    if gpu:
        sec.update(cudnn=torch.backends.cudnn.version(), gpu=torch.cuda.get_device_name(dev))
        torch.backends.cudnn.benchmark = True
    opt = torch.optim.SGD(net.parameters(), lr=config.LR, momentum=config.MOMENTUM,
                          weight_decay=config.WEIGHT_DECAY)
    gen = torch.Generator(device='cpu').manual_seed(args.seed)
    x = torch.randn(args.batch, 3, config.INPUT_SIZE, config.INPUT_SIZE,
                    generator=gen).to(dev)
    t = torch.randint(0, config.N_CLASSES, (args.batch,), generator=gen).to(dev)

    def sync():
        if gpu:
            torch.cuda.synchronize()

    def step():
        sync()
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(net(x), t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        return time.perf_counter() - start, loss.detach()

    for mode in (('fp32', 'tf32') if gpu else ('fp32',)):
        if CLOCK.left() <= 0:
            sec['results'][mode] = {'skipped': 'time budget spent'}
            continue
        try:
            flags = set_tf32(torch, mode == 'tf32') if gpu else {}
            first, _ = step()
            for _ in range(args.warmup - 1):
                step()
            runs = [step() for _ in range(args.timed)]
            res = summarize_times([r[0] for r in runs])
            res.update(first_step_s=first, flags=flags, final_loss=runs[-1][1].item())
            sec['results'][mode] = res
            log('torch %s: median %.1f ms/step (first step %.2f s)'
                % (mode, res['median_ms'], first))
        except Exception as e:
            sec['results'][mode] = short_error(e)
            log('torch %s: ERROR %s' % (mode, sec['results'][mode]['error']))
        report.save()
    chainer_times = report.data['sections'].get('timing', {}).get('results', {})
    sec['chainer_over_torch'] = {
        'Chainer %s / PyTorch %s' % (key, mode): chainer_times[key]['median_ms'] / r['median_ms']
        for mode, r in sec['results'].items() if 'median_ms' in r
        for key in ('bp', 'bp (TF32 GEMMs)') if 'median_ms' in chainer_times.get(key, {})}
    if gpu:
        set_tf32(torch, False)
        del net, opt, x, t
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------
# 4. 20 training steps of every Table 1 method, through the real data pipeline.

def all_methods(args, device, report):
    sec = report.section('methods')
    sec.update(depth=args.depth, batch=args.batch, steps=args.steps,
               what='updater.update() on generated class-patterned images through '
                    'AugmentedDataset + BatchIterator; a step includes building the '
                    'batch on the host and sending it', results={})
    images, labels = generated_images(max(512, 2 * args.batch), args.seed)
    for row in methods.TABLE1:
        alpha = config.ALPHA_GS if row.alpha_gs is None else row.alpha_gs  # None: unused
        if CLOCK.left() <= 0:
            sec['results'][row.label] = {'skipped': 'time budget spent'}
            continue
        res = sec['results'].setdefault(row.label, {'method': row.method,
                                                    'alpha_gs': row.alpha_gs})
        losses, times = [], []
        try:
            numpy.random.seed(args.seed)
            it = data.BatchIterator(data.AugmentedDataset(images, labels), args.batch)
            setup = methods.build(row.method, iterator=it, device=device, depth=args.depth, alpha_gs=alpha)
            obs = {}
            for _ in range(args.steps):
                times.append(timed_update(setup.updater, device, obs))
                losses.append(float(obs['main/loss'].array))
            res.update(status='ok', final_loss=losses[-1])
            for key in ('synth/loss', 'synth/cosine', 'head/loss'):
                if key in obs:
                    res['final ' + key] = float(chainer.backend.CpuDevice().send(
                        getattr(obs[key], 'array', obs[key])))
            del setup
        except updaters.NonFiniteError as e:
            res.update(status='diverged', message=str(e))
        except Exception as e:
            res.update(short_error(e), status='error')
        res.update(losses=losses, finite=bool(numpy.isfinite(losses).all()) if losses else None,
                   first_step_s=times[0] if times else None,
                   # steps after the first three (kernel compilation, memory pool growth)
                   step_ms=1e3 * statistics.median(times[3:] or times) if times else None)
        log('methods %-28s %s: loss %s -> %s, %s ms/step' % (
            row.label, res['status'], '%.3f' % losses[0] if losses else '-',
            '%.3f' % losses[-1] if losses else '-',
            '%.1f' % res['step_ms'] if times else '-'))
        free_device_memory(device)
        report.save()
    bp = sec['results'].get(methods.TABLE1[0].label, {}).get('step_ms')
    if bp:
        for res in sec['results'].values():
            if res.get('step_ms'):
                res['ratio_to_bp'] = res['step_ms'] / bp


# ---------------------------------------------------------------------------
# 5. The host-side data pipeline.

def data_pipeline(args, device, report):
    sec = report.section('data')
    images, labels = generated_images(2000, args.seed)
    it = data.BatchIterator(data.AugmentedDataset(images, labels), args.batch)
    it.next()  # first call: the order permutation
    start = time.perf_counter()
    for _ in range(args.data_batches):
        it.next()
    host = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.data_batches):
        x, t = it.next()
        device.send(x), device.send(t)
    synchronize(device)
    sent = time.perf_counter() - start
    n = args.data_batches * args.batch
    sec.update(batch=args.batch, batches=args.data_batches, processes=1,
               views_per_s=n / host, views_per_s_with_transfer=n / sent,
               ms_per_batch=1e3 * host / args.data_batches)
    log('data: %.0f views/s on the host (%.1f ms per batch of %d), %.0f with the '
        'transfer to %s' % (sec['views_per_s'], sec['ms_per_batch'], args.batch,
                            sec['views_per_s_with_transfer'], device))


# ---------------------------------------------------------------------------
# Markdown summary.

def _fmt(x, spec='%.2e'):
    if x is None:
        return '-'
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return spec % x


def _verdict(ok):
    return 'PASS' if ok else 'FAIL'


def render_markdown(d):
    """The human summary. A part that cannot be rendered (a section cut short) says
    so instead of stopping the JSON from being written."""
    s = d['sections']
    env = s.get('environment', {})
    lines = ['# Device check: chainer-vfbn on %s' % env.get('gpu', env.get('device', '?')),
             '', 'Started %s, %.0f s so far. Command: `%s`.'
             % (d['started'], d.get('elapsed_s', 0), ' '.join(d['argv'])), '']
    if d.get('status'):
        lines += ['Sections: ' + ', '.join('%s %s' % kv for kv in d['status'].items()), '']
    if 'device_error' in d:
        lines += ['**Chainer cannot use the device**: %s' % d['device_error']['error'], '']
    for name, render in (('environment', _md_environment), ('numerics', _md_numerics),
                         ('numerics64', _md_numerics), ('timing', _md_timing),
                         ('changes', _md_changes),
                         ('torch', _md_torch), ('methods', _md_methods),
                         ('data', _md_data)):
        if name in s and set(s[name]) - {'error', 'traceback'}:
            try:
                lines += render(s[name], s) + ['']
            except Exception as e:  # a section cut short: show what is there in the JSON
                lines += ['## %s' % name, '', '(incomplete: %s: %s; see device_check.json)'
                          % (type(e).__name__, e), '']
    errors = [(name, sec) for name, sec in s.items() if isinstance(sec, dict) and 'error' in sec]
    if 'device_error' in d:
        errors.insert(0, ('device', d['device_error']))
    if errors:
        lines += ['## Errors', '']
        for name, sec in errors:
            lines += ['### %s: %s' % (name, sec['error']), '', '```']
            lines += sec.get('traceback', [])
            lines += ['```', '']
    return '\n'.join(lines)


def _md_environment(env, s):
    return (['## Environment', '', '| item | value |', '|---|---|']
            + ['| %s | %s |' % (k, ' '.join(str(env[k]).split())) for k in sorted(env)
               if k != 'traceback'])


def _md_numerics(num, s):
    f32 = num['dtype'] == 'float32'
    tol = ('max(%g, %g x noise), noise = the CPU\'s float32 error against its own '
           'float64' % (num['rtol'], num['noise_factor']) if f32 else '%g' % num['rtol'])
    lines = ['## Numerics, %s: %s vs CPU, same weights and inputs'
             % (num['dtype'], s.get('environment', {}).get('device', '?')), '',
             'Depth %s units/block, batch %s, train mode. err = max|gpu - cpu| / max|cpu| '
             '(gradients: denominator at least %g x the largest gradient of the same '
             'network); tolerance %s.'
             % (num['depth'], num['batch'], num['group_floor'], tol), '',
             '| check | quantity | max abs | err | %stol | |' % ('noise | ' if f32 else ''),
             '|---|---|---|---|---|---|' + ('---|' if f32 else '')]
    for check, c in num.get('checks', {}).items():
        if 'error' in c:
            lines.append('| %s | ERROR: %s | | | %s| FAIL |'
                         % (check, c['error'], '| ' if f32 else ''))
        else:
            lines += _numerics_rows(check, c['quantities'], f32)
    if 'passed' in num:
        lines += ['', 'Numerics, %s: **%s**' % (num['dtype'], _verdict(num['passed']))]
    return lines


def _md_timing(tim, s):
    lines = ['## Step time (Chainer, %s)' % s.get('environment', {}).get('device', '?'), '',
             'Depth %s units/block, batch %s; %s (%s warm-up, %s timed).'
             % (tim['depth'], tim['batch'], tim['what'], tim['warmup'], tim['timed']), '',
             '| method | median ms/step | min ms | images/s | first step s |',
             '|---|---|---|---|---|']
    lines += [_time_row(key, r, tim['batch']) for key, r in tim['results'].items()]
    if 'vfbn_over_bp' in tim:
        lines += ['', 'VFBN / BP step time: **%.2f**' % tim['vfbn_over_bp']]
    phases = tim.get('bp_phases', {})
    if 'error' in phases:
        lines += ['', 'Backprop step by phase: ERROR %s' % phases['error']]
    elif phases:
        lines += ['', 'Backprop step by phase (medians; "host": until the host has queued '
                  'the work, "done": until the device has run it, both from a '
                  'synchronisation):', '', '| phase | host ms | done ms | function applications |',
                  '|---|---|---|---|']
        lines += ['| %s | %.1f | %.1f | %d |' % (n, r['host_ms'], r['done_ms'], r['applies'])
                  for n, r in phases.items()]
    return lines


def _md_changes(ch, s):
    agree = ch.get('optimizer_agreement', {})
    lines = ['## Speed-ups, each against the code it replaced (%s)'
             % s.get('environment', {}).get('device', '?'), '',
             'Depth %s units/block, batch %s, alpha_gs 1e-3; %s (%s warm-up, %s timed).'
             % (ch['depth'], ch['batch'], ch['what'], ch['warmup'], ch['timed']), '']
    if 'error' in agree:
        lines += ['One-kernel optimizer against Chainer\'s: ERROR %s' % agree['error'], '']
    elif agree:
        lines += ['One-kernel optimizer against Chainer\'s MomentumSGD + WeightDecay on the '
                  'same device and gradients, %d steps at depth 2 with a snapshot round trip: '
                  'err %.1e (tol %.0e), %d of %d values differ: %s.'
                  % (agree['steps'], agree['err'], agree['tol'], agree['values_differing'],
                     agree['values'], _verdict(agree['passed'])), '']
    lines += ['| run | median ms/step | min ms |', '|---|---|---|']
    lines += ['| %s | %.1f | %.1f |' % (key, r['median_ms'], r['min_ms']) if 'median_ms' in r
              else '| %s | ERROR: %s | |' % (key, r.get('error')) for key, r in
              ch.get('results', {}).items()]
    lines += ['', 'Ratios of paired steps (one round each):', '',
              '| ratio | median | quartiles |', '|---|---|---|']
    lines += ['| %s | **%.3f** | %.3f-%.3f |' % (name, r['median'], r['q1'], r['q3'])
              for name, r in ch.get('ratios', {}).items()]
    if 'skipped' in ch:
        lines += ['', 'Cut short: %s.' % ch['skipped']]
    return lines


def _md_torch(tor, s):
    lines = ['## PyTorch reference', '']
    if 'skipped' in tor:
        return lines + ['Skipped: %s' % tor['skipped']]
    same = tor.get('same_network', {})
    if 'error' in same:
        same_text = 'ERROR ' + same['error']
    else:
        same_text = 'logits err %.1e, loss err %.1e: %s' % (
            same['logits_err'], same['loss_err'], _verdict(same['passed']))
    lines += ['PyTorch %s on %s (cuDNN %s): %s. Parameters %d (Chainer %d): %s. Same '
              'function as the Chainer network (Chainer\'s weights copied, float64, CPU, '
              'train mode, depth %s): %s.'
              % (tor['torch'], tor['device'], tor.get('cudnn', '-'), tor['what'],
                 tor['params'], tor['chainer_params'], _verdict(tor['params_match']),
                 same.get('depth', '?'), same_text), '',
              '| mode | median ms/step | min ms | images/s | first step s |',
              '|---|---|---|---|---|']
    results = tor.get('results', {})
    lines += [_time_row(key, r, tor['batch']) for key, r in results.items()]
    ratios = ['%s: **%.2f**' % (pair, ratio)
              for pair, ratio in tor.get('chainer_over_torch', {}).items()]
    return lines + ([''] + ratios if ratios else [])


def _md_methods(met, s):
    lines = ['## %d training steps of every Table 1 method' % met['steps'], '',
             'Depth %s units/block, batch %s; %s.' % (met['depth'], met['batch'], met['what']),
             '', '| row | status | first loss | final loss | finite | ms/step | / BP '
             '| first step s |', '|---|---|---|---|---|---|---|---|']
    for label, r in met['results'].items():
        if 'skipped' in r:
            lines.append('| %s | skipped: %s | | | | | | |' % (label, r['skipped']))
            continue
        status = r.get('status', '?')
        if status != 'ok':
            status += ': ' + r.get('error', r.get('message', ''))
        losses = r.get('losses') or []
        lines.append('| %s | %s | %s | %s | %s | %s | %s | %s |' % (
            label, status, _fmt(losses[0] if losses else None, '%.4f'),
            _fmt(losses[-1] if losses else None, '%.4f'), r.get('finite'),
            _fmt(r.get('step_ms'), '%.1f'), _fmt(r.get('ratio_to_bp'), '%.2f'),
            _fmt(r.get('first_step_s'), '%.2f')))
    return lines


def _md_data(dat, s):
    return ['## Data pipeline', '',
            'AugmentedDataset + BatchIterator, batch %d, one process: **%.0f views/s** '
            '(%.1f ms per batch); %.0f views/s including the transfer to the device.'
            % (dat['batch'], dat['views_per_s'], dat['ms_per_batch'],
               dat['views_per_s_with_transfer'])]


def _numerics_rows(check, rows, f32):
    """Non-gradient quantities one per row; gradients grouped by network (the one
    nearest its tolerance shown); every failing gradient also on its own row."""
    out, groups = [], {}
    for r in rows:
        if grad_group(r['quantity']):
            groups.setdefault(grad_group(r['quantity']), []).append(r)
        else:
            out.append(_numerics_row(check, r['quantity'], r, f32))
    for group, rs in groups.items():
        worst = max(rs, key=lambda r: r['err'] / r['tol'])
        merged = dict(worst, passed=all(r['passed'] for r in rs))
        out.append(_numerics_row(check, '%s/* (%d arrays; worst: %s)' % (
            group, len(rs), worst['quantity'][len(group) + 1:]), merged, f32))
        out += [_numerics_row(check, r['quantity'], r, f32) for r in rs if not r['passed']]
    return out


def _numerics_row(check, name, r, f32):
    return '| %s | %s | %s | %s | %s%s | %s |' % (
        check, name, _fmt(r['max_abs']), _fmt(r['err']),
        _fmt(r['noise']) + ' | ' if f32 else '', _fmt(r['tol']), _verdict(r['passed']))


def _time_row(key, r, batch):
    if 'median_ms' not in r:
        return '| %s | %s | | | |' % (key, r.get('skipped') or 'ERROR: ' + r.get('error', '?'))
    return '| %s | %.1f | %.1f | %.0f | %.2f |' % (
        key, r['median_ms'], r['min_ms'], batch / r['median_ms'] * 1e3, r['first_step_s'])


# ---------------------------------------------------------------------------

def main(argv=None):
    global CLOCK
    args = parse_args(argv)
    CLOCK = Clock(args.budget_s)
    gpu = args.device != '@numpy'
    if gpu:
        problem = cuda_problem(args.device)
        if problem:
            print('CuPy/CUDA not available: %s' % problem, flush=True)
            return 0

    os.makedirs(args.out, exist_ok=True)
    report = Report(args.out, args)
    log('device check on %s: sections %s, budget %.0f s'
        % (args.device, ', '.join(args.sections), args.budget_s))
    report.data['status'] = status = {}
    try:
        report.data['sections']['environment'] = environment(args.device, gpu)
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

    runners = {'numerics': lambda: numerics(args, device, report, numpy.float32),
               'numerics64': lambda: numerics(args, device, report, numpy.float64),
               'timing': lambda: timing(args, device, report),
               'changes': lambda: changes(args, device, report),
               'torch': lambda: torch_reference(args, gpu, report),
               'methods': lambda: all_methods(args, device, report),
               'data': lambda: data_pipeline(args, device, report)}
    for name in SECTIONS:
        if name not in args.sections:
            continue
        if CLOCK.left() <= 0:
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
    for name in ('numerics', 'numerics64'):
        num = report.data['sections'].get(name, {})
        if 'passed' in num:
            log('%s (%s): %s' % (name, num['dtype'], _verdict(num['passed'])))
    log('done; wrote %s and %s' % (report.json_path, report.md_path))
    return 0


if __name__ == '__main__':
    sys.exit(main())
