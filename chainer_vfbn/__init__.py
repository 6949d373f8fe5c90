"""chainer-vfbn: Synthetic Gradient Methods with Virtual Forward-Backward Networks.

A Chainer reproduction of Miyato, Okanohara, Maeda and Koyama (ICLR 2017 workshop).
Importing this package first makes Chainer 7.8.1 work on today's NumPy and Python
(see :mod:`chainer_vfbn._compat`).
"""
from chainer_vfbn import _compat

_compat.import_chainer()

__version__ = '0.1.0'
