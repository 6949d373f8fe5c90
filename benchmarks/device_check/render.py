"""The Markdown summary, ``device_check.md``, rendered from the report's dict."""
import math

from common import verdict
from numerics import grad_group


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
                         ('numerics64', _md_numerics), ('timing', _md_timing),
                         ('changes', _md_changes),
                         ('torch', _md_torch), ('methods', _md_methods),
                         ('data', _md_data)):
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
    lines = ['## Numerics, %s: %s vs CPU, same weights and inputs'
             % (num['dtype'], s.get('environment', {}).get('device', '?')), '',
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
    """Non-gradient quantities one per row; gradients grouped by network (the one
    nearest its tolerance shown); every failing gradient also on its own row."""
    out, groups = [], {}
    for r in rows:
        if grad_group(r['quantity']):
            groups.setdefault(grad_group(r['quantity']), []).append(r)
        else:
            out.append(_numerics_row(check, r['quantity'], r, f32))
    for group, rs in groups.items():
        worst = max(rs, key=lambda r: r['err'] / r['tol'])
        merged = dict(worst, passed=all(r['passed'] for r in rs))
        out.append(_numerics_row(check, '%s/* (%d arrays; worst: %s)' % (
            group, len(rs), worst['quantity'][len(group) + 1:]), merged, f32))
        out += [_numerics_row(check, r['quantity'], r, f32) for r in rs if not r['passed']]
    return out


def _numerics_row(check, name, r, f32):
    return '| %s | %s | %s | %s | %s%s | %s |' % (
        check, name, _fmt(r['max_abs']), _fmt(r['err']),
        _fmt(r['noise']) + ' | ' if f32 else '', _fmt(r['tol']), verdict(r['passed']))


def _time_row(key, r, batch):
    if 'median_ms' not in r:
        return '| %s | %s | | | |' % (key, r.get('skipped') or 'ERROR: ' + r.get('error', '?'))
    return '| %s | %.1f | %.1f | %.0f | %.2f |' % (
        key, r['median_ms'], r['min_ms'], batch / r['median_ms'] * 1e3, r['first_step_s'])

