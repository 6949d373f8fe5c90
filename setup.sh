#!/usr/bin/env bash
# Set up chainer-vfbn in a virtual environment (default .venv), from nothing.
#
#   ./setup.sh                       CPU: Chainer 7.8.1, NumPy 2, matplotlib, pytest
#   ./setup.sh --cupy cupy-cuda12x   also CuPy for the GPU (README, "GPU")
#   ./setup.sh --numpy 1.26.4        another NumPy (CI's second lane)
#   VENV=.venv-np1 ./setup.sh ...    another environment folder
#
# It installs chainer_vfbn itself editable (pip install -e .), so that it imports
# from any folder.
#
# Chainer 7.8.1 is on PyPI only as an sdist whose setup.py imports pkg_resources,
# which setuptools 82 removed; pip's isolated build would take the newest setuptools
# and fail. So we build its (pure-Python) wheel once, without build isolation, in an
# environment pinned to setuptools < 82, and install from that wheel.
# Fashion-MNIST (the offline data set) comes from Debian's dataset-fashion-mnist.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
CUPY=""
NUMPY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cupy) CUPY="$2"; shift 2 ;;
    --numpy) NUMPY="$2"; shift 2 ;;
    *) echo "setup.sh: unknown option $1 (see the comment at the top)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}

echo "== virtual environment $VENV ($($PY --version))"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install --upgrade pip "setuptools<82" wheel

if ! ls .wheels/chainer-7.8.1-*.whl >/dev/null 2>&1; then
  echo "== building the Chainer 7.8.1 wheel (setuptools<82, no build isolation)"
  $PIP wheel --no-deps --no-build-isolation -w .wheels chainer==7.8.1
fi

echo "== installing requirements.txt"
$PIP install --find-links .wheels -r requirements.txt
[ -z "$NUMPY" ] || { echo "== numpy==$NUMPY"; $PIP install "numpy==$NUMPY"; }
# The package itself, editable (pyproject.toml): importable from any folder, and the
# checkout's code is what runs. Built with this environment's setuptools (< 82).
echo "== chainer_vfbn (editable)"
PYTHONWARNINGS=ignore $PIP install --no-deps --no-build-isolation -e .
[ -z "$CUPY" ] || { echo "== $CUPY"; $PIP install "$CUPY"; }

FMNIST=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ]; then
  echo "== Fashion-MNIST (Debian package dataset-fashion-mnist)"
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
      || echo "setup.sh: could not install dataset-fashion-mnist; the Fashion-MNIST demo needs it" >&2
  else
    echo "setup.sh: run 'sudo apt-get install dataset-fashion-mnist' for the offline demo data" >&2
  fi
fi

VENV_PY="$(cd "$VENV" && pwd)/bin/python"
(cd / && "$VENV_PY" -c "import chainer_vfbn, chainer, numpy; \
from chainer_vfbn import _compat; \
print('== ready: chainer', chainer.__version__, 'numpy', numpy.__version__, \
      'repairs', _compat.applied or 'none')")
