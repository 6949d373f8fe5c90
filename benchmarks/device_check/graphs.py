"""Sections ``kernels`` and ``graph``: what the GPU is asked to do, read from CUDA graphs
captured with CuPy's stream capture (``cupy.cuda.Stream.begin_capture`` /
``end_capture``, then ``Graph.launch``).

* ``kernels``: the nodes (kernel launches, copies, memsets) of one residual unit's
  forward pass and of its forward and backward, on the composed and on the fused
  path, counted from the captured graph's DOT description
  (``Graph.debug_dot_str``; by CUDA's documentation it gives each node's type).
* ``graph``: an experiment, in this benchmark only. The fused training step of
  backprop and of VFBN is captured once and replayed with ``graph.launch()``, which
  costs the host one call instead of Chainer's Python per function application: the
  replay's time is what the GPU needs for the step. The replay repeats the captured
  kernels on the captured addresses (the batch, the running scale s and Adam's step
  size are frozen at capture, and blocks the capture freed may be reused inside it),
  so its numbers are not those of training: only its time is measured. The per-step
  NaN check (``updaters.check_finite``, a host synchronisation, which capture
  forbids) is left out of the captured step and of the eager steps it is compared
  with.

Without a GPU (``--device @numpy``) both sections run what needs no capture (the
eager steps) and record that the capture was skipped.
"""
import contextlib
import re
import time

import common  # first: chainer_vfbn before Chainer
from common import free_device_memory, log, short_error
from timing import build_run, device_batches, summarize_times, timed_update

import chainer
import numpy

from chainer_vfbn import hostcost, model, updaters

#: Node types of a CUDA graph as cudaGraphDebugDotPrint names them.
NODE_TYPES = ('KERNEL', 'MEMCPY', 'MEMSET', 'HOST', 'EMPTY', 'GRAPH', 'EVENT_RECORD',
              'WAIT_EVENT', 'EVENT_WAIT', 'EXT_SEMAS_SIGNAL', 'EXT_SEMAS_WAIT',
              'MEM_ALLOC', 'MEM_FREE', 'BATCH_MEM_OP', 'CONDITIONAL')
#: The unit whose kernels are counted: one of ResBlock-2's, 64 -> 64 channels at
#: 11 x 11, stride 1 (the paper's split is in ResBlock-2).
UNIT_CHANNELS, UNIT_SIZE = 64, 11
DOT_EXCERPT = 3000      # characters of each DOT description kept in the JSON


def count_nodes(dot):
    """``{type: count}`` of a CUDA graph's nodes from its DOT description, plus
    ``'nodes'`` (node statements found) and ``'edges'``. A node statement is
    ``"NAME"[...]`` that ends its line (not an edge's attributes); its type is the
    first of :data:`NODE_TYPES` named in its attributes, ``'unknown'`` if none is."""
    counts = {'nodes': 0, 'edges': len(re.findall(r'->', dot))}
    for match in re.finditer(r'"([^"]+)"\s*\[(.*?)\]\s*;?\s*$', dot, re.S | re.M):
        attrs = match.group(2)
        line = dot[dot.rfind('\n', 0, match.start()) + 1:match.start()]
        if '->' in line:       # an edge's attributes
            continue
        counts['nodes'] += 1
        # upper-case bounds: a type may follow a literal "\n" in the label
        found = re.search(r'(?<![A-Z0-9_])(%s)(?![A-Z0-9_])' % '|'.join(NODE_TYPES), attrs)
        kind = found.group(1) if found else 'unknown'
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def gpu(device):
    return device.xp is not numpy


def capture(fn, stream):
    """``fn()`` under stream capture on ``stream``: ``(graph, fn's result)``."""
    with stream:
        stream.begin_capture()
        try:
            out = fn()
        except Exception:
            try:
                stream.end_capture()
            except Exception:
                pass
            raise
        graph = stream.end_capture()
    return graph, out


def graph_nodes(graph):
    dot = graph.debug_dot_str()
    return dict(count_nodes(dot), dot_excerpt=dot[:DOT_EXCERPT])


# ---------------------------------------------------------------------------
# Kernels of one residual unit.

def unit_kernels(variant, args, device):
    """The nodes of one unit's forward pass and of its forward and backward under
    ``variant``, in training mode (batch statistics), batch ``args.batch``; on the
    CPU, ``{'skipped': ...}`` after running both once."""
    numpy.random.seed(args.seed)
    unit = model.ResidualUnit(UNIT_CHANNELS, UNIT_CHANNELS)
    unit.to_device(device)
    rng = numpy.random.RandomState(args.seed)
    shape = (args.batch, UNIT_CHANNELS, UNIT_SIZE, UNIT_SIZE)
    x, gy = (device.send(rng.standard_normal(shape).astype(numpy.float32)) for _ in range(2))

    def forward():
        return unit(chainer.Variable(x))

    def forward_backward():
        y = forward()
        y.grad = gy
        unit.cleargrads()
        y.backward()
        return y

    with hostcost.variant_config(variant), chainer.using_config('train', True):
        if not gpu(device):
            forward_backward()
            return {'skipped': 'capture needs a CUDA GPU'}
        stream = device.xp.cuda.Stream(non_blocking=True)
        with stream:            # CuPy's memory pool keeps free blocks per stream
            for _ in range(2):
                forward_backward()
            stream.synchronize()
        return {'forward': graph_nodes(capture(forward, stream)[0]),
                'forward_backward': graph_nodes(capture(forward_backward, stream)[0])}


def kernels(args, device, report):
    sec = report.section('kernels')
    sec.update(unit='ResidualUnit(%d, %d), stride 1, %dx%d maps, batch %d, train mode'
               % (UNIT_CHANNELS, UNIT_CHANNELS, UNIT_SIZE, UNIT_SIZE, args.batch),
               what='nodes of the CUDA graph captured from the unit, by type (KERNEL: '
                    'a kernel launch)', results={})
    for variant in ('composed', 'fused'):
        try:
            sec['results'][variant] = res = unit_kernels(variant, args, device)
        except Exception as e:
            sec['results'][variant] = res = short_error(e)
        if 'forward' in res:
            log('kernels %s unit: forward %s, forward + backward %s' % (
                variant, res['forward'].get('KERNEL'), res['forward_backward'].get('KERNEL')))
        else:
            log('kernels %s unit: %s' % (variant, res.get('skipped') or res.get('error')))
        report.save()
    free_device_memory(device)


# ---------------------------------------------------------------------------
# The fused step replayed as a CUDA graph (experiment).

@contextlib.contextmanager
def without_finite_check():
    """The updaters' per-step NaN check (a host synchronisation) left out."""
    saved = updaters.check_finite
    updaters.check_finite = lambda *args, **kwargs: None
    try:
        yield
    finally:
        updaters.check_finite = saved


def replay(method, args, device):
    """Eager steps of the fused path of ``method`` (one resident batch), then, on a
    GPU, the same step captured and replayed: medians and the replay's nodes."""
    batches = device_batches(args, device)[:1]
    updater = build_run(method, 'fused', args, device, batches)
    obs = {}
    stream = device.xp.cuda.Stream(non_blocking=True) if gpu(device) else None
    with hostcost.variant_config('fused'), without_finite_check(), \
            (stream if stream is not None else contextlib.nullcontext()):
        for _ in range(args.warmup):
            timed_update(updater, device, obs)
        eager = summarize_times([timed_update(updater, device, obs)
                                 for _ in range(args.timed)])
        res = {'eager': eager}
        if stream is None:
            res['graph'] = {'skipped': 'capture needs a CUDA GPU'}
            return res

        def step():
            with chainer.Reporter().scope(obs):
                updater.update()
        try:
            graph, _ = capture(step, stream)
            graph.launch(stream)
            stream.synchronize()
            times = []
            for _ in range(args.timed):
                start = time.perf_counter()
                graph.launch(stream)
                stream.synchronize()
                times.append(time.perf_counter() - start)
        except Exception as e:      # the eager times stay
            res['graph'] = short_error(e)
            return res
    res['graph'] = dict(summarize_times(times), nodes=graph_nodes(graph))
    res['graph_over_eager'] = res['graph']['median_ms'] / eager['median_ms']
    return res


def graph(args, device, report):
    sec = report.section('graph')
    sec.update(depth=args.depth, batch=args.batch, warmup=args.warmup, timed=args.timed,
               what='the fused step (updater.update(), alpha_gs 1e-3 for VFBN, no NaN '
                    'check), eager against captured once and replayed with '
                    'graph.launch(); medians of synchronised steps; the replay\'s numbers '
                    'are not checked (see graphs.py)', results={})
    for method in ('bp', 'vfbn'):
        if common.CLOCK.left() <= 0:
            sec['results'][method] = {'skipped': 'time budget spent'}
            continue
        try:
            sec['results'][method] = res = replay(method, args, device)
            log('graph %s: eager %.1f ms/step, %s' % (
                method, res['eager']['median_ms'],
                'replayed %.1f ms (%.2f of eager), %s kernels' % (
                    res['graph']['median_ms'], res['graph_over_eager'],
                    res['graph']['nodes'].get('KERNEL')) if 'median_ms' in res['graph']
                else res['graph']['skipped']))
        except Exception as e:
            sec['results'][method] = short_error(e)
            log('graph %s: ERROR %s' % (method, sec['results'][method]['error']))
        free_device_memory(device)
        report.save()
