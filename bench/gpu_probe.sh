#!/usr/bin/env bash
# One device call: GPU tests (xdist; SKIP_TESTS=1 skips), `sigattn check` (SKIP_CHECK=1 skips), and short LM/ViT
# training probes (PROBE_TASKS="lm vit": throughput alone on the GPU).
#   OUT=... bash bench/gpu_probe.sh          (the device tool sets OUT)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-$PWD/gpu_out}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cudnn', torch.backends.cudnn.version())"
start=$SECONDS
if [[ -z "${SKIP_TESTS:-}" ]]; then
    echo "== pytest -m gpu ${PYTEST_ARGS:-tests}"
    python -m pytest -m gpu -q -p no:cacheprovider -n "${PYTEST_WORKERS:-8}" ${PYTEST_ARGS:-tests} > "$OUT/tests.txt" 2>&1
    echo "pytest rc=$? in $((SECONDS - start)) s"; tail -n 25 "$OUT/tests.txt"
fi
if [[ -z "${SKIP_CHECK:-}" ]]; then
    echo "== sigattn check"; t=$SECONDS
    python -m sigattn.cli check > "$OUT/check.txt" 2>&1; echo "check rc=$? in $((SECONDS - t)) s"; tail -n 25 "$OUT/check.txt"
fi
for task in ${PROBE_TASKS:-}; do
    for v in softmax sigmoid; do
        t=$SECONDS
        python -m sigattn.recipes.cli "$task" --size gpu --variants "$v" --steps "${PROBE_STEPS:-300}" \
            --out "/tmp/probe-$task" --no-progress ${PROBE_ARGS:-} > "$OUT/probe-$task-$v.log" 2>&1
        echo "probe $task $v rc=$? in $((SECONDS - t)) s"
        python - "$task" "$v" <<'PY'
import json, sys
s = json.load(open(f"/tmp/probe-{sys.argv[1]}/{sys.argv[2]}/summary.json"))
print({k: v for k, v in s.items() if not isinstance(v, (list, dict))})
PY
    done
done
