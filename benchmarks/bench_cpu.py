#!/usr/bin/env python
"""CPU benchmarks: the data pipeline's throughput and each method's step time.

    python benchmarks/bench_cpu.py --out benchmarks/cpu      # writes cpu.json, cpu.md

* Data: views/s of :meth:`AugmentedDataset.get_batch` at batch 128, pinned to one
  core (the issue asks for >= 50,000 views/s, ten times what a GPU run consumes).
* Steps: one training iteration (forward, backward, update; batch 128 by default) of
  every Table 1 method, at a small depth and at depth 18, as medians over repeats
  taken round-robin (method A, B, ..., A, B, ...) so that a slow spell of the machine
  hits every method alike; reported as ratios to the backprop step of the same run.
* Where a synthesizer's time goes: its forward (delta_hat) and its eq. 3 backward,
  timed alone on a fixed h.
* The optimizer update of ResNet-110's 330 parameter arrays: chainer_vfbn.sgd's
  one-operation update against Chainer's MomentumSGD + WeightDecay hook, interleaved.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

import chainer_vfbn  # noqa: E402,F401  (compat shim before chainer)
import chainer  # noqa: E402
import numpy  # noqa: E402

from chainer_vfbn import config, data, methods, model, sgd  # noqa: E402
from chainer_vfbn.machine import cpu_name  # noqa: E402

ROWS = [(r.label, r.method, r.alpha_gs if r.alpha_gs is not None else 0.0)
        for r in methods.TABLE1]


def bench_data(batch=128, seconds=3.0):
    if hasattr(os, 'sched_setaffinity'):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    rng = numpy.random.RandomState(0)
    ds = data.AugmentedDataset(rng.randint(0, 256, (10000, 3, 32, 32)).astype(numpy.uint8),
                               rng.randint(0, 10, 10000))
    order = rng.permutation(len(ds))
    n, i, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        ds.get_batch(order[i:i + batch])
        i = (i + batch) % (len(order) - batch)
        n += batch
    return n / (time.perf_counter() - start)


def make_updaters(depth, batch):
    rng = numpy.random.RandomState(0)
    n_images = max(1, -(-batch * 4 // 36))
    images = rng.randint(0, 256, (n_images, 3, 32, 32)).astype(numpy.uint8)
    ds = data.AugmentedDataset(images, rng.randint(0, 10, n_images))
    out = {}
    for label, method, alpha in ROWS:
        numpy.random.seed(0)
        it = data.BatchIterator(ds, batch)
        out[label] = methods.build(method, iterator=it, depth=depth, alpha_gs=alpha).updater
    return out


def bench_steps(depth, batch, repeats):
    ups = make_updaters(depth, batch)
    for u in ups.values():      # warm-up (first calls allocate)
        u.update()
    times = {k: [] for k in ups}
    for _ in range(repeats):
        for k, u in ups.items():
            t = time.perf_counter()
            u.update()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    bp = med['BackProp']
    synth_parts = {}
    for k, u in ups.items():
        if not hasattr(u, 'synth'):
            continue
        x, t = u.get_iterator('main').dataset.get_batch(numpy.arange(batch))
        h = u.lower(x).array
        fwd, bwd = [], []
        for _ in range(max(2, repeats)):
            s = time.perf_counter()
            o = u.synth(chainer.Variable(h), t)
            fwd.append(time.perf_counter() - s)
            e = u.synth.loss(o, numpy.zeros_like(h), 1.0)
            s = time.perf_counter()
            u.synth.cleargrads()
            e.backward()
            bwd.append(time.perf_counter() - s)
        synth_parts[k] = {'forward_s': statistics.median(fwd),
                          'eq3_backward_s': statistics.median(bwd)}
    return {'depth': depth, 'batch': batch, 'repeats': repeats,
            'median_step_s': med, 'ratio_to_bp': {k: v / bp for k, v in med.items()},
            'synthesizer_parts_s': synth_parts}


def bench_optimizer(repeats=30):
    """Seconds per ``optimizer.update()`` over ResNet-110's parameters (gradients
    already there), ours and Chainer's taken in turn; medians and their ratio."""
    hyper = (config.LR, config.MOMENTUM, config.WEIGHT_DECAY)
    rng = numpy.random.RandomState(0)
    opts = {name: make(model.Net(*model.build_resnet(18)), *hyper)
            for name, make in (('chainer', sgd.chainer_momentum_sgd),
                               ('ours', methods.network_optimizer))}
    grads = [rng.standard_normal(p.shape).astype(numpy.float32) * 1e-2
             for p in opts['ours'].target.params()]
    times = {name: [] for name in opts}
    for i in range(repeats + 2):
        for name, opt in sorted(opts.items(), reverse=i % 2 == 1):   # alternate the order
            for p, g in zip(opt.target.params(), grads):
                p.grad = g.copy()
            start = time.perf_counter()
            opt.update()
            if i >= 2:
                times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    return {'arrays': len(grads), 'values': sum(g.size for g in grads), 'repeats': repeats,
            'median_s': med, 'ours_over_chainer': med['ours'] / med['chainer']}


def markdown(res):
    lines = ['# CPU benchmarks', '',
             'Command: `%s`  ' % res['command'],
             'Machine: %s, %d cores; Python %s, NumPy %s, Chainer %s.  ' % (
                 res['machine'], res['cpus'], res['python'], res['numpy'], res['chainer']),
             'Measured %s; 1-minute load average %.1f before, %.1f after (2 cores: '
             'above 2 means other work shared the machine).' % (
                 res['date'], res['load_average_before'], res['load_average_after']), '',
             '## Data pipeline (one core, batch 128)', '',
             '%.0f views/s (target: >= 50,000).' % res['data_views_per_s'], '']
    for st in res['steps']:
        lines += ['## Step time, %d units per block (%d layers), batch %d, median of %d'
                  % (st['depth'], model.layer_count(st['depth']), st['batch'], st['repeats']), '',
                  '| method | step (s) | / backprop | synthesizer forward (s) | eq. 3 backward (s) |',
                  '|---|---|---|---|---|']
        for label, _, _ in ROWS:
            p = st['synthesizer_parts_s'].get(label)
            lines.append('| %s | %.3f | %.2f | %s | %s |' % (
                label, st['median_step_s'][label], st['ratio_to_bp'][label],
                '%.3f' % p['forward_s'] if p else '', '%.3f' % p['eq3_backward_s'] if p else ''))
        lines.append('')
    opt = res.get('optimizer')
    if opt:
        lines += ['## Optimizer update, ResNet-110 (%d arrays, %d values), median of %d'
                  % (opt['arrays'], opt['values'], opt['repeats']), '',
                  '| optimizer | update (ms) |', '|---|---|',
                  '| Chainer MomentumSGD + WeightDecay hook | %.2f |'
                  % (1e3 * opt['median_s']['chainer']),
                  '| chainer_vfbn.sgd.MomentumSGDWeightDecay | %.2f |'
                  % (1e3 * opt['median_s']['ours']), '',
                  'Ours / Chainer: **%.2f**.' % opt['ours_over_chainer'], '']
    return '\n'.join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', default='benchmarks/cpu', help='output path without extension')
    p.add_argument('--depths', type=int, nargs='+', default=[1, 18])
    p.add_argument('--batch', type=int, default=128)
    p.add_argument('--repeats', type=int, nargs='+', default=[5, 2],
                   help='timed steps per method, for each depth')
    args = p.parse_args()
    threads = ['%s=%s' % (k, os.environ[k]) for k in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS')
               if k in os.environ]  # the thread pools' sizes change the step times
    res = {'command': ' '.join(threads + ['python'] + sys.argv), 'date': time.strftime('%Y-%m-%d'),
           'machine': cpu_name(), 'cpus': os.cpu_count(),
           'load_average_before': os.getloadavg()[0],
           'python': platform.python_version(), 'numpy': numpy.__version__,
           'chainer': chainer.__version__, 'steps': []}
    res['data_views_per_s'] = bench_data()
    print('data: %.0f views/s' % res['data_views_per_s'], flush=True)
    if hasattr(os, 'sched_setaffinity'):
        os.sched_setaffinity(0, set(range(os.cpu_count())))
    for depth, rep in zip(args.depths, args.repeats + args.repeats[-1:] * len(args.depths)):
        st = bench_steps(depth, args.batch, rep)
        res['steps'].append(st)
        print(json.dumps(st, indent=1), flush=True)
    res['optimizer'] = bench_optimizer()
    print(json.dumps(res['optimizer'], indent=1), flush=True)
    res['load_average_after'] = os.getloadavg()[0]
    os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
    with open(args.out + '.json', 'w') as f:
        json.dump(res, f, indent=2)
    with open(args.out + '.md', 'w') as f:
        f.write(markdown(res) + '\n')
    print(markdown(res))


if __name__ == '__main__':
    main()
