"""End-to-end tests of ``train.py``'s snapshots: a run resumed from a trainer snapshot
ends with exactly the state of the uninterrupted run (across the fused residual unit
too), and Ctrl-C saves a snapshot that ``--resume`` continues. Same set-up as
``test_cli.py`` (depth 1, the small generated CIFAR-10 archive of ``conftest.py``)."""
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import chainer_vfbn  # noqa: F401  (the NumPy-2 shim precedes `import chainer`)
import chainer
import numpy
import pytest

from chainer_vfbn import fused as chainer_fused

from conftest import (REPO_ROOT, SCRIPT_TIMEOUT, TINY, Applications, read_json, script,
                      short_run, table1_row)


# ---------------------------------------------------------------------------
# (b) Resuming from a snapshot is exact.

@pytest.mark.parametrize('method, alpha_gs', [('vfbn', 1e-3), ('vfbn', 0.0),
                                              ('jaderberg-linear', 1e-3)])
def test_resume_is_exact(trained, tmp_path, cifar_archive, method, alpha_gs):
    """Also alpha_gs = 0, whose synthesizer's optimizer never updates."""
    row = table1_row(method, alpha_gs)
    full, proc = trained(*short_run(row, iterations=6))
    assert proc.returncode == 0, proc.stderr
    first_half, proc = trained(*short_run(row, iterations=3))
    assert proc.returncode == 0, proc.stderr

    # --iterations 6 raises the stop trigger of a run that stopped at 3.
    resumed = str(tmp_path / 'resumed')
    proc = script('train.py', *TINY, '--data-dir', cifar_archive, '--out', resumed,
                  *short_run(row, iterations=6),
                  '--resume', os.path.join(first_half, 'snapshot_iter_3'))
    assert proc.returncode == 0, proc.stderr
    assert read_json(os.path.join(resumed, 'result.json'))['iteration'] == 6

    with numpy.load(os.path.join(full, 'model.npz')) as a, \
            numpy.load(os.path.join(resumed, 'model.npz')) as b:
        assert sorted(a.files) == sorted(b.files)
        for name in a.files:
            numpy.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert read_json(os.path.join(full, 'result.json'))['test_error'] == \
        read_json(os.path.join(resumed, 'result.json'))['test_error']



def test_resume_across_the_fused_unit_is_exact(trained, tmp_path, cifar_archive):
    """A snapshot taken on the composed path (every switch of chainer_vfbn.fused off:
    the code before the speed work) resumes on the fused one, the default, and the
    run ends as the uninterrupted fused run: every array of its last snapshot
    (networks, optimizers, iterator, the running RMS s) and its log, entry for entry,
    but the elapsed time."""
    argv = short_run(table1_row('vfbn', 1e-3), iterations=6) + ['--eval-every', 3]
    full, proc = trained(*argv)
    assert proc.returncode == 0, proc.stderr
    part, fused = str(tmp_path / 'part'), Applications()
    with contextlib.ExitStack() as composed:
        for key in chainer_fused.SWITCHES:
            composed.enter_context(chainer.using_config(key, False))
        with fused:
            proc = script('train.py', *TINY, '--data-dir', cifar_archive, '--out', part,
                          *argv, '--iterations', 3)
    assert proc.returncode == 0, proc.stderr
    assert fused.count('FusedResidualUnit') == fused.count('Head') == 0
    with fused:
        proc = script('train.py', '--resume', part, '--iterations', 6)
    assert proc.returncode == 0, proc.stderr
    assert fused.count('FusedResidualUnit') >= 3 * 3   # 3 updates of the network's 3 units
    assert fused.count('Head') == 3                     # v_f's fused head, once a step

    def timeless(log):
        return [{k: v for k, v in entry.items() if k != 'elapsed_time'} for entry in log]

    with numpy.load(os.path.join(full, 'snapshot_iter_6')) as a, \
            numpy.load(os.path.join(part, 'snapshot_iter_6')) as b:
        assert sorted(a.files) == sorted(b.files)
        assert any('optimizer:synth' in name for name in a.files)
        for name in a.files:
            if name.endswith('LogReport/_log'):
                want, got = (timeless(json.loads(str(f[name]))) for f in (a, b))
                assert len(want) == 2 and got == want
            elif name != '_snapshot_elapsed_time':
                numpy.testing.assert_array_equal(a[name], b[name], err_msg=name)
    want, got = (timeless(read_json(os.path.join(run, 'log'))) for run in (full, part))
    assert [entry['iteration'] for entry in want] == [3, 6] and got == want


def test_resume_after_the_last_lr_drop_goes_on_at_the_dropped_rate(tmp_path, cifar_archive):
    """--lr-drops 1 2: a run stopped at 2 (after the last drop) and resumed to 4 ends
    as the uninterrupted run, at lr 0.001 (Chainer skips the lr extension's
    initialize once its trigger is finished; train.py puts the rate back)."""
    argv = TINY + ['--data-dir', cifar_archive, '--method', 'bp', '--lr-drops', 1, 2,
                   '--eval-every', 1, '--snapshot-every', 2, '--eval-views', 1]
    full, part = str(tmp_path / 'full'), str(tmp_path / 'part')
    assert script('train.py', *argv, '--iterations', 4, '--out', full).returncode == 0
    assert script('train.py', *argv, '--iterations', 2, '--out', part).returncode == 0
    proc = script('train.py', '--resume', part, '--iterations', 4)
    assert proc.returncode == 0, proc.stderr
    lrs = [entry['lr'] for entry in read_json(os.path.join(part, 'log'))]
    assert lrs == [entry['lr'] for entry in read_json(os.path.join(full, 'log'))]
    assert lrs[-1] == pytest.approx(0.001)
    with numpy.load(os.path.join(full, 'model.npz')) as a, \
            numpy.load(os.path.join(part, 'model.npz')) as b:
        for name in a.files:
            numpy.testing.assert_array_equal(a[name], b[name], err_msg=name)


# ---------------------------------------------------------------------------
# (e) Ctrl-C saves a snapshot that --resume continues.

def test_ctrl_c_snapshots_and_resumes(tmp_path, cifar_archive):
    out = tmp_path / 'out'
    argv = [sys.executable, os.path.join(REPO_ROOT, 'train.py'), *TINY,
            '--data-dir', cifar_archive, '--out', str(out), '--synth', 'vfbn',
            '--eval-every', '1', '--eval-views', '1']  # a cheap log after each iteration
    with open(tmp_path / 'stdout', 'w') as so, open(tmp_path / 'stderr', 'w') as se:
        proc = subprocess.Popen(argv + ['--iterations', '100000'], cwd=REPO_ROOT,
                                stdout=so, stderr=se)
        try:
            # The log appears after the first iteration, once the handler is in place.
            deadline = time.time() + SCRIPT_TIMEOUT
            while not (out / 'log').exists():
                assert proc.poll() is None, 'train.py ended early'
                assert time.time() < deadline, 'no log after %ds' % SCRIPT_TIMEOUT
                time.sleep(0.1)
            proc.send_signal(signal.SIGINT)
            code = proc.wait(timeout=SCRIPT_TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stderr = (tmp_path / 'stderr').read_text()
    assert code == 130, stderr
    assert 'Traceback' not in stderr
    m = re.search(r'interrupted at iteration (\d+); a snapshot was saved: continue with: '
                  r'(.*)$', stderr.strip())
    assert m, stderr
    iteration, command = int(m.group(1)), m.group(2)
    assert command.split()[-2:] == ['--resume', str(out)]
    assert (out / ('snapshot_iter_%d' % iteration)).is_file()
    assert not (out / 'result.json').exists()

    # The printed command, as printed, with a later stopping point.
    resumed = subprocess.run(command.split() + ['--iterations', str(iteration + 2)],
                             cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=SCRIPT_TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr
    result = read_json(str(out / 'result.json'))
    assert result['status'] == 'finished'
    assert result['iteration'] == iteration + 2


def test_a_second_signal_while_the_snapshot_is_written_is_ignored(tmp_path):
    """In process: the first SIGINT asks for a snapshot; one arriving while it is
    written changes nothing, and the run stops with that snapshot's path."""
    from chainer_vfbn import trainer_extensions

    class Trainer(object):
        out = str(tmp_path)

        class updater(object):
            iteration = 7
    written = []

    def snapshot(trainer):
        os.kill(os.getpid(), signal.SIGINT)  # handled at once, mid-snapshot
        written.append(trainer.updater.iteration)
    stop = trainer_extensions.StopOnSignal(snapshot)
    stop.initialize(Trainer)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(trainer_extensions.Interrupted) as e:
            stop(Trainer)
    finally:
        stop.finalize()
    assert written == [7]
    assert e.value.args == (7, os.path.join(str(tmp_path), 'snapshot_iter_7'))
