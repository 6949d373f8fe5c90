#!/usr/bin/env python
"""The CPU proxy of a step's host cost: function applications per phase, and the
time of the paper's step with tiny arrays, for every variant of the fast paths.

    python benchmarks/bench_host.py --out benchmarks/host     # writes host.json, host.md

A GPU step of this package is bound by the host: by Chainer's Python cost per
function application, not by the GPU (docs/GPU.md). On the CPU the same graph with
tiny arrays (batch 2, 8x8 images, every width / 8, one BLAS thread) costs the host
what it costs on a GPU plus a little array work, so its time is a proxy of the host
cost. For backprop, Jaderberg's Linear and VFBN at n = 18 (ResNet-110), it reports:

* applications per phase of the step and the optimizers' update-rule calls, exact
  (``chainer_vfbn.hostcost``; ``tests/test_host_cost.py`` pins them at n = 1);
* CPU and wall ms per step, us per application, each method's ratio to backprop;
* every variant of ``hostcost.VARIANTS`` (the composed path, the fused path, each
  lever alone) timed INTERLEAVED in one process: round robin over all runs, the
  order rotated every round; each ratio is taken within a round (paired) and
  summarised by its median over the rounds; after the warm-up the objects alive
  are frozen out of Python's collector (``gc.freeze``), whose full collections
  otherwise land in a step at random;
* beside each variant, its float64 check against the composed path: the max over
  parameters of ``max|g - g_composed| / max|g_composed|`` of every parameter
  gradient after one step (and the same of the parameters after the update).

Counts are exact on any machine; the timings are ratios taken in one process, but a
machine shared with other work makes them noisy (the load average is recorded).
``--print-pins`` prints the counts at n = 1 in the form tests/test_host_cost.py pins.
"""
import argparse
import gc
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
import threadpoolctl  # noqa: E402

from chainer_vfbn import hostcost, machine  # noqa: E402

METHODS = list(hostcost.HOST_METHODS)
VARIANTS = list(hostcost.VARIANTS)
#: Kernels one residual unit launches on a GPU (forward + backward, training), by
#: reading the code. The composed unit's count and the fused unit's come from the
#: fused unit's author (chainer_vfbn/fused/unit.py); ``benchmarks/device_check``
#: counts them on a GPU (its ``kernels`` section). None: not yet given.
KERNELS_PER_UNIT = {'composed': 'about 53 (23 forward + 30 backward; without cuDNN)',
                    'fused': 'about 37 (15 forward + 22 backward)'}
#: The issue's targets (issue 20), judged on the fused path.
TARGET_BP_APPLICATIONS = 150
TARGET_VFBN_MINUS_BP = 60
TARGET_BP_CPU_RATIO = 0.45
TARGET_VFBN_OVER_BP = 1.15


# ---------------------------------------------------------------------------
# Counts.

def counts(shape):
    """Applications per phase, update-rule calls and optimizer updates of one
    steady-state step of every method under every variant."""
    out = {}
    for variant in VARIANTS:
        for method in METHODS:
            apps, rules, updates = hostcost.count_method(method, variant, **shape)
            out.setdefault(variant, {})[method] = {
                'applications': apps, 'total': sum(apps.values()),
                'rule_calls': rules, 'optimizer_updates': updates}
    return out


def pins(n=1):
    """The counts that tests/test_host_cost.py pins, at ``n`` units per block."""
    out = {}
    for variant in ('composed', 'fused'):
        for method in METHODS:
            apps, rules, _ = hostcost.count_method(method, variant, n=n)
            out.setdefault(variant, {})[method] = {
                'applications': {p: c for p, c in apps.items() if c},
                'rule_calls': rules}
    return out


# ---------------------------------------------------------------------------
# Gradients: every variant against the composed path, float64.

def gradients(shape):
    """``{method: {variant: {'grad': err, 'param': err}}}`` after one float64 step."""
    out = {}
    for method in METHODS:
        ref = None
        for variant in VARIANTS:
            updater = hostcost.build_updater(method, variant, dtype=numpy.float64, **shape)
            with hostcost.variant_config(variant):
                updater.update()
            state = _state(updater)
            if ref is None:
                ref = state
            out.setdefault(method, {})[variant] = {
                kind: _worst(ref[kind], state[kind]) for kind in ('grad', 'param')}
    return out


def _state(updater):
    state = {'grad': {}, 'param': {}}
    for name, optimizer in sorted(updater.get_all_optimizers().items()):
        for pname, p in optimizer.target.namedparams():
            state['grad'][name + pname] = numpy.array(p.grad)
            state['param'][name + pname] = numpy.array(p.array)
    return state


def _worst(ref, got):
    """Max over arrays of ``max|got - ref| / max|ref|`` (0 where both are 0); a
    missing or extra array is an infinite difference."""
    if set(ref) != set(got):
        return float('inf')
    worst = 0.0
    for k, r in ref.items():
        diff = float(numpy.abs(got[k] - r).max()) if r.size else 0.0
        scale = float(numpy.abs(r).max()) if r.size else 0.0
        worst = max(worst, diff / scale if scale else (0.0 if diff == 0 else float('inf')))
    return worst


# ---------------------------------------------------------------------------
# Timing: every (method, variant) run interleaved.

def timing(shape, rounds, warmup):
    runs = {}
    for method in METHODS:
        for variant in VARIANTS:
            runs[(method, variant)] = hostcost.build_updater(method, variant, **shape)
    keys = list(runs)
    cpu = {k: [] for k in keys}
    wall = {k: [] for k in keys}
    for i in range(warmup + rounds):
        if i == warmup:
            # The updaters' long-lived objects (networks, optimizer states: made by
            # now) out of the collector's way: a full collection walks them all, and
            # lands inside whichever of the interleaved steps is being timed.
            gc.collect()
            gc.freeze()
        for k in _round_order(i):
            with hostcost.variant_config(k[1]):
                c, w = time.process_time(), time.perf_counter()
                runs[k].update()
                c, w = time.process_time() - c, time.perf_counter() - w
            if i >= warmup:
                cpu[k].append(c)
                wall[k].append(w)
    gc.unfreeze()
    out = {}
    for (method, variant) in keys:
        c, w = cpu[(method, variant)], wall[(method, variant)]
        base, bp = cpu[(method, 'composed')], cpu[('bp', variant)]
        out.setdefault(method, {})[variant] = {
            'cpu_ms': 1e3 * statistics.median(c), 'wall_ms': 1e3 * statistics.median(w),
            'over_composed': _paired(c, base), 'over_bp': _paired(c, bp)}
    return out


def _round_order(i):
    """Round ``i``: the methods in turn, each method's variants one after the other
    (so that a variant and the composed path it is compared with run close in
    time), both orders rotated by ``i``."""
    ms, vs = METHODS[i % len(METHODS):] + METHODS[:i % len(METHODS)], \
        VARIANTS[i % len(VARIANTS):] + VARIANTS[:i % len(VARIANTS)]
    return [(m, v) for m in ms for v in vs]


def _paired(a, b):
    """Median and quartiles of the per-round ratios a / b."""
    ratios = [x / y for x, y in zip(a, b)]
    q1, q2, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return {'median': q2, 'q1': q1, 'q3': q3}


# ---------------------------------------------------------------------------
# The report.

def targets(res):
    """The issue's targets, each with its value on the fused path and met or not."""
    out = []
    for variant in ('fused', 'fused, no type check'):
        c, t = res['counts'][variant], res['timing']
        bp, vf = c['bp']['total'], c['vfbn']['total']
        out += [
            ('applications per backprop step <= %d' % TARGET_BP_APPLICATIONS, variant,
             '%d' % bp, bp <= TARGET_BP_APPLICATIONS),
            ('VFBN minus backprop applications <= %d' % TARGET_VFBN_MINUS_BP, variant,
             '%d' % (vf - bp), vf - bp <= TARGET_VFBN_MINUS_BP),
            ('backprop CPU time / composed path <= %.2f' % TARGET_BP_CPU_RATIO, variant,
             _ratio(t['bp'][variant]['over_composed']),
             t['bp'][variant]['over_composed']['median'] <= TARGET_BP_CPU_RATIO),
            ('VFBN / backprop CPU time <= %.2f' % TARGET_VFBN_OVER_BP, variant,
             _ratio(t['vfbn'][variant]['over_bp']),
             t['vfbn'][variant]['over_bp']['median'] <= TARGET_VFBN_OVER_BP)]
    return out


def notes(res):
    """What the reader must know before the numbers, found from the results."""
    out = []
    same = all(res['counts'][v] == res['counts']['composed'] for v in VARIANTS)
    if same:
        out.append('Every variant made the same applications as the composed path: the '
                   'fast paths are not in this tree (their switches exist and do nothing), '
                   'so the variants differ only by type_check and the ratios near 1 show '
                   'the noise of the measure.')
    if max(res['load_average_before'], res['load_average_after']) > 0.5 * res['cpus']:
        out.append('The machine was shared with other work (load average above): counts '
                   'are exact, timings noisy. Redo the timing on a quiet machine before '
                   'quoting it.')
    return out


def markdown(res):
    s = res['shape']
    lines = [
        '# Host cost of a step: the CPU proxy', '',
        'Command: `%s`  ' % res['command'],
        'Machine: %s, %d cores; Python %s, NumPy %s, Chainer %s; one BLAS thread.  '
        % (res['machine'], res['cpus'], res['python'], res['numpy'], res['chainer']),
        'Measured %s; 1-minute load average %.1f before, %.1f after (2 cores: above 2 '
        'means other work shared the machine).  ' % (
            res['date'], res['load_average_before'], res['load_average_after']),
        'Network: the paper\'s, %d units per block (%d layers), every width / %d; batch '
        '%d, %dx%d images. Timing: %d rounds after %d warm-up, all %d runs interleaved.'
        % (s['n'], 6 * s['n'] + 2, s['width_divisor'], s['batch'], s['size'], s['size'],
           res['rounds'], res['warmup'], len(METHODS) * len(VARIANTS)), '']
    lines += ['**%s**' % note for note in notes(res)] + ['']
    lines += ['Variants: ' + '; '.join('`%s` = %s' % (v, ', '.join(
        '%s %s' % (k, 'on' if on else 'off') for k, on in hostcost.VARIANTS[v].items()))
        for v in VARIANTS) + '.', '']

    lines += ['## Function applications per step, by phase', '',
              'Exact counts (a global `chainer.FunctionHook`, backward passes included; '
              '`chainer_vfbn/hostcost.py` says how phases are told apart).', '']
    shown = [p for p in hostcost.PHASES
             if any(res['counts'][v][m]['applications'][p] for v in VARIANTS for m in METHODS)]
    lines += ['| method | variant | ' + ' | '.join(shown) + ' | total | rule calls |',
              '|---|---|' + '---|' * (len(shown) + 2)]
    for method in METHODS:
        for variant in ('composed', 'fused', 'units only', 'bn double backward only'):
            c = res['counts'][variant][method]
            lines.append('| %s | %s | %s | **%d** | %s |' % (
                method, variant, ' | '.join(str(c['applications'][p]) for p in shown),
                c['total'], ', '.join('%s %d' % kv for kv in sorted(c['rule_calls'].items()))
                or '0'))
    lines += ['', 'Optimizer updates per step: ' + '; '.join(
        '%s %s' % (m, ', '.join('%s %d' % kv for kv in sorted(
            res['counts']['composed'][m]['optimizer_updates'].items()))) for m in METHODS)
        + ' (the network\'s optimizers update every parameter in one operation and call '
        'no update rule).', '']

    lines += ['## Time per step, every variant interleaved', '',
              'CPU and wall ms: medians over rounds. Ratios: medians of the per-round '
              'ratios of CPU times (quartiles in brackets). "grad err" / "param err": '
              'float64, one step from the same weights and batch, max over parameters '
              'of max|x - x_composed| / max|x_composed|.', '',
              '| method | variant | CPU ms | wall ms | us / application | / composed | '
              '/ backprop | grad err | param err |', '|---|---|---|---|---|---|---|---|---|']
    for method in METHODS:
        for variant in VARIANTS:
            t = res['timing'][method][variant]
            g = res['gradients'][method][variant]
            total = res['counts'][variant][method]['total']
            lines.append('| %s | %s | %.1f | %.1f | %.0f | %s | %s | %.1e | %.1e |' % (
                method, variant, t['cpu_ms'], t['wall_ms'], 1e3 * t['cpu_ms'] / total,
                _ratio(t['over_composed']), _ratio(t['over_bp']), g['grad'], g['param']))
    lines += ['', '## The issue\'s targets', '',
              '| target | path | value | |', '|---|---|---|---|']
    lines += ['| %s | %s | %s | %s |' % (name, variant, value, 'met' if ok else 'NOT met')
              for name, variant, value, ok in targets(res)]
    lines += ['', 'A ratio is judged on its median; the quartiles (in brackets) show how far '
              'the noise of this run reaches.', '',
              'On a GPU (backprop <= 71 ms on an H200, VFBN / BP <= 1.15): not '
              'measured with the fused path (`benchmarks/device_check`, sections `paths` and '
              '`graph`). Part of the fused path\'s CPU gain is the CPU\'s alone: its '
              'im2col and col2im take 3 and 4 NumPy calls where Chainer\'s take about 20 '
              'and 11 (`chainer_vfbn/fused/kernels.py`); on a GPU Chainer\'s are one '
              'kernel each already.', '',
              '## Kernels per residual unit on a GPU (forward + backward)', '']
    k = res['kernels_per_unit']
    if k['composed'] is None or k['fused'] is None:
        lines += ['PLACEHOLDER, not yet filled: the counts by reading the code come from '
                  'the fused unit (chainer_vfbn/fused/unit.py) and its report; the device '
                  'check counts them on a GPU when one is lent (section `kernels`).']
    else:
        lines += ['By reading the code (not counted on a GPU): a stride-1 unit, the '
                  'convolutions\' ~21 kernels the same code in both; the normalisations, '
                  'ReLUs, adds and masks go from 32 kernels to 15.', '',
                  '| unit | kernels |', '|---|---|',
                  '| composed | %s |' % k['composed'], '| fused | %s |' % k['fused']]
    return '\n'.join(lines)


def _ratio(r):
    return '%.3f (%.3f-%.3f)' % (r['median'], r['q1'], r['q3'])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', default='benchmarks/host', help='output path without extension')
    p.add_argument('--depth', type=int, default=18, help='units per block (18: ResNet-110)')
    p.add_argument('--width-divisor', type=int, default=8)
    p.add_argument('--batch', type=int, default=2)
    p.add_argument('--size', type=int, default=8, help='image height and width')
    p.add_argument('--rounds', type=int, default=30)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--print-pins', action='store_true',
                   help='print the counts tests/test_host_cost.py pins (n = 1) and exit')
    args = p.parse_args()
    for name in ('depth', 'width_divisor', 'batch', 'rounds'):
        if getattr(args, name) < 1:
            p.error('--%s must be >= 1' % name.replace('_', '-'))
    if args.warmup < 0:
        p.error('--warmup must be >= 0')
    if args.size < 8:
        p.error('--size must be >= 8 (conv1 has no padding; two stride-2 stages follow)')
    with threadpoolctl.threadpool_limits(limits=1):
        if args.print_pins:
            print(json.dumps(pins(), indent=4))
            return
        run(args)


def run(args):
    shape = {'n': args.depth, 'width_divisor': args.width_divisor, 'batch': args.batch,
             'size': args.size}
    res = {'command': 'python ' + ' '.join(sys.argv), 'date': time.strftime('%Y-%m-%d'),
           'machine': machine.cpu_name(), 'cpus': os.cpu_count(),
           'load_average_before': os.getloadavg()[0], 'python': platform.python_version(),
           'numpy': numpy.__version__, 'chainer': chainer.__version__, 'shape': shape,
           'rounds': args.rounds, 'warmup': args.warmup, 'variants': hostcost.VARIANTS,
           'kernels_per_unit': KERNELS_PER_UNIT}
    start = time.perf_counter()
    res['counts'] = counts(shape)
    print('counts: ' + ', '.join('%s %s %d' % (v, m, res['counts'][v][m]['total'])
                                 for v in ('composed', 'fused') for m in METHODS), flush=True)
    res['gradients'] = gradients(shape)
    print('gradients: worst %.1e' % max(g['grad'] for m in res['gradients'].values()
                                        for g in m.values()), flush=True)
    res['timing'] = timing(shape, args.rounds, args.warmup)
    res['load_average_after'] = os.getloadavg()[0]
    res['seconds'] = time.perf_counter() - start
    os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
    text = {'.json': json.dumps(res, indent=2) + '\n', '.md': markdown(res) + '\n'}
    for ext, content in text.items():      # both written, or neither replaced
        with open(args.out + ext + '.tmp', 'w') as f:
            f.write(content)
    for ext in text:
        os.replace(args.out + ext + '.tmp', args.out + ext)
    print(text['.md'])
    print('%.0f s' % res['seconds'])


if __name__ == '__main__':
    main()
