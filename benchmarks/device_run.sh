#!/usr/bin/env bash
# Everything to do on the lent GPU machine, in one call (after
# benchmarks/build_device_wheels.sh here): install Chainer and pytest from .whl/ into a
# temporary folder, run the device check, then the GPU twins of the tests. Writes
# OUT/device_check.{json,md,log} and OUT/gpu_tests.txt, in under 5 minutes.
#
# Usage: benchmarks/device_run.sh OUT [device_check options...]
set -uo pipefail

cd "$(dirname "$0")/.."
OUT=${1:?usage: benchmarks/device_run.sh OUT [device_check options...]}
shift
SITE=${SITE:-/tmp/site}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl || { echo "error: cannot install .whl/*.whl" >&2; exit 1; }
export PYTHONPATH=$SITE:$PWD CUPY_CACHE_DIR=${CUPY_CACHE_DIR:-/tmp/cupy}
# The whole call must stay under 5 minutes: the check's own budget (--budget-s, 190 s
# by default) stops new sections, runs and rounds; `timeout` is the hard cap (the
# report is rewritten after every section, so a cut keeps what finished).
timeout --signal=INT --kill-after=10 "${CHECK_TIMEOUT_S:-240}" \
    python3 -u benchmarks/device_check --out "$OUT" "$@" 2>&1 | tee "$OUT/device_check.log"
check=${PIPESTATUS[0]}
python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_sgd.py tests/test_synthesizers.py \
    tests/test_adam.py tests/test_fused_unit.py \
    2>&1 | tee "$OUT/gpu_tests.txt"
tests=${PIPESTATUS[0]}
echo "device_check exit $check, gpu tests exit $tests"
exit $(( check || tests ))
