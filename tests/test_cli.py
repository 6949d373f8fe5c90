"""End-to-end tests of the two scripts, ``train.py`` and ``evaluate.py``.

Each test runs a script's ``main(argv)`` as a user's command line would (in this
process, through ``conftest.run_main``; in a real process where signals or the bare
commands are the point), at depth 1 (8
layers) on the small generated CIFAR-10 archive of ``conftest.py``: 40 training
images (x36 views), 8 test images, batches of 8, a few iterations. They pin down
the contract of the command line (STYLE.md; SPEC section 4 on divergence):

* every Table 1 row trains, logs the keys the plots read, and finishes;
* bad input exits 2 with one line on stderr, divergence exits 3 and records it;
* (resuming and Ctrl-C: ``test_resume.py``; ``evaluate.py``: ``test_evaluate_cli.py``,
  on the same runs.)

Finished runs are memoised per module (:func:`trained`), so a run that several tests
need is trained once.
"""
import math
import os
import re
import shutil
import subprocess
import sys

import chainer_vfbn  # noqa: F401  (the NumPy-2 shim precedes `import chainer`)
import chainer
import numpy
import pytest

from chainer_vfbn import methods
from conftest import (REPO_ROOT, SCRIPT_TIMEOUT, SYNTH_KEYS, TINY, assert_one_error_line,
                      read_json, row_id, script, short_run, table1_row)


# ---------------------------------------------------------------------------
# (a) Every Table 1 row trains.

@pytest.mark.numpy1
@pytest.mark.parametrize('row', methods.TABLE1, ids=row_id)
def test_table1_row_trains(trained, row):
    out, proc = trained(*short_run(row))
    assert proc.returncode == 0, proc.stderr
    assert 'final test error' in proc.stdout

    result = read_json(os.path.join(out, 'result.json'))
    assert result['status'] == 'finished'
    assert result['iteration'] == 3
    assert result['method'] == row.method
    run_args = read_json(os.path.join(out, 'args.json'))
    assert run_args['method'] == row.method
    if row.alpha_gs is not None:
        assert run_args['alpha_gs'] == row.alpha_gs

    log = read_json(os.path.join(out, 'log'))
    assert log, 'empty log'
    expected = ['main/loss', 'validation/main/error']
    if row.method in methods.SYNTHESIZERS:
        expected += SYNTH_KEYS
    elif row.method == 'layerwise':
        expected += ['head/loss', 'synth/cosine']
    for entry in log:
        missing = [k for k in expected if k not in entry]
        assert not missing, 'log lacks %s' % missing
        assert math.isfinite(entry['main/loss'])
        assert 0 <= entry['validation/main/error'] <= 1
    for name in ('model.npz', 'snapshot_iter_3', 'model_iter_3.npz'):
        assert os.path.isfile(os.path.join(out, name)), name
    assert_every_parameter_learned(out, row)


def assert_every_parameter_learned(out, row, iterations=3, lr=0.1, momentum=0.9, decay=1e-4):
    """Every parameter of every trained network moved by more than its weight decay
    alone would move it (MomentumSGD, from the initial weights the seed gives, rebuilt
    here), so a gradient reached it; the synthesizer moved (Adam) unless alpha_gs = 0,
    where it must be exactly as initialised."""
    from chainer_vfbn import training
    training.seed_everything(0, chainer.get_device('@numpy'))
    initial = methods.build_networks(row.method, depth=1).trained
    with numpy.load(os.path.join(out, 'snapshot_iter_3')) as f:
        final = {k: f[k] for k in f.files}
    for name, link in initial.items():
        for path, param in link.namedparams():
            key = 'updater/model:%s%s' % (name, path)
            w0, w = param.array.astype(numpy.float64), final[key]
            if name == 'synth':
                moved = not numpy.array_equal(w, param.array)
                assert moved == (row.alpha_gs != 0), key
                continue
            v, decayed = numpy.zeros_like(w0), w0.copy()
            for _ in range(iterations):  # the trajectory of a zero gradient
                v = momentum * v - lr * decay * decayed
                decayed = decayed + v
            assert not numpy.allclose(w, decayed, rtol=1e-5, atol=1e-12), key


# ---------------------------------------------------------------------------
# (c) Bad input: exit 2, one line, nothing written.

def test_bad_input_unknown_method(tmp_path, cifar_archive):
    """argparse's own errors are one line too (no usage block)."""
    out = tmp_path / 'out'
    for argv in (['--method', 'nope'], ['--dataset', 'nope'], ['--no-such-option']):
        proc = script('train.py', *TINY, '--data-dir', cifar_archive, '--out', out, *argv)
        line = assert_one_error_line(proc, 'train.py')
        assert line.startswith('train.py: error: ') and argv[0] in line, line
        assert line.endswith('(train.py --help lists the options)')
        assert not out.exists()


def corrupt_archive(tmp_path, cifar_archive):
    """The fake archive cut in half: a download that stopped midway."""
    path = tmp_path / 'cifar-10-python.tar.gz'
    with open(cifar_archive, 'rb') as f:
        blob = f.read()
    path.write_bytes(blob[:len(blob) // 2])
    return str(path)


@pytest.mark.parametrize('case', ['method-synth', 'missing-data', 'corrupt-archive', 'gpu',
                                  'resume-missing', 'lr-drops', 'tta-images'])
def test_bad_input(tmp_path, cifar_archive, case):
    out = tmp_path / 'out'
    data_dir, argv, says = cifar_archive, [], None
    if case == 'method-synth':
        argv, says = ['--method', 'bp', '--synth', 'vfbn'], 'disagree'
    elif case == 'missing-data':
        data_dir, says = str(tmp_path / 'nowhere'), 'no CIFAR-10 at'
    elif case == 'corrupt-archive':
        data_dir, says = corrupt_archive(tmp_path, cifar_archive), 'not a readable'
    elif case == 'gpu':
        if chainer.backends.cuda.available:
            pytest.skip('this machine has a GPU')
        argv, says = ['--gpu', '0'], 'run on the CPU'
    elif case == 'resume-missing':
        argv, says = ['--resume', tmp_path / 'snapshot_iter_99'], 'no such run folder or snapshot'
    elif case == 'lr-drops':
        argv, says = ['--lr-drops', 3, 2], 'increasing'
    elif case == 'tta-images':
        argv, says = ['--tta-images', 9], 'more than --test-images 8'
    proc = script('train.py', *TINY, '--data-dir', data_dir, '--out', out,
                  '--iterations', 3, *argv)
    line = assert_one_error_line(proc, 'train.py')
    assert says in line
    assert not (out / 'result.json').exists()


@pytest.mark.parametrize('case', ['alpha-nan', 'lr-inf', 'epoch-0', 'epoch-negative',
                                  'lr-drop-every-0', 'momentum-1', 'out-under-a-file',
                                  'out-is-a-file', 'device-typo', 'split-out-of-range'])
def test_bad_value_is_one_line_before_anything_is_written(tmp_path, cifar_archive, case):
    out, argv = tmp_path / 'out', []
    says = {'alpha-nan': '--alpha-gs must be a finite number',
            'lr-inf': '--lr must be a finite number', 'epoch-0': '--epoch must be > 0',
            'epoch-negative': '--epoch must be > 0',
            'lr-drop-every-0': '--lr-drop-every must be > 0',
            'momentum-1': '--momentum must be in [0, 1)', 'out-under-a-file': 'is a file',
            'out-is-a-file': 'is a file', 'device-typo': "unknown device 'foo'",
            'split-out-of-range': '--split must be a unit boundary'}[case]
    argv = {'alpha-nan': ['--synth', 'vfbn', '--alpha-gs', 'nan'], 'lr-inf': ['--lr', 'inf'],
            'epoch-0': ['--epoch', '0'], 'epoch-negative': ['--epoch', '-1'],
            'lr-drop-every-0': ['--lr-drop-every', '0'], 'momentum-1': ['--momentum', '1'],
            'device-typo': ['--device', 'foo'], 'split-out-of-range': ['--split', '4']}.get(case, [])
    if case == 'out-under-a-file':
        (tmp_path / 'afile').write_text('x')
        out = tmp_path / 'afile' / 'out'
    elif case == 'out-is-a-file':
        out.write_text('x')
    before = sorted(os.listdir(tmp_path))
    proc = script('train.py', *TINY, '--data-dir', cifar_archive, '--out', out, *argv)
    line = assert_one_error_line(proc, 'train.py')
    assert says in line, line
    assert sorted(os.listdir(tmp_path)) == before  # nothing written


def test_a_run_folder_is_never_shared(trained, tmp_path):
    """A new run into a folder holding a run is refused (one line naming --resume and
    --overwrite, nothing touched); --overwrite starts over without the old files."""
    done, proc = trained(*short_run(table1_row('vfbn', 1e-3), iterations=6))
    run = tmp_path / 'run'
    shutil.copytree(done, str(run))
    before = {n: (run / n).read_bytes() for n in os.listdir(str(run))}
    proc = script('train.py', *TINY, '--out', run, '--iterations', 3)
    line = assert_one_error_line(proc, 'train.py')
    assert 'holds a run' in line and '--resume' in line and '--overwrite' in line
    assert {n: (run / n).read_bytes() for n in os.listdir(str(run))} == before
    run_args = read_json(str(run / 'args.json'))
    proc = script('train.py', *TINY, '--data-dir', run_args['data_dir'], '--out', run,
                  '--method', 'bp', '--iterations', 1, '--overwrite')
    assert proc.returncode == 0, proc.stderr
    assert not (run / 'snapshot_iter_6').exists() and not (run / 'snapshot_iter_3').exists()
    assert read_json(str(run / 'args.json'))['method'] == 'bp'
    assert read_json(str(run / 'result.json'))['iteration'] == 1


def test_resume_from_the_folder_alone_and_refuse_a_contradiction(trained, tmp_path):
    """``--resume RUN_DIR`` continues from its latest snapshot with its own arguments
    (the data set and sizes come from args.json) and ends where the uninterrupted run
    ends; an option that contradicts args.json is refused, naming it."""
    full, _ = trained(*short_run(table1_row('vfbn', 1e-3), iterations=6))
    half, _ = trained(*short_run(table1_row('vfbn', 1e-3), iterations=3))
    run = tmp_path / 'run'
    shutil.copytree(half, str(run))
    for argv, named in ((['--lr', '0.5'], '--lr 0.5'), (['--seed', '1'], '--seed 1'),
                        (['--train-images', '30'], '--train-images 30'),
                        (['--iterations', '2'], 'before the snapshot')):
        proc = script('train.py', '--resume', run, *argv)
        line = assert_one_error_line(proc, 'train.py')
        assert named in line, line
    proc = script('train.py', '--resume', run, '--iterations', 6)
    assert proc.returncode == 0, proc.stderr
    with numpy.load(os.path.join(full, 'model.npz')) as a, \
            numpy.load(str(run / 'model.npz')) as b:
        for name in a.files:
            numpy.testing.assert_array_equal(a[name], b[name], err_msg=name)
    run_args = read_json(str(run / 'args.json'))
    assert run_args['iterations'] == 6
    first, resumed = run_args['parts']  # each part, the first included
    assert (first['resumed_from'], first['iterations']) == (None, 3)
    assert (resumed['resumed_from'], resumed['iterations']) == (str(run / 'snapshot_iter_3'), 6)
    result = read_json(str(run / 'result.json'))
    assert result['seconds'] > read_json(os.path.join(half, 'result.json'))['seconds']


def test_bad_input_resume_other_depth(trained, tmp_path, cifar_archive):
    depth1, proc = trained(*short_run(table1_row('vfbn', 1e-3)))
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / 'out'
    proc = script('train.py', *TINY, '--depth', 2, '--data-dir', cifar_archive, '--out', out,
                  '--synth', 'vfbn', '--iterations', 6,
                  '--resume', os.path.join(depth1, 'snapshot_iter_3'))
    line = assert_one_error_line(proc, 'train.py')
    assert "--depth 2 contradicts the run's 1" in line
    assert not (out / 'result.json').exists()


def test_failed_resume_leaves_the_run_folder_alone(trained, tmp_path, cifar_archive):
    finished, proc = trained(*short_run(table1_row('vfbn', 1e-3)))
    run = str(tmp_path / 'run')
    shutil.copytree(finished, run)
    before = {n: open(os.path.join(run, n)).read() for n in ('args.json', 'result.json')}
    proc = script('train.py', *TINY, '--depth', 2, '--data-dir', cifar_archive, '--out', run,
                  '--synth', 'vfbn', '--resume', os.path.join(run, 'snapshot_iter_3'))
    assert proc.returncode == 2
    after = {n: open(os.path.join(run, n)).read() if os.path.exists(os.path.join(run, n))
             else None for n in before}
    assert after == before


# ---------------------------------------------------------------------------
# (d) Divergence is an outcome, not a crash.

def test_divergence_exits_3_and_is_recorded(tmp_path, cifar_archive):
    """An lr of 1e30 overflows the weights of the end-to-end network at once: the
    loss of iteration 2 is NaN."""
    out = tmp_path / 'out'
    proc = script('train.py', *TINY, '--data-dir', cifar_archive, '--out', out,
                  '--method', 'bp', '--lr', '1e30', '--iterations', 20)
    assert proc.returncode == 3, proc.stderr
    assert 'Traceback' not in proc.stderr
    # NumPy's overflow warnings may come first; the verdict is the last line.
    line = proc.stderr.strip().splitlines()[-1]
    m = re.match(r'train\.py: error: bp diverged at iteration (\d+): (.*) became non-finite',
                 line)
    assert m, line
    result = read_json(str(out / 'result.json'))
    assert result['status'] == 'diverged'
    assert result['method'] == 'bp'
    assert result['message'] in line
    assert 'test_error' not in result
    assert not (out / 'model.npz').exists()


# ---------------------------------------------------------------------------
# (g) The bare commands: train.py, then evaluate.py and plot_curves.py with nothing.

def test_bare_evaluate_and_plot_after_a_default_run(tmp_path, cifar_archive):
    def bare(name, *argv):
        return subprocess.run([sys.executable, os.path.join(REPO_ROOT, name)] +
                              [str(a) for a in argv], cwd=str(tmp_path), capture_output=True,
                              text=True, timeout=SCRIPT_TIMEOUT)
    line = assert_one_error_line(bare('evaluate.py'), 'evaluate.py')
    assert 'no run in result/' in line
    line = assert_one_error_line(bare('plot_curves.py'), 'plot_curves.py')
    assert 'no run folders' in line and 'result/' in line

    proc = bare('train.py', *TINY, '--data-dir', cifar_archive, '--iterations', 2,
                '--eval-every', 1)
    assert proc.returncode == 0, proc.stderr
    assert '\033' not in proc.stdout  # no terminal codes when not on a terminal
    assert '[progress] iteration 1/2' in proc.stdout
    result = read_json(str(tmp_path / 'result' / 'result.json'))

    proc = bare('evaluate.py')
    assert proc.returncode == 0, proc.stderr
    assert 'test error %.2f%% (36-view)' % (100 * result['test_error']) in proc.stdout

    proc = bare('plot_curves.py')
    assert proc.returncode == 0, proc.stderr
    for name in ('figure3_error.png', 'figure3_error.pdf', 'figure3_fidelity.png',
                 'figure3_fidelity.pdf'):
        assert (tmp_path / 'result' / name).stat().st_size > 0, name
        assert name in proc.stdout

    (tmp_path / 'afile').write_text('x')
    proc = bare('plot_curves.py', 'result', '--out', tmp_path / 'afile' / 'fig')
    line = assert_one_error_line(proc, 'plot_curves.py')
    assert 'is a file' in line
