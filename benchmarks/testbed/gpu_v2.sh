#!/usr/bin/env bash
# Testbed version 2 on the GPU machine, in steps that each fit one 10-minute command.
#
#   benchmarks/testbed/gpu_v2.sh STEP [RUN_DIR]      (RUN_DIR default: runs/testbed-v2, git-ignored)
#
#   STEP 1: corpus, then pretraining until about 9 minutes have passed (resumable: repeat step 1 until it says done)
#   STEP 2: allocations, then stage 2, each split over every visible GPU (one process per GPU, --shard)
#   STEP 3: eval split over the GPUs, the report, and $OUT/testbed-v2.tgz (results JSON/MD, allocations,
#           per-prompt verdicts, heatmaps, logs) when $OUT is set
#
# Every phase skips finished work, so a step cut short is continued by running it again.
# PER_CELL=N (prompts per task x context x depth cell, default 84) must be the same in every step.
set -euo pipefail
step=${1:?usage: gpu_v2.sh STEP [RUN_DIR]}
run=${2:-runs/testbed-v2}
py=${PYTHON:-python}
n=$(nvidia-smi -L | wc -l)
tb() { "$py" -m benchmarks.testbed.run_v2 --out "$run" ${PER_CELL:+--per-cell "$PER_CELL"} "$@"; }
sharded() {  # phase, minutes: one process per GPU, each with every n-th job
  local pids=() i
  for ((i = 0; i < n; i++)); do
    CUDA_VISIBLE_DEVICES=$i tb --phase "$1" --shard "$i/$n" --max-minutes "$2" > "$run/log-$1-$i.txt" 2>&1 &
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
     # minutes (a command stops at 10), at least 1, and saves its state when that runs out.
     t0=$(date +%s)
     tb --phase corpus
     left=$(( 540 - ($(date +%s) - t0) ))
     tb --phase pretrain --max-minutes "$(awk -v s="$left" 'BEGIN { print (s < 60 ? 1 : s / 60) }')" ;;
  2) sharded allocations 4 && sharded stage2 4 ;;
  3) sharded eval 8
     tb --phase report --results-dir "$run/published"
     cp "$run"/log-*.txt "$run/published/" 2>/dev/null || true
     if [ -n "${OUT:-}" ]; then tar czf "$OUT/testbed-v2.tgz" -C "$run/published" . && ls -l "$OUT"; fi ;;
  *) echo "gpu_v2.sh: STEP must be 1, 2 or 3" >&2; exit 2 ;;
esac
