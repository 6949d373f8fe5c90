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


def machine(device):
    m = {'platform': platform.platform(), 'cpu': cpu_name(), 'cpus': os.cpu_count(),
         'device': str(device)}
    if device.xp is not numpy:
        try:
            import cupy
            props = cupy.cuda.runtime.getDeviceProperties(device.device.id)
            m['gpu'] = props['name'].decode() if isinstance(props['name'], bytes) else props['name']
        except Exception:
            pass
    return m
