"""``python -m chainer_vfbn.table``'s GPUs (``--gpus``), ``status``, the one-line
refusals of the cluster options, and train.py's stop on a scheduler's signals,
without Slurm (tests/test_slurm.py has the jobs).

The GPU assignment runs for real with the CPU standing in for two GPUs (``--device
@numpy`` and ``--gpu -1`` are two names of the CPU): four tiny runs, two at a time;
each running run must hold a device no other running run holds, as its record
(``table_job.json``) and its ``args.json`` say."""
import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import chainer
import pytest

from chainer_vfbn import table, trainer_extensions

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--train-images', '16', '--test-images', '4', '--batchsize', '4']


def run_table(*argv, env=None, timeout=300, **kw):
    return subprocess.run([sys.executable, '-m', 'chainer_vfbn.table'] + [str(a) for a in argv],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env, **kw)


def main(*argv):
    """``python -m chainer_vfbn.table ARGV`` in this process: (exit status, stdout,
    stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = table.main([str(a) for a in argv])
        except SystemExit as e:  # argparse's usage errors
            code = e.code
    return code, out.getvalue(), err.getvalue()


def read(path):
    with open(str(path)) as f:
        return json.load(f)


def test_each_concurrent_run_holds_its_own_device(tmp_path, cifar_archive, capsys):
    root = str(tmp_path / 'root')
    devices = [['--device', '@numpy'], ['--gpu', '-1']]  # the CPU, standing in for two GPUs
    common = ['--depth', '1', '--data-dir', cifar_archive] + TINY + ['--iterations', '1']
    code = table.run_table(root, [0, 1], ['bp', 'vfbn-1e-3'], common, jobs=2, devices=devices,
                           threads=1)
    assert code == 0, capsys.readouterr().out
    records = []
    for seed, row in table.plan([0, 1], ['bp', 'vfbn-1e-3']):
        folder = os.path.join(root, row.slug, 'seed%d' % seed)
        record, args = read(os.path.join(folder, 'table_job.json')), \
            read(os.path.join(folder, 'args.json'))
        assert record['device'] in devices and record['exit_status'] == 0
        assert record['command'][-len(record['device']) - 2:-2] == record['device']
        device = ['--device', args['device']] if args['device'] else ['--gpu', str(args['gpu'])]
        assert device == record['device']  # args.json says where it ran
        records.append(record)
    assert {tuple(r['device']) for r in records} == set(map(tuple, devices))
    overlaps = 0
    for i, a in enumerate(records):
        for b in records[i + 1:]:
            if a['started'] < b['ended'] and b['started'] < a['ended']:
                overlaps += 1
                assert a['device'] != b['device'], (a, b)
    assert overlaps >= 1  # two at a time: the check above bit


def test_gpus_become_train_py_gpu_options(tmp_path, cifar_archive):
    """On a machine without CuPy the GPUs' number is unknown: the runs start, each
    with its --gpu, and train.py refuses the missing GPU in its one line."""
    if chainer.backends.cuda.available:
        pytest.skip('this machine has a GPU')
    root = tmp_path / 'root'
    proc = run_table('run', '--out', root, '--depth', '1', '--rows', 'bp', 'vfbn-0',
                     '--gpus', '3', '5', '--', '--data-dir', cifar_archive, *TINY,
                     '--iterations', '1')
    assert proc.returncode == table.EXIT_FAILED, proc.stdout + proc.stderr
    assert '2 at a time' in proc.stdout and 'on --gpu 3, --gpu 5' in proc.stdout
    used = set()
    for row in ('bp', 'vfbn-0'):
        output = (root / row / 'seed0' / 'train_output.txt').read_text()
        gpu = re.search(r'--gpu (\d) --threads', output).group(1)
        used.add(gpu)
        assert 'device @cupy:%s is not available' % gpu in output
    assert used == {'3', '5'}




@pytest.mark.parametrize('case', ['no-sbatch', 'gpus-twice', 'gpus-too-few', 'gpus-and-gpu',
                                  'slurm-option-local', 'gpus-on-slurm', 'gpus-per-run-cpu',
                                  'bad-time', 'bad-sbatch', 'bad-gpu'])
def test_bad_cluster_options_are_one_line_and_write_nothing(tmp_path, monkeypatch, case):
    root = tmp_path / 'root'
    argv, says, env = {
        'no-sbatch': (['--executor', 'slurm'], 'sbatch is not on PATH', str(tmp_path)),
        'gpus-twice': (['--gpus', '0', '0'], 'names a GPU twice', None),
        'gpus-too-few': (['--gpus', '0', '1', '--jobs', '3'], 'names only 2 GPU', None),
        'gpus-and-gpu': (['--gpus', '0', '--', '--gpu', '1'], 'leave --gpu out', None),
        'slurm-option-local': (['--partition', 'gpu'], 'only with --executor slurm', None),
        'gpus-on-slurm': (['--executor', 'slurm', '--gpus', '0'], '--gpus-per-run', None),
        'gpus-per-run-cpu': (['--executor', 'slurm', '--gpus-per-run', '1'],
                             'add -- --gpu 0', None),
        'bad-time': (['--time', '1:2:3:4'], 'not a Slurm time limit', None),
        'bad-sbatch': (['--sbatch', '=x'], 'KEY=VALUE', None),
        'bad-gpu': (['--gpus', 'x'], 'expected a GPU number', None),
    }[case]
    if env:
        monkeypatch.setenv('PATH', env)  # a PATH without sbatch
    code, out, err = main('run', '--out', root, *argv)
    assert code == 2, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert re.match(r'python -m chainer_vfbn.table( run)?: error: ', lines[0]), lines[0]
    assert says in lines[0], lines[0]
    if case == 'no-sbatch':
        assert '--executor local' in lines[0]
    assert not root.exists()


def test_status_without_a_plan_is_one_line(tmp_path):
    code, out, err = main('status', tmp_path)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and 'holds no table plan' in lines[0], err


def status(root):
    code, out, err = main('status', root)
    assert code == 0, err
    return {line.split()[0]: line for line in out.splitlines()[1:]}


def test_status_of_local_runs(tmp_path, cifar_archive):
    """Stopped with Ctrl-C during its first run: interrupted, then not started; the
    same command again: finished, and a run whose train.py failed says why. (100
    iterations, so that the first run cannot finish before the Ctrl-C lands.)"""
    root = tmp_path / 'root'
    argv = ['run', '--out', root, '--depth', '1', '--rows', 'bp', '--seeds', '0', '1',
            '--', '--data-dir', cifar_archive, *TINY, '--iterations', '100',
            '--progress-every', '3600']
    proc = subprocess.Popen([sys.executable, '-m', 'chainer_vfbn.table'] + list(map(str, argv)),
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    output = root / 'bp' / 'seed0' / 'train_output.txt'
    deadline = time.time() + 120
    while not (output.exists() and '[progress] iteration 1' in output.read_text()):
        assert time.time() < deadline and proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    during = status(root)
    assert re.match(r'bp/seed0\s+running\s', during['bp/seed0'])
    assert re.match(r'bp/seed1\s+queued\s', during['bp/seed1'])
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal
    assert proc.wait(timeout=120) == table.EXIT_INTERRUPTED
    after = status(root)
    assert re.match(r'bp/seed0\s+interrupted\s+-\s', after['bp/seed0']), after
    assert re.match(r'bp/seed1\s+not started\s', after['bp/seed1']), after

    again = run_table(*argv)
    assert again.returncode == 0, again.stdout + again.stderr
    done = status(root)
    for folder in ('bp/seed0', 'bp/seed1'):
        assert re.match(r'%s\s+finished\s+iteration 100 at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\s+-\s+'
                        r'test error \d+\.\d\d%%$' % folder, done[folder]), done[folder]

    # A run whose train.py fails: its last line is its error.
    shutil.rmtree(str(root / 'bp' / 'seed1'))
    failed = run_table('run', '--out', root, '--depth', '1', '--rows', 'bp', '--seeds', '0', '1',
                       '--', '--data-dir', tmp_path / 'no-such-data', *TINY,
                       '--iterations', '100', '--progress-every', '3600')
    assert failed.returncode == table.EXIT_FAILED
    line = status(root)['bp/seed1']
    assert re.match(r'bp/seed1\s+failed\s+-\s+-\s+exit status 2: '
                    r'train.py: error: .*no CIFAR-10 at', line), line


class FakeTrainer(object):
    """What StopOnSignal reads of a trainer."""
    out = None

    class updater(object):
        iteration = 7


@pytest.mark.parametrize('first, second', [(signal.SIGTERM, signal.SIGTERM),
                                           (signal.SIGUSR1, signal.SIGTERM),
                                           (signal.SIGINT, signal.SIGINT)],
                         ids=['term-term', 'usr1-term', 'int-int'])
def test_a_schedulers_second_signal_still_gets_the_snapshot(tmp_path, first, second):
    """In process: Slurm sends SIGTERM to every process of a job, and the job's Python
    passes it (or SIGUSR1) on to train.py too; a second such signal must not cost the
    snapshot. A second Ctrl-C still stops at once, without one."""
    FakeTrainer.out = str(tmp_path)
    written = []
    stop = trainer_extensions.StopOnSignal(lambda trainer: written.append(trainer.updater.iteration))
    stop.initialize(FakeTrainer)
    try:
        os.kill(os.getpid(), first)  # each handled at once, in this thread
        if second == signal.SIGINT:
            with pytest.raises(trainer_extensions.Interrupted) as e:
                os.kill(os.getpid(), second)
            assert e.value.args == (7, None) and written == []
            return
        os.kill(os.getpid(), second)
        with pytest.raises(trainer_extensions.Interrupted) as e:
            stop(FakeTrainer)
    finally:
        stop.finalize()
    assert written == [7]
    assert e.value.args == (7, os.path.join(str(tmp_path), 'snapshot_iter_7'))
