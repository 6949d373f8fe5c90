"""Sections ``numerics`` (float32) and ``numerics64`` (float64): the same weights
and inputs on the device and on the CPU, for full backprop and for one VFBN
iteration, compared quantity by quantity with normwise errors. Section
``numerics_fused``: the fused path on the device against the composed path on the
CPU, float64, two whole training steps."""
import math

# common first: it imports chainer_vfbn before Chainer
from common import log, short_error, synchronize, to_host, verdict

import chainer
import chainer.functions as F
import numpy

from chainer_vfbn import config, hostcost, model, synthesizers

# ---------------------------------------------------------------------------
# Tolerances of the numerics (section 1). Errors are normwise: for a quantity q,
#   err(q) = max|q_gpu - q_cpu| / max|q_cpu|,
# because an element-wise relative error is meaningless for the many entries of a
# gradient that are near zero. A gradient that is zero in exact arithmetic (conv1's
# bias feeds straight into BN, SPEC section 2) is pure rounding noise (~1e-8 against
# gradients ~1e-1); so a gradient's denominator is at least GROUP_FLOOR x the largest
# gradient of the same network (lower half, upper half or v_f).
GROUP_FLOOR = 1e-3
# float32: the GPU and the CPU round differently (cuBLAS and OpenBLAS split and order
# the sums of the im2col GEMMs differently; CuPy's reductions for BN's batch mean and
# variance use another order than NumPy's pairwise sums), so they differ by float32
# rounding noise, amplified by the network's conditioning (BN divides by batch
# standard deviations; its backward subtracts nearly equal terms). The size of that
# noise is measured, not guessed: NOISE32(q) is the error of the CPU's own float32
# result against the CPU's float64 result from the same weights (on the CPU at depth
# 2, batch 16: 2e-8 for the loss, ~1e-6 for logits, h, delta and delta_hat, 3e-7 to
# 1.4e-5 for the parameter gradients). The GPU's float32 error is another draw of
# the same kind of noise; a different summation order (blocked or sequential partial
# sums instead of pairwise) can make it larger by a few times, so NOISE_FACTOR x
# NOISE32(q) is allowed, and never less than RTOL32 (~80 float32 ulps, 2^-23 ~
# 1.2e-7). That still fails anything systematic: TF32 GEMMs (10-bit mantissa) give
# ~1e-3, a wrong kernel or a dropped term O(1).
NOISE_FACTOR = 30.0
RTOL32 = 1e-5
# float64: the same rounding-order differences at 2^-52 ~ 2.2e-16 per operation, that
# is 2^-29 ~ 2e-9 times the float32 noise above: ~3e-14 for the worst gradient. Even
# the worst conditioning seen on this network (float32 gradients ~1e-2 apart
# across BLAS builds, an amplification of ~1e5 over float32's eps) gives ~2e-11
# in float64; RTOL64 stays above that and far below any real difference.
RTOL64 = 1e-10

# ---------------------------------------------------------------------------
# 1. Numerics: GPU against CPU, same weights, same inputs.

def build_nets(depth, dtype, seed):
    """The lower and upper half of the paper's ResNet and a VFBN synthesizer, in
    ``dtype``, with the weights that ``seed`` gives the float32 build (the float64
    build gets the same values, cast)."""
    numpy.random.seed(seed)
    lower, upper = model.build_resnet(depth)
    synth = synthesizers.VFBN(synthesizers.VirtualForward(lower.units[-1].out_ch))
    if dtype != numpy.float32:
        with chainer.using_config('dtype', dtype):
            cast = model.build_resnet(depth) + (
                synthesizers.VFBN(synthesizers.VirtualForward(lower.units[-1].out_ch)),)
        for src, dst in zip((lower, upper, synth), cast):
            dst_params = dict(dst.namedparams())
            for name, p in src.namedparams():
                dst_params[name].array[...] = p.array
        lower, upper, synth = cast
    return {'lower': lower, 'upper': upper, 'synth': synth, 'net': model.Net(lower, upper)}


def numerics_inputs(batch, seed):
    rng = numpy.random.RandomState(seed + 1)
    x = rng.standard_normal((batch, 3, config.INPUT_SIZE, config.INPUT_SIZE))
    t = rng.randint(0, config.N_CLASSES, batch).astype(numpy.int32)
    return x.astype(numpy.float32), t


def backprop_quantities(nets, x, t):
    """Table 1 "BackProp": logits, loss and every parameter's gradient."""
    net = nets['net']
    logits = net(x)
    loss = F.softmax_cross_entropy(logits, t)
    net.cleargrads()
    loss.backward()
    out = {'logits': logits.array, 'loss': loss.array}
    out.update(('grad %s' % name[1:], p.grad) for name, p in net.namedparams())
    return out


def vfbn_quantities(nets, x, t):
    """One VFBN iteration (DecoupledUpdater's steps 1-4, SPEC section 4) without
    the optimizer updates: h, delta_hat (eq. 6), delta, eq. 3, the gradient of eq. 3
    w.r.t. v_f's parameters (double backprop) and the lower half's gradients after
    ``h.backward()`` with delta_hat."""
    lower, upper, synth = nets['lower'], nets['upper'], nets['synth']
    h = lower(x)
    delta_hat = synth(chainer.Variable(h.array), t)
    lower.cleargrads()
    h.grad = delta_hat.array
    h.backward()
    h_up = chainer.Variable(h.array)
    loss = F.softmax_cross_entropy(upper(h_up), t)
    upper.cleargrads()
    loss.backward()
    delta = h_up.grad
    scale = synth.xp.sqrt((delta * delta).mean())
    e = synth.loss(delta_hat, delta, scale)
    synth.cleargrads()
    e.backward()
    out = {'h': h.array, 'delta': delta, 'delta_hat': delta_hat.array, 'eq3': e.array}
    out.update(('grad lower%s' % name, p.grad) for name, p in lower.namedparams())
    out.update(('grad v_f%s' % name[len('/v_f'):], p.grad)
               for name, p in synth.namedparams())
    return out


CHECKS = {'bp': backprop_quantities, 'vfbn': vfbn_quantities}


def run_check(check, depth, batch, dtype, devices, seed):
    """The check's quantities computed on each of ``devices``, as host arrays, from
    the same weights and inputs."""
    x, t = numerics_inputs(batch, seed)
    x = x.astype(dtype)
    results = []
    for dev in devices:
        nets = build_nets(depth, dtype, seed)
        for link in nets.values():
            link.to_device(dev)
        with chainer.using_device(dev), chainer.using_config('train', True):
            q = CHECKS[check](nets, dev.send(x), dev.send(t))
        synchronize(dev)
        results.append({k: to_host(v) for k, v in q.items()})
    return results


def grad_group(name):
    """``'grad lower/units/0/conv1/W'`` -> ``'grad lower'`` (the network it belongs to);
    None for a quantity that is not a gradient."""
    return name.split('/')[0] if name.startswith('grad ') else None


def normwise_errors(ref, got):
    """``{name: (max abs error, err, max |ref|)}`` with err as in the module's
    tolerance notes: the denominator of a gradient is at least GROUP_FLOOR x the
    largest gradient of the same network (lower half, upper half or v_f)."""
    largest = {}
    for name, r in ref.items():
        if grad_group(name) and r is not None and r.size:
            largest[grad_group(name)] = max(largest.get(grad_group(name), 0.0),
                                            float(numpy.abs(r).max()))
    errors = {}
    for name, r in ref.items():
        g = got.get(name)
        if r is None or g is None:
            errors[name] = (0.0, 0.0 if r is None and g is None else math.inf, 0.0)
            continue
        r, g = r.astype(numpy.float64), g.astype(numpy.float64)
        diff = float(numpy.abs(g - r).max()) if r.size else 0.0
        scale = float(numpy.abs(r).max()) if r.size else 0.0
        denom = max(scale, GROUP_FLOOR * largest.get(grad_group(name), 0.0))
        err = diff / denom if denom > 0 else (0.0 if diff == 0 else math.inf)
        errors[name] = (diff, err, scale)
    return errors


def numerics(args, device, report, dtype):
    """Section ``numerics`` (float32) or ``numerics64`` (float64): every quantity of
    both checks on the device against the CPU, with the tolerances above."""
    f32 = dtype == numpy.float32
    sec = report.section('numerics' if f32 else 'numerics64')
    sec.update(dtype=numpy.dtype(dtype).name, depth=args.numerics_depth,
               batch=args.numerics_batch, group_floor=GROUP_FLOOR, checks={})
    sec.update(rtol=RTOL32, noise_factor=NOISE_FACTOR) if f32 else sec.update(rtol=RTOL64)
    cpu = chainer.get_device('@numpy')
    for check in CHECKS:
        log('numerics %s, %s: depth %d, batch %d' % (
            check, sec['dtype'], args.numerics_depth, args.numerics_batch))
        entry = sec['checks'].setdefault(check, {})
        try:
            ref, got = run_check(check, args.numerics_depth, args.numerics_batch, dtype,
                                 (cpu, device), args.seed)
            if f32:  # the float32 rounding noise, measured on the CPU (NOISE_FACTOR)
                ref64, = run_check(check, args.numerics_depth, args.numerics_batch,
                                   numpy.float64, (cpu,), args.seed)
                noise = normwise_errors(ref64, ref)
        except Exception as e:
            entry.update(short_error(e), passed=False)
            log('numerics %s: ERROR %s' % (check, entry['error']))
            report.save()
            continue
        entry.update(compare(ref, got, noise if f32 else None))
        log_entry('numerics %s, %s' % (check, sec['dtype']), entry)
        report.save()
    sec['passed'] = all(c.get('passed') for c in sec['checks'].values())


def compare(ref, got, noise=None):
    """Rows of every quantity's normwise error and tolerance: float32 (``noise``:
    the CPU's float32 errors) or float64 (``noise`` None, RTOL64); and whether all
    passed."""
    rows = []
    for name, (max_abs, err, scale) in normwise_errors(ref, got).items():
        row = {'quantity': name, 'shape': None if ref[name] is None else list(ref[name].shape),
               'scale': scale, 'max_abs': max_abs, 'err': err}
        if noise is not None:
            row.update(noise=noise[name][1], tol=max(RTOL32, NOISE_FACTOR * noise[name][1]))
        else:
            row['tol'] = RTOL64
        row['passed'] = err <= row['tol']
        rows.append(row)
    return {'quantities': rows, 'passed': all(r['passed'] for r in rows)}


def log_entry(what, entry):
    worst = max(entry['quantities'], key=lambda r: r['err'] / r['tol'])
    log('%s: %s (worst %s: err %.2e, tol %.2e)' % (
        what, verdict(entry['passed']), worst['quantity'], worst['err'], worst['tol']))


# ---------------------------------------------------------------------------
# 1b. The fused path on the device against the composed path on the CPU, float64.

FUSED_STEPS = 2


def step_state(method, variant, device, args):
    """``FUSED_STEPS`` training steps (updater.update(), optimizers included) of
    ``method`` under ``variant`` on ``device``, float64, from the weights and
    batches that ``args.seed`` gives: the last step's loss and every parameter's
    gradient, every parameter and persistent value (BN's running statistics) and
    every optimizer's snapshot after it, as host arrays."""
    updater = hostcost.build_updater(
        method, variant, n=args.numerics_depth, batch=args.numerics_batch,
        size=config.INPUT_SIZE, dtype=numpy.float64, seed=args.seed, device=device)
    obs = {}
    with hostcost.variant_config(variant), chainer.using_device(device), \
            chainer.Reporter().scope(obs):
        for _ in range(FUSED_STEPS):
            updater.update()
    synchronize(device)
    out = {'loss': to_host(getattr(obs['main/loss'], 'array', obs['main/loss']))}
    for name, opt in sorted(updater.get_all_optimizers().items()):
        for pname, p in opt.target.namedparams():
            out['grad %s%s' % (name, pname)] = to_host(p.grad)
            out['param %s%s' % (name, pname)] = to_host(p.array)
        for lname, link in opt.target.namedlinks():
            for key in sorted(link._persistent):      # BN's avg_mean, avg_var, N
                value = getattr(link, key)
                if isinstance(value, (numpy.ndarray, device.xp.ndarray)):
                    out['persistent %s%s/%s' % (name, lname, key)] = to_host(value)
        snapshot = {}
        chainer.serializers.DictionarySerializer(snapshot).save(opt)
        out.update(('optimizer %s/%s' % (name, k), to_host(numpy.asarray(v)
                                                          if numpy.isscalar(v) else v))
                   for k, v in snapshot.items())
    return out


def numerics_fused(args, device, report):
    """Section ``numerics_fused``: the fused path (``hostcost.VARIANTS['fused']``:
    fused units, BN's one-node double backward, the fused synthesizer Adam) on the
    device against the composed path on the CPU, both float64, over two training
    steps of backprop and VFBN (alpha_gs 1e-3), to RTOL64."""
    sec = report.section('numerics_fused')
    sec.update(dtype='float64', depth=args.numerics_depth, batch=args.numerics_batch,
               group_floor=GROUP_FLOOR, rtol=RTOL64, steps=FUSED_STEPS, checks={},
               title='fused path on %s vs composed path on the CPU, %d training steps '
                     '(optimizers included)' % (device.name, FUSED_STEPS))
    cpu = chainer.get_device('@numpy')
    for method in ('bp', 'vfbn'):
        entry = sec['checks'].setdefault(method, {})
        try:
            ref = step_state(method, 'composed', cpu, args)
            got = step_state(method, 'fused', device, args)
        except Exception as e:
            entry.update(short_error(e), passed=False)
            log('numerics_fused %s: ERROR %s' % (method, entry['error']))
            report.save()
            continue
        entry.update(compare(ref, got))
        log_entry('numerics_fused %s' % method, entry)
        report.save()
    sec['passed'] = all(c.get('passed') for c in sec['checks'].values())
