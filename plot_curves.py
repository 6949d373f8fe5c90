#!/usr/bin/env python
"""Plot the paper's Figure 3 (test error during training) and the gradient fidelity
of ``train.py`` run folders: ``python plot_curves.py RUN_DIR ... --out PREFIX``.
The logic is in :mod:`chainer_vfbn.curves`."""
import sys

from chainer_vfbn.curves import main

if __name__ == '__main__':
    sys.exit(main())
