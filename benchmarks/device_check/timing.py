"""Section ``timing``: one training step of BP and of VFBN at full depth with the
batches already on the device, BP again with TF32 GEMMs on a GPU, and a BP step split
into forward, backward and update. Also the helpers the other timed sections share
(generated images, resident batches, an updater built under one of
``hostcost.VARIANTS``, a synchronised step, medians and quartiles)."""
import contextlib
import statistics
import time

import common  # first: chainer_vfbn before Chainer
from common import free_device_memory, log, short_error, synchronize

import chainer
import chainer.functions as F
import numpy

from chainer_vfbn import config, data, hostcost, methods

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


def device_batches(args, device):
    """Four training batches of generated images, already on ``device`` (cycled by
    ``hostcost.FixedBatches``, so that a timed step is the network's work alone; the
    host pipeline is timed in section 5)."""
    images, labels = generated_images(4 * args.batch, args.seed)
    it = data.BatchIterator(data.AugmentedDataset(images, labels), args.batch)
    return [tuple(device.send(a) for a in it.next()) for _ in range(4)]


def build_run(method, variant, args, device, batches):
    """``methods.build`` of ``method`` (alpha_gs 1e-3) under ``variant``'s switches."""
    numpy.random.seed(args.seed)
    with hostcost.variant_config(variant):
        return methods.build(method, iterator=hostcost.FixedBatches(batches), device=device,
                             depth=args.depth, alpha_gs=1e-3).updater


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


def quartiles(values):
    """Median and quartiles of ``values`` (e.g. the per-round ratios of paired steps)."""
    q1, q2, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
    return {'median': q2, 'q1': q1, 'q3': q3}


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
        if common.CLOCK.left() <= 0:
            sec['results'][key] = {'skipped': 'time budget spent'}
            continue
        try:
            numpy.random.seed(args.seed)
            setup = methods.build(method, iterator=hostcost.FixedBatches(batches), device=device,
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
    if common.CLOCK.left() > 0:
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
    setup = methods.build('bp', iterator=hostcost.FixedBatches(batches), device=device,
                          depth=args.depth)
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
