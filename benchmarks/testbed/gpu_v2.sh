#!/usr/bin/env bash
# Testbed version 2 on the GPU machine, in commands that each fit the 10-minute limit.
#
#   BUDGET=540 benchmarks/testbed/gpu_v2.sh auto [RUN_DIR]    (RUN_DIR default: runs/testbed-v2, git-ignored)
#   benchmarks/testbed/gpu_v2.sh report [RUN_DIR]
#
#   auto:   the next phases in order (corpus, pretraining, allocations, eval, stage 2, eval: the first
#           eval pass does every masks-only allocation, so a lease cut short loses stage-2 rows, not
#           masks-only ones; the second does the stage-2 models), each given what
#           is left of BUDGET seconds, then, once every phase is done, the report. Repeat the same
#           command until it says "testbed v2: done": every phase skips finished work and saves its
#           state when its budget runs out (pretraining resumes from its checkpoint).
#   report: the report on what exists (stage 2 and the eval go in priority order, run_v2.priority,
#           so a lease that ends early leaves out the least important allocations; the report lists
#           them), for the last command of a lease that cannot finish.
#   Both write $OUT/testbed-v2.tgz (results JSON/MD, allocations, per-prompt verdicts, heatmaps,
#   logs) when they report and $OUT is set; auto also reports (on what exists) when its budget ends
#   after the eval has begun, so a lease that ends early still brings back the latest call's report.
#
#   benchmarks/testbed/gpu_v2.sh pack K [RUN_DIR]
#   benchmarks/testbed/gpu_v2.sh restore PIECES_DIR [RUN_DIR]
#
#   pack:    the pretrained model with its record (pretrained/, pretrain.json, pretrain-log.jsonl,
#            settings.json, the corpus manifest) as pieces of 14 MiB, $OUT/pretrained.tgz.NN; call K
#            (1, 2, ...) brings back pieces 4K-3 .. 4K (a command returns at most 64 MiB, and the
#            report's testbed-v2.tgz may come back beside them), so the 111 MB model of FULL2
#            comes back in two calls. It lets a run span leases (across sessions only if the checkout's
#            git-ignored .gpu/ survives, which is not guaranteed): the model is the only part that
#            takes long to remake. `auto` with PACK=K does the same once pretraining is done,
#            before the sharded phases, so the model is safe early in a lease.
#   restore: a new machine's run directory from those pieces (carried in, all of them in
#            PIECES_DIR); then `auto` remakes the corpus (1.5 min, deterministic on the same
#            image), refuses to go on if its manifest differs from the packed one, and skips
#            pretraining. A testbed-v2.tgz in PIECES_DIR (the latest report of the same run) also
#            restores its allocations and evals, so `auto` goes on where that lease stopped; one
#            from another pretraining run is refused.
#
# PER_CELL=N (prompts per task x context x depth cell, default run_v2.FULL2.per_cell) must be the same in every command.
# MODES=stage2 (or masks; default both, the same in every command): evaluate in that mode only; without
# stage2, stage 2 is not trained. At the default PER_CELL one mode fits one lease and both do not.
# PROCS (default 3): processes per GPU for the allocations, stage 2 and the eval. The model is
# small (hidden 512) and the jobs short, so several processes share a GPU. A phase's budget is
# checked before each job starts (a job then runs to its end: up to 105 s for a trained allocation
# in run 1), so sharded phases get what is left minus MARGIN seconds (default 100); each such phase
# samples the GPU's load every 5 s into log-gpu-PHASE.txt (published with the logs). Once the
# allocations exist, the jobs left are shorter (run 2: eval 13-71 s per allocation), so a lease's
# last call may set MARGIN=75 to start more of them.
#
# STAGE2_SHARE=P (percent, 1-100; unset: stage 2 takes all it needs): for a lease's last call, when
# stage 2 and its eval cannot both finish. Stage 2 gets P% of what is left, then the eval runs on the
# stage-2 models made so far (priority order), and the call ends "unfinished" if stage 2 did.
#
# Measured on one H200 (run 1, benchmarks/results/testbed_v2_h200_run1): corpus 97 s; pretraining
# 0.288 s per step of 32 x 2048 tokens, 0.37 s per step of 8 x 8192.
set -euo pipefail
mode=${1:?usage: gpu_v2.sh auto|report [RUN_DIR] | pack K [RUN_DIR] | restore PIECES_DIR [RUN_DIR]}
for var in BUDGET PROCS MARGIN STAGE2_SHARE PACK; do
  case ${!var:-1} in ''|*[!0-9]*|0) echo "gpu_v2.sh: $var must be a whole number above 0, got '${!var}'" >&2; exit 2 ;; esac
done
if [ "${STAGE2_SHARE:-100}" -gt 100 ]; then
  echo "gpu_v2.sh: STAGE2_SHARE must be a percentage from 1 to 100, got '$STAGE2_SHARE'" >&2; exit 2
fi
case $mode in pack|restore) run=${3:-runs/testbed-v2} ;; *) run=${2:-runs/testbed-v2} ;; esac
py=${PYTHON:-python}
gpus=$(nvidia-smi -L | wc -l)
n=$((gpus * ${PROCS:-3}))
deadline=$(( $(date +%s) + ${BUDGET:-540} ))
tb() { "$py" -m benchmarks.testbed.run_v2 --out "$run" ${PER_CELL:+--per-cell "$PER_CELL"} ${MODES:+--modes "$MODES"} "$@"; }
minutes_left() {  # what is left of BUDGET, minus $1 seconds, in minutes (0 when under 20 s)
  awk -v s=$(( deadline - $(date +%s) - ${1:-0} )) 'BEGIN { print (s < 20 ? 0 : s / 60) }'
}
sharded() {  # phase [percent]: PROCS processes per GPU, each with every n-th job, within what is left (or that share of it)
  local m pids=() i p r rc=0 unf=0
  m=$(minutes_left "${MARGIN:-100}")
  [ "$m" != 0 ] || return 3
  m=$(awk -v m="$m" -v p="${2:-100}" 'BEGIN { print m * p / 100 }')
  for ((i = 0; i < n; i++)); do
    CUDA_VISIBLE_DEVICES=$((i % gpus)) tb --phase "$1" --shard "$i/$n" --max-minutes "$m" >> "$run/log-$1-$i.txt" 2>&1 &
    pids+=($!)
  done
  # GPU load every 5 s while the phase runs: whether PROCS processes leave the GPU idle.
  nvidia-smi --query-gpu=timestamp,index,utilization.gpu,memory.used --format=csv,noheader -l 5 \
    </dev/null >> "$run/log-gpu-$1.txt" 2>&1 &
  local smi=$!
  for p in "${pids[@]}"; do
    r=0; wait "$p" || r=$?
    if [ "$r" = 3 ]; then unf=1; elif [ "$r" != 0 ]; then rc=$r; fi
  done
  kill "$smi" 2>/dev/null || true; wait "$smi" 2>/dev/null || true
  tail -n 2 "$run"/log-"$1"-*.txt
  [ "$rc" = 0 ] || return "$rc"
  [ "$unf" = 0 ] || return 3
}
# A phase's exit status 3 means "budget spent" (rerun), anything else a failure.
check() {  # phase, status
  [ "$2" = 0 ] && return 0
  [ "$2" = 3 ] && unfinished "$1"
  echo "testbed v2: $1 failed (exit status $2); see the log above or $run/log-$1-*.txt" >&2
  exit "$2"
}
report() {
  tb --phase report --results-dir "$run/published"
  cp "$run"/log-*.txt "$run/published/" 2>/dev/null || true
  if [ -n "${OUT:-}" ]; then tar czf "$OUT/testbed-v2.tgz" -C "$run/published" . && ls -l "$OUT"; fi
}
unfinished() {  # the report on what exists comes back with every call once the eval has begun
  if [ -n "$(ls "$run"/eval/*/*.json 2>/dev/null)" ]; then report; fi
  echo "testbed v2: $1 unfinished (budget spent); run the same command again"; exit 0
}
pack_pieces() {  # K: call K's pieces of the pretrained model into $OUT
  local k=$1 pieces="$run/pack" all first i
  [ -f "$run/pretrained/config.json" ] || { echo "gpu_v2.sh: pack: no pretrained model in $run" >&2; exit 2; }
  [ -n "${OUT:-}" ] || { echo "gpu_v2.sh: pack: OUT must be set" >&2; exit 2; }
  mkdir -p "$OUT"
  if [ ! -f "$pieces/done" ]; then
    rm -rf "$pieces" && mkdir -p "$pieces"
    tar czf - -C "$run" pretrained pretrain.json pretrain-log.jsonl settings.json corpus/manifest.json \
      | split -b 14M -d - "$pieces/pretrained.tgz."
    touch "$pieces/done"
  fi
  mapfile -t all < <(ls "$pieces"/pretrained.tgz.*)
  first=$((4 * (k - 1)))
  if [ "$first" -ge "${#all[@]}" ]; then echo "testbed v2: pack: only ${#all[@]} pieces, none left for call $k"; return 0; fi
  for ((i = first; i < first + 4 && i < ${#all[@]}; i++)); do cp "${all[$i]}" "$OUT/"; done
  echo "testbed v2: pack: pieces $((first + 1))-$i of ${#all[@]} in \$OUT"
}
mkdir -p "$run"
case $mode in
  auto)
    tb --phase corpus
    if [ -f "$run/packed/corpus/manifest.json" ] && ! cmp -s "$run/packed/corpus/manifest.json" "$run/corpus/manifest.json"; then
      echo "testbed v2: the corpus made here differs from the one the restored model was pretrained on" \
           "($run/packed/corpus/manifest.json); start a new run" >&2
      exit 2
    fi
    m=$(minutes_left 15)
    [ "$m" != 0 ] || unfinished pretrain
    r=0; tb --phase pretrain --max-minutes "$m" || r=$?
    check pretrain "$r"
    [ -z "${PACK:-}" ] || pack_pieces "$PACK"
    s2_left=0
    for phase in allocations eval stage2 eval; do
      share=100; [ "$phase" != stage2 ] || share=${STAGE2_SHARE:-100}
      r=0; sharded "$phase" "$share" || r=$?
      # With STAGE2_SHARE, an unfinished stage 2 still lets this call evaluate the models it made.
      if [ "$phase" = stage2 ] && [ -n "${STAGE2_SHARE:-}" ] && [ "$r" = 3 ]; then s2_left=1; r=0; fi
      check "$phase" "$r"
    done
    [ "$s2_left" = 0 ] || unfinished stage2
    report
    echo "testbed v2: done" ;;
  report) report ;;
  pack)
    k=${2:?usage: gpu_v2.sh pack K [RUN_DIR]}
    case $k in ''|*[!0-9]*|0) echo "gpu_v2.sh: pack: K must be a whole number above 0, got '$k'" >&2; exit 2 ;; esac
    pack_pieces "$k" ;;
  restore)
    src=${2:?usage: gpu_v2.sh restore PIECES_DIR [RUN_DIR]}
    ls "$src"/pretrained.tgz.* >/dev/null 2>&1 || { echo "gpu_v2.sh: restore: no pretrained.tgz.* pieces in $src" >&2; exit 2; }
    [ ! -e "$run/pretrained" ] || { echo "gpu_v2.sh: restore: $run already has a pretrained model" >&2; exit 2; }
    # Into a scratch folder first: pieces that do not make a whole archive leave nothing behind.
    rm -rf "$run/packed.tmp" && mkdir -p "$run/packed.tmp"
    if ! cat "$src"/pretrained.tgz.* | tar xzf - -C "$run/packed.tmp" 2>/dev/null; then
      rm -rf "$run/packed.tmp"
      echo "gpu_v2.sh: restore: the pieces in $src do not make a whole archive (one missing or cut short?)" >&2; exit 2
    fi
    done_work=""
    if [ -f "$src/testbed-v2.tgz" ]; then
      # The report's allocations and evals belong to the model they were made on: compare records.
      mkdir -p "$run/packed.tmp/report"
      # The whole report (a few MB): what restore keeps of it is checked below, not listed to tar.
      if ! tar xzf "$src/testbed-v2.tgz" -C "$run/packed.tmp/report" 2>/dev/null \
          || [ ! -f "$run/packed.tmp/report/pretrain.json" ] || [ ! -d "$run/packed.tmp/report/allocations" ]; then
        rm -rf "$run/packed.tmp"
        echo "gpu_v2.sh: restore: $src/testbed-v2.tgz is not a readable report with pretrain.json and allocations/" >&2; exit 2
      fi
      if ! cmp -s "$run/packed.tmp/report/pretrain.json" "$run/packed.tmp/pretrain.json"; then
        rm -rf "$run/packed.tmp"
        echo "gpu_v2.sh: restore: $src/testbed-v2.tgz comes from another pretraining run than the pieces" \
             "(pretrain.json differs)" >&2; exit 2
      fi
      done_work=" with $(ls "$run/packed.tmp/report/allocations" | wc -l) allocations and"
      done_work+=" $(find "$run/packed.tmp/report/eval" -name '*.json' 2>/dev/null | wc -l) evals"
    fi
    rm -rf "$run/packed" && mv "$run/packed.tmp" "$run/packed"
    mv "$run/packed/pretrained" "$run/packed/pretrain.json" "$run/packed/pretrain-log.jsonl" \
      "$run/packed/settings.json" "$run/"
    if [ -d "$run/packed/report" ]; then
      mv "$run/packed/report/allocations" "$run/"
      [ ! -d "$run/packed/report/eval" ] || mv "$run/packed/report/eval" "$run/"
    fi
    echo "testbed v2: restored the pretrained model$done_work into $run; run auto next" ;;
  *) echo "gpu_v2.sh: the first argument must be auto, report, pack or restore" >&2; exit 2 ;;
esac
