#!/usr/bin/env python
"""Train one method of the paper's Table 1. ``python train.py --help`` lists the
options; the README lists one command per row."""
import sys

from chainer_vfbn.training import main

if __name__ == '__main__':
    sys.exit(main())
