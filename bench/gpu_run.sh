#!/usr/bin/env bash
# The GPU machine's one script: versions, GPU-marked tests, then the benchmark sweep into $OUT/bench.
#
#   bash bench/gpu_run.sh                    # full FlashAttention-paper sweep, bf16
#   BENCH_ARGS="--modes fwd --seqlens 1k,4k,16k" bash bench/gpu_run.sh
#   SKIP_TESTS=1 bash bench/gpu_run.sh       # benchmark only
#
# The device tool runs it from a checkout that is not pip-installed (10 min per command), and collects
# what lands under $OUT. The whole script keeps within BUDGET seconds (default 570): the sweep gets what
# the tests left, less 40 s for the report, or BENCH_TIMEOUT if that is smaller. A sweep cut off still
# reports: the rows measured so far are in results.partial.jsonl, rendered into the same tables and plot.
set -uo pipefail

cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-$PWD/gpu_out}"
BENCH_OUT="$OUT/bench"
BUDGET="${BUDGET:-570}"
mkdir -p "$BENCH_OUT"
# Peers the GPU image lacks (e.g. triton-sigmoid) travel as wheels in .whl/ (carry it with the device tool):
#   pip download --no-deps -d .whl triton-sigmoid
if compgen -G ".whl/*.whl" > /dev/null; then
    python -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

echo "== versions"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "nvidia-smi: not found"
python - <<'PY'
import importlib.util
import sys

import torch

print("python", sys.version.split()[0])
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| cuDNN", torch.backends.cudnn.version())
try:
    import triton

    print("triton", triton.__version__)
except ImportError as e:
    print("triton: not importable:", e)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"gpu {p.name} sm_{p.major}{p.minor} {p.total_memory / 2**30:.0f} GiB")
for mod in ("flash_attn", "triton_sigmoid", "tqdm", "matplotlib", "rich", "pytest"):
    print(f"{mod}: {'yes' if importlib.util.find_spec(mod) else 'no'}")
PY

test_rc=0
if [[ -z "${SKIP_TESTS:-}" ]]; then
    echo "== pytest -m gpu"
    # Triton compiles every kernel variant the tests touch (573 s on a cold machine in one process): pytest-xdist
    # (in the GPU image) spreads the compiles over CPU cores; bigmem tests run afterwards one at a time.
    bash scripts/gpu_tests.sh ${PYTEST_ARGS:-tests} 2>&1 | tail -n 40
    test_rc=${PIPESTATUS[0]}
    # 5 = no test collected (no GPU tests yet): not a failure.
    if [[ $test_rc -eq 5 ]]; then test_rc=0; fi
    echo "pytest rc=$test_rc"
fi

left=$((BUDGET - SECONDS - 40))
bench_timeout=$((left < ${BENCH_TIMEOUT:-$left} ? left : ${BENCH_TIMEOUT:-$left}))
if [[ $bench_timeout -lt 30 ]]; then bench_timeout=30; fi
echo "== bench (timeout ${bench_timeout}s) -> $BENCH_OUT"
# shellcheck disable=SC2086  # BENCH_ARGS is a list of options
timeout --signal=INT --kill-after=20 "$bench_timeout" \
    python -m sigattn.bench --out "$BENCH_OUT" ${BENCH_ARGS:-} > "$BENCH_OUT/log.txt" 2>&1
bench_rc=$?
if [[ $bench_rc -ne 0 ]]; then
    echo "bench rc=$bench_rc; last lines of its log:"
    tail -n 30 "$BENCH_OUT/log.txt"
    if [[ -s "$BENCH_OUT/results.partial.jsonl" ]]; then
        echo "== report from the rows measured before the cut"
        python -m sigattn.bench --from "$BENCH_OUT/results.partial.jsonl" --out "$BENCH_OUT" ${BENCH_ARGS:-} \
            > /dev/null 2>> "$BENCH_OUT/log.txt"
    fi
fi

echo "== files"
ls -l "$BENCH_OUT"
echo "== table"
cat "$BENCH_OUT/table.txt" 2>/dev/null || echo "no table: see $BENCH_OUT/log.txt"

if [[ $test_rc -ne 0 || $bench_rc -ne 0 ]]; then exit 1; fi
