"""Section ``changes``: each speed-up (``chainer_vfbn.sgd``'s one-kernel optimizer,
``synthesizers.cross_entropy`` without a host sync) timed against the code it
replaced, runs interleaved in one process, as ratios; and the fused optimizer's
parameters against Chainer's optimizer's on the device."""
import contextlib

import common  # first: chainer_vfbn before Chainer
from common import log, short_error, to_host, verdict
from timing import generated_images, quartiles, summarize_times, timed_update

import chainer
import chainer.functions as F
import numpy

from chainer_vfbn import config, data, hostcost, methods, model, sgd, synthesizers

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
                                      verdict(agreement['passed'])))
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
                setup = methods.build(method, iterator=hostcost.FixedBatches(batches),
                                      device=device, depth=args.depth, alpha_gs=1e-3)
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
        if common.CLOCK.left() <= 0:
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
