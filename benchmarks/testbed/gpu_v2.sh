#!/usr/bin/env bash
# Testbed version 2 on the GPU machine, in steps that each fit one 10-minute command.
#
#   benchmarks/testbed/gpu_v2.sh STEP [RUN_DIR]      (RUN_DIR default: runs/testbed-v2, git-ignored)
#
#   STEP 1: corpus, then pretraining until about 9 minutes (STEP1_SECONDS) have passed (resumable: repeat
#           step 1 until it says done)
#   STEP 2: allocations, then stage 2, each split over every visible GPU (PROCS processes per GPU, --shard)
#   STEP 3: eval split the same way, the report, and $OUT/testbed-v2.tgz (results JSON/MD, allocations,
#           per-prompt verdicts, heatmaps, logs) when $OUT is set
#
# Every phase skips finished work, so a step cut short is continued by running it again; stage 2
# and the eval go in priority order (run_v2.priority), so a budget that runs out leaves out the
# least important allocations, and the report lists them.
# PER_CELL=N (prompts per task x context x depth cell, default 40) must be the same in every step.
# PROCS (default 3): processes per GPU. The model is small (hidden 512): one process leaves most of
# an H200 idle, so several share it. Budgets in minutes, each checked before a job starts (a job
# then runs to its end): ALLOC_MIN (3.5), S2_MIN (3.5), EVAL_MIN (7); one H200 lease:
# step 1 (9 min), step 2 (about 9), step 3 (about 8).
set -euo pipefail
step=${1:?usage: gpu_v2.sh STEP [RUN_DIR]}
run=${2:-runs/testbed-v2}
py=${PYTHON:-python}
gpus=$(nvidia-smi -L | wc -l)
n=$((gpus * ${PROCS:-3}))
tb() { "$py" -m benchmarks.testbed.run_v2 --out "$run" ${PER_CELL:+--per-cell "$PER_CELL"} "$@"; }
sharded() {  # phase, minutes: PROCS processes per GPU, each with every n-th job
  local pids=() i
  for ((i = 0; i < n; i++)); do
    CUDA_VISIBLE_DEVICES=$((i % gpus)) tb --phase "$1" --shard "$i/$n" --max-minutes "$2" > "$run/log-$1-$i.txt" 2>&1 &
    pids+=($!)
  done
  local rc=0
  for p in "${pids[@]}"; do wait "$p" || rc=$?; done
  tail -n 3 "$run"/log-"$1"-*.txt
  return $rc
}
mkdir -p "$run"
case $step in
  1) # The corpus takes minutes of CPU the first time: pretraining gets what is left of about 9
     # minutes (STEP1_SECONDS, default 540: a command stops at 10), at least 1, and saves its
     # state when that runs out.
     t0=$(date +%s)
     tb --phase corpus
     left=$(( ${STEP1_SECONDS:-540} - ($(date +%s) - t0) ))
     tb --phase pretrain --max-minutes "$(awk -v s="$left" 'BEGIN { print (s < 60 ? 1 : s / 60) }')" ;;
  2) sharded allocations "${ALLOC_MIN:-3.5}" && sharded stage2 "${S2_MIN:-3.5}" ;;
  3) sharded eval "${EVAL_MIN:-7}" || true  # a budget that ran out still gets its report
     tb --phase report --results-dir "$run/published"
     cp "$run"/log-*.txt "$run/published/" 2>/dev/null || true
     if [ -n "${OUT:-}" ]; then tar czf "$OUT/testbed-v2.tgz" -C "$run/published" . && ls -l "$OUT"; fi ;;
  *) echo "gpu_v2.sh: STEP must be 1, 2 or 3" >&2; exit 2 ;;
esac
