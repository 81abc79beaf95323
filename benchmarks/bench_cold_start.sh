#!/usr/bin/env bash
# Engine start from cold caches: stock layer-wise against a ConSA kv_head engine with the
# compile ahead of consa_vllm/plugin/precompile.py off and on. Each engine gets a fresh
# VLLM_CACHE_ROOT, as on a machine that never served (vLLM's torch.compile cache, its Triton
# kernels and consa_vllm's shared Triton folder all start empty), in the order
# ConSA off, stock, ConSA on, stock, so neither side is always first on the machine. Writes
# $OUT/cold_<n>_<name>.json (bench_serving.py, --diag-startup: each Triton compile is logged
# with its time in the JSON's logs).
#   OUT=... bash benchmarks/bench_cold_start.sh            (the Llama-3.1-8B shape, DuoAttention's
#                                                            50% pattern with sink 64, 32k engines)
set -u
OUT=${OUT:?set OUT}
ARGS=${ARGS:-"--shape llama3.1-8b --window 256 --allocation 0.5=benchmarks/allocations/duo-llama3.1-8b-0.5.json
  --requests 0 --b1-prompt 32768 --b1-output 16 --b1-repeats 1 --diag-startup"}
CONSA=${CONSA:-alloc0.5s64} STOCK=${STOCK:-layer0.5}
n=0
for spec in "$CONSA off 0" "$STOCK stock 1" "$CONSA on 1" "$STOCK stock 1"; do
  set -- $spec
  n=$((n + 1))
  root=$(mktemp -d /tmp/cold-root-XXXX)
  echo "== $n: $1 ($2), VLLM_CACHE_ROOT=$root"
  VLLM_CACHE_ROOT=$root CONSA_PRECOMPILE=$3 python benchmarks/bench_serving.py $ARGS --models "$1" \
    --out "$OUT/cold_${n}_$2.json" || echo "== $n failed"
  rm -rf "$root"
done
