"""Sections ``methods`` and ``data``: a few training steps of every Table 1
method through the real data pipeline, and the host-side pipeline's views per second."""
import statistics
import time

import common  # first: chainer_vfbn before Chainer
from common import free_device_memory, log, short_error, synchronize
from timing import generated_images, timed_update

import chainer
import numpy

from chainer_vfbn import config, data, methods, updaters

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
        if common.CLOCK.left() <= 0:
            sec['results'][row.label] = {'skipped': 'time budget spent'}
            continue
        res = sec['results'].setdefault(row.label, {'method': row.method,
                                                    'alpha_gs': row.alpha_gs})
        losses, times = [], []
        try:
            numpy.random.seed(args.seed)
            it = data.BatchIterator(data.AugmentedDataset(images, labels), args.batch)
            setup = methods.build(row.method, iterator=it, device=device, depth=args.depth,
                                  alpha_gs=alpha)
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
