#!/usr/bin/env python
"""Where a GPU training step's time goes (issue: make the GPU step fast).

    PYTHONPATH=/tmp/site:$PWD python3 benchmarks/gpu_profile.py --out $OUT

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
import sys

# The repository root (for chainer_vfbn) and the device check's modules.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(HERE, 'device_check')]

# The device check's helpers (importing them also sets CUPY_TF32=0, so both tools
# time the same fp32 kernels).
from timing import summarize_times, timed_update  # noqa: E402

import chainer  # noqa: E402  (after chainer_vfbn, which the device check imports first)
import numpy  # noqa: E402

from chainer_vfbn import hostcost, methods  # noqa: E402


def steps(updater, device, n):
    return [timed_update(updater, device, {}) for _ in range(n)]


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
        up = methods.build(method, iterator=hostcost.FixedBatches(batches), device=device,
                           depth=args.depth, alpha_gs=alpha).updater
        steps(up, device, 3)
        for tc in (True, False):
            with chainer.using_config('type_check', tc):
                ts = steps(up, device, args.timed)
            key = '%s type_check=%s' % (name, tc)
            res[key] = summarize_times(ts)
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
