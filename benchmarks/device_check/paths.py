"""Section ``paths``: the composed and the fused path (``chainer_vfbn.hostcost.VARIANTS``)
of backprop and VFBN, at full depth and batch, timed interleaved in one process, as
ms per step and as ratios of paired steps; and the function applications of one
step of each (``hostcost``, device-independent)."""
import common  # first: chainer_vfbn before Chainer
from common import free_device_memory, log, short_error
from timing import build_run, device_batches, quartiles, summarize_times, timed_update

from chainer_vfbn import hostcost

#: (method, variant) of every timed run: the paper's comparison on the composed path
#: (the code before the speed work) and on the fused path, then the fused path
#: without Chainer's type checks.
PATH_RUNS = (('bp', 'composed'), ('bp', 'fused'), ('vfbn', 'composed'), ('vfbn', 'fused'),
             ('bp', 'fused, no type check'), ('vfbn', 'fused, no type check'))
#: (name, run, run it is divided by): the ratios the section reports.
PATH_RATIOS = (
    ('backprop, fused / composed', ('bp', 'fused'), ('bp', 'composed')),
    ('VFBN, fused / composed', ('vfbn', 'fused'), ('vfbn', 'composed')),
    ('VFBN / BP, composed', ('vfbn', 'composed'), ('bp', 'composed')),
    ('VFBN / BP, fused', ('vfbn', 'fused'), ('bp', 'fused')),
    ('backprop, fused without type checks / fused', ('bp', 'fused, no type check'),
     ('bp', 'fused')),
    ('VFBN / BP, fused without type checks', ('vfbn', 'fused, no type check'),
     ('bp', 'fused, no type check')),
)


def run_key(run):
    return '%s, %s' % run


def paths(args, device, report):
    """All runs built side by side and timed in rounds (one step of each, in an order
    rotated every round); a ratio is taken within each round and summarised by its
    median and quartiles over the rounds."""
    sec = report.section('paths')
    sec.update(depth=args.depth, batch=args.batch, warmup=args.warmup, timed=args.timed,
               what='updater.update() of methods.build(...) under each variant\'s switches, '
                    'batches on the device, runs interleaved in rotated order; median of '
                    'synchronised steps after the warm-up',
               variants={v: hostcost.VARIANTS[v] for _, v in PATH_RUNS}, results={},
               applications={})
    batches = device_batches(args, device)
    runs = {}
    for method, variant in PATH_RUNS:
        key = run_key((method, variant))
        try:
            runs[key] = {'updater': build_run(method, variant, args, device, batches),
                         'variant': variant, 'times': [], 'obs': {}}
        except Exception as e:
            sec['results'][key] = short_error(e)
            log('paths %s: ERROR %s' % (key, sec['results'][key]['error']))
    for i in range(args.warmup + args.timed):
        if common.CLOCK.left() <= 0:
            sec['skipped'] = 'time budget spent after %d rounds' % i
            break
        keys = list(runs)
        for key in keys[i % len(keys):] + keys[:i % len(keys)]:
            run = runs[key]
            try:
                with hostcost.variant_config(run['variant']):
                    seconds = timed_update(run['updater'], device, run['obs'])
            except Exception as e:       # e.g. divergence: this run stops, others go on
                sec['results'][key] = short_error(e)
                del runs[key]
                continue
            if i >= args.warmup:
                run['times'].append(seconds)
    for key, run in runs.items():
        if run['times']:
            sec['results'][key] = dict(summarize_times(run['times']), times_ms=[
                1e3 * t for t in run['times']], final_loss=float(run['obs']['main/loss'].array))
            log('paths %s: median %.1f ms/step' % (key, sec['results'][key]['median_ms']))
        with hostcost.variant_config(run['variant']):    # one more step, counted
            apps, rules, _, _ = hostcost.count_step(run['updater'])
        sec['applications'][key] = {'total': sum(apps.values()), 'per_phase': apps,
                                    'rule_calls': rules}
    sec['ratios'] = {}
    for name, a, b in PATH_RATIOS:
        ta = sec['results'].get(run_key(a), {}).get('times_ms')
        tb = sec['results'].get(run_key(b), {}).get('times_ms')
        if ta and tb:
            sec['ratios'][name] = quartiles([x / y for x, y in zip(ta, tb)])
            log('paths %s: %.3f (quartiles %.3f-%.3f)' % (
                name, sec['ratios'][name]['median'], sec['ratios'][name]['q1'],
                sec['ratios'][name]['q3']))
    del runs
    free_device_memory(device)
