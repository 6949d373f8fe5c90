"""The two-process pipeline (``train.py --pipeline``, :mod:`chainer_vfbn.pipeline`),
run for real with ``mpiexec -n 2`` on the tiny generated CIFAR-10.

* At lag 0 it is the one-process decoupled run, bit for bit: the same weights and the
  same log, for every synthesizer (the oracle is the one-process run).
* At lag > 0 it trains with finite losses, differs from lag 0, logs its lag, and a
  run resumed from a snapshot that holds pending batches ends exactly as the
  uninterrupted one.
* Launched wrongly, it says so in one line.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import chainer_vfbn  # noqa: F401  (the NumPy-2 shim precedes `import chainer`)
import numpy
import pytest

from conftest import REPO_ROOT, run_main

MPIEXEC = os.path.join(os.path.dirname(sys.executable), 'mpiexec')
pytestmark = pytest.mark.skipif(not os.path.exists(MPIEXEC),
                                reason='no mpiexec beside Python (./setup.sh installs mpich)')
TINY = ['--depth', '1', '--train-images', '40', '--test-images', '8', '--batchsize', '8',
        '--eval-every', '2', '--snapshot-every', '2', '--eval-views', '1', '--threads', '1']


def mpiexec(*argv, n=2):
    """``mpiexec -n N python train.py ARGV...`` (a stuck rank gives up after 60 s)."""
    return subprocess.run([MPIEXEC, '-n', str(n), sys.executable,
                           os.path.join(REPO_ROOT, 'train.py'), '--pipeline',
                           '--pipeline-timeout', '60'] + [str(a) for a in argv],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def weights(folder):
    with numpy.load(os.path.join(str(folder), 'model.npz')) as f:
        return {k: f[k] for k in f.files}


def log(folder):
    with open(os.path.join(str(folder), 'log')) as f:
        return json.load(f)


def assert_same_weights(a, b):
    assert sorted(a) == sorted(b)
    for name in a:
        numpy.testing.assert_array_equal(a[name], b[name], err_msg=name)


#: What a --pipeline run's trainer snapshot holds beyond the one-process run's: the
#: trigger of the pull of the upper half and the batches still waiting (none at lag 0).
PIPELINE_ONLY = {'extension_triggers/PullUpper/previous_epoch_detail',
                 'extension_triggers/PullUpper/previous_iteration', 'updater/pending'}


@pytest.mark.parametrize('synth', ['vfbn', 'jaderberg-linear', 'jaderberg-resnet'])
def test_lag_0_is_the_one_process_run_bit_for_bit(tmp_path, cifar_archive, synth):
    """Every array of the final trainer snapshot (every network, the synthesizer
    included; every optimizer's state, the synthesizer's Adam included; the
    iterator, the scale s, the triggers) and every log entry, the wall times aside."""
    argv = TINY + ['--data-dir', cifar_archive, '--synth', synth, '--iterations', 4]
    one = run_main('train.py', *argv, '--out', tmp_path / 'one')
    assert one.returncode == 0, one.stderr
    two = mpiexec(*argv, '--out', tmp_path / 'two')
    assert two.returncode == 0, two.stderr
    assert_same_weights(weights(tmp_path / 'one'), weights(tmp_path / 'two'))
    a, b = (dict(numpy.load(str(tmp_path / run / 'snapshot_iter_4'))) for run in ('one', 'two'))
    assert set(b) - set(a) == PIPELINE_ONLY and b['updater/pending'] == 0
    for prefix in ('updater/model:synth/', 'updater/optimizer:synth/', 'updater/model:upper/',
                   'updater/optimizer:upper/', 'updater/model:lower/'):
        assert any(k.startswith(prefix) for k in a), prefix
    logs = [json.loads(str(s.pop('extensions/LogReport/_log'))) for s in (a, b)]
    assert a.pop('_snapshot_elapsed_time') > 0 and b.pop('_snapshot_elapsed_time') > 0
    assert_same_weights(a, {k: v for k, v in b.items() if k not in PIPELINE_ONLY})
    logs.append(log(tmp_path / 'one'))
    logs.append(log(tmp_path / 'two'))
    for one_entries, two_entries in (logs[0:2], logs[2:4]):
        assert len(one_entries) == 2
        for x, y in zip(one_entries, two_entries, strict=True):
            assert y.pop('pipeline/lag') == 0
            x.pop('elapsed_time'), y.pop('elapsed_time')
            assert x == y
    with open(tmp_path / 'two' / 'args.json') as f:
        assert json.load(f)['pipeline'] is True


def test_lags_1_and_2_train_log_their_lag_and_resume_exactly(tmp_path, cifar_archive):
    argv = TINY + ['--data-dir', cifar_archive, '--synth', 'vfbn', '--lag', 2]
    full = mpiexec(*argv, '--iterations', 6, '--out', tmp_path / 'full')
    assert full.returncode == 0, full.stderr
    entries = log(tmp_path / 'full')
    assert [e['pipeline/lag'] for e in entries] == [2, 2, 2]
    # The first two batches' true gradients arrive only at steps 3 and 4.
    assert 'synth/loss' not in entries[0] and 'main/loss' not in entries[0]
    assert all(numpy.isfinite(e['main/loss']) and numpy.isfinite(e['synth/loss'])
               for e in entries[1:])

    lag0 = mpiexec(*TINY, '--data-dir', cifar_archive, '--synth', 'vfbn', '--iterations', 6,
                   '--out', tmp_path / 'lag0')
    lag1 = mpiexec(*TINY, '--data-dir', cifar_archive, '--synth', 'vfbn', '--iterations', 6,
                   '--lag', 1, '--out', tmp_path / 'lag1')
    assert lag0.returncode == 0 and lag1.returncode == 0, lag0.stderr + lag1.stderr
    assert all(numpy.isfinite(e['main/loss']) and e['pipeline/lag'] == 1
               for e in log(tmp_path / 'lag1'))
    runs = [weights(tmp_path / name) for name in ('lag0', 'lag1', 'full')]
    for a, b in ((runs[0], runs[1]), (runs[1], runs[2])):
        assert any(not numpy.array_equal(a[k], b[k]) for k in a)

    # Stopped at 4 (two batches pending in the snapshot), resumed to 6; a copy of
    # the snapshot in the older format (pending batches with only their loss and
    # accuracy) resumes the same.
    part = mpiexec(*argv, '--iterations', 4, '--out', tmp_path / 'part')
    assert part.returncode == 0, part.stderr
    shutil.copytree(tmp_path / 'part', tmp_path / 'old')
    to_old_snapshot_format(tmp_path / 'old' / 'snapshot_iter_4')
    for name in ('part', 'old'):
        resumed = mpiexec('--resume', tmp_path / name, '--iterations', 6)
        assert resumed.returncode == 0, resumed.stderr
        assert_same_weights(weights(tmp_path / 'full'), weights(tmp_path / name))
        for a, b in zip(entries, log(tmp_path / name), strict=True):
            assert dict(a, elapsed_time=0) == dict(b, elapsed_time=0)


def to_old_snapshot_format(path):
    """Rewrite rank 0's pending batches as snapshots written at b00b095 and before held them."""
    with numpy.load(str(path)) as f:
        arrays = {k: f[k] for k in f.files}
    pending = [k[:-len('report_keys')] for k in arrays if k.endswith('/report_keys')]
    assert len(pending) == 2
    for prefix in pending:
        del arrays[prefix + 'report_keys']
        arrays[prefix + 'loss'] = arrays.pop(prefix + 'report/main/loss')
        arrays[prefix + 'accuracy'] = arrays.pop(prefix + 'report/main/accuracy')
        assert not any(k.startswith(prefix + 'report/') for k in arrays)
    with open(str(path), 'wb') as f:
        numpy.savez(f, **arrays)


def test_evaluate_reads_the_assembled_network(tmp_path, cifar_archive):
    two = mpiexec(*TINY, '--data-dir', cifar_archive, '--synth', 'vfbn', '--iterations', 2,
                  '--out', tmp_path / 'two')
    assert two.returncode == 0, two.stderr
    with open(tmp_path / 'two' / 'result.json') as f:
        result = json.load(f)
    proc = run_main('evaluate.py', tmp_path / 'two', '--json', '-')
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)['test_error'] == result['test_error']


@pytest.mark.parametrize('synth', ['vfbn', 'jaderberg-linear'])
def test_three_modules_at_lag_0_are_the_sequential_schedule_bit_for_bit(tmp_path,
                                                                       cifar_archive, synth):
    """The oracle: the three-module schedule written out in one process, with momentum
    SGD and weight decay by hand (Chainer's CPU arithmetic, operation for operation)
    and Chainer's Adam, from the initial weights the ranks build (rank 0's networks,
    which it sends up; rank 1's synthesizer, made after the networks). --depth 1
    --splits 1 2: module 0 is conv1 and unit 0, module 1 unit 1 (a synthesizer after
    it), module 2 unit 2 and fc. The scale s at a cut is 1 until a true delta there
    is not all zeros (docs/PIPELINE.md); Jaderberg's Linear depends on it."""
    import chainer
    import chainer.functions as F
    import threadpoolctl
    from chainer_vfbn import arguments, data, methods, model, trainer_extensions, training

    argv = TINY + ['--data-dir', cifar_archive, '--synth', synth, '--splits', 1, 2,
                   '--iterations', 3, '--eval-every', 3, '--snapshot-every', 3]
    run = mpiexec(*argv, '--out', tmp_path / 'run', n=3)
    assert run.returncode == 0, run.stderr

    args = arguments.parse_args([str(a) for a in argv] + ['--pipeline', '--out',
                                                           str(tmp_path / 'o')])
    device = chainer.get_device('@numpy')
    with threadpoolctl.threadpool_limits(limits=1):
        training.seed_everything(0, device)          # rank 1
        methods.build_networks('vfbn', depth=1, split=1)
        synth1 = methods.make_synthesizer(synth, model.channels_at(1, 2))
        training.seed_everything(0, device)          # rank 0
        train_set, _ = training.load_data(args)
        batches = data.BatchIterator(train_set, 8, repeat=True,
                                     order_sampler=trainer_extensions.SeededShuffle(0))
        nets = methods.build_networks(synth, depth=1, split=1)
        lower, upper, synth0 = (nets.trained[k] for k in ('lower', 'upper', 'synth'))
        velocity = {}

        def momentum_sgd(*links):   # each module's own update: its parameters only
            for p in (p for link in links for p in link.params()):
                g = p.grad + 1e-4 * p.array
                v = velocity.setdefault(id(p), numpy.zeros_like(p.array))
                v *= 0.9
                v -= 0.1 * g
                p.array += v

        adams = []
        for link in (synth0, synth1):
            adams.append(chainer.optimizers.Adam(alpha=1e-3))
            adams[-1].setup(link)
        mean_square = [None, None]  # of the true delta at each cut

        def s(k):
            m = mean_square[k]
            return 1.0 if m is None or m == 0 else numpy.sqrt(m)

        for _ in range(3):
            x, t = batches.next()
            h0 = lower(x)                                    # rank 0
            out0 = synth0(chainer.Variable(h0.array), t)
            lower.cleargrads()
            h0.grad = synth0.to_gradient(out0.array, s(0))
            h0.backward()
            momentum_sgd(lower)
            h_in = chainer.Variable(h0.array)                # rank 1
            h1 = upper.units[0](h_in)
            out1 = synth1(chainer.Variable(h1.array), t)
            upper.cleargrads()
            h1.grad = synth1.to_gradient(out1.array, s(1))
            h1.backward()
            momentum_sgd(upper.units[0])
            h_top = chainer.Variable(h1.array)               # rank 2
            logits = upper.fc(F.average(upper.units[1](h_top), axis=(2, 3)))
            upper.cleargrads()
            F.softmax_cross_entropy(logits, t).backward()
            momentum_sgd(upper.units[1], upper.fc)
            for k, link, out, delta in ((0, synth0, out0, h_in.grad),
                                        (1, synth1, out1, h_top.grad)):
                m = (delta * delta).mean()                   # eq. 3 at each cut
                mean_square[k] = m if mean_square[k] is None else \
                    0.99 * mean_square[k] + 0.01 * m
                e = link.loss(out, delta, s(k))
                link.cleargrads()
                e.backward()
                adams[k].update()
    chainer.serializers.save_npz(str(tmp_path / 'oracle.npz'), model.Net(lower, upper))
    oracle = dict(numpy.load(str(tmp_path / 'oracle.npz')))
    assert_same_weights(oracle, weights(tmp_path / 'run'))


@pytest.mark.parametrize('synth', ['vfbn', 'jaderberg-linear'])
def test_three_modules_train_log_every_synthesizer_and_resume_exactly(tmp_path, cifar_archive,
                                                                    synth):
    """--depth 1 has units 0, 1, 2: modules [conv1, unit 0], [unit 1], [unit 2, fc],
    two synthesizers (after units 0 and 1). At lag 1 a snapshot holds pending batches
    on rank 0 and on the middle rank: stopped at 4 and resumed to 6, the run ends with
    the weights and the log of the uninterrupted run (with the fidelity reported on
    every other iteration, on the same ones)."""
    argv = TINY + ['--data-dir', cifar_archive, '--synth', synth, '--splits', 1, 2,
                   '--lag', 1, '--diag-interval', 2]
    full = mpiexec(*argv, '--iterations', 6, '--out', tmp_path / 'full', n=3)
    assert full.returncode == 0, full.stderr
    entries = log(tmp_path / 'full')
    for e in entries[1:]:
        for key in ('main/loss', 'synth/loss', 'synth1/loss', 'synth1/cosine'):
            assert numpy.isfinite(e[key]), key
    assert 'in 3 modules, before unit indices 1, 2' in full.stdout
    with open(tmp_path / 'full' / 'result.json') as f:
        result = json.load(f)
    proc = run_main('evaluate.py', tmp_path / 'full', '--json', '-')
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)['test_error'] == result['test_error']

    part = mpiexec(*argv, '--iterations', 4, '--out', tmp_path / 'part', n=3)
    assert part.returncode == 0, part.stderr
    resumed = mpiexec('--resume', tmp_path / 'part', '--iterations', 6, n=3)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(weights(tmp_path / 'full'), weights(tmp_path / 'part'))
    for a, b in zip(entries, log(tmp_path / 'part'), strict=True):
        assert sorted(a) == sorted(b)
        for key in set(a) - {'elapsed_time'}:
            assert a[key] == b[key], key


def test_balance_records_the_cuts_it_chose_and_a_resumed_run_keeps_them(tmp_path,
                                                                       cifar_archive):
    argv = TINY + ['--data-dir', cifar_archive, '--synth', 'vfbn', '--balance']
    first = mpiexec(*argv, '--iterations', 2, '--out', tmp_path / 'b', n=3)
    assert first.returncode == 0, first.stderr
    chosen = re.search(r'# --balance: cuts (\d+) (\d+), modules ', first.stdout)
    assert chosen, first.stdout
    with open(tmp_path / 'b' / 'args.json') as f:
        recorded = json.load(f)
    cuts = [int(c) for c in chosen.groups()]
    assert recorded['splits'] == cuts and recorded['split'] == cuts[0]
    assert 0 <= cuts[0] < cuts[1] <= 3
    assert 'at lag 0 eq. 3 waits' in first.stdout  # the model's limit, said at lag 0

    resumed = mpiexec('--resume', tmp_path / 'b', '--iterations', 4, n=3)
    assert resumed.returncode == 0, resumed.stderr
    assert 'timing the stages' not in resumed.stdout
    with open(tmp_path / 'b' / 'args.json') as f:
        assert json.load(f)['splits'] == cuts


@pytest.mark.parametrize('argv, says', [
    (['--synth', 'vfbn', '--pipeline'], 'mpiexec -n 2'),
    (['--synth', 'vfbn', '--lag', '1'], 'needs --pipeline'),
    (['--method', 'bp', '--pipeline'], 'give --synth'),
    (['--synth', 'vfbn', '--pipeline', '--splits', '1', '2'], 'mpiexec -n 3'),
    (['--synth', 'vfbn', '--splits', '1', '2'], 'give --split'),
    (['--synth', 'vfbn', '--pipeline', '--splits', '2', '1'], 'increasing unit boundaries'),
    (['--synth', 'vfbn', '--pipeline', '--splits', '1', '4'], 'in [0, 3] for --depth 1'),
    (['--synth', 'vfbn', '--pipeline', '--split', '2', '--splits', '1', '2'], 'disagree'),
    (['--synth', 'vfbn', '--balance'], 'give --pipeline'),
    (['--synth', 'vfbn', '--pipeline', '--balance', '--split', '2'], 'leave out --split'),
    (['--synth', 'vfbn', '--pipeline', '--balance'], 'K >= 2'),
])
def test_a_wrong_launch_is_one_line(tmp_path, cifar_archive, argv, says):
    proc = run_main('train.py', *TINY, '--data-dir', cifar_archive, '--out', tmp_path / 'o',
                    *argv)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('train.py: error: ') and says in lines[0]
    assert not (tmp_path / 'o').exists()


def interrupt_a_long_run(out, cifar_archive, act, *options, n=2):
    """Start a pipeline run of ``n`` processes and many iterations into ``out``; once
    its log exists (the ranks are in their loop), call ``act()``; return (exit
    status, stderr)."""
    argv = [MPIEXEC, '-n', str(n), sys.executable, os.path.join(REPO_ROOT, 'train.py'),
            '--pipeline', *options, *TINY, '--eval-every', '1', '--data-dir', cifar_archive,
            '--synth', 'vfbn', '--iterations', '100000', '--out', str(out)]
    proc = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / 'log').exists():
            assert proc.poll() is None and time.time() < deadline, 'no log'
            time.sleep(0.1)
        act(proc)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, stderr


@pytest.mark.parametrize('n, splits', [(2, []), (3, ['--splits', '1', '2'])])
def test_ctrl_c_on_the_launcher_snapshots_and_the_printed_command_resumes(tmp_path,
                                                                          cifar_archive,
                                                                          n, splits):
    """SIGINT to mpiexec reaches every rank: rank 0 saves a snapshot (with the other
    ranks' modules, synthesizers and pending batches) and prints the mpiexec command
    that continues."""
    out = tmp_path / 'out'
    code, stderr = interrupt_a_long_run(out, cifar_archive,
                                        lambda proc: proc.send_signal(signal.SIGINT),
                                        '--lag', '1', *splits, n=n)
    assert code == 130, stderr
    m = re.search(r'interrupted at iteration (\d+); a snapshot was saved: continue with: '
                  r'(.*)$', stderr.strip())
    assert m, stderr
    iteration, command = int(m.group(1)), m.group(2).split()
    assert command[:3] == [MPIEXEC, '-n', str(n)] and command[-2:] == ['--resume', str(out)]
    resumed = subprocess.run(command + ['--iterations', str(iteration + 2)], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    with open(out / 'result.json') as f:
        assert json.load(f)['iteration'] == iteration + 2


@pytest.mark.skipif(not os.path.isdir('/proc/self'), reason='finds rank 1 through /proc')
def test_a_silent_rank_ends_the_run_with_a_line_naming_it(tmp_path, cifar_archive):
    """Rank 1 frozen (SIGSTOP): rank 0 gives up after --pipeline-timeout, says which
    rank did not answer, and the whole job ends (no hang)."""
    def freeze_rank_1(proc):
        rank1 = [pid for pid in os.listdir('/proc') if pid.isdigit() and
                 b'PMI_RANK=1' in _environ(pid) and str(out).encode() in _cmdline(pid)]
        assert len(rank1) == 1, rank1
        os.kill(int(rank1[0]), signal.SIGSTOP)

    out = tmp_path / 'out'
    code, stderr = interrupt_a_long_run(out, cifar_archive, freeze_rank_1,
                                        '--pipeline-timeout', '3')
    assert code != 0 and stderr.strip(), (code, stderr)
    first = stderr.strip().splitlines()[0]
    assert first == ('train.py: error: no answer from rank 1 (the upper half) in 3 s; it '
                     'has stopped or is stuck (its output above says why)'), stderr


RANK_0_GOES_QUIET = """
import sys, time
import chainer_vfbn
from chainer_vfbn import pipeline, transport
comm = transport.connect(2)
asked = sys.argv[1] == 'after-get'
if comm.rank == 0:
    comm.mpi_comm.Barrier()  # rank 1 has built its module
    if asked:  # as before an evaluation: take the other rank's state, then work alone
        comm.mpi_comm.send(('get',), dest=1, tag=transport.TAG_COMMAND)
        comm.mpi_comm.recv(source=1, tag=transport.TAG_STATE)
    time.sleep(3)
    transport.stop(comm)
else:
    server = pipeline.stage_server(comm, 'vfbn', depth=1, splits=None, alpha_gs=1e-3,
                                   timeout=1)
    comm.mpi_comm.Barrier()
    try:
        server.serve()
        print('served to the end')
    except transport.PipelineError as e:
        print('gave up:', e)
"""


@pytest.mark.parametrize('when, says', [('after-get', 'served to the end'),
                                        ('before-any-get', 'gave up: no answer from rank 0')])
def test_a_rank_waits_without_limit_only_while_rank_0_works_alone(when, says):
    """Rank 0 quiet for 3 s, the others' timeout 1 s: after a ``get`` (rank 0 then
    evaluates or writes a snapshot, which can take hours) they wait; at any other
    time they give up."""
    ran = subprocess.run([MPIEXEC, '-n', '2', sys.executable, '-c', RANK_0_GOES_QUIET, when],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert says in ran.stdout, (ran.stdout, ran.stderr)


def _environ(pid):
    try:
        with open('/proc/%s/environ' % pid, 'rb') as f:
            return f.read().split(b'\0')
    except OSError:
        return []


def _cmdline(pid):
    try:
        with open('/proc/%s/cmdline' % pid, 'rb') as f:
            return f.read()
    except OSError:
        return b''
