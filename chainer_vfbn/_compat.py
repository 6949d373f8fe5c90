"""Make Chainer 7.8.1 import and run on today's Python and NumPy.

Chainer's last release (7.8.1, 2020) predates NumPy 2, Python 3.12 and the removal
of ``pkg_resources`` from setuptools. Four things break (``docs/CHAINER_TODAY.md``):

1. ``numpy.sctypes`` (gone in NumPy 2.0) is read by ``functions/array/as_strided.py``.
2. ``numpy.float`` (gone in NumPy 1.24) is used by ``functions/array/resize_images.py``.
3. ``chainer/_environment_check.py`` imports ``numpy.distutils.system_info``, absent
   in NumPy 2 and on Python >= 3.12 (it is only *called* on macOS).
4. ``pkg_resources`` is imported by ``_environment_check.py`` and ``testing/helper.py``.

:func:`install` repairs each one only where it is broken: it restores the two NumPy
names with the values NumPy itself used to give them, and registers minimal stand-in
modules for ``numpy.distutils.system_info`` and ``pkg_resources`` only when the real
ones cannot be imported. It must run before the first ``import chainer``; importing
:mod:`chainer_vfbn` does that, so the package, the scripts and the tests all get it.
It returns the list of repairs it made (empty on a stack where nothing is broken).
"""
import importlib
import importlib.metadata
import sys
import types
import warnings

import numpy

_SCTYPES = {
    'int': [numpy.int8, numpy.int16, numpy.int32, numpy.int64],
    'uint': [numpy.uint8, numpy.uint16, numpy.uint32, numpy.uint64],
    'float': [numpy.float16, numpy.float32, numpy.float64, numpy.longdouble],
    'complex': [numpy.complex64, numpy.complex128, numpy.clongdouble],
    'others': [bool, object, bytes, str, numpy.void],
}

applied = []


def _has_attr(module, name):
    try:
        getattr(module, name)
        return True
    except AttributeError:
        return False


def _importable(name):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            importlib.import_module(name)
        return True
    except Exception:  # ImportError, or numpy.distutils failing on new setuptools
        return False


def _system_info_stub():
    """``numpy.distutils.system_info`` reduced to what Chainer calls (macOS only)."""
    distutils = types.ModuleType('numpy.distutils')
    system_info = types.ModuleType('numpy.distutils.system_info')
    system_info.get_info = lambda name, notfound_action=0: {}
    distutils.system_info = system_info
    distutils.__chainer_vfbn_stub__ = True
    return {'numpy.distutils': distutils,
            'numpy.distutils.system_info': system_info}


def _pkg_resources_stub():
    """``pkg_resources`` reduced to the calls Chainer makes: ``require`` and
    ``WorkingSet().require`` (is a distribution installed?) and
    ``get_distribution(name).version``. Version specifiers are not checked:
    Chainer only uses them to print advisory warnings."""
    mod = types.ModuleType('pkg_resources')

    class ResolutionError(Exception):
        pass

    class DistributionNotFound(ResolutionError):
        pass

    class VersionConflict(ResolutionError):
        pass

    def _name(requirement):
        for sep in '<>=!~;[ ':
            requirement = requirement.split(sep)[0]
        return requirement.strip()

    def get_distribution(requirement):
        try:
            dist = importlib.metadata.distribution(_name(requirement))
        except importlib.metadata.PackageNotFoundError:
            raise DistributionNotFound(requirement)
        return types.SimpleNamespace(version=dist.version,
                                     project_name=dist.metadata['Name'])

    def require(*requirements):
        return [get_distribution(r) for r in requirements]

    class WorkingSet(object):
        def require(self, *requirements):
            return require(*requirements)

    mod.ResolutionError = ResolutionError
    mod.DistributionNotFound = DistributionNotFound
    mod.VersionConflict = VersionConflict
    mod.get_distribution = get_distribution
    mod.require = require
    mod.WorkingSet = WorkingSet
    mod.__chainer_vfbn_stub__ = True
    return {'pkg_resources': mod}


def install():
    """Apply every repair this interpreter needs; idempotent. Returns their names."""
    if 'chainer' in sys.modules and not applied:
        # Too late to help an import that already happened; say so plainly.
        warnings.warn('chainer was imported before chainer_vfbn._compat; import '
                      'chainer_vfbn first so that its NumPy/Python fixes apply')
    if not _has_attr(numpy, 'sctypes'):
        numpy.sctypes = _SCTYPES
        applied.append('numpy.sctypes')
    if not _has_attr(numpy, 'float'):
        numpy.float = float  # what the alias meant until NumPy 1.24
        applied.append('numpy.float')
    if not _importable('numpy.distutils.system_info'):
        stubs = _system_info_stub()
        sys.modules.update(stubs)
        numpy.distutils = stubs['numpy.distutils']  # NumPy's __getattr__ would refuse
        applied.append('numpy.distutils.system_info')
    if not _importable('pkg_resources'):
        sys.modules.update(_pkg_resources_stub())
        applied.append('pkg_resources')
    return list(applied)


def import_chainer():
    """Install the repairs, then import Chainer quietly (no deprecation noise from
    ``pkg_resources``, no cuDNN-missing warning on CuPy 14 where none is asked for)."""
    install()
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='.*pkg_resources.*')
        warnings.filterwarnings('ignore', category=DeprecationWarning)
        # CuPy 14 has no cuDNN; Chainer then uses im2col + GEMM (README, GPU).
        warnings.filterwarnings('ignore', message='.*cuDNN is not enabled.*')
        import chainer
    return chainer
