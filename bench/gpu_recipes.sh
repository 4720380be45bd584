#!/usr/bin/env bash
# One device call: train recipe variants as concurrent processes on one GPU (small models leave it mostly idle),
# then write each task's table/curves and a tarball of the logs into $OUT.
#
#   JOBS="lm:softmax,sigmoid,sigmoid-b0 asr:softmax,sigmoid" STEPS_lm=3000 DEADLINE=540 bash bench/gpu_recipes.sh
#
# Each variant runs `sigattn train TASK --size gpu --variants V --out runs/TASK-gpu` with 2 CPU threads; a variant
# still running at DEADLINE seconds is stopped (its log.jsonl keeps what it reached). ARGS_<task> adds options.
# Throughput columns from concurrent runs measure shared-GPU speed: take training throughput from a run alone.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-$PWD/gpu_out}"; mkdir -p "$OUT" runs
DEADLINE="${DEADLINE:-540}"
pids=()
for job in ${JOBS:?set JOBS=\"task:v1,v2 ...\"}; do
    task="${job%%:*}"; IFS=, read -r -a vs <<< "${job#*:}"
    steps_var="STEPS_$task"; args_var="ARGS_$task"
    for v in "${vs[@]}"; do
        timeout --signal=INT --kill-after=15 "$((DEADLINE - SECONDS))" \
            python -m sigattn.recipes.cli "$task" --size "${SIZE:-gpu}" --variants "$v" --out "runs/$task-${SIZE:-gpu}" --threads 2 \
            --no-progress ${!steps_var:+--steps ${!steps_var}} ${!args_var:-} > "runs/$task-${SIZE:-gpu}-$v.log" 2>&1 &
        pids+=($!)
        echo "started $task $v (pid $!)"
    done
done
wait "${pids[@]}"
echo "all done at ${SECONDS}s"
for job in $JOBS; do
    task="${job%%:*}"; steps_var="STEPS_$task"
    python -m sigattn.recipes.cli "$task" --size "${SIZE:-gpu}" --variants all --out "runs/$task-${SIZE:-gpu}" --report-only \
        ${!steps_var:+--steps ${!steps_var}} > "$OUT/$task-report.txt" 2>&1
    cat "$OUT/$task-report.txt"
    cp "runs/$task-${SIZE:-gpu}/curves.png" "$OUT/$task-curves.png" 2>/dev/null
    # The device tool returns only a few files from $OUT: three per task (report, curves, one tarball).
    tar czf "$OUT/$task-logs.tgz" runs/$task-${SIZE:-gpu}/*/log.jsonl runs/$task-${SIZE:-gpu}/*/summary.json \
        runs/$task-${SIZE:-gpu}/results.* runs/$task-${SIZE:-gpu}-*.log 2>/dev/null
    for f in runs/$task-${SIZE:-gpu}-*.log; do echo "-- $f"; tail -n 3 "$f"; done
done
