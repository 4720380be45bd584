#!/usr/bin/env bash
# The GPU test run: `pytest -m gpu` over the given paths (default: tests), in two passes so that parallel workers do
# not run out of GPU memory together:
#   1. "gpu and not bigmem" spread over pytest-xdist workers (PYTEST_WORKERS, default 8; the compiles dominate),
#   2. "gpu and bigmem" (several GiB each) one at a time.
# Exit status: non-zero if either pass failed (5, nothing collected, counts as success).
set -uo pipefail
cd "$(dirname "$0")/.."
paths=("$@")
(( ${#paths[@]} )) || paths=(tests)
xdist=()
if python -c "import xdist" 2>/dev/null; then xdist=(-n "${PYTEST_WORKERS:-8}"); fi
python -m pytest -m "gpu and not bigmem" -q -p no:cacheprovider -o faulthandler_timeout=180 "${xdist[@]}" "${paths[@]}"
a=$?
python -m pytest -m "gpu and bigmem" -q -p no:cacheprovider -o faulthandler_timeout=180 "${paths[@]}"
b=$?
(( a == 5 )) && a=0
(( b == 5 )) && b=0
echo "gpu tests: parallel pass rc=$a, bigmem pass rc=$b"
exit $(( a != 0 || b != 0 ))
