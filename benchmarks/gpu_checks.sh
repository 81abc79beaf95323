#!/usr/bin/env bash
# Every GPU test of the project in one call on the GPU machine, independent files as
# parallel pytest processes (each engine is small: 6% of the GPU), logs and JSON reports
# under $OUT (default ./gpu-out). Source benchmarks/gpu_env.sh first. About 6-8 minutes on
# one H200.
#
#   . benchmarks/gpu_env.sh && bash benchmarks/gpu_checks.sh [-k EXPR]
#
# Quantized checkpoints: set CONSA_QUANT_CHECKPOINTS to a directory made on a CPU machine by
# `python tests/make_quant_checkpoints.py DIR` (else test_gpu_quant.py makes what it can).
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
# A fixed 1 GiB KV cache per engine: vLLM's memory profiling fails when other processes'
# engines start or stop on the same GPU meanwhile. Two CPU threads per process for the
# float32 references (8 processes on 16 cores).
export CONSA_GPU_REPORT_DIR="$OUT" VLLM_ENABLE_V1_MULTIPROCESSING=1 VLLM_WORKER_MULTIPROC_METHOD=spawn \
  CONSA_TEST_KV_CACHE_BYTES=$((1 << 30)) OMP_NUM_THREADS=2
run() {  # name, pytest args...
  local name=$1; shift
  ( start=$(date +%s)
    python -m pytest -q -s -p no:cacheprovider --junitxml="$OUT/$name.xml" "$@" >"$OUT/$name.log" 2>&1
    echo "$name: rc=$? $(( $(date +%s) - start )) s $(tail -1 "$OUT/$name.log")" | tee -a "$OUT/summary.txt" ) &
}
F=tests/test_gpu_families.py::test_gpu_calibrated_parity
run ops tests/test_gpu_ops.py
run engine tests/test_gpu_engine.py
run quant tests/test_gpu_quant.py
for case in qwen3_moe-0 mixtral-0 qwen3-0 qwen3-4 qwen3-16; do
  run "families-$case" "$F[$case]"
done
wait
cat "$OUT/summary.txt"
