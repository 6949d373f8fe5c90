"""Choosing a pipeline's cuts from measured stage times (``train.py --balance``).

The paper cuts ResNet-110 in the middle of ResBlock-2, which leaves unequal halves:
by our count 236M multiply-adds per image below h and 128M above, and the
synthesizer runs on the lower side. Run at once, the modules go at the pace of the
slowest (``docs/PIPELINE.md``), so ``--balance`` cuts where the slowest is fastest:

1. time, on this process's threads and a batch of random images of the run's batch
   size, the forward and backward pass of the stem, of one residual unit of each
   kind (the units of a block are alike, except the first), of the head, and the
   synthesizer's part of a step (forward, delta_hat, eq. 3 and its update) at each
   kind of cut (the maps' channels and size);
2. add them up into the time of every possible module: module 0 is the stem and its
   units, every module but the top one has a synthesizer at its output, the top one
   has the head;
3. choose the K - 1 cuts that make the largest module time smallest (exactly, by
   dynamic programming over the unit boundaries).

The measurement takes a few seconds to a minute; the cuts go into args.json as
``--splits``, so a rerun with those ``--splits`` (or ``--resume``) builds the same
network without timing again. Times on another machine, or under other load, can
choose other cuts: a run's cuts are a fact about the machine it ran on. The model
lets a module's synthesizer work overlap with the modules above, as at lag >= 1; at
lag 0 eq. 3 waits for the true gradient of the same batch and the chosen cuts can be
slower than the paper's (docs/PIPELINE.md, measured).
"""
import statistics
import time

import chainer
import numpy

from chainer_vfbn import config, methods, model, pipeline

REPEATS = 3


def _seconds(step, device, repeats=REPEATS):
    """Median wall time of ``step()`` after one warm-up call (on a GPU, until its
    kernels have finished)."""
    def synchronize():
        if device.xp is not numpy:
            device.xp.cuda.Stream.null.synchronize()

    step()
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        step()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _forward_backward(forward, x, link):
    """One forward and backward pass of ``forward`` (``link`` or a part of it) from
    the array ``x``; returns the output array."""
    y = forward(chainer.Variable(x))
    link.cleargrads()
    y.grad = link.xp.ones_like(y.array)
    y.backward()
    return y.array


def stage_costs(method, depth, batchsize, *, device=None, jaderberg_scaled=True,
                vfbn_normalized_loss=False, alpha_gs=config.ALPHA_GS):
    """Measured seconds per batch: ``(stem, units, head, synth)``, ``units[i]`` of unit
    i, ``synth[s]`` of the synthesizer at the cut before unit ``s`` (s in 0..3n)."""
    device = device or chainer.get_device('@numpy')
    lower, upper = model.build_resnet(depth, 3 * depth)  # every unit in the lower chain
    lower.to_device(device)
    upper.to_device(device)
    rng = numpy.random.RandomState(0)
    size = (config.INPUT_SIZE, config.INPUT_SIZE)
    x = device.send(rng.uniform(-1, 1, (batchsize, 3) + size).astype(numpy.float32))
    t = device.send(rng.randint(0, config.N_CLASSES, batchsize).astype(numpy.int32))

    def stem(x):
        return chainer.functions.relu(lower.bn1(lower.conv1(x)))

    stem_cost = _seconds(lambda: _forward_backward(stem, x, lower), device)
    h = _forward_backward(stem, x, lower)
    unit_cost, maps, kinds = [], [h], {}
    for unit in lower.units:
        kind = (unit.conv1.W.shape, unit.stride, h.shape)
        if kind not in kinds:
            kinds[kind] = _seconds(lambda: _forward_backward(unit, h, unit), device)
        unit_cost.append(kinds[kind])
        h = _forward_backward(unit, h, unit)
        maps.append(h)
    head = _seconds(lambda: _forward_backward(upper.head, h, upper), device)

    synth_cost, shapes = [], {}
    for h in maps:
        if h.shape not in shapes:
            synth = methods.make_synthesizer(method, h.shape[1],
                                             jaderberg_scaled=jaderberg_scaled,
                                             vfbn_normalized_loss=vfbn_normalized_loss)
            synth.to_device(device)
            optimizer = methods.synthesizer_optimizer(synth, alpha_gs)
            delta = device.send(rng.normal(0, 1e-3, h.shape).astype(numpy.float32))

            def step(h=h, synth=synth, optimizer=optimizer, delta=delta):
                out, _ = pipeline.synthetic_gradient(synth, h, t, 1.0, True)
                batch = pipeline.Batch(h, t, out, None, delta, None)
                pipeline.learn_synth(synth, optimizer, batch, 1.0, alpha_gs > 0)

            shapes[h.shape] = _seconds(step, device)
        synth_cost.append(shapes[h.shape])
    return stem_cost, unit_cost, head, synth_cost


def module_time(costs, start, stop, top):
    """Seconds per batch of the module of units ``[start, stop)``: the stem below
    unit 0, the head on the top module, else the synthesizer at its output."""
    stem, units, head, synth = costs
    return ((stem if start == 0 else 0.0) + sum(units[start:stop]) +
            (head if top else synth[stop]))


def best_cuts(costs, modules):
    """The ``modules - 1`` increasing unit boundaries that make the largest
    :func:`module_time` smallest, and that time."""
    n = len(costs[1])
    if not 2 <= modules <= n + 1:
        raise ValueError('%d modules do not fit a network of %d units' % (modules, n))
    # best[k][s]: the smallest largest time of units [0, s) in k modules (not the top).
    inf = float('inf')
    best = [[inf] * (n + 1) for _ in range(modules)]
    came = [[None] * (n + 1) for _ in range(modules)]
    for s in range(n + 1):
        best[1][s] = module_time(costs, 0, s, False)
    for k in range(2, modules):
        for s in range(k - 1, n + 1):
            for r in range(k - 2, s):
                worst = max(best[k - 1][r], module_time(costs, r, s, False))
                if worst < best[k][s]:
                    best[k][s], came[k][s] = worst, r
    cut, worst = min(((s, max(best[modules - 1][s], module_time(costs, s, n, True)))
                      for s in range(modules - 2, n + 1)), key=lambda p: p[1])
    cuts = [cut]
    for k in range(modules - 1, 1, -1):
        cuts.append(came[k][cuts[-1]])
    return cuts[::-1], worst
