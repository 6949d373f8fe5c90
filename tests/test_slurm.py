"""``python -m chainer_vfbn.table run --executor slurm`` against a real Slurm.

Marked ``slurm`` and left out of the default ``pytest -q`` (pytest.ini). They need a
running cluster on this machine: ``sudo .ci/slurm.sh start`` makes a one-node one
(``.ci/run`` starts it, runs ``pytest -m slurm`` and stops it). Without one they fail
with the reason; they never skip. Each is a tiny table (depth 1, 16 images, batch
4) on the generated CIFAR-10 of ``conftest.py``, with one BLAS thread per run:

* the same plan through Slurm and through the local executor gives the same
  table.md and the same log and weights in every run folder;
* a job signalled mid-run (``scancel --signal=USR1 --batch``, what Slurm sends before
  a time limit; or SIGTERM to all its processes, as at a preemption) saves a
  snapshot, requeues itself and resumes from it, and ends with the log, weights and
  whole trainer state of an uninterrupted run, exactly;
* a job with a bad argument shows as failed in ``table status``, with its error line,
  while the other jobs of the array finish.
"""
import json
import os
import re
import subprocess
import sys
import time

import numpy
import pytest

from conftest import run_main

pytestmark = pytest.mark.slurm
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--train-images', '16', '--test-images', '4', '--batchsize', '4']
WAIT = 240  # seconds for an array to finish (a requeue waits ~15 s in the queue)


@pytest.fixture(scope='module', autouse=True)
def cluster():
    """Fail (not skip) without a cluster whose node takes jobs."""
    try:
        out = subprocess.run(['sinfo', '-h', '-o', '%t'], capture_output=True, text=True,
                             timeout=30)
        said = (out.stdout + out.stderr).strip()
    except OSError as e:
        said = str(e)
    if not re.search(r'\b(idle|mix|alloc)', said):
        pytest.fail('no Slurm cluster takes jobs here (sinfo: %r); start one with '
                    'sudo .ci/slurm.sh start' % said, pytrace=False)


def table(*argv):
    return subprocess.run([sys.executable, '-m', 'chainer_vfbn.table'] + [str(a) for a in argv],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def status(root):
    """``{folder: (state, rest of its line)}`` from ``table status``."""
    proc = table('status', root)
    assert proc.returncode == 0, proc.stderr
    states = {}
    for line in proc.stdout.splitlines()[1:]:
        m = re.match(r'(\S+)\s+(not started|queued|running|finished|diverged|interrupted|'
                     r'failed)\b\s*(.*)', line)
        assert m, line
        states[m.group(1)] = (m.group(2), m.group(3))
    return states


def wait_for(root, done=('finished', 'diverged', 'failed')):
    deadline = time.time() + WAIT
    while True:
        states = status(root)
        if all(s in done for s, _ in states.values()):
            return states
        if time.time() > deadline:
            pytest.fail('after %d s: %s' % (WAIT, states))
        time.sleep(1)


def submit(root, *argv):
    proc = table('run', '--out', root, '--executor', 'slurm', *argv)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def queue():
    return subprocess.run(['squeue', '-h', '-o', '%i'], capture_output=True, text=True,
                          check=True, timeout=30).stdout.split()


def read_log(folder):
    with open(os.path.join(str(folder), 'log')) as f:
        return [dict(e, elapsed_time=None) for e in json.load(f)]


def arrays(path):
    with numpy.load(str(path)) as f:
        return {k: f[k] for k in f.files}


def assert_same_arrays(a, b, ignore=()):
    assert sorted(a) == sorted(b)
    for k in a:
        if k not in ignore:
            numpy.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_table_via_slurm_equals_the_local_table(tmp_path, cifar_archive):
    plan = ['--depth', '1', '--rows', 'bp', 'vfbn-1e-3', '--seeds', '0', '1', '--threads', '1']
    extra = ['--', '--data-dir', cifar_archive] + TINY + ['--iterations', '3']
    local = table('run', '--out', tmp_path / 'local', '--jobs', '2', *plan, *extra)
    assert local.returncode == 0, local.stdout + local.stderr
    out = submit(tmp_path / 'slurm', '--cpus-per-run', '1', '--time', '10', *plan, *extra)
    assert 'submitted 4 run(s)' in out
    again = submit(tmp_path / 'slurm', '--cpus-per-run', '1', '--time', '10', *plan, *extra)
    assert 'nothing to submit' in again and 'already in the queue as job' in again, again
    states = wait_for(tmp_path / 'slurm')
    assert {s for s, _ in states.values()} == {'finished'}, states
    assert all(re.search(r'job \d+_[0-3]', rest) for _, rest in states.values()), states
    assert table('report', tmp_path / 'slurm').returncode == 0

    assert (tmp_path / 'slurm' / 'table.md').read_text() == \
        (tmp_path / 'local' / 'table.md').read_text()
    for row in ('bp', 'vfbn-1e-3'):
        for seed in (0, 1):
            a, b = (tmp_path / where / row / ('seed%d' % seed) for where in ('local', 'slurm'))
            assert read_log(a) == read_log(b)
            assert_same_arrays(arrays(a / 'model.npz'), arrays(b / 'model.npz'))
            assert json.loads((b / 'args.json').read_text())['threads'] == 1


def snapshot_state(path):
    """A trainer snapshot's arrays, its LogReport's log without the wall times, and
    the keys that hold wall time (which two runs never share)."""
    state = arrays(path)
    timed = [k for k in state if 'elapsed_time' in k]
    logs = [k for k in state if k.endswith('LogReport/_log')]
    for k in logs:
        state[k] = [dict(e, elapsed_time=None) for e in json.loads(str(state[k]))]
    return state, timed, logs


@pytest.mark.parametrize('signal', [
    ['--signal=USR1', '--batch'],  # what Slurm sends before the time limit
    ['--signal=TERM', '--full']],  # preemption: every process of the job gets SIGTERM
    ids=['usr1-batch', 'term-all'])
def test_a_signalled_job_requeues_and_ends_as_the_uninterrupted_run(tmp_path, cifar_archive,
                                                                     signal):
    iterations = 40
    train = ['--depth', '1'] + TINY + ['--data-dir', cifar_archive, '--iterations',
                                       iterations, '--eval-every', 10, '--progress-every', 3600]
    root = tmp_path / 'root'
    submit(root, '--rows', 'vfbn-1e-3', '--threads', '1', '--cpus-per-run', '1',
           '--depth', '1', '--', *train[2:])
    run = root / 'vfbn-1e-3' / 'seed0'
    job = json.loads((root / 'table_plan.json').read_text())['runs'][0]['job']
    deadline = time.time() + WAIT  # until train.py has made its first iteration
    while not re.search(r'\[progress\] iteration 1\b', (run / 'train_output.txt').read_text()
                        if (run / 'train_output.txt').exists() else ''):
        assert time.time() < deadline, 'train.py did not start'
        time.sleep(0.2)
    subprocess.run(['scancel'] + signal + [job], check=True, timeout=30)
    states = wait_for(root)
    assert states['vfbn-1e-3/seed0'][0] == 'finished', states

    # It stopped mid-run with a snapshot, was requeued, and resumed from that snapshot.
    output = (run / 'train_output.txt').read_text()
    stopped = re.search(r'interrupted at iteration (\d+); a snapshot was saved', output)
    assert stopped, output
    k = int(stopped.group(1))
    assert 0 < k < iterations
    assert 'requeued job %s' % job in (root / 'slurm' / ('%s_0_log.out' % job)).read_text()
    parts = json.loads((run / 'args.json').read_text())['parts']
    # (parts lists every part of the run, the first included)
    assert [p['resumed_from'] for p in parts] == [None, str(run / ('snapshot_iter_%d' % k))]
    second = output.split('--resume', 1)[1]  # the requeued job's train.py went on at k + 1
    assert re.search(r'\[progress\] iteration (\d+)', second).group(1) == str(k + 1), second

    # The uninterrupted run, one thread, here.
    ref = tmp_path / 'ref'
    proc = run_main('train.py', '--synth', 'vfbn', '--alpha-gs', '1e-3', *train,
                    '--seed', 0, '--threads', 1, '--out', ref)
    assert proc.returncode == 0, proc.stderr
    assert read_log(run) == read_log(ref) and len(read_log(ref)) == iterations // 10
    assert_same_arrays(arrays(run / 'model.npz'), arrays(ref / 'model.npz'))
    last = 'snapshot_iter_%d' % iterations
    (a, timed, logs), (b, _, _) = snapshot_state(run / last), snapshot_state(ref / last)
    assert logs and all(a[k] == b[k] for k in logs)
    assert_same_arrays(a, b, ignore=timed + logs)
    for name in ('test_error', 'test_error_single'):
        assert json.loads((run / 'result.json').read_text())[name] == \
            json.loads((ref / 'result.json').read_text())[name]


def test_a_job_with_a_bad_argument_fails_in_status_and_the_others_finish(tmp_path,
                                                                       cifar_archive):
    root = tmp_path / 'root'
    submit(root, '--depth', '1', '--rows', 'bp', '--seeds', '0', '-1', '1', '--threads', '1',
           '--cpus-per-run', '1', '--', '--data-dir', cifar_archive, *TINY,
           '--iterations', '2')
    states = wait_for(root)
    assert states['bp/seed0'][0] == states['bp/seed1'][0] == 'finished', states
    state, rest = states['bp/seed-1']
    assert state == 'failed', states
    assert re.search(r'job \d+_1\s+exit status \d+: .*seed', rest, re.IGNORECASE), rest


def test_slurm_refuses_a_partition_in_one_line(tmp_path):
    """(An unknown --account takes the same path; this cluster, without accounting,
    takes any account.)"""
    before = queue()
    proc = table('run', '--out', tmp_path / 'root', '--executor', 'slurm', '--partition',
                 'nosuch')
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert re.match(r'python -m chainer_vfbn.table: error: Slurm refused the job array: '
                    r'sbatch: error: .*partition', lines[0], re.IGNORECASE), lines[0]
    assert queue() == before and not (tmp_path / 'root').exists()
