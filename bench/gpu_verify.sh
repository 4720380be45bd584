#!/usr/bin/env bash
# One device call that checks and times what was changed without a GPU: GPU tests, then short benchmarks.
#
#   bash bench/gpu_verify.sh                       # all stages, within BUDGET seconds (default 570)
#   STAGES="tests bench host" bash bench/gpu_verify.sh
#
# Stages (in this order; each has its own time limit and is skipped when the budget is spent):
#   tests   scripts/gpu_tests.sh over tests/ops tests/nn tests/integrations (xdist, then bigmem serially; ~2.5 min)
#   gbwd    bench/gluon_bwd_check.py: the Gluon backward's correctness and timing (if present)
#   bench   sigattn bench: Gluon/portable forward + backward vs SDPA flash and cuDNN, d 64/128, N 1k/4k/16k
#   gfwd    bench/gluon_check_bench.py --bench at GFWD_SEQLENS (default 1024,2048): Gluon forward schedules vs cuDNN
#   cprobe  bench/kernel_probe.py --exp-causal: portable causal forward configs at CPROBE_NS for CPROBE_DS
#   host    bench/host_overhead.py: host cost per call vs SDPA
#   decode  the decode benchmark (kernel-level and API rows; DECODE_ARGS adds e.g. "--splits 8,16,33,66")
#   varlen  bench/varlen_bench.py, d=128 non-causal, equal and mixed packs
#   lm      the LM training-throughput probe (softmax vs sigmoid alone, 300 steps each, eager)
#   lmc     the same under torch.compile (--compile)
#   lmg     the same under torch.compile with CUDA graphs (--compile reduce-overhead: no per-op host cost)
# Stage limits: TESTS_LIMIT (default 300 s), BENCH_LIMIT (200 s), GFWD_LIMIT, CPROBE_LIMIT, VARLEN_LIMIT.
# TEST_PATHS (default tests/ops tests/nn tests/integrations), VARLEN_ARGS, DECODE_ARGS replace those stages' arguments.
# Bench knobs: BENCH_CAUSAL (yes/no/both), BENCH_SEQLENS (default 1k,4k,16k), BENCH_PROVIDERS (default Gluon/portable/SDPA flash/cuDNN); peers
# shipped as wheels in .whl/ (carry it: triton-sigmoid) are installed to /tmp/site first.
# The device tool returns at most 8 files from $OUT: everything goes into $OUT/verify.tgz plus $OUT/summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-$PWD/gpu_out}"
W="$(mktemp -d)"
BUDGET="${BUDGET:-570}"
STAGES="${STAGES:-tests gbwd bench gfwd cprobe host decode varlen lm lmc lmg}"
summary="$OUT/summary.txt"
mkdir -p "$OUT"
: > "$summary"
if compgen -G ".whl/*.whl" > /dev/null; then
    python -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

log() { echo "$*" | tee -a "$summary"; }

stage() {  # stage NAME LIMIT CMD...
    local name=$1 limit=$2 left
    shift 2
    [[ " $STAGES " == *" $name "* ]] || return 0
    left=$((BUDGET - SECONDS - 15))
    if (( left < 20 )); then log "== $name: skipped (budget spent)"; return 0; fi
    (( limit > left )) && limit=$left
    local t=$SECONDS
    timeout --signal=INT --kill-after=10 "$limit" "$@" > "$W/$name.txt" 2>&1
    local rc=$?
    log "== $name rc=$rc in $((SECONDS - t)) s (limit $limit s)"
}

log "$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"
log "$(python -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "cudnn", torch.backends.cudnn.version())')"

stage tests "${TESTS_LIMIT:-300}" bash scripts/gpu_tests.sh ${TEST_PATHS:-tests/ops tests/nn tests/integrations}
grep -E "^FAILED|^ERROR| passed| failed|gpu tests:" "$W/tests.txt" 2>/dev/null | tail -n 20 | tee -a "$summary"
if [[ -f bench/gluon_bwd_check.py ]]; then stage gbwd 150 python bench/gluon_bwd_check.py; fi
tail -n 25 "$W/gbwd.txt" 2>/dev/null | tee -a "$summary"
stage bench "${BENCH_LIMIT:-200}" python -m sigattn.bench --out "$W/bench" --modes fwd,bwd --headdims 64,128 --causal "${BENCH_CAUSAL:-both}" \
    --seqlens "${BENCH_SEQLENS:-1k,4k,16k}" \
    --providers "${BENCH_PROVIDERS:-sigattn-triton,sigattn-triton-portable,sdpa-flash,sdpa-cudnn}"
cat "$W/bench/table.txt" 2>/dev/null | tee -a "$summary"
stage gfwd "${GFWD_LIMIT:-150}" python bench/gluon_check_bench.py --bench --seqlens "${GFWD_SEQLENS:-1024,2048}"
grep "^|" "$W/gfwd.txt" 2>/dev/null | tee -a "$summary"
stage cprobe "${CPROBE_LIMIT:-60}" python bench/kernel_probe.py --no-errors --no-table --exp-causal --out "$W" \
    --ds "${CPROBE_DS:-64}" --causal-ns "${CPROBE_NS:-1024,2048}"
grep "^|" "$W/cprobe.txt" 2>/dev/null | tee -a "$summary"
stage host 60 python bench/host_overhead.py ${HOST_ARGS:-}
head -n 12 "$W/host.txt" 2>/dev/null | tee -a "$summary"
stage decode 100 python -m sigattn.bench.decode --out "$W/decode" ${DECODE_ARGS:-}
grep -v "sigattn\[" "$W/decode/decode.md" 2>/dev/null | tee -a "$summary"
stage varlen "${VARLEN_LIMIT:-100}" python bench/varlen_bench.py --out "$W/varlen" ${VARLEN_ARGS:---ds 128 --causal no --packs equal:2048,mixed --modes fwd,bwd}
cat "$W/varlen/table.md" 2>/dev/null | tee -a "$summary"
PROBE_TASKS=lm SKIP_CHECK=1 SKIP_TESTS=1 OUT="$W/lm" stage lm 120 bash bench/gpu_probe.sh
grep "^{" "$W/lm.txt" 2>/dev/null | tee -a "$summary"
PROBE_TASKS=lm SKIP_CHECK=1 SKIP_TESTS=1 PROBE_ARGS=--compile OUT="$W/lmc" stage lmc 180 bash bench/gpu_probe.sh
grep "^{" "$W/lmc.txt" 2>/dev/null | tee -a "$summary"
PROBE_TASKS=lm SKIP_CHECK=1 SKIP_TESTS=1 PROBE_ARGS="--compile reduce-overhead" OUT="$W/lmg" stage lmg 180 \
    bash bench/gpu_probe.sh
grep "^{" "$W/lmg.txt" 2>/dev/null | tee -a "$summary"
tar czf "$OUT/verify.tgz" -C "$W" . 2>/dev/null
log "== done in $SECONDS s"
