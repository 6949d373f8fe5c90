#!/usr/bin/env bash
# Gather the wheels that benchmarks/device_check and the GPU tests need on the lent
# GPU machine.
#
# That machine (Python 3.12, NumPy 2.5, CuPy 14, PyTorch; see docs/GPU.md) has no
# network and no Chainer. Chainer 7.8.1 is pure Python, but PyPI has only its sdist,
# whose setup.py imports pkg_resources (gone in setuptools >= 82; docs/CHAINER_TODAY.md):
# build the wheel here without build isolation, in a Python whose setuptools is < 82
# (the project's .venv has 81), or reuse a wheel already built into .wheels/. Its
# three import-time dependencies come as py3 wheels from PyPI. Everything lands in
# .whl/ (git-ignored), one version of each, ready for
#   pip install --no-index --no-deps --target /tmp/site .whl/*.whl
#
# Usage: benchmarks/build_device_wheels.sh [PYTHON]   (default: .venv/bin/python)
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
OUT=.whl
CHAINER=chainer==7.8.1
# Pure-Python dependencies Chainer needs at import, then pytest and its own, for the
# GPU twins of the tests (`pytest -m gpu`); versions pinned so that reruns give the
# same files (those of the project .venv, where they are known to work). All support
# Python 3.12.
DEPS=(six==1.17.0 filelock==4.3.1 typing-extensions==4.16.0
      pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 packaging==26.4 pygments==2.21.0)

mkdir -p "$OUT"
rm -f "$OUT"/*.whl

# 1. Chainer: reuse the wheel built once for this project, else build it.
if [ -f .wheels/chainer-7.8.1-py3-none-any.whl ]; then
    cp .wheels/chainer-7.8.1-py3-none-any.whl "$OUT"/
else
    if ! "$PY" -c 'import pkg_resources' 2>/dev/null; then
        echo "error: $PY has no pkg_resources (setuptools >= 82?); install" \
             "'setuptools<82' wheel into it or give another PYTHON" >&2
        exit 1
    fi
    "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" "$CHAINER"
fi

# 2. Its dependencies, as wheels for the device's Python 3.12.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation py --dest "$OUT" "${DEPS[@]}"

# Exactly one wheel per project, all pure Python.
for name in chainer six filelock typing_extensions pytest pluggy iniconfig packaging pygments; do
    n=$(ls "$OUT" | grep -ci "^${name}-" || true)
    if [ "$n" != 1 ]; then
        echo "error: expected one $name wheel in $OUT, found $n" >&2
        exit 1
    fi
done
if ls "$OUT" | grep -v -e '-py3-none-any\.whl$' -e '-py2\.py3-none-any\.whl$'; then
    echo "error: the wheels above are not pure Python" >&2
    exit 1
fi

echo "wheels in $OUT/:"
for f in "$OUT"/*.whl; do
    printf '  %-50s %8d bytes  sha256 %s\n' "$(basename "$f")" "$(stat -c %s "$f")" \
        "$(sha256sum "$f" | cut -c1-16)"
done
