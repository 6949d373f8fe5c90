#!/usr/bin/env python
"""Test error of a network trained by ``train.py``: ``python evaluate.py RUN_DIR``
(``--help`` lists the options)."""
import sys

from chainer_vfbn.evaluate_cli import main

if __name__ == '__main__':
    sys.exit(main())
