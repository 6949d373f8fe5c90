"""Shared fixtures: small, seeded stand-ins for the datasets (SPEC section 6).

The development machines cannot download CIFAR-10, so the tests write their own
files in its exact format: ``cifar-10-python.tar.gz`` holding ``cifar-10-batches-py/``
with five ``data_batch_N`` and one ``test_batch``, each a Python pickle with byte-string
keys, ``b'data'`` a uint8 ``(n, 3072)`` array (per row: 1024 red, 1024 green, 1024 blue
bytes, each channel row-major) and ``b'labels'`` a list of ints. The Fashion-MNIST
stand-in is four gzipped idx files (big-endian magic ``0x00000803`` for images,
``0x00000801`` for labels, then the dimensions), as Debian's
``dataset-fashion-mnist`` installs them.

``chainer_vfbn`` is imported here, before anything imports ``chainer``, so that its
NumPy-2 compatibility shim applies to every test.
"""
import contextlib
import gzip
import importlib
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import types

import numpy
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import chainer_vfbn  # noqa: E402,F401  (the shim must precede `import chainer`)
import chainer  # noqa: E402
from chainer_vfbn import methods  # noqa: E402


# ---------------------------------------------------------------------------
# The three commands, run in this process (a subprocess pays Chainer's import each
# time; the tests that need a real process, for signals and the bare commands, make one).

_MAINS = {'train.py': 'chainer_vfbn.training', 'evaluate.py': 'chainer_vfbn.evaluate_cli',
          'plot_curves.py': 'chainer_vfbn.curves'}


def run_main(name, *argv, cwd=REPO_ROOT):
    """What ``python NAME ARGV...`` run in ``cwd`` would give, as a CompletedProcess
    (exit status, stdout, stderr), from NAME's ``main(argv)`` in this process. The BLAS
    thread limit (``--threads``), the working folder and ``sys.argv[0]`` are put back."""
    import threadpoolctl
    main = importlib.import_module(_MAINS[name]).main
    argv = [str(a) for a in argv]
    out, err = io.StringIO(), io.StringIO()
    here, argv0 = os.getcwd(), sys.argv[0]
    try:
        os.chdir(cwd)
        sys.argv[0] = name
        with threadpoolctl.threadpool_limits(limits=None), \
                contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as e:  # argparse's usage errors
                code = e.code
    finally:
        os.chdir(here)
        sys.argv[0] = argv0
    return subprocess.CompletedProcess([name] + argv, code or 0, out.getvalue(), err.getvalue())


#: The tiny run of the command-line tests: depth 1 (8 layers), 40 training images (x36
#: views), 8 test images, batches of 8; an option given again after it overrides it
#: (argparse keeps the last).
TINY = ['--depth', '1', '--train-images', '40', '--test-images', '8', '--batchsize', '8']


@pytest.fixture(scope='session')
def trained(tmp_path_factory, cifar_archive):
    """``trained(*argv)`` -> ``(out folder, CompletedProcess)`` of ``train.py
    TINY... ARGV`` on the fake CIFAR-10; each distinct argv is run once per session."""
    cache = {}

    def train(*argv):
        argv = tuple(str(a) for a in argv)
        if argv not in cache:
            out = str(tmp_path_factory.mktemp('run'))
            proc = run_main('train.py', *TINY, '--data-dir', cifar_archive, '--out', out, *argv)
            cache[argv] = (out, proc)
        return cache[argv]
    return train


# ---------------------------------------------------------------------------
# Devices: a check function run on the CPU and, marked ``gpu``, on GPU 0 (skipped
# without CuPy and a GPU; ``benchmarks/device_check`` is the GPU machine's check).

def _gpu_problem():
    """Why CuPy cannot run on GPU 0 (a sentence), or None when it can."""
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return 'no CUDA device'
    except Exception as e:
        return '%s: %s' % (type(e).__name__, e)
    return None


@pytest.fixture(scope='session')
def gpu_problem():
    return _gpu_problem()


@pytest.fixture(params=['@numpy', pytest.param('@cupy:0', marks=pytest.mark.gpu)])
def device(request, gpu_problem):
    """``chainer.get_device('@numpy')``, then GPU 0 (marked ``gpu``)."""
    import chainer
    if request.param != '@numpy' and gpu_problem:
        pytest.skip('needs CuPy and a GPU (%s)' % gpu_problem)
    device = chainer.get_device(request.param)
    device.use()
    return device


CIFAR_PER_BATCH = 20
CIFAR_BATCH_NAMES = ['data_batch_%d' % i for i in range(1, 6)] + ['test_batch']


# ---------------------------------------------------------------------------
# CIFAR-10 format.

def cifar_batch_blob(data, labels, batch_label=b'testing batch'):
    """One CIFAR-10 python batch as the bytes of its pickle (protocol 2, as the
    original Python 2 files; read back with ``encoding='bytes'``)."""
    return pickle.dumps({b'batch_label': batch_label,
                         b'labels': [int(t) for t in labels],
                         b'data': data,
                         b'filenames': [b'img_%d.png' % i for i in range(len(labels))]},
                        protocol=2)


def write_cifar_archive(path, blobs):
    """Write a ``.tar.gz`` whose members are ``cifar-10-batches-py/<name>``."""
    with tarfile.open(path, 'w:gz') as tar:
        for name, blob in blobs.items():
            info = tarfile.TarInfo('cifar-10-batches-py/' + name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


@pytest.fixture(scope='session')
def cifar_batches():
    """The raw content of the fake CIFAR-10: ``{name: (data uint8 (20, 3072),
    labels int list)}`` for the five training batches and the test batch."""
    rng = numpy.random.RandomState(1234)
    return {name: (rng.randint(0, 256, size=(CIFAR_PER_BATCH, 3072)).astype(numpy.uint8),
                   [int(t) for t in rng.randint(0, 10, size=CIFAR_PER_BATCH)])
            for name in CIFAR_BATCH_NAMES}


@pytest.fixture(scope='session')
def cifar_archive(tmp_path_factory, cifar_batches):
    """Path of a complete, small ``cifar-10-python.tar.gz`` (20 images per batch)."""
    blobs = {name: cifar_batch_blob(*cifar_batches[name]) for name in CIFAR_BATCH_NAMES}
    blobs['batches.meta'] = pickle.dumps(
        {b'label_names': [b'class%d' % i for i in range(10)],
         b'num_cases_per_batch': CIFAR_PER_BATCH, b'num_vis': 3072}, protocol=2)
    blobs['readme.html'] = b'<html>fake CIFAR-10 for the tests</html>'
    folder = tmp_path_factory.mktemp('cifar_archive')
    return str(write_cifar_archive(str(folder / 'cifar-10-python.tar.gz'), blobs))


@pytest.fixture(scope='session')
def cifar_folder(tmp_path_factory, cifar_archive):
    """Path of the extracted ``cifar-10-batches-py`` folder of :func:`cifar_archive`."""
    dest = tmp_path_factory.mktemp('cifar_extracted')
    with tarfile.open(cifar_archive, 'r:gz') as tar:
        tar.extractall(str(dest), filter='data')
    return str(dest / 'cifar-10-batches-py')


@pytest.fixture(scope='session')
def tiny_images():
    """Four random uint8 images ``(4, 3, 32, 32)`` and their int32 labels."""
    rng = numpy.random.RandomState(99)
    images = rng.randint(0, 256, size=(4, 3, 32, 32)).astype(numpy.uint8)
    labels = rng.randint(0, 10, size=4).astype(numpy.int32)
    return images, labels


# ---------------------------------------------------------------------------
# Fashion-MNIST format.

def write_idx_gz(path, array, magic=None):
    """Write a uint8 array as a gzipped idx file; ``magic`` defaults to the right
    one for its number of dimensions (``0x800 + ndim``)."""
    array = numpy.ascontiguousarray(array, dtype=numpy.uint8)
    magic = 0x800 + array.ndim if magic is None else magic
    header = struct.pack('>I', magic) + struct.pack('>' + 'I' * array.ndim, *array.shape)
    with gzip.open(path, 'wb') as f:
        f.write(header + array.tobytes())
    return path


def write_fashion_mnist(folder, n_train=6, n_test=4, seed=0, image_magic=None):
    """Write the four Fashion-MNIST files into ``folder``; return their content
    as ``SimpleNamespace(path, train_x, train_y, test_x, test_y)`` (28x28 uint8)."""
    rng = numpy.random.RandomState(seed)
    out = types.SimpleNamespace(path=str(folder))
    for split, prefix, n in (('train', 'train', n_train), ('test', 't10k', n_test)):
        x = rng.randint(0, 256, size=(n, 28, 28)).astype(numpy.uint8)
        y = rng.randint(0, 10, size=n).astype(numpy.uint8)
        write_idx_gz(os.path.join(str(folder), '%s-images-idx3-ubyte.gz' % prefix), x,
                     magic=image_magic)
        write_idx_gz(os.path.join(str(folder), '%s-labels-idx1-ubyte.gz' % prefix), y)
        setattr(out, split + '_x', x)
        setattr(out, split + '_y', y)
    return out


@pytest.fixture(scope='session')
def fashion_mnist_folder(tmp_path_factory):
    """A small, valid fake Fashion-MNIST folder (6 training, 4 test images)."""
    return write_fashion_mnist(tmp_path_factory.mktemp('fashion_mnist'))


@pytest.fixture(scope='session')
def fashion_mnist_writer():
    """:func:`write_fashion_mnist`, for tests that need a variant (bad magic, ...)."""
    return write_fashion_mnist


@pytest.fixture(scope='session')
def cifar_writer():
    """``(cifar_batch_blob, write_cifar_archive)``, for tests that build broken archives."""
    return cifar_batch_blob, write_cifar_archive


# ---------------------------------------------------------------------------
# What the command-line tests (test_cli, test_resume, test_evaluate_cli) share.

SYNTH_KEYS = ('synth/loss', 'synth/cosine', 'synth/rel_error', 'synth/norm_delta',
              'synth/norm_delta_hat')
SCRIPT_TIMEOUT = 300  # seconds; a tiny run takes a few


def script(name, *argv):
    """``python NAME ARGV...`` from the repository root, in this process: the
    CompletedProcess (exit status, text stdout and stderr)."""
    return run_main(name, *argv)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def row_id(row):
    return row.method if row.alpha_gs is None else '%s-%g' % (row.method, row.alpha_gs)


def table1_row(method, alpha_gs=None):
    return next(r for r in methods.TABLE1 if r.method == method
                and (alpha_gs is None or r.alpha_gs == alpha_gs))


def assert_one_error_line(proc, prog, code=2):
    """The process failed with ``code`` and said why in exactly one stderr line."""
    assert proc.returncode == code, proc.stderr
    assert 'Traceback' not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith('%s: error: ' % prog), lines
    return lines[0]


def short_run(row, iterations=3):
    """argv of a finished Table 1 run with a trainer snapshot at its last iteration."""
    return methods.row_argv(row) + ['--iterations', iterations, '--snapshot-every', 3]


# ---------------------------------------------------------------------------
# Counting function applications (the fast paths' tests).

class Applications(chainer.FunctionHook):
    """The label of every function application, in order, those made inside backward
    passes too."""
    name = 'Applications'

    def __init__(self):
        self.labels = []

    def forward_preprocess(self, function, in_data):
        self.labels.append(function.label)

    def count(self, label):
        return self.labels.count(label)

    @property
    def total(self):
        return len(self.labels)
