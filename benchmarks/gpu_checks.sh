#!/usr/bin/env bash
# Every GPU test of the project in one call on the GPU machine, independent files as
# parallel pytest processes (each engine is small: 6% of the GPU), logs and JSON reports
# packed into $OUT/gpu-checks.tgz (OUT default ./gpu-out). Source benchmarks/gpu_env.sh first. About 7-9 minutes on
# one H200 (36 processes of one to three compiled engines each, one after another).
#
#   . benchmarks/gpu_env.sh && bash benchmarks/gpu_checks.sh
#
# ONLY="PREFIX ..." runs only the cases whose names start with one of the prefixes (e.g.
# ONLY="float32 same-model-mixtral"; "NAME=" selects exactly the case NAME). Quantized checkpoints: set CONSA_QUANT_CHECKPOINTS to a directory made on a CPU machine by
# `python tests/make_quant_checkpoints.py DIR` (else test_gpu_quant.py makes what it can).
# REPEAT=N runs each selected case N times at once (logs NAME.rK.log, reports under rK/):
# for intermittent failures, e.g. REPEAT=6 ONLY="same-model-mixtral-all_f= same-model-mixtral-all_f_privatecache=" (run 16).
# HASHSEEDS="S1 S2 ..." repeats instead once per listed seed, with PYTHONHASHSEED set to it (a seed
# may repeat): an outcome that follows the seed points at an iteration over a set or a str hash.
# PROMPT_SEEDS="S1 S2 ..." repeats once per listed seed with CONSA_GPU_PROMPT_SEED set to it (tags
# .pS): the calibrated tests draw other prompts (gpu_parity.prompt_draw; test_gpu_checkpoint.py
# cuts its text at other offsets); seed 0 is every committed run's prompts. Engines queue each round whole (tests/engine_harness.py), so a repeat on the same
# prompts reruns the same batches: the rule's spread across runs comes from other prompts.
# Cases listed under DIAG below run only when ONLY names them.
set -u
for v in HASHSEEDS PROMPT_SEEDS; do
  [ -n "${!v:-}" ] || continue
  for s in ${!v}; do
    case $s in *[!0-9]*) echo "gpu_checks: $v must be whole numbers, got '$s'" >&2; exit 2 ;; esac
  done
  [ -z "${REPEAT:-}" ] || { echo "gpu_checks: set one of REPEAT, HASHSEEDS and PROMPT_SEEDS" >&2; exit 2; }
  set -- ${!v}; REPEAT=$#; set --
done
case ${REPEAT:-1} in
  ''|*[!0-9]*|0) echo "gpu_checks: REPEAT must be a positive integer, got '${REPEAT}'" >&2; exit 2 ;;
esac
case ${PORT_BASE:-20000} in
  *[!0-9]*) echo "gpu_checks: PORT_BASE must be a port number, got '${PORT_BASE}'" >&2; exit 2 ;;
esac
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
# A fixed 1 GiB KV cache per engine: vLLM's memory profiling fails when other processes'
# engines start or stop on the same GPU meanwhile. One CPU thread per process for the
# float32 references (16 processes on 16 cores). Each engine runs in its own process
# (several compiled in-process engines in one process hit a CUDA allocator assert).
export CONSA_GPU_REPORT_DIR="$OUT" VLLM_ENABLE_V1_MULTIPROCESSING=1 VLLM_WORKER_MULTIPROC_METHOD=spawn \
  CONSA_TEST_KV_CACHE_BYTES=$((1 << 30)) OMP_NUM_THREADS=1
# Each process's engines take ports from a range of their own (vLLM scans up from VLLM_PORT):
# left to the kernel, two of ~30 engines starting at once drew the same port for their process
# group in run 27 (EADDRINUSE). Several gpu_checks.sh at once (gpu_checkpoint_groups.sh) each
# need a PORT_BASE of their own: 200 ports per process, up to 150 processes from 20000.
PORT_BASE=${PORT_BASE:-20000} NPROC=0
run() {  # name, pytest args...  (INPROC=1: the engine in the test's own process; DIAG=1: only if ONLY names it)
  local name=$1; shift
  if [ -n "${ONLY:-}" ]; then
    local p hit=0
    for p in $ONLY; do
      case $p in
        *=) [ "$name" = "${p%=}" ] && hit=1 ;;  # NAME= : exactly that case
        *) case $name in "$p"*) hit=1 ;; esac ;;
      esac
    done
    [ $hit = 1 ] || return 0
  elif [ "${DIAG:-0}" = 1 ]; then
    return 0
  fi
  local k tag seed
  for k in $(seq 1 "${REPEAT:-1}"); do
    NPROC=$((NPROC + 1))
    tag=$name; [ "${REPEAT:-1}" = 1 ] || tag=$name.r$k
    seed="" pseed=""
    [ -z "${HASHSEEDS:-}" ] || { seed=$(echo $HASHSEEDS | cut -d' ' -f"$k"); tag=$tag.h$seed; }
    [ -z "${PROMPT_SEEDS:-}" ] || { pseed=$(echo $PROMPT_SEEDS | cut -d' ' -f"$k"); tag=$tag.p$pseed; }
    ( export VLLM_PORT=$((PORT_BASE + 200 * NPROC))
      [ "${INPROC:-0}" = 1 ] && export VLLM_ENABLE_V1_MULTIPROCESSING=0
      [ -z "$seed" ] || export PYTHONHASHSEED=$seed
      [ -z "$pseed" ] || export CONSA_GPU_PROMPT_SEED=$pseed
      [ "${REPEAT:-1}" = 1 ] || { mkdir -p "$OUT/r$k"; export CONSA_GPU_REPORT_DIR="$OUT/r$k"; }
      start=$(date +%s)
      python -m pytest -q -s -p no:cacheprovider --junitxml="$OUT/$tag.xml" "$@" >"$OUT/$tag.log" 2>&1
      echo "$tag: rc=$? $(( $(date +%s) - start )) s $(tail -1 "$OUT/$tag.log")" | tee -a "$OUT/summary.txt" ) &
  done
}
Q=tests/test_gpu_quant.py
QP=$Q::test_gpu_quantized_kv_head_calibrated_parity
E=tests/test_gpu_engine.py
F=tests/test_gpu_families.py::test_gpu_calibrated_parity
run ops tests/test_gpu_ops.py
# Rounds queued whole: the same batches as an in-process engine, and the same logprobs for the
# same batches (bf16, CUDA graphs): what makes the parity reports' engines comparable.
run schedule tests/test_engine_schedule.py
# It inspects the engine core's model runner: in-process (one compiled engine, one eager).
INPROC=1 run engine-greedy "$E::test_gpu_greedy_parity"
# The split small decode in every mixed layer: the default (CONSA_SMALL_DECODE=auto) splits only
# layers with at least 4 F heads, which the test models' mixed layers never have.
CONSA_SMALL_DECODE=split INPROC=1 run engine-greedy-split "$E::test_gpu_greedy_parity"
run engine-bf16-prefill "$E::test_gpu_bf16_flash_prefill_matches_fused"
# Triton's compile hook sees the engine only in the test's own process.
INPROC=1 run engine-precompile "$E::test_gpu_kernels_compile_ahead_of_their_first_launch"
run engine-fp8 "$E::test_gpu_fp8_kv_cache_calibrated"
run quant-1 "$QP[ct-fp8-tensor]" "$QP[ct-fp8-channel]"
run quant-2 "$QP[ct-fp8-block]" "$QP[ct-w4a16]"
run quant-3 "$QP[ct-w4a16-asym]" "$QP[ct-w4a16-gptq-actorder]"
run quant-4 "$QP[awq]" "$QP[gptq]"
run quant-5 "$Q::test_gpu_native_fp8_block_permutation_is_exact" "$Q::test_gpu_native_fp8_block_kv_head_calibrated_parity"
run quant-6 "$Q::test_gpu_online_fp8_kv_head_calibrated_parity"
# The same rules on the sharp-attention model (every attention logit x3, gpu_parity.SHARP).
run engine-fp8-sharp "$E::test_gpu_fp8_kv_cache_calibrated_sharp_attention"
QS=${QP}_sharp_attention
run quant-sharp-1 "$QS[ct-fp8-tensor]" "$QS[ct-fp8-channel]" "$QS[ct-fp8-block]"
run quant-sharp-2 "$QS[ct-w4a16]" "$QS[ct-w4a16-asym]" "$QS[ct-w4a16-gptq-actorder]"
run quant-sharp-3 "$QS[awq]" "$QS[gptq]" "$Q::test_gpu_online_fp8_kv_head_calibrated_parity_sharp_attention"
# The two formats whose max missed in run 27 (one token each, n.s.), alone: with PROMPT_SEEDS,
# other prompt draws for the rule across runs (docs/DESIGN.md §10). Only when ONLY names it.
DIAG=1 run quant-sharp-misses "$QS[ct-fp8-block]" "$QS[ct-w4a16-asym]"
# W4A16 asym alone: the FP8 block format's draws are settled (run 30), this one's are not.
DIAG=1 run quant-sharp-asym "$QS[ct-w4a16-asym]"
for case in qwen3_moe-0 mixtral-0 qwen3-0 qwen3-4 qwen3-16; do
  run "families-$case" "$F[$case]"
done
# The same rule on the same models with every attention logit scaled 3x (see the test).
for case in qwen3_moe-0 mixtral-0 qwen3-0 qwen3-16; do
  run "families-sharp-$case" "${F}_sharp_attention[$case]"
done
S=tests/test_gpu_families.py::test_gpu_same_model_parity
# Two engines per case; Mixtral's layer-shaped export also through the diagnostic variants
# (Triton only, eager, compiled without CUDA graphs), each its own process.
for case in qwen3_moe-all_f qwen3_moe-layer_shaped mixtral-all_f mixtral-layer_shaped mixtral-layer_shaped_triton \
    mixtral-layer_shaped_eager mixtral-layer_shaped_nographs qwen3-all_f qwen3-layer_shaped llama-all_f \
    llama-layer_shaped; do
  run "same-model-$case" "$S[$case]"
done
# A trained checkpoint under learned allocations (skipped unless CONSA_GPU_CHECKPOINT and
# CONSA_GPU_CHECKPOINT_ALLOCATIONS name them; see the test's docstring).
run checkpoint tests/test_gpu_checkpoint.py
# Inductor's padded router logits, forced: stock vLLM misroutes, the ConSA engine is guarded.
run router-padding tests/test_gpu_families.py::test_gpu_router_padding
# Diagnostics of compiled engines (run 16 found the Mixtral defect with the second), only when
# ONLY names them.
for case in mixtral-all_f_eager mixtral-all_f_privatecache; do
  DIAG=1 run "same-model-$case" "$S[$case]"
done
# float32 greedy parity of every family, uneven and layer-shaped: four cases per process, the
# Mixtral layer-shaped case first (it runs the fused Triton kernel alone: see the test).
P=tests/test_gpu_families.py::test_gpu_float32_family_parity
run float32-1 "$P[mixtral-layer_shaped]" "$P[mixtral-uneven]" "$P[qwen3_moe-layer_shaped]" "$P[qwen3_moe-uneven]"
run float32-2 "$P[qwen3-uneven]" "$P[qwen3-layer_shaped]" "$P[qwen2-uneven]" "$P[qwen2-layer_shaped]"
run float32-3 "$P[llama-uneven]" "$P[llama-layer_shaped]" "$P[mistral-uneven]" "$P[mistral-layer_shaped]"
# A command on the GPU machine is stopped at 10 minutes with everything it started, the
# packing below included: stop the tests at DEADLINE seconds (default 540) instead.
# The sleep must not hold our stdout: a pipe into tail/grep would wait for it.
# Killing the sleep wakes the watchdog, so it stops only if the tests have not finished: with
# several gpu_checks.sh at once (gpu_checkpoint_groups.sh), one that finishes must not stop the
# others' tests.
done_flag="$OUT/.tests-done"
rm -f "$done_flag"
( sleep "${DEADLINE:-540}" >/dev/null 2>&1; [ -e "$done_flag" ] && exit 0
  echo "gpu_checks: DEADLINE reached, stopping the tests" | tee -a "$OUT/summary.txt"
  pkill -f "pytest -q -s -p no:cacheprovider" ) &
watchdog=$!
tests=$(jobs -p | grep -vx "$watchdog")
[ -z "$tests" ] || wait $tests
touch "$done_flag"
pkill -P "$watchdog" 2>/dev/null; wait "$watchdog" 2>/dev/null
rm -f "$done_flag"
cat "$OUT/summary.txt"
# At most 8 files per command come back from the GPU machine: one archive holds them all.
tar czf "$OUT.tgz" -C "$OUT" . && rm -rf "${OUT:?}"/* && mv "$OUT.tgz" "$OUT/gpu-checks.tgz"
