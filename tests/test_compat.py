"""Tests of :mod:`chainer_vfbn._compat`, the shim that runs Chainer 7.8.1 on today's
Python and NumPy (``docs/CHAINER_TODAY.md``: ``numpy.sctypes``, ``numpy.float``,
``numpy.distutils.system_info`` and ``pkg_resources``).

What the shim changes happens once per interpreter, before ``import chainer``, so
every check of it runs a fresh interpreter (:func:`run_fresh`); the child prints one
JSON object and the oracles live here, in the parent. The last test checks, in this
process, the double backprop that VFBN's synthetic gradient needs (SPEC section 3).
"""
import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap

import numpy
import pytest

import chainer_vfbn  # noqa: F401  (before chainer)
import chainer
import chainer.functions as F
from chainer import gradient_check

pytestmark = pytest.mark.numpy1  # CI runs this file on NumPy 1.26 too

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Makes `import <name>` (and its submodules) fail in the child, as on a stack where
# the module is absent (pkg_resources: setuptools >= 82; numpy.distutils: NumPy 2 on
# Python >= 3.12). Prepended to a child's code.
BLOCKER = '''
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def __init__(self, name):
        self.name = name
    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.name or fullname.startswith(self.name + '.'):
            raise ImportError('blocked by the test: ' + fullname)
        return None
sys.meta_path.insert(0, _Block(%r))
'''


def run_fresh(code, block=None):
    """Run ``code`` in a new interpreter (optionally with one module made
    unimportable first) and return the JSON object it prints last."""
    source = (BLOCKER % block if block else '') + textwrap.dedent(code)
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
    proc = subprocess.run([sys.executable, '-c', source], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, 'child failed:\n%s\n%s' % (proc.stdout, proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_fresh_import_restores_numpy_names_and_chainer_works():
    """(a) After ``import chainer_vfbn``: the two NumPy names exist with NumPy 1.x's
    meaning, and the Chainer code that reads them runs and gives the right numbers."""
    out = run_fresh('''
        import json
        import chainer_vfbn
        from chainer_vfbn import _compat
        import numpy
        import chainer, chainer.testing, chainer.gradient_check
        import chainer.functions as F
        from chainer.functions.array import as_strided as as_strided_module

        first = list(_compat.applied)
        sctypes_before = numpy.sctypes
        second = _compat.install()

        # F.resize_images (numpy.float): a 4x4 ramp 10*row + col, bilinear, to 7x7.
        ramp = numpy.add.outer(10.0 * numpy.arange(4), numpy.arange(4)).astype(numpy.float32)
        resized = F.resize_images(ramp[None, None], (7, 7)).array[0, 0]

        # F.as_strided forward and backward (numpy.sctypes): y[i, j] = x[i + j].
        x = chainer.Variable(numpy.arange(5, dtype=numpy.float32))
        y = F.as_strided(x, (3, 3), (1, 1), 0)
        y.grad = numpy.arange(1, 10, dtype=numpy.float32).reshape(3, 3)
        y.backward()

        print(json.dumps({
            'has_sctypes': hasattr(numpy, 'sctypes'),
            'float_is_builtin': getattr(numpy, 'float', None) is float,
            'sctypes_float': [numpy.dtype(t).name for t in numpy.sctypes['float']],
            'index_dtype': {str(k): numpy.dtype(v).name
                            for k, v in as_strided_module.index_dtype.items()},
            'first': first, 'second': second,
            'sctypes_same_object': numpy.sctypes is sctypes_before,
            'resized': resized.tolist(),
            'strided': y.array.tolist(), 'x_grad': x.grad.tolist(),
            'testing_has_with_requires': hasattr(chainer.testing, 'with_requires'),
            'has_check_backward': hasattr(chainer.gradient_check, 'check_backward'),
        }))
    ''')
    assert out['has_sctypes'] and out['float_is_builtin']
    # What NumPy 1.x gave: the signed ints by size, and float16/32/64 among the floats.
    assert out['index_dtype'] == {'1': 'int8', '2': 'int16', '4': 'int32', '8': 'int64'}
    assert {'float16', 'float32', 'float64'} <= set(out['sctypes_float'])
    # Idempotent: the second install repeats the list and replaces nothing.
    assert out['second'] == out['first']
    assert len(set(out['first'])) == len(out['first'])
    assert out['sctypes_same_object']
    assert out['testing_has_with_requires'] and out['has_check_backward']

    # Bilinear with aligned corners is exact on a ramp: out[i, j] = (10 i + j) * 3/6.
    steps = numpy.arange(7) * 3.0 / 6.0
    numpy.testing.assert_allclose(out['resized'], numpy.add.outer(10 * steps, steps),
                                  rtol=0, atol=1e-5)
    numpy.testing.assert_array_equal(out['strided'], [[0, 1, 2], [1, 2, 3], [2, 3, 4]])
    # x[k] receives the upstream gradient of every (i, j) with i + j == k.
    gy = numpy.arange(1, 10).reshape(3, 3)
    expected = [sum(gy[i, j] for i in range(3) for j in range(3) if i + j == k)
                for k in range(5)]
    numpy.testing.assert_array_equal(out['x_grad'], expected)


def test_install_leaves_working_names_alone():
    """(b) Where NumPy still has the two names, install() keeps the existing objects
    and does not list them; it repairs only modules that really fail to import."""
    out = run_fresh('''
        import importlib, json, warnings
        import numpy
        own_sctypes = {'int': [numpy.int8, numpy.int16, numpy.int32, numpy.int64],
                       'uint': [numpy.uint8], 'float': [numpy.float32, numpy.float64],
                       'complex': [numpy.complex128], 'others': [bool]}
        numpy.sctypes = own_sctypes
        numpy.float = float

        def importable(name):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter('ignore')
                    importlib.import_module(name)
                return True
            except Exception:
                return False
        broken = [m for m in ('numpy.distutils.system_info', 'pkg_resources')
                  if not importable(m)]

        import chainer_vfbn
        from chainer_vfbn import _compat
        first = list(_compat.applied)
        print(json.dumps({'broken': broken, 'first': first,
                          'second': _compat.install(), 'third': _compat.install(),
                          'kept': numpy.sctypes is own_sctypes}))
    ''')
    assert 'numpy.sctypes' not in out['first'] and 'numpy.float' not in out['first']
    assert out['first'] == out['broken']
    assert out['second'] == out['first'] and out['third'] == out['first']
    assert out['kept']


def test_pkg_resources_stub_when_it_is_missing():
    """(c) Without ``pkg_resources`` (setuptools >= 82) Chainer, ``chainer.testing``
    and its ``with_requires`` still work through the stub."""
    numpy_version = importlib.metadata.version('numpy')
    out = run_fresh('''
        import json, unittest
        try:
            import pkg_resources
            blocked = False
        except ImportError:
            blocked = True
        import chainer_vfbn
        from chainer_vfbn import _compat
        import chainer, chainer.testing, chainer.gradient_check
        import chainer.functions as F
        import numpy
        import pkg_resources

        found = [d.version for d in pkg_resources.require('numpy')]
        found_spec = [d.version for d in pkg_resources.require('numpy>=1.0')]
        try:
            pkg_resources.require('no-such-dist-xyz')
            missing = 'no error'
        except pkg_resources.DistributionNotFound:
            missing = 'DistributionNotFound'

        class T(unittest.TestCase):
            @chainer.testing.with_requires('numpy')
            def test_present(self):
                pass

            @chainer.testing.with_requires('no-such-dist-xyz')
            def test_absent(self):
                pass
        result = unittest.TestResult()
        unittest.defaultTestLoader.loadTestsFromTestCase(T).run(result)

        print(json.dumps({
            'blocked': blocked, 'applied': _compat.applied,
            'is_stub': getattr(pkg_resources, '__chainer_vfbn_stub__', False),
            'found': found, 'found_spec': found_spec, 'missing': missing,
            'skipped': [t.id().rsplit('.', 1)[-1] for t, _ in result.skipped],
            'ran': result.testsRun,
            'relu': F.relu(numpy.array([-1.0, 2.0])).array.tolist(),
        }))
    ''', block='pkg_resources')
    assert out['blocked'], 'the blocker did not make pkg_resources unimportable'
    assert 'pkg_resources' in out['applied'] and out['is_stub']
    assert out['found'] == [numpy_version] and out['found_spec'] == [numpy_version]
    assert out['missing'] == 'DistributionNotFound'
    assert out['ran'] == 2 and out['skipped'] == ['test_absent']
    assert out['relu'] == [0.0, 2.0]


def test_system_info_stub_when_numpy_distutils_is_missing():
    """(c) Without ``numpy.distutils`` (NumPy 2 on Python >= 3.12) Chainer imports,
    and the macOS-only check in ``chainer._environment_check`` that calls
    ``numpy.distutils.system_info.get_info`` runs on the stub."""
    out = run_fresh('''
        import json, sys
        try:
            import numpy.distutils.system_info
            blocked = False
        except ImportError:
            blocked = True
        import chainer_vfbn
        from chainer_vfbn import _compat
        import chainer
        import chainer._environment_check as environment_check
        stub = sys.modules['numpy.distutils.system_info']

        sys.platform = 'darwin'  # the only platform where Chainer calls get_info
        try:
            environment_check._check_osx_numpy_backend()
            osx_check = 'ok'
        except Exception as e:
            osx_check = '%s: %s' % (type(e).__name__, e)
        print(json.dumps({'blocked': blocked, 'applied': _compat.applied,
                          'is_stub': getattr(sys.modules['numpy.distutils'],
                                             '__chainer_vfbn_stub__', False),
                          'get_info': stub.get_info('blas_opt'),
                          'osx_check': osx_check}))
    ''', block='numpy.distutils')
    assert out['blocked'], 'the blocker did not make numpy.distutils unimportable'
    assert 'numpy.distutils.system_info' in out['applied'] and out['is_stub']
    assert out['get_info'] == {}
    assert out['osx_check'] == 'ok'


def test_double_backprop_through_conv_bn_relu_linear_softmax_cross_entropy():
    """(d) Second-order gradients (VFBN trains v_f through d CE / d h, SPEC section 3)
    agree with finite differences of the first-order ones, in float64."""
    rng = numpy.random.RandomState(0)
    labels = numpy.array([1, 0, 2], dtype=numpy.int32)

    def loss(x, w, gamma, beta, fc_w, fc_b):
        h = F.convolution_2d(x, w, pad=1)                      # (3, 2, 4, 4)
        h = F.relu(F.batch_normalization(h, gamma, beta))
        h = F.average_pooling_2d(h, 2)                         # (3, 2, 2, 2)
        y = F.linear(h, fc_w, fc_b)                            # (3, 3)
        return F.softmax_cross_entropy(y, labels, enable_double_backprop=True)

    inputs = [rng.randn(3, 2, 4, 4), rng.randn(2, 2, 3, 3) * 0.5,
              1 + 0.1 * rng.randn(2), 0.1 * rng.randn(2),
              rng.randn(3, 8) * 0.5, 0.1 * rng.randn(3)]
    grad_grads = [rng.randn(*a.shape) for a in inputs]
    gradient_check.check_double_backward(
        loss, inputs, numpy.array(1.0), grad_grads, eps=1e-4, atol=1e-5, rtol=1e-4,
        dtype=numpy.float64, detect_nondifferentiable=True)


def test_softmax_cross_entropy_refuses_double_backprop_unless_enabled():
    """Why the check above passes ``enable_double_backprop=True``: without it Chainer
    refuses the second backward through softmax cross-entropy (VFBN's v_f loss)."""
    rng = numpy.random.RandomState(1)
    labels = numpy.array([1, 0], dtype=numpy.int32)
    y = chainer.Variable(rng.randn(2, 3))
    gy, = chainer.grad([F.softmax_cross_entropy(y, labels)], [y],
                       enable_double_backprop=True)
    with pytest.raises(RuntimeError, match='enable_double_backprop'):
        F.sum(gy * gy).backward()
