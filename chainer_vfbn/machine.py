"""Facts about the machine a number was measured on: the versions of what computes
it, the CPU's name, the CPUs this process may use, and the device. ``train.py``
records them in ``args.json``; the benchmarks record them beside their timings."""
import os
import platform

import chainer
import numpy


def usable_cpus():
    """The CPUs this process may run on (its affinity mask, else all of them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def versions():
    """Versions of what computes the numbers (recorded in args.json)."""
    v = {'python': platform.python_version(), 'chainer': chainer.__version__,
         'numpy': numpy.__version__}
    try:
        import cupy
        v['cupy'] = cupy.__version__
    except Exception:
        pass
    return v


def cpu_name():
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def blas():
    """The BLAS NumPy calls and the kernels it chose for this CPU (``openblas
    0.3.31 SkylakeX``): float32 products round differently with another choice
    (AVX-512 or AVX2 kernels), so bit-for-bit repeats need the same one."""
    try:
        import threadpoolctl
        for lib in threadpoolctl.threadpool_info():
            if lib.get('user_api') == 'blas':
                return ' '.join(str(lib.get(k)) for k in ('internal_api', 'version',
                                                          'architecture') if lib.get(k))
    except Exception:
        pass
    return None


def machine(device):
    m = {'platform': platform.platform(), 'cpu': cpu_name(), 'cpus': os.cpu_count(),
         'blas': blas(), 'device': str(device)}
    if device.xp is not numpy:
        try:
            import cupy
            props = cupy.cuda.runtime.getDeviceProperties(device.device.id)
            m['gpu'] = props['name'].decode() if isinstance(props['name'], bytes) else props['name']
        except Exception:
            pass
    return m
