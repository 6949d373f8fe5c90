"""The bottom layer of the device check: the clock and log, errors as data, device
synchronisation, the order of the sections and the environment. Imported first by
every other module, and importing none of them: it sets the environment variables
CuPy and Chainer read at import, and imports chainer_vfbn before Chainer.

The modules import in one direction: this one; the sections' shared helpers
(numerics, timing); the sections (changes, graphs, paths, pipeline, torch_ref); the
report on top (render: the Markdown and the Report that writes it), then __main__."""
import os
import platform
import subprocess
import sys
import time
import traceback

# The repository root (two folders up), so that ``import chainer_vfbn`` works without
# PYTHONPATH; after sys.path[0], this folder when run as ``python benchmarks/device_check``.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(1, ROOT)

# Before CuPy and Chainer are imported: CuPy reads CUPY_TF32 once, at the first
# float32 GEMM. TF32 (10-bit mantissa) would make the GPU's float32 GEMMs differ from
# the CPU's by ~1e-3 relative, drowning the rounding-order differences the numerics
# compare; CuPy's default is off, we make it explicit (and time Chainer in true fp32).
os.environ['CUPY_TF32'] = '0'
# CuPy 14 has no cuDNN; say so to Chainer instead of having it warn (docs/GPU.md).
os.environ.setdefault('CHAINER_CUDNN', '0')

import numpy  # noqa: E402

import chainer_vfbn  # noqa: E402  (first: its repairs must precede Chainer's import)
import chainer  # noqa: E402

# Run in this order: what the speed work must show first (the composed and the
# fused path, PyTorch beside them, the fused path's float64 numerics, kernels per
# unit, the CUDA-graph experiment), then the earlier checks. float64 comes last
# among the earlier ones: its GPU kernels are compiled for it alone (CuPy compiles
# every kernel once per dtype), so where compilation is slow it must not delay the
# float32 timings; a timeout then costs only the float64 check.
SECTIONS = ('numerics', 'paths', 'torch', 'numerics_fused', 'kernels', 'graph', 'timing',
            'changes', 'methods', 'data', 'numerics64')
RESNET110_PARAMS = 2975594  # SPEC section 2: parameters at 18 units per block


class Clock(object):
    """Wall time since the start, for timestamps and the time budget."""

    def __init__(self, budget_s):
        self.start, self.budget_s = time.time(), budget_s

    def elapsed(self):
        return time.time() - self.start

    def left(self):
        return self.budget_s - self.elapsed()


CLOCK = Clock(float('inf'))


def log(msg):
    print('[%6.1fs] %s' % (CLOCK.elapsed(), msg), flush=True)


def short_error(e):
    """``Type: first line`` of an exception, and the end of its traceback."""
    tb = traceback.format_exc().strip().splitlines()
    first = str(e).strip().splitlines()[0] if str(e).strip() else ''
    return {'error': '%s: %s' % (type(e).__name__, first), 'traceback': tb[-20:]}


def verdict(ok):
    return 'PASS' if ok else 'FAIL'


def synchronize(device):
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.xp is not numpy:
        device.xp.cuda.get_current_stream().synchronize()


def free_device_memory(device):
    if device.xp is not numpy:
        synchronize(device)
        device.xp.get_default_memory_pool().free_all_blocks()


def to_host(array):
    return None if array is None else numpy.asarray(chainer.backend.CpuDevice().send(array))


def environment(spec, gpu):
    """Versions, GPU and the Chainer/CuPy settings that change what is measured."""
    cuda = chainer.backends.cuda
    env = {'python': platform.python_version(), 'numpy': numpy.__version__,
           'chainer': chainer.__version__, 'platform': platform.platform(),
           'cpus': os.cpu_count(), 'device': spec,
           'chainer_cuda_available': bool(cuda.available),
           'chainer_cudnn_enabled': bool(chainer.backends.cuda.cudnn_enabled),
           'CUPY_TF32': os.environ.get('CUPY_TF32'),
           'CHAINER_CUDNN': os.environ.get('CHAINER_CUDNN'),
           # others that change what GPU kernels do (None: not set, the default)
           'CUPY_ACCELERATORS': os.environ.get('CUPY_ACCELERATORS'),
           'NVIDIA_TF32_OVERRIDE': os.environ.get('NVIDIA_TF32_OVERRIDE'),
           'compat_repairs': list(chainer_vfbn._compat.applied)}
    if getattr(cuda, '_resolution_error', None) is not None:
        # Why Chainer found no CuPy, or (CuPy 14) no cuDNN.
        env['chainer_cuda_note'] = '%s: %s' % (type(cuda._resolution_error).__name__,
                                               cuda._resolution_error)
    if gpu:
        import cupy
        props = cupy.cuda.runtime.getDeviceProperties(int(spec.split(':')[1]))
        name = props['name']
        env.update(
            gpu=name.decode() if isinstance(name, bytes) else name,
            compute_capability='%d.%d' % (props['major'], props['minor']),
            gpu_memory_gib=round(props['totalGlobalMem'] / 2.0 ** 30, 1),
            cupy=cupy.__version__,
            cuda_runtime=cupy.cuda.runtime.runtimeGetVersion(),
            cuda_driver_api=cupy.cuda.runtime.driverGetVersion(),
            cupy_cudnn=_has_module('cupy.cudnn'))
        try:
            smi = subprocess.run(['nvidia-smi', '--query-gpu=driver_version',
                                  '--format=csv,noheader'], capture_output=True,
                                 text=True, timeout=20)
            env['nvidia_driver'] = smi.stdout.strip().splitlines()[0]
        except Exception as e:
            env['nvidia_driver'] = 'unknown (%s)' % type(e).__name__
    try:
        import torch
        env['torch'] = torch.__version__
        env['torch_cuda'] = torch.version.cuda
    except Exception as e:
        env['torch'] = 'not available (%s)' % type(e).__name__
    return env


def _has_module(name):
    try:
        __import__(name)
        return True
    except Exception:
        return False

