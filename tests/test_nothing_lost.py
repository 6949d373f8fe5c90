"""Nothing a run has made is ever lost, and every bad value is one line.

Run for real at depth 1 on the generated data of ``conftest.py`` (a full disk on a
real, tiny tmpfs; an allocation that does not fit under a real address-space limit):

* a finished run resumed without a later stopping point is left as it was, byte for
  byte, and says how to extend it;
* Ctrl-C in the final test keeps the training (its end is saved before the test),
  and the resumed run only tests;
* a full disk is one line naming the folder and the space a snapshot needs; the last
  whole snapshot stays, and the run continues from it exactly once there is space;
* bad values are refused before anything is loaded or written, naming the option
  and its range; a batch that does not fit in memory leaves no folder behind;
* the last iteration is always logged; each part of a resumed run keeps its threads;
  a file that is not a whole trainer snapshot is named for what it is.
"""
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys

import chainer_vfbn  # noqa: F401  (the NumPy-2 shim precedes `import chainer`)
import numpy
import pytest

from conftest import REPO_ROOT, run_main

TINY = ['--depth', '1', '--train-images', '40', '--test-images', '8', '--batchsize', '8',
        '--eval-views', '1']
MPIEXEC = os.path.join(os.path.dirname(sys.executable), 'mpiexec')
TIMEOUT = 300


def read_json(path):
    with open(str(path)) as f:
        return json.load(f)


def one_error_line(proc, prog='train.py', code=2):
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert 'Traceback' not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prog + ': error: '), proc.stderr
    return lines[0]


def folder_state(folder):
    """Every file in ``folder``: its bytes and its modification time in ns."""
    return {name: (open(os.path.join(folder, name), 'rb').read(),
                   os.stat(os.path.join(folder, name)).st_mtime_ns)
            for name in sorted(os.listdir(folder))}


def arrays(path):
    with numpy.load(str(path)) as f:
        return {k: f[k] for k in f.files}


def assert_same_arrays(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        numpy.testing.assert_array_equal(a[k], b[k], err_msg=k)


def without_wall_time(snapshot):
    """A trainer snapshot's arrays, but its elapsed time and its log's."""
    log = json.loads(str(snapshot.pop('extensions/LogReport/_log')))
    del snapshot['_snapshot_elapsed_time']
    snapshot['log'] = json.dumps([dict(e, elapsed_time=0) for e in log])
    return snapshot


def python(*argv, cwd=REPO_ROOT, **kw):
    """``python train.py ARGV`` in a real process."""
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, 'train.py')] +
                          [str(a) for a in argv], cwd=cwd, capture_output=True, text=True,
                          timeout=TIMEOUT, **kw)


@pytest.fixture(scope='module')
def finished(tmp_path_factory, cifar_archive):
    """A finished 3-iteration VFBN run (snapshot at 3): its folder."""
    out = tmp_path_factory.mktemp('finished') / 'run'
    proc = run_main('train.py', *TINY, '--data-dir', cifar_archive, '--synth', 'vfbn',
                    '--iterations', 3, '--snapshot-every', 3, '--out', out)
    assert proc.returncode == 0, proc.stderr
    return str(out)


# ---------------------------------------------------------------------------
# A finished run is never changed by a resume that asks for nothing more.

def test_resuming_a_finished_run_without_more_touches_nothing(finished, tmp_path):
    run = str(tmp_path / 'run')
    shutil.copytree(finished, run)
    before = folder_state(run)
    for extra in ([], ['--iterations', '3'], ['--iterations', '2']):
        proc = run_main('train.py', '--resume', run, *extra)
        if extra == ['--iterations', '2']:  # before the snapshot: refused, as ever
            assert 'before the snapshot' in one_error_line(proc)
            continue
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == ''
        line, = proc.stdout.strip().splitlines()
        assert line.startswith('train.py: %s is finished (iteration 3' % run), line
        assert 'no file touched' in line and '--resume %s --iterations N with N > 3' % run \
            in line and '--epoch E' in line, line
        assert folder_state(run) == before
    # Asking for more trains on, and args.json records the new stopping point.
    proc = run_main('train.py', '--resume', run, '--iterations', 4)
    assert proc.returncode == 0, proc.stderr
    assert read_json(os.path.join(run, 'result.json'))['iteration'] == 4
    assert read_json(os.path.join(run, 'args.json'))['iterations'] == 4


def test_each_part_of_a_resumed_run_records_its_threads(finished, tmp_path):
    run = str(tmp_path / 'run')
    shutil.copytree(finished, run)
    first = read_json(os.path.join(run, 'args.json'))['threads']
    proc = run_main('train.py', '--resume', run, '--iterations', 4, '--threads', 1)
    assert proc.returncode == 0, proc.stderr
    recorded = read_json(os.path.join(run, 'args.json'))
    assert recorded['threads'] == 1
    assert [(p['resumed_from'], p['iterations'], p['threads']) for p in recorded['parts']] == \
        [(None, 3, first), (os.path.join(run, 'snapshot_iter_3'), 4, 1)]


# ---------------------------------------------------------------------------
# Ctrl-C in the final test.

@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_in_the_final_test_keeps_the_training(tmp_path, fashion_mnist_writer, signum):
    """The final 36-view test of 64 images prints a progress line after each batch
    of 16 (``--progress-every`` 0.01 s); a SIGINT (or SIGTERM) after the first one
    stops the test, also when train.py inherited SIGINT ignored, as a background job
    of a shell without job control does (CI may start the tests so).
    Training's end is in ``snapshot_iter_2``; the printed command tests, and only
    tests: the log and the weights stay as they were."""
    (tmp_path / 'fm').mkdir()
    fm = fashion_mnist_writer(tmp_path / 'fm', n_train=40, n_test=64).path
    out = tmp_path / 'out'
    argv = [sys.executable, os.path.join(REPO_ROOT, 'train.py'), '--dataset', 'fashion-mnist',
            '--data-dir', fm, '--depth', '1', '--train-images', '40', '--batchsize', '8',
            '--synth', 'vfbn', '--iterations', '2', '--eval-every', '2', '--eval-views', '1',
            '--eval-images', '4', '--tta-images', '64', '--progress-every', '0.01',
            '--threads', '1', '--out', str(out)]  # no --snapshot-every, as the README's demo
    # Started as a shell without job control starts a background job: SIGINT ignored.
    proc = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED='1'),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        for line in proc.stdout:
            if line.startswith('[progress] test, 36 views of images 1-64: '):
                proc.send_signal(signum)
                break
        else:
            pytest.fail('no progress line of the final test')
        _, stderr = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    assert 'Traceback' not in stderr, stderr
    m = re.fullmatch(r"train\.py: interrupted in the final test; training's end \(iteration "
                     r"2\) is saved in (\S+), and resuming it runs only the test: continue "
                     r"with: (.*)", stderr.strip())
    assert m, stderr
    assert m.group(1) == str(out / 'snapshot_iter_2')
    assert not (out / 'result.json').exists()
    assert not [n for n in os.listdir(str(out)) if n.endswith('.tmp')]
    before = {n: (out / n).read_bytes() for n in ('log', 'snapshot_iter_2')}
    weights = arrays(out / 'model.npz')

    resumed = subprocess.run(m.group(2).split(), cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr
    assert '[progress] iteration' not in resumed.stdout  # no training, only the test
    assert 'final test error' in resumed.stdout
    result = read_json(out / 'result.json')
    assert (result['status'], result['iteration'], result['tta_images']) == ('finished', 2, 64)
    assert {n: (out / n).read_bytes() for n in before} == before
    assert_same_arrays(weights, arrays(out / 'model.npz'))


# ---------------------------------------------------------------------------
# A full disk, for real: a tmpfs of a few MiB.

@pytest.fixture
def tiny_disk(tmp_path):
    mount = tmp_path / 'disk'
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip('mounting a tmpfs needs root (CI runs as root)')
    made = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=16m', 'tmpfs', str(mount)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip('cannot mount a tmpfs here: %s' % made.stderr.strip())
    try:
        yield mount
    finally:
        subprocess.run(['umount', str(mount)], check=True)


def fill(disk, leave):
    """Fill ``disk`` but about ``leave`` bytes with a file; returns its path."""
    filler = disk / 'filler'
    with open(str(filler), 'wb') as f:
        try:
            while True:
                f.write(b'\0' * 65536)
                f.flush()
        except OSError:
            pass
    size = os.path.getsize(str(filler))
    os.truncate(str(filler), max(0, size - leave))
    return filler


def test_a_full_disk_keeps_the_last_snapshot_and_resumes_from_it(tiny_disk, tmp_path,
                                                                  cifar_archive):
    """A run finished at 2, resumed to 4 with 64 KiB left: args.json and the log fit,
    the snapshot at 4 does not. One line; the snapshot at 2 whole and unchanged,
    nothing half-written; with space again, the printed command ends the run as the
    uninterrupted 4-iteration run, bit for bit."""
    argv = TINY + ['--data-dir', cifar_archive, '--synth', 'vfbn', '--eval-every', 2,
                   '--snapshot-every', 2, '--threads', 1]
    out = tiny_disk / 'run'
    assert run_main('train.py', *argv, '--iterations', 2, '--out', out).returncode == 0
    kept = (out / 'snapshot_iter_2').read_bytes()
    filler = fill(tiny_disk, 64 * 1024)

    proc = python('--resume', out, '--iterations', 4)
    line = one_error_line(proc, code=1)
    m = re.fullmatch(r'train\.py: error: no space left on the device of (\S+) \(writing (\S+)\): '
                     r'a snapshot of this run needs about ([\d.]+) MB, ([\d.]+) MB are free; '
                     r'the latest whole snapshot is (\S+): free some space, then continue '
                     r'with: (.*)', line)
    assert m, line
    assert m.group(1) == str(out) and m.group(5) == str(out / 'snapshot_iter_2')
    assert re.fullmatch(r'(snapshot_iter|model_iter)_4(\.npz)?(\.tmp)?', m.group(2)), line
    assert float(m.group(3)) > float(m.group(4))
    assert (out / 'snapshot_iter_2').read_bytes() == kept
    names = sorted(os.listdir(str(out)))
    assert not [n for n in names if n.endswith('.tmp') or n.startswith('tmp')], names
    assert 'result.json' not in names and 'snapshot_iter_4' not in names
    read_json(out / 'args.json'), read_json(out / 'log')  # whole JSON

    os.remove(str(filler))
    resumed = subprocess.run(m.group(6).split(), cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr
    straight = tmp_path / 'straight'
    assert run_main('train.py', *argv, '--iterations', 4, '--out', straight).returncode == 0
    assert_same_arrays(*(without_wall_time(arrays(folder / 'snapshot_iter_4'))
                         for folder in (straight, out)))
    assert read_json(out / 'result.json')['test_error'] == \
        read_json(straight / 'result.json')['test_error']


# ---------------------------------------------------------------------------
# Bad values: one line naming the option and its range, before anything is loaded.

@pytest.mark.parametrize('argv, says', [
    (['--seed', '-1'], '--seed must be in [0, 4294967295]'),
    (['--seed', '99999999999'], '--seed must be in [0, 4294967295]'),
    (['--batchsize', '100000000'], '--batchsize must be in [1, 1440] (the training examples '
                                   'of one epoch: 40 training images x 36 views)'),
    (['--depth', '100000'], '--depth must be in [1, 200] (ResNet-1202'),
    (['--out', ''], '--out must name a folder'),
    (['--diag-interval', '-1'], '--diag-interval must be >= 0'),
    (['--threads', '100000'], '--threads must be in [1, %d] (the CPUs this process may use)'
     % len(os.sched_getaffinity(0))),
])
def test_a_bad_value_is_refused_before_anything_is_loaded(tmp_path, argv, says):
    """The data folder does not exist: had anything been loaded, the error would be
    the data's."""
    out = tmp_path / 'out'
    proc = run_main('train.py', *TINY, '--data-dir', tmp_path / 'nowhere', '--out', out,
                    *argv)
    line = one_error_line(proc)
    assert says in line, line
    assert os.listdir(str(tmp_path)) == []


def test_a_batch_that_does_not_fit_in_memory_leaves_no_folder(tmp_path, cifar_archive):
    """Under a 3 GiB address-space limit a batch of 3600 views (all 100 images x 36)
    cannot be trained: MemoryError at the first allocation that does not fit, one
    line saying what did not fit, and no run folder for a run that never started."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
    out = tmp_path / 'out'
    proc = python(*TINY, '--train-images', 100, '--batchsize', 3600, '--data-dir',
                  cifar_archive, '--threads', 1, '--iterations', 1, '--out', out,
                  preexec_fn=limit,
                  env=dict(os.environ, OPENBLAS_NUM_THREADS='1', OMP_NUM_THREADS='1'))
    line = one_error_line(proc)
    assert re.match(r'train\.py: error: out of memory at iteration 1 \(--batchsize 3600, '
                    r'--depth 1\): Unable to allocate .* nothing was kept$', line), line
    assert not out.exists()


# ---------------------------------------------------------------------------
# The log's last iteration; files that are not what --resume needs.

def test_the_last_iteration_is_always_logged(tmp_path, cifar_archive):
    out = tmp_path / 'out'
    proc = run_main('train.py', *TINY, '--data-dir', cifar_archive, '--method', 'bp',
                    '--iterations', 3, '--eval-every', 2, '--out', out)
    assert proc.returncode == 0, proc.stderr
    assert [e['iteration'] for e in read_json(out / 'log')] == [2, 3]
    out = tmp_path / 'long'
    proc = run_main('train.py', *TINY, '--data-dir', cifar_archive, '--method', 'bp',
                    '--iterations', 2, '--eval-every', 50, '--out', out)
    assert proc.returncode == 0, proc.stderr
    assert [e['iteration'] for e in read_json(out / 'log')] == [2]


@pytest.mark.parametrize('case', ['model.npz', 'truncated'])
def test_resume_names_a_file_that_is_not_a_whole_snapshot(finished, tmp_path, case):
    run = tmp_path / 'run'
    shutil.copytree(finished, str(run))
    if case == 'model.npz':
        given, says = run / 'model.npz', 'is not a trainer snapshot (it has no updater/iteration'
    else:
        blob = (run / 'snapshot_iter_3').read_bytes()
        (run / 'snapshot_iter_3').write_bytes(blob[:len(blob) // 2])
        given, says = run, 'cannot be read as a trainer snapshot (BadZipFile'
    before = folder_state(str(run))
    line = one_error_line(run_main('train.py', '--resume', given, '--iterations', 5))
    assert says in line and str(run / ('model.npz' if case == 'model.npz' else
                                      'snapshot_iter_3')) in line, line
    assert 'args.json' not in line
    assert folder_state(str(run)) == before


# ---------------------------------------------------------------------------
# mpiexec with a number of processes that does not fit: refused at start, once.

@pytest.mark.skipif(not os.path.exists(MPIEXEC),
                    reason='no mpiexec beside Python (./setup.sh installs mpich)')
@pytest.mark.parametrize('n, argv, says', [
    (3, ['--synth', 'vfbn', '--pipeline'], "--pipeline runs the network's 2 modules as 2 MPI "
                                           "processes; launch it with: mpiexec -n 2"),
    (2, ['--synth', 'vfbn'], 'this is an mpiexec job of 2 processes, but only --pipeline '
                             'runs on several processes'),
    (2, ['--synth', 'vfbn', '--pipeline', '--out', os.devnull + '/out'], 'is a file'),
])
def test_an_mpiexec_job_that_does_not_fit_is_refused_once_at_start(tmp_path, cifar_archive,
                                                                 n, argv, says):
    """Also an --out that no rank can write to: every rank stops (none waits for
    rank 0 to connect), rank 0 alone says why."""
    out = tmp_path / 'out'
    proc = subprocess.run([MPIEXEC, '-n', str(n), sys.executable,
                           os.path.join(REPO_ROOT, 'train.py'), *TINY, '--data-dir',
                           cifar_archive, '--iterations', '20', '--out', str(out), *argv,
                           '--pipeline-timeout', '20'],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    line = one_error_line(proc)
    assert says in line, line
    assert 'final test error' not in proc.stdout and not out.exists()


# ---------------------------------------------------------------------------
# evaluate.py: the file that is wrong is the one named.

@pytest.mark.parametrize('case, says', [
    ('not-an-object', "args.json is not train.py's record of a run: not a JSON object"),
    ('no-depth', "args.json is not train.py's record of a run: no 'depth'"),
    ('depth-text', "args.json is not train.py's record of a run: 'depth' must be an integer "
                   "in [1, 200], got 'x'"),
    ('method', "args.json is not train.py's record of a run: 'method' must be one of"),
    ('truncated', "cannot read the run's arguments"),
    ('other-depth', 'model.npz does not hold the network that'),
    ('tta-images', '--tta-images 500 is more than the 8 test images evaluated'),
])
def test_evaluate_names_the_file_that_is_wrong(finished, tmp_path, case, says):
    run = tmp_path / 'run'
    shutil.copytree(finished, str(run))
    recorded = read_json(run / 'args.json')
    argv = []
    if case == 'not-an-object':
        (run / 'args.json').write_text('[1, 2]')
    elif case == 'truncated':
        (run / 'args.json').write_text(json.dumps(recorded)[:40])
    elif case == 'tta-images':
        argv = ['--tta-images', 500]
    else:
        if case == 'no-depth':
            del recorded['depth']
        else:
            recorded.update({'depth-text': {'depth': 'x'}, 'method': {'method': 'vbfn'},
                             'other-depth': {'depth': 2}}[case])
        (run / 'args.json').write_text(json.dumps(recorded))
    line = one_error_line(run_main('evaluate.py', run, *argv), prog='evaluate.py')
    assert says in line, line
    if case == 'other-depth':  # either file may be the wrong one: both are named
        assert str(run / 'model.npz') in line and str(run / 'args.json') in line, line
    elif case != 'tta-images':
        assert str(run / 'args.json') in line and 'model.npz' not in line, line
