"""benchmarks/device_check on a machine without a GPU (the development and CI machines).

On the lent GPU machine the check compares the GPU with the CPU, times the methods
and runs a PyTorch reference; here it must (1) notice that there is no CuPy/GPU, say
so in one line, write nothing and exit 0, and (2) with ``--device @numpy`` run every
section on the CPU, where the "GPU" side is a second CPU copy of the same weights,
so the numerics must agree exactly. PyTorch is not needed: without it that section
records that it was skipped.
"""
import ast
import importlib
import importlib.util
import json
import os
import subprocess
import sys

import numpy
import pytest

from chainer_vfbn import methods

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A folder with __main__.py, run as `python benchmarks/device_check`; its modules
# import each other by bare name (common, numerics, timing, changes, torch_ref, ...).
SCRIPT = os.path.join(REPO_ROOT, 'benchmarks', 'device_check')


def load(name):
    """One of the device check's modules (imported on first use: importing it sets
    CUPY_TF32 and CHAINER_CUDNN, as running the check does)."""
    if SCRIPT not in sys.path:
        sys.path.insert(0, SCRIPT)
    return importlib.import_module(name)


def load_main():
    """The check's ``__main__.py`` as a module (``main(argv)``, ``parse_args``)."""
    spec = importlib.util.spec_from_file_location('device_check_main',
                                                  os.path.join(SCRIPT, '__main__.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(*args, timeout=120):
    # One BLAS thread: a modest share of this 2-core machine, and a fixed summation
    # order, so the two CPU copies of the numerics compute bit for bit the same. And
    # OpenBLAS's AVX2 kernels: with its AVX-512 ones (SkylakeX, chosen on this
    # project's AMD EPYC) the two copies differed in a last bit in 1 run of 6 to 2 of
    # 3 of this file (2026-12-06), with the AVX2 ones in none of 10.
    path = [REPO_ROOT] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), OPENBLAS_NUM_THREADS='1',
               OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', OPENBLAS_CORETYPE='Haswell')
    return subprocess.run([sys.executable, SCRIPT] + list(args), capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=REPO_ROOT)


def test_without_gpu_says_so_and_writes_nothing(tmp_path, gpu_problem):
    if gpu_problem is None:
        pytest.skip('this machine has a GPU: the script would run the real check')
    out = tmp_path / 'out'
    proc = run_script('--out', str(out))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('CuPy/CUDA not available: '), proc.stdout
    assert not out.exists()


def test_dry_run_on_cpu_runs_every_section(tmp_path):
    out = tmp_path / 'out'
    proc = run_script('--out', str(out), '--device', '@numpy', '--depth', '1',
                      '--batch', '8', '--steps', '2', '--quick')
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / 'device_check.json').read_text())
    md = (out / 'device_check.md').read_text()
    sections = report['sections']
    assert report['status'] == {name: 'done' for name in
                                ('numerics', 'paths', 'torch', 'numerics_fused', 'kernels',
                                 'graph', 'timing', 'changes', 'methods', 'data',
                                 'numerics64')}
    assert sections['environment']['device'] == '@numpy'

    # Numerics: CPU against CPU is exact, in both precisions, for BP and VFBN.
    for name, dtype in (('numerics', 'float32'), ('numerics64', 'float64')):
        num = sections[name]
        assert num['passed'] and num['dtype'] == dtype and set(num['checks']) == {'bp', 'vfbn'}
        names = {c: {q['quantity'] for q in num['checks'][c]['quantities']}
                 for c in num['checks']}
        assert {'logits', 'loss', 'grad lower/conv1/W', 'grad upper/fc/W'} <= names['bp']
        assert {'h', 'delta', 'delta_hat', 'eq3', 'grad lower/conv1/W',
                'grad v_f/fc/W'} <= names['vfbn']
        for check in num['checks'].values():
            assert all(q['max_abs'] == 0 and q['passed'] for q in check['quantities'])
    # the float32 noise reference (CPU float32 against float64) is real, not zero
    for check in sections['numerics']['checks'].values():
        assert max(q['noise'] for q in check['quantities']) > 0

    # Step times of BP and VFBN, and 2 steps of every Table 1 row, all finite.
    timing = sections['timing']['results']
    assert timing['bp']['median_ms'] > 0 and timing['vfbn (alpha_gs=0.001)']['median_ms'] > 0
    assert sections['timing']['vfbn_over_bp'] > 0
    phases = sections['timing']['bp_phases']
    assert phases['forward']['applies'] > 0 and phases['backward']['applies'] > 0
    assert phases['update']['applies'] == 0     # the one-kernel optimizer applies none
    assert all(0 < r['host_ms'] <= r['done_ms'] for r in phases.values())
    # Each speed-up against the code it replaced: every run timed, every ratio there,
    # and on the CPU the one-kernel optimizer equals Chainer's exactly.
    changes, changes_module = sections['changes'], load('changes')
    assert set(changes['results']) == {key for key, _, _ in changes_module.CHANGE_RUNS}
    assert set(changes['ratios']) == {name for name, _, _ in changes_module.CHANGE_RATIOS}
    assert all(0 < r['q1'] <= r['median'] <= r['q3'] for r in changes['ratios'].values())
    agreement = changes['optimizer_agreement']
    assert agreement['max_abs'] == 0 and agreement['values_differing'] == 0 and agreement['passed']
    # The composed and the fused path, interleaved: every run timed and counted, every
    # ratio there; counts equal the host-cost module's for the same method and variant.
    paths, paths_module = sections['paths'], load('paths')
    keys = {paths_module.run_key(run) for run in paths_module.PATH_RUNS}
    assert set(paths['results']) == keys == set(paths['applications'])
    assert all(r['median_ms'] > 0 and len(r['times_ms']) == 2 for r in paths['results'].values())
    assert set(paths['ratios']) == {name for name, _, _ in paths_module.PATH_RATIOS}
    assert all(0 < r['q1'] <= r['median'] <= r['q3'] for r in paths['ratios'].values())
    for (method, variant) in paths_module.PATH_RUNS:
        apps = paths['applications'][paths_module.run_key((method, variant))]
        assert apps['total'] == sum(apps['per_phase'].values()) > 0
        assert apps['per_phase']['forward lower'] > 0 and apps['per_phase']['other'] == 0
    # The fused path against the composed path, float64, two steps: every gradient,
    # parameter, BN statistic and optimizer snapshot compared (on the CPU, exactly).
    fused = sections['numerics_fused']
    assert fused['passed'] and fused['dtype'] == 'float64'
    assert set(fused['checks']) == {'bp', 'vfbn'}
    vfbn_names = {q['quantity'] for q in fused['checks']['vfbn']['quantities']}
    for name in ('loss', 'grad synth/v_f/fc/W', 'param lower/conv1/W',
                 'persistent upper/units/0/bn1/avg_mean', 'optimizer synth/v_f/fc/W/m'):
        assert name in vfbn_names, name
    assert all(q['passed'] for c in fused['checks'].values() for q in c['quantities'])
    # Capture needs a GPU: the kernel count says so; the graph section still times the
    # eager fused step.
    for variant in ('composed', 'fused'):
        assert sections['kernels']['results'][variant] == {'skipped': 'capture needs a CUDA GPU'}
    for method in ('bp', 'vfbn'):
        g = sections['graph']['results'][method]
        assert g['eager']['median_ms'] > 0 and g['graph'] == {'skipped': 'capture needs a CUDA GPU'}

    rows = sections['methods']['results']
    assert list(rows) == [row.label for row in methods.TABLE1]
    for label, r in rows.items():
        assert r['status'] == 'ok' and r['finite'] and len(r['losses']) == 2, (label, r)
        assert r['ratio_to_bp'] > 0
    assert sections['data']['views_per_s'] > 0

    # PyTorch: skipped here unless it is installed, then the same network.
    torch_sec = sections['torch']
    if importlib.util.find_spec('torch') is None:
        assert 'skipped' in torch_sec
    else:
        assert torch_sec['params_match'] and torch_sec['same_network']['passed']

    for heading in ('## Numerics, float32', '## Numerics, float64', '## Step time', '## Speed-ups',
                    '## Numerics, float64: fused path', '## The composed and the fused path',
                    '## Kernels per residual unit', '## Experiment: the fused step replayed',
                    '## PyTorch reference', '## 2 training steps of every Table 1 method', '## Data pipeline'):
        assert heading in md
    assert 'FAIL' not in md and 'PASS' in md
    for row in methods.TABLE1:
        assert row.label in md


def test_spent_budget_skips_sections_but_still_reports(tmp_path):
    out = tmp_path / 'out'
    proc = run_script('--out', str(out), '--device', '@numpy', '--budget-s', '0',
                      '--sections', 'timing,data')
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / 'device_check.json').read_text())
    assert report['status'] == {'timing': 'skipped (time budget)',
                                'data': 'skipped (time budget)'}
    assert 'python' in report['sections']['environment']


def test_failing_section_is_recorded_and_the_next_one_runs(tmp_path, monkeypatch):
    dc = load_main()

    def broken(args, device, report):
        raise ValueError('injected failure')
    monkeypatch.setattr(load('timing'), 'timing', broken)   # main looks it up when it runs
    assert dc.main(['--out', str(tmp_path), '--device', '@numpy', '--quick',
                    '--batch', '4', '--sections', 'timing,data']) == 0
    report = json.loads((tmp_path / 'device_check.json').read_text())
    assert report['status'] == {'timing': 'error', 'data': 'done'}
    assert report['sections']['timing']['error'] == 'ValueError: injected failure'
    assert report['sections']['data']['views_per_s'] > 0
    assert 'ValueError: injected failure' in (tmp_path / 'device_check.md').read_text()


def test_normwise_errors_and_tolerances():
    dc = load('numerics')
    ref = {'logits': numpy.array([1.0, -2.0]),
           'grad lower/conv1/W': numpy.array([0.1, -0.2]),
           'grad lower/conv1/b': numpy.array([1e-9, 0.0]),   # zero in exact arithmetic
           'grad v_f/fc/W': numpy.array([1e-6, 2e-6])}
    got = {'logits': numpy.array([1.0, -2.0 + 2e-6]),
           'grad lower/conv1/W': ref['grad lower/conv1/W'],
           'grad lower/conv1/b': numpy.array([3e-9, 0.0]),
           'grad v_f/fc/W': numpy.array([1e-6, 2e-6 + 1e-12])}
    err = dc.normwise_errors(ref, got)
    assert err['logits'][1] == pytest.approx(1e-6)              # 2e-6 / max|ref| = 2
    assert err['grad lower/conv1/W'][1] == 0
    # a noise-only gradient is measured against 1e-3 x its network's largest (0.2) ...
    assert err['grad lower/conv1/b'][1] == pytest.approx(2e-9 / 2e-4)
    # ... and v_f's tiny gradients against their own scale, not the lower half's
    assert err['grad v_f/fc/W'][1] == pytest.approx(1e-12 / 2e-6)
    # TF32-sized differences (~1e-3) fail the float32 floor; float64 is tight
    assert 1e-3 > dc.RTOL32 and dc.RTOL64 <= 1e-10
    missing = dc.normwise_errors({'grad upper/fc/W': ref['logits']}, {'grad upper/fc/W': None})
    assert missing['grad upper/fc/W'][1] == float('inf')


def test_torch_reference_is_the_chainer_network():
    pytest.importorskip('torch')
    dc = load('torch_ref')
    import torch
    same = dc.torch_same_network(torch, depth=1, batch=4, seed=0)
    assert same['logits_err'] < 1e-12 and same['loss_err'] < 1e-12
    assert sum(p.numel() for p in dc.torch_resnet(18).parameters()) == dc.RESNET110_PARAMS


def test_count_nodes_of_a_graph_description():
    """Nodes by type from a DOT description in the layout of cudaGraphDebugDotPrint
    (a subgraph per graph, one statement per node naming its type, edges apart)."""
    dot = '\n'.join([
        'digraph dot {',
        'subgraph cluster_1 {',
        'label="graph_1" graph[style="dashed"];',
        '"graph_1_node_0"[style="solid" shape="rectangle" label="0',
        'KERNEL',
        'cupy_multiply__float32_float32_float32',
        '\\<<<(4,1,1),(128,1,1),0>>>"];',
        '"graph_1_node_1"[style="solid" shape="rectangle" label="1',
        'MEMSET"];',
        '"graph_1_node_2"[style="solid" shape="rectangle" label="2\\nKERNEL\\ngemm"];',
        '"graph_1_node_0" -> "graph_1_node_1";',
        '"graph_1_node_1" -> "graph_1_node_2" [label="edge"];',
        '}', '}'])
    counts = load('graphs').count_nodes(dot)
    assert counts == {'nodes': 3, 'edges': 2, 'KERNEL': 2, 'MEMSET': 1}


# The device check's modules, each on the layer it may import from: only modules
# on lower layers (helpers below, sections above, the report on top).
LAYERS = {'common': 0, 'numerics': 1, 'timing': 1, 'changes': 2, 'graphs': 2, 'paths': 2,
          'pipeline': 2, 'torch_ref': 2, 'render': 3, '__main__': 4}


def _sibling_imports(path, siblings):
    """``(module imported, inside a function?)`` for each import of a sibling."""
    tree = ast.parse(open(path).read())
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((a.name, inner) for a in child.names if a.name in siblings)
            elif isinstance(child, ast.ImportFrom) and child.module in siblings:
                found.append((child.module, inner))
            visit(child, inner)
    visit(tree, False)
    return found


def test_device_check_modules_import_in_one_direction():
    names = {f[:-3] for f in os.listdir(SCRIPT) if f.endswith('.py')}
    assert names == set(LAYERS), 'place every module of device_check on a layer'
    for name in names:
        for imported, in_function in _sibling_imports(os.path.join(SCRIPT, name + '.py'),
                                                      names):
            assert not in_function, '%s imports %s inside a function' % (name, imported)
            assert LAYERS[imported] < LAYERS[name], '%s imports %s' % (name, imported)
