#!/usr/bin/env python
"""Where a GPU training step's time goes (issue: make the GPU step fast).

    PYTHONPATH=/tmp/site:$PWD python3 scripts/gpu_profile.py --out $OUT

For BP and VFBN (alpha_gs = 1e-3) at full depth, batch 128, batches on the device:
the median synchronised step time with Chainer's defaults, then with
``chainer.config.type_check = False`` (Chainer checks every function's input types
in Python on every call), and a cProfile of a few steps (top functions by own
time), so that Python overhead and GPU time can be told apart. Writes
``gpu_profile.json`` and ``gpu_profile.txt``.
"""
import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

import chainer_vfbn  # noqa: E402,F401
import chainer  # noqa: E402
import numpy  # noqa: E402

from chainer_vfbn import methods  # noqa: E402


class Fixed(chainer.dataset.Iterator):
    """Iterator over a few batches already on the device."""
    epoch, is_new_epoch, epoch_detail = 0, False, 0.0

    def __init__(self, batches):
        self.batches, self.count = batches, 0

    def __next__(self):
        self.count += 1
        return self.batches[self.count % len(self.batches)]

    next = __next__


def sync(device):
    if device.xp is not numpy:
        device.xp.cuda.Device().synchronize()


def steps(updater, device, n):
    out = []
    for _ in range(n):
        sync(device)
        t = time.perf_counter()
        with chainer.Reporter().scope({}):
            updater.update()
        sync(device)
        out.append(time.perf_counter() - t)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--out', required=True)
    p.add_argument('--device', default='@cupy:0')
    p.add_argument('--depth', type=int, default=18)
    p.add_argument('--batch', type=int, default=128)
    p.add_argument('--timed', type=int, default=15)
    args = p.parse_args()
    device = chainer.get_device(args.device)
    device.use()
    rng = numpy.random.RandomState(0)
    batches = [(device.send(rng.randn(args.batch, 3, 24, 24).astype(numpy.float32)),
                device.send(rng.randint(0, 10, args.batch).astype(numpy.int32)))
               for _ in range(4)]
    res, text = {}, io.StringIO()
    for name, method, alpha in (('bp', 'bp', 0.0), ('vfbn', 'vfbn', 1e-3)):
        numpy.random.seed(0)
        up = methods.build(method, Fixed(batches), device, units=args.depth,
                           alpha_gs=alpha).updater
        up.converter = lambda batch, device: batch
        steps(up, device, 3)
        for tc in (True, False):
            with chainer.using_config('type_check', tc):
                ts = steps(up, device, args.timed)
            key = '%s type_check=%s' % (name, tc)
            res[key] = {'median_ms': 1e3 * statistics.median(ts), 'min_ms': 1e3 * min(ts)}
            print(key, res[key], flush=True)
        prof = cProfile.Profile()
        with chainer.using_config('type_check', False):
            prof.enable()
            steps(up, device, 5)
            prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats('tottime').print_stats(25)
        text.write('=== %s, 5 steps, type_check=False, by own time\n' % name)
        text.write(s.getvalue())
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats('cumulative').print_stats(30)
        text.write('=== %s, by cumulative time\n' % name)
        text.write(s.getvalue())
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'gpu_profile.json'), 'w') as f:
        json.dump(res, f, indent=2)
    with open(os.path.join(args.out, 'gpu_profile.txt'), 'w') as f:
        f.write(text.getvalue())
    print(text.getvalue()[:6000])


if __name__ == '__main__':
    main()
