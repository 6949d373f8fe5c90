#!/usr/bin/env python
"""Throughput of the pipeline against one-process training, on the CPU.

    python benchmarks/bench_pipeline.py --out benchmarks/pipeline   # pipeline.{json,md}
    python benchmarks/bench_pipeline.py --compare 0:5 1:5 1:1 1:0 --rounds 3 \
        --out benchmarks/pipeline-cuts                               # LAG:CUTS, in turn

Every number is the images/s of training steps of VFBN (alpha_gs = 1e-3) or backprop
on random images (batch 128, the depth given), timed after two warm-up steps, each
configuration in a fresh process (or ``mpiexec -n K`` job), the whole set repeated
``--rounds`` times in turn, medians reported:

* backprop and the one-process decoupled step with all the CPUs' threads;
* the one-process decoupled step on one thread (what the pipeline splits);
* the pipeline (``train.py --pipeline``'s updater and servers) at the paper's cut at
  lags 0, 1 and 2, and at the cuts ``--balance`` picks for K = 2 (lags 0 and 1) and
  K = 3 (lag 0) modules, one thread per rank.

``--compare`` times only the pipeline configurations it names, in turn in each round,
and gives each one's s/step as a ratio to the first one's in the same round.

Stage times, on one thread in one process: the upper stage is
:func:`~chainer_vfbn.updaters.upper_step`; the lower stage is the rest of the
decoupled step (lower forward and backward, synthesizer, eq. 3). The ideal speed-up
of two concurrent stages is their sum over the larger; the fraction of it reached is
the larger stage over the pipeline's measured step time.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '..'))

import chainer_vfbn  # noqa: E402,F401  (compat shim before chainer)
import chainer  # noqa: E402
import numpy  # noqa: E402

from chainer_vfbn import (balance, data, machine, methods, model, pipeline,  # noqa: E402
                          transport, updaters)

WARMUP = 2


def iterator(batch):
    rng = numpy.random.RandomState(0)
    n = max(1, -(-batch * 4 // 36))
    ds = data.AugmentedDataset(rng.randint(0, 256, (n, 3, 32, 32)).astype(numpy.uint8),
                               rng.randint(0, 10, n))
    return data.BatchIterator(ds, batch)


def timed_steps(updater, steps):
    for _ in range(WARMUP):
        updater.update()
    start = time.perf_counter()
    for _ in range(steps):
        updater.update()
    return (time.perf_counter() - start) / steps


def measure(kind, depth, batch, steps, cuts):
    """Seconds per step of one configuration, in this process (or MPI job)."""
    numpy.random.seed(0)
    if kind.startswith('pipeline'):
        lag = int(kind[len('pipeline'):])
        comm = transport.connect(len(cuts) + 1)
        if comm.rank:
            pipeline.stage_server(comm, 'vfbn', depth=depth, splits=cuts, alpha_gs=1e-3,
                                  lag=lag).serve()
            return None
        networks = methods.build_networks('vfbn', depth=depth, split=cuts[0])
        updater, _ = pipeline.build_updater(networks, comm=comm, lag=lag,
                                            iterator=iterator(batch), alpha_gs=1e-3)
        try:
            return timed_steps(updater, steps)
        finally:
            updater.finalize()
            transport.stop(comm)
    method = 'bp' if kind == 'bp' else 'vfbn'
    setup = methods.build(method, iterator=iterator(batch), depth=depth, alpha_gs=1e-3)
    return timed_steps(setup.updater, steps)


def stage_times(depth, batch, steps):
    """(lower stage, upper stage, synthesizer forward) seconds, one thread."""
    setup = methods.build('vfbn', iterator=iterator(batch), depth=depth, alpha_gs=1e-3)
    u = setup.updater
    step = timed_steps(u, steps)
    x, t = u.next_batch()
    h = u.lower(x).array
    optimizer = u.get_optimizer('upper')
    upper = []
    synth = []
    for _ in range(steps):
        start = time.perf_counter()
        updaters.upper_step(u.upper, optimizer, h, t)
        upper.append(time.perf_counter() - start)
        start = time.perf_counter()
        u.synth(chainer.Variable(h), t)
        synth.append(time.perf_counter() - start)
    up = statistics.median(upper)
    return step - up, up, statistics.median(synth)


def run(kind, args, threads, cuts=None):
    """Seconds per step of ``kind``, measured by a fresh process (an MPI job of one
    process per module for a pipeline; ``cuts`` default to the paper's split)."""
    cuts = cuts or [model.paper_split(args.depth)]
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, 'result.json')
        command = [sys.executable, os.path.abspath(__file__), '--measure', kind,
                   '--depth', str(args.depth), '--batch', str(args.batch),
                   '--steps', str(args.steps), '--result', result,
                   '--cuts'] + [str(c) for c in cuts]
        if kind.startswith('pipeline'):
            command = transport.launcher(len(cuts) + 1) + command
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
                   MKL_NUM_THREADS=str(threads))
        subprocess.run(command, check=True, env=env, timeout=3600)
        with open(result) as f:
            return json.load(f)


def run_pair(args):
    """Seconds per step of two one-thread decoupled runs in two processes at once (the
    mean of the two): how much two busy processes slow each other on this machine."""
    env = dict(os.environ, OMP_NUM_THREADS='1', OPENBLAS_NUM_THREADS='1', MKL_NUM_THREADS='1')
    with tempfile.TemporaryDirectory() as tmp:
        results = [os.path.join(tmp, 'result%d.json' % i) for i in range(2)]
        procs = [subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), '--measure', 'decoupled',
             '--depth', str(args.depth), '--batch', str(args.batch), '--steps', str(args.steps),
             '--result', result], env=env) for result in results]
        for proc in procs:
            if proc.wait(timeout=3600):
                raise RuntimeError('a measuring process failed')
        seconds = []
        for result in results:
            with open(result) as f:
                seconds.append(json.load(f))
        return statistics.mean(seconds)


def report(res):
    cores = res['cores']
    t = res['seconds_per_step']
    ips = {k: res['batch'] / v for k, v in t.items()}
    lower, upper = res['stages']['lower'], res['stages']['upper']
    ideal = (lower + upper) / max(lower, upper)
    lines = [
        '# Pipeline throughput (CPU)',
        '',
        'Command: `%s`' % res['command'],
        '',
        'Machine: %s, %d cores, Python %s, NumPy %s, Chainer %s; %s. VFBN alpha_gs = 1e-3 '
        '(backprop for the first row), depth %d (%d layers), batch %d, %d steps after %d '
        'warm-up, median of %d rounds; 1-minute load %.2f before, %.2f after.'
        % (res['cpu'], cores, res['python'], res['numpy'], res['chainer'], res['date'],
           res['depth'], 6 * res['depth'] + 2, res['batch'], res['steps'], WARMUP,
           res['rounds'], res['load'][0], res['load'][1]),
        '',
        '| configuration | threads | s/step | each round | images/s | vs backprop | '
        'vs 1-thread decoupled |',
        '|---|---|---|---|---|---|---|',
    ]
    names = [('bp', 'backprop, one process', cores), ('decoupled', 'decoupled, one process',
                                                     cores),
             ('decoupled1', 'decoupled, one process', 1)]
    names += [('pipeline%d' % d, 'pipeline, lag %d (2 processes)' % d, '1 + 1')
              for d in (0, 1, 2)]
    for key, label, threads in names:
        lines.append('| %s | %s | %.3f | %s | %.1f | %.2f | %.2f |' % (
            label, threads, t[key], rounds(res, key), ips[key], ips[key] / ips['bp'],
            ips[key] / ips['decoupled1']))
    lines += [
        '',
        'Stages on one thread: lower %.3f s (lower forward and backward, synthesizer, '
        'eq. 3), upper %.3f s (forward, backward, update); a synthesizer forward (what '
        'lag > 0 adds to the lower stage) %.3f s. Ideal speed-up of the two stages run '
        'at once: %.2fx (sum over the larger); the lower stage is %s.'
        % (lower, upper, res['stages']['synth_forward'], ideal,
           'the larger' if lower >= upper else 'the smaller'),
        '',
        '| lag | lower stage (s) | ideal s/step | measured s/step | speed-up over 1-thread decoupled | fraction of the ideal |',
        '|---|---|---|---|---|---|',
    ]
    for d in (0, 1, 2):
        # At lag > 0 the lower stage also recomputes a synthesizer forward.
        stage = lower + (res['stages']['synth_forward'] if d else 0.0)
        key = 'pipeline%d' % d
        lines.append('| %d | %.3f | %.3f | %.3f | %.2fx | %.0f%% |' % (
            d, stage, max(stage, upper), t[key], t['decoupled1'] / t[key],
            100 * max(stage, upper) / t[key]))
    lines += [
        '',
        'The stages are timed in this process, the pipeline in its own: a fraction a few '
        'points above 100%% is measurement noise. Two concurrent stages can at best hide '
        'the smaller one; with the upper stage %.0f%% of the lower one, the split (not '
        'the overlap) limits the speed-up here.' % (100 * upper / lower)]
    if 'cut_runs' in res:
        lines += cuts_report(res)
    return '\n'.join(lines) + '\n'


def rounds(res, key):
    """Every round's s/step of ``key``: how far apart they are says how quiet the
    machine was."""
    return ' / '.join('%.2f' % x for x in res['all_seconds'][key])


def module_times(res, cuts):
    bounds = [0] + list(cuts) + [3 * res['depth']]
    return [balance.module_time(res['costs'], a, b, i == len(cuts))
            for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]


def cuts_report(res):
    """Markdown: the pipeline at the paper's cut and at the cuts ``--balance`` picks."""
    t1 = res['seconds_per_step']['decoupled1']
    stem, units, head, synth = res['costs']
    lines = [
        '',
        '## Where to cut (`--balance`)',
        '',
        'Parts timed on one thread by `chainer_vfbn.balance.stage_costs` (forward and '
        'backward, batch %d; the synthesizer\'s part is its forward, delta_hat, eq. 3 and '
        'its update): stem %.3f s, units %s s, head %.4f s; the synthesizer at the cut '
        'before unit 0..%d: %s s. Their sum for the paper\'s cut, %.3f s, against the '
        'one-thread decoupled step measured whole, %.3f s. A module\'s time is its parts\' '
        'sum; K modules on %d cores can at best take max(largest module, sum / cores) per '
        'step (the ideal below). Lag 0, where a module\'s eq. 3 waits for the true '
        'gradient of the same batch: only the synthesizer\'s work before that wait '
        'overlaps with the modules above, while the model counts all of it as overlapping '
        '(at lag 1 nothing waits, and one more synthesizer forward is added).'
        % (res['batch'], stem, ' '.join('%.3f' % u for u in units), head, len(units),
           ' '.join('%.3f' % x for x in synth),
           sum(module_times(res, [model.paper_split(res['depth'])])), t1, res['cores']),
        '',
        '| cuts | lag | processes | module times (s) | ideal s/step | measured s/step | '
        'each round | images/s | speed-up over 1-thread decoupled | fraction of the ideal |',
        '|---|---|---|---|---|---|---|---|---|---|',
    ]
    for name, cuts, *lag in res['cut_runs']:
        lag = lag[0] if lag else 0  # benchmarks/pipeline.json predates the lag: all 0
        times = module_times(res, cuts)
        ideal = max(max(times), sum(times) / min(res['cores'], len(times)))
        measured = res['seconds_per_step'][name]
        lines.append('| %s (%s) | %d | %d | %s | %.3f | %.3f | %s | %.1f | %.2fx | %.0f%% |' % (
            ' '.join(map(str, cuts)), name.split('_lag')[0].replace('_', ' '), lag,
            len(cuts) + 1, ' + '.join('%.3f' % x for x in times), ideal, measured,
            rounds(res, name), res['batch'] / measured, t1 / measured, 100 * ideal / measured))
    if any(entry[2:] and entry[2] for entry in res['cut_runs']):
        lines += ['', 'At lag 1 the ideal leaves out the synthesizer forward that the lag '
                  'adds to every module but the last (%.3f s at the paper\'s cut, more at an '
                  'earlier one).' % res['stages']['synth_forward']]
    if 'decoupled1_pair' in res['seconds_per_step']:
        pair = res['seconds_per_step']['decoupled1_pair']
        lines += [
            '',
            'Two busy processes at once: two one-thread decoupled runs side by side take '
            '%.3f s/step each, against %.3f s/step alone, so on this machine two processes '
            'run at %.0f%% of the speed of one each. The ideal above assumes 100%%: a '
            'pipeline whose modules are all busy (the balanced cuts) loses about that much, '
            'one whose upper module idles most of the step (the paper\'s cut) much less.'
            % (pair, t1, 100 * t1 / pair)]
    if res['cores'] < 3:
        lines += ['', 'With %d cores, three processes share them: the K = 3 row is not one '
                  'core per rank.' % res['cores']]
    return lines


def compare(args):
    """Only the pipeline configurations ``--compare LAG:CUTS ...``, one after the
    other in each of ``--rounds`` rounds, each against the first in the same round (a
    paired ratio: a machine whose speed drifts slows both)."""
    configs = []
    for text in args.compare:
        lag, _, cuts = text.partition(':')
        configs.append((text, int(lag), [int(c) for c in cuts.split(',')]))
    load = [os.getloadavg()[0]]
    times = {text: [] for text, _, _ in configs}
    for r in range(args.rounds):
        for text, lag, cuts in configs:
            times[text].append(run('pipeline%d' % lag, args, 1, cuts))
            print('round %d lag %d, cuts %-6s %.3f s/step' % (r + 1, lag, ','.join(map(str, cuts)),
                                                               times[text][-1]), flush=True)
    load.append(os.getloadavg()[0])
    return dict(facts(args, load), configs=configs, all_seconds=times)


def compare_report(res):
    first = res['configs'][0][0]
    ratios = {text: [a / b for a, b in zip(res['all_seconds'][text], res['all_seconds'][first])]
              for text, _, _ in res['configs']}
    lines = [
        '# Pipeline configurations side by side (CPU)',
        '',
        'Command: `%s`' % res['command'],
        '',
        'Machine: %s, %d cores, Python %s, NumPy %s, Chainer %s; %s. VFBN alpha_gs = 1e-3, '
        'depth %d, batch %d, one thread per process, %d steps after %d warm-up, the '
        'configurations in turn in each of %d rounds; 1-minute load %.2f before, %.2f after. '
        'The ratio is to the first configuration in the same round.'
        % (res['cpu'], res['cores'], res['python'], res['numpy'], res['chainer'], res['date'],
           res['depth'], res['batch'], res['steps'], WARMUP, res['rounds'], res['load'][0],
           res['load'][1]),
        '',
        '| lag | cuts | s/step, each round | median s/step | ratio, each round | median ratio |',
        '|---|---|---|---|---|---|',
    ]
    for text, lag, cuts in res['configs']:
        seconds = res['all_seconds'][text]
        lines.append('| %d | %s | %s | %.3f | %s | %.2f |' % (
            lag, ' '.join(map(str, cuts)), ' / '.join('%.2f' % x for x in seconds),
            statistics.median(seconds), ' / '.join('%.2f' % x for x in ratios[text]),
            statistics.median(ratios[text])))
    return '\n'.join(lines) + '\n'


def facts(args, load):
    """The command, the machine and the settings of a measurement."""
    return dict(command='python benchmarks/bench_pipeline.py ' + ' '.join(sys.argv[1:]),
                cpu=machine.cpu_name(), cores=machine.usable_cpus(), python=platform.python_version(),
                numpy=numpy.__version__, chainer=chainer.__version__,
                date=time.strftime('%Y-%m-%d'), depth=args.depth, batch=args.batch,
                steps=args.steps, rounds=args.rounds, load=load)


def write(res, out, text):
    with open(out + '.json', 'w') as f:
        json.dump(res, f, indent=1)
    with open(out + '.md', 'w') as f:
        f.write(text)
    print(text)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', default=os.path.join(HERE, 'pipeline'),
                   help='writes OUT.json and OUT.md')
    p.add_argument('--depth', type=int, default=3)
    p.add_argument('--batch', type=int, default=128)
    p.add_argument('--steps', type=int, default=8)
    p.add_argument('--rounds', type=int, default=2)
    p.add_argument('--report', action='store_true',
                   help='rewrite OUT.md from OUT.json without measuring')
    p.add_argument('--compare', nargs='+', metavar='LAG:CUTS',
                   help='time only these pipeline configurations (e.g. 0:5 1:1 1:0,7), '
                        'in turn, each against the first in the same round')
    p.add_argument('--measure', help=argparse.SUPPRESS)
    p.add_argument('--result', help=argparse.SUPPRESS)
    p.add_argument('--cuts', type=int, nargs='+', help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        seconds = measure(args.measure, args.depth, args.batch, args.steps, args.cuts)
        if seconds is not None:
            with open(args.result, 'w') as f:
                json.dump(seconds, f)
        return

    if args.report:
        with open(args.out + '.json') as f:
            res = json.load(f)
        write(res, args.out, (compare_report if 'configs' in res else report)(res))
        return
    if args.compare:
        res = compare(args)
        write(res, args.out, compare_report(res))
        return
    load = [os.getloadavg()[0]]
    cores = machine.usable_cpus()
    kinds = [('bp', cores), ('decoupled', cores), ('decoupled1', 1), ('pipeline0', 1),
             ('pipeline1', 1), ('pipeline2', 1)]
    import threadpoolctl
    with threadpoolctl.threadpool_limits(limits=1):
        costs = balance.stage_costs('vfbn', args.depth, args.batch, alpha_gs=1e-3)
    # (name, cuts, lag): the paper's cut is the pipeline0 run above.
    cut_runs = [('paper', [model.paper_split(args.depth)], 0),
                ('balanced_K2', balance.best_cuts(costs, 2)[0], 0),
                ('balanced_K2_lag1', balance.best_cuts(costs, 2)[0], 1),
                ('balanced_K3', balance.best_cuts(costs, 3)[0], 0)]
    times = {k: [] for k, _ in kinds}
    times.update({name: [] for name, _, _ in cut_runs[1:]}, decoupled1_pair=[])
    for r in range(args.rounds):
        for kind, threads in kinds:
            times[kind].append(run('decoupled' if kind == 'decoupled1' else kind, args, threads))
            print('round %d %-10s %.3f s/step' % (r + 1, kind, times[kind][-1]), flush=True)
        times['decoupled1_pair'].append(run_pair(args))
        print('round %d %-10s %.3f s/step (two at once)' % (r + 1, 'decoupled1',
                                                          times['decoupled1_pair'][-1]), flush=True)
        for name, cuts, lag in cut_runs[1:]:
            times[name].append(run('pipeline%d' % lag, args, 1, cuts))
            print('round %d %-10s %.3f s/step (cuts %s, lag %d)'
                  % (r + 1, name, times[name][-1], cuts, lag), flush=True)
    times['paper'] = times['pipeline0']
    with threadpoolctl.threadpool_limits(limits=1):
        lower, upper, synth = stage_times(args.depth, args.batch, args.steps)
    load.append(os.getloadavg()[0])
    res = dict(facts(args, load),
               seconds_per_step={k: statistics.median(v) for k, v in times.items()},
               all_seconds=times,
               stages=dict(lower=lower, upper=upper, synth_forward=synth),
               costs=costs, cut_runs=cut_runs)
    write(res, args.out, report(res))


if __name__ == '__main__':
    main()
