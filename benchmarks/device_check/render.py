"""The top of the device check: the report, one dict saved as ``device_check.json``
and rendered as ``device_check.md`` after every step (:class:`Report`), and the
Markdown rendering itself. Imports the helpers and sections below it; none of them
imports this module (the sections get the Report object from __main__)."""
import datetime
import json
import math
import os
import sys

import common
from common import verdict
from numerics import grad_group

import numpy


def _fmt(x, spec='%.2e'):
    if x is None:
        return '-'
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return spec % x


def render_markdown(d):
    """The human summary. A part that cannot be rendered (a section cut short) says
    so instead of stopping the JSON from being written."""
    s = d['sections']
    env = s.get('environment', {})
    lines = ['# Device check: chainer-vfbn on %s' % env.get('gpu', env.get('device', '?')),
             '', 'Started %s, %.0f s so far. Command: `%s`.'
             % (d['started'], d.get('elapsed_s', 0), ' '.join(d['argv'])), '']
    if d.get('status'):
        lines += ['Sections: ' + ', '.join('%s %s' % kv for kv in d['status'].items()), '']
    if 'device_error' in d:
        lines += ['**Chainer cannot use the device**: %s' % d['device_error']['error'], '']
    for name, render in (('environment', _md_environment), ('numerics', _md_numerics),
                         ('numerics_fused', _md_numerics), ('numerics64', _md_numerics),
                         ('paths', _md_paths), ('torch', _md_torch),
                         ('kernels', _md_kernels), ('graph', _md_graph),
                         ('timing', _md_timing), ('changes', _md_changes),
                         ('methods', _md_methods), ('data', _md_data)):
        if name in s and set(s[name]) - {'error', 'traceback'}:
            try:
                lines += render(s[name], s) + ['']
            except Exception as e:  # a section cut short: show what is there in the JSON
                lines += ['## %s' % name, '', '(incomplete: %s: %s; see device_check.json)'
                          % (type(e).__name__, e), '']
    errors = [(name, sec) for name, sec in s.items() if isinstance(sec, dict) and 'error' in sec]
    if 'device_error' in d:
        errors.insert(0, ('device', d['device_error']))
    if errors:
        lines += ['## Errors', '']
        for name, sec in errors:
            lines += ['### %s: %s' % (name, sec['error']), '', '```']
            lines += sec.get('traceback', [])
            lines += ['```', '']
    return '\n'.join(lines)


def _md_environment(env, s):
    return (['## Environment', '', '| item | value |', '|---|---|']
            + ['| %s | %s |' % (k, ' '.join(str(env[k]).split())) for k in sorted(env)
               if k != 'traceback'])


def _md_numerics(num, s):
    f32 = num['dtype'] == 'float32'
    tol = ('max(%g, %g x noise), noise = the CPU\'s float32 error against its own '
           'float64' % (num['rtol'], num['noise_factor']) if f32 else '%g' % num['rtol'])
    title = num.get('title') or '%s vs CPU, same weights and inputs' % s.get(
        'environment', {}).get('device', '?')
    lines = ['## Numerics, %s: %s' % (num['dtype'], title), '',
             'Depth %s units/block, batch %s, train mode. err = max|gpu - cpu| / max|cpu| '
             '(gradients: denominator at least %g x the largest gradient of the same '
             'network); tolerance %s.'
             % (num['depth'], num['batch'], num['group_floor'], tol), '',
             '| check | quantity | max abs | err | %stol | |' % ('noise | ' if f32 else ''),
             '|---|---|---|---|---|---|' + ('---|' if f32 else '')]
    for check, c in num.get('checks', {}).items():
        if 'error' in c:
            lines.append('| %s | ERROR: %s | | | %s| FAIL |'
                         % (check, c['error'], '| ' if f32 else ''))
        else:
            lines += _numerics_rows(check, c['quantities'], f32)
    if 'passed' in num:
        lines += ['', 'Numerics, %s: **%s**' % (num['dtype'], verdict(num['passed']))]
    return lines


def _md_timing(tim, s):
    lines = ['## Step time (Chainer, %s)' % s.get('environment', {}).get('device', '?'), '',
             'Depth %s units/block, batch %s; %s (%s warm-up, %s timed).'
             % (tim['depth'], tim['batch'], tim['what'], tim['warmup'], tim['timed']), '',
             '| method | median ms/step | min ms | images/s | first step s |',
             '|---|---|---|---|---|']
    lines += [_time_row(key, r, tim['batch']) for key, r in tim['results'].items()]
    if 'vfbn_over_bp' in tim:
        lines += ['', 'VFBN / BP step time: **%.2f**' % tim['vfbn_over_bp']]
    phases = tim.get('bp_phases', {})
    if 'error' in phases:
        lines += ['', 'Backprop step by phase: ERROR %s' % phases['error']]
    elif phases:
        lines += ['', 'Backprop step by phase (medians; "host": until the host has queued '
                  'the work, "done": until the device has run it, both from a '
                  'synchronisation):', '', '| phase | host ms | done ms | function applications |',
                  '|---|---|---|---|']
        lines += ['| %s | %.1f | %.1f | %d |' % (n, r['host_ms'], r['done_ms'], r['applies'])
                  for n, r in phases.items()]
    return lines


def _md_paths(pa, s):
    lines = ['## The composed and the fused path (Chainer, %s)'
             % s.get('environment', {}).get('device', '?'), '',
             'Depth %s units/block, batch %s, alpha_gs 1e-3; %s (%s warm-up, %s timed).'
             % (pa['depth'], pa['batch'], pa['what'], pa['warmup'], pa['timed']), '',
             '| run | median ms/step | min ms | images/s | function applications |',
             '|---|---|---|---|---|']
    for key, r in pa.get('results', {}).items():
        apps = pa.get('applications', {}).get(key, {}).get('total')
        if 'median_ms' in r:
            lines.append('| %s | %.1f | %.1f | %.0f | %s |' % (
                key, r['median_ms'], r['min_ms'], pa['batch'] / r['median_ms'] * 1e3,
                _fmt(apps, '%d')))
        else:
            lines.append('| %s | ERROR: %s | | | |' % (key, r.get('error')))
    lines += ['', 'Ratios of paired steps (one round each):', '',
              '| ratio | median | quartiles |', '|---|---|---|']
    lines += ['| %s | **%.3f** | %.3f-%.3f |' % (name, r['median'], r['q1'], r['q3'])
              for name, r in pa.get('ratios', {}).items()]
    if 'skipped' in pa:
        lines += ['', 'Cut short: %s.' % pa['skipped']]
    return lines


def _md_kernels(ke, s):
    lines = ['## Kernels per residual unit', '', '%s; %s.' % (ke['unit'], ke['what']), '',
             '| path | forward: kernels | forward: all nodes | forward + backward: kernels '
             '| forward + backward: all nodes |', '|---|---|---|---|---|']
    for variant, r in ke['results'].items():
        if 'forward' in r:
            f, fb = r['forward'], r['forward_backward']
            lines.append('| %s | %s | %s | %s | %s |' % (
                variant, f.get('KERNEL', 0), f['nodes'], fb.get('KERNEL', 0), fb['nodes']))
        else:
            lines.append('| %s | %s | | | |' % (
                variant, r.get('skipped') or 'ERROR: %s' % r.get('error')))
    return lines


def _md_graph(gr, s):
    lines = ['## Experiment: the fused step replayed as a CUDA graph', '',
             'Depth %s units/block, batch %s; %s.' % (gr['depth'], gr['batch'], gr['what']),
             '', '| method | eager ms/step | replayed ms/step | replayed / eager | kernels '
             'per step |', '|---|---|---|---|---|']
    for method, r in gr['results'].items():
        if 'eager' not in r:
            lines.append('| %s | %s | | | |' % (
                method, r.get('skipped') or 'ERROR: %s' % r.get('error')))
            continue
        g = r['graph']
        lines.append('| %s | %.1f | %s | %s | %s |' % (
            method, r['eager']['median_ms'],
            _fmt(g.get('median_ms'), '%.1f') if 'median_ms' in g
            else g.get('skipped') or 'ERROR: %s' % g.get('error'),
            _fmt(r.get('graph_over_eager'), '%.2f'),
            _fmt(g.get('nodes', {}).get('KERNEL'), '%d')))
    return lines


def _md_changes(ch, s):
    agree = ch.get('optimizer_agreement', {})
    lines = ['## Speed-ups, each against the code it replaced (%s)'
             % s.get('environment', {}).get('device', '?'), '',
             'Depth %s units/block, batch %s, alpha_gs 1e-3; %s (%s warm-up, %s timed).'
             % (ch['depth'], ch['batch'], ch['what'], ch['warmup'], ch['timed']), '']
    if 'error' in agree:
        lines += ['One-kernel optimizer against Chainer\'s: ERROR %s' % agree['error'], '']
    elif agree:
        lines += ['One-kernel optimizer against Chainer\'s MomentumSGD + WeightDecay on the '
                  'same device and gradients, %d steps at depth 2 with a snapshot round trip: '
                  'err %.1e (tol %.0e), %d of %d values differ: %s.'
                  % (agree['steps'], agree['err'], agree['tol'], agree['values_differing'],
                     agree['values'], verdict(agree['passed'])), '']
    lines += ['| run | median ms/step | min ms |', '|---|---|---|']
    lines += ['| %s | %.1f | %.1f |' % (key, r['median_ms'], r['min_ms']) if 'median_ms' in r
              else '| %s | ERROR: %s | |' % (key, r.get('error')) for key, r in
              ch.get('results', {}).items()]
    lines += ['', 'Ratios of paired steps (one round each):', '',
              '| ratio | median | quartiles |', '|---|---|---|']
    lines += ['| %s | **%.3f** | %.3f-%.3f |' % (name, r['median'], r['q1'], r['q3'])
              for name, r in ch.get('ratios', {}).items()]
    if 'skipped' in ch:
        lines += ['', 'Cut short: %s.' % ch['skipped']]
    return lines


def _md_torch(tor, s):
    lines = ['## PyTorch reference', '']
    if 'skipped' in tor:
        return lines + ['Skipped: %s' % tor['skipped']]
    same = tor.get('same_network', {})
    if 'error' in same:
        same_text = 'ERROR ' + same['error']
    else:
        same_text = 'logits err %.1e, loss err %.1e: %s' % (
            same['logits_err'], same['loss_err'], verdict(same['passed']))
    lines += ['PyTorch %s on %s (cuDNN %s): %s. Parameters %d (Chainer %d): %s. Same '
              'function as the Chainer network (Chainer\'s weights copied, float64, CPU, '
              'train mode, depth %s): %s.'
              % (tor['torch'], tor['device'], tor.get('cudnn', '-'), tor['what'],
                 tor['params'], tor['chainer_params'], verdict(tor['params_match']),
                 same.get('depth', '?'), same_text), '',
              '| mode | median ms/step | min ms | images/s | first step s |',
              '|---|---|---|---|---|']
    results = tor.get('results', {})
    lines += [_time_row(key, r, tor['batch']) for key, r in results.items()]
    ratios = ['%s: **%.2f**' % (pair, ratio)
              for pair, ratio in tor.get('chainer_over_torch', {}).items()]
    return lines + ([''] + ratios if ratios else [])


def _md_methods(met, s):
    lines = ['## %d training steps of every Table 1 method' % met['steps'], '',
             'Depth %s units/block, batch %s; %s.' % (met['depth'], met['batch'], met['what']),
             '', '| row | status | first loss | final loss | finite | ms/step | / BP '
             '| first step s |', '|---|---|---|---|---|---|---|---|']
    for label, r in met['results'].items():
        if 'skipped' in r:
            lines.append('| %s | skipped: %s | | | | | | |' % (label, r['skipped']))
            continue
        status = r.get('status', '?')
        if status != 'ok':
            status += ': ' + r.get('error', r.get('message', ''))
        losses = r.get('losses') or []
        lines.append('| %s | %s | %s | %s | %s | %s | %s | %s |' % (
            label, status, _fmt(losses[0] if losses else None, '%.4f'),
            _fmt(losses[-1] if losses else None, '%.4f'), r.get('finite'),
            _fmt(r.get('step_ms'), '%.1f'), _fmt(r.get('ratio_to_bp'), '%.2f'),
            _fmt(r.get('first_step_s'), '%.2f')))
    return lines


def _md_data(dat, s):
    return ['## Data pipeline', '',
            'AugmentedDataset + BatchIterator, batch %d, one process: **%.0f views/s** '
            '(%.1f ms per batch); %.0f views/s including the transfer to the device.'
            % (dat['batch'], dat['views_per_s'], dat['ms_per_batch'],
               dat['views_per_s_with_transfer'])]


def _numerics_rows(check, rows, f32):
    """Single quantities one per row; gradients, parameters, persistent values and
    optimizer snapshots grouped by network (the one nearest its tolerance shown);
    every failing one also on its own row."""
    out, groups = [], {}
    for r in rows:
        if _row_group(r['quantity']):
            groups.setdefault(_row_group(r['quantity']), []).append(r)
        else:
            out.append(_numerics_row(check, r['quantity'], r, f32))
    for group, rs in groups.items():
        worst = max(rs, key=lambda r: r['err'] / r['tol'])
        merged = dict(worst, passed=all(r['passed'] for r in rs))
        out.append(_numerics_row(check, '%s/* (%d arrays; worst: %s)' % (
            group, len(rs), worst['quantity'][len(group) + 1:]), merged, f32))
        out += [_numerics_row(check, r['quantity'], r, f32) for r in rs if not r['passed']]
    return out


def _row_group(name):
    """The group of a quantity shown on one row: each network's gradients
    (:func:`numerics.grad_group`), parameters, persistent values and optimizer
    snapshot; None for a quantity shown alone."""
    if name.startswith(('param ', 'persistent ', 'optimizer ')):
        return name.split('/')[0]
    return grad_group(name)


def _numerics_row(check, name, r, f32):
    return '| %s | %s | %s | %s | %s%s | %s |' % (
        check, name, _fmt(r['max_abs']), _fmt(r['err']),
        _fmt(r['noise']) + ' | ' if f32 else '', _fmt(r['tol']), verdict(r['passed']))


def _time_row(key, r, batch):
    if 'median_ms' not in r:
        return '| %s | %s | | | |' % (key, r.get('skipped') or 'ERROR: ' + r.get('error', '?'))
    return '| %s | %.1f | %.1f | %.0f | %.2f |' % (
        key, r['median_ms'], r['min_ms'], batch / r['median_ms'] * 1e3, r['first_step_s'])



# ---------------------------------------------------------------------------
# The report: one dict, saved as JSON and rendered as Markdown after every step.

class Report(object):
    def __init__(self, out, args):
        self.json_path = os.path.join(out, 'device_check.json')
        self.md_path = os.path.join(out, 'device_check.md')
        self.data = {'started': datetime.datetime.now(datetime.timezone.utc).isoformat(),
                     'argv': sys.argv, 'args': {k: v for k, v in vars(args).items()},
                     'sections': {}}

    def section(self, name):
        return self.data['sections'].setdefault(name, {})

    def save(self):
        self.data['elapsed_s'] = round(common.CLOCK.elapsed(), 2)
        for path, text in ((self.json_path, json.dumps(self.data, indent=2, default=_jsonable)),
                           (self.md_path, render_markdown(self.data))):
            tmp = path + '.tmp'
            with open(tmp, 'w') as f:
                f.write(text + '\n')
            os.replace(tmp, path)


def _jsonable(x):
    if isinstance(x, (numpy.floating, numpy.integer)):
        return x.item()
    if isinstance(x, numpy.ndarray):
        return x.tolist()
    return str(x)
