#!/usr/bin/env bash
# Plan C of benchmarks/README.md in one call on the GPU machine: the calibrated rule on trained
# checkpoints (tests/test_gpu_checkpoint.py), several groups at once on one GPU. Each group is
# gpu_checks.sh's `checkpoint` case with its own model, allocations and engine options, its
# report in $OUT/<group>/gpu-checks.tgz. Parity does not depend on timing and each engine takes
# 6% of the GPU, so the groups share it; the references run on the GPU too
# (CONSA_GPU_REFERENCE_DEVICE=cuda, float32 without TF32). Source benchmarks/gpu_env.sh first.
#
#   bash benchmarks/gpu_checkpoint_groups.sh c cm ckv cfw
#
# Groups: c (run 7's trained Qwen3, four rho 0.75 allocations), c2 (the same model, four more),
# cm (run 7's model upcycled to Qwen3-MoE), ckv (run 7's model on an FP8 KV cache), cfw (run 7's
# model as an FP8 compressed-tensors checkpoint). The models are unpacked from the pieces in
# /tmp/pieces (.gpu/tbv2-pieces, .gpu/moe-pieces) on first use. gpu_checks.sh's REPEAT,
# HASHSEEDS and PROMPT_SEEDS pass through: PROMPT_SEEDS="1 2 3" runs each group once per prompt
# draw (plan C').
set -u
OUT=${OUT:-gpu-out}
A=benchmarks/results/testbed_v2_h200_run7/allocations
A3=$A/consa-kv_head-global-0.75.json,$A/duo-0.75.json,$A/consa-kv_head-per-layer-0.75-sink64.json
unpack() {  # archive prefix, target dir
  [ -d "$2" ] && return 0
  ( cd /tmp/pieces && sha256sum -c --ignore-missing --quiet SHA256SUMS* ) || { echo "bad pieces" >&2; return 1; }
  mkdir -p "$2" && cat /tmp/pieces/"$1".tgz.* | tar xzf - -C "$2"
}
known="c, c2, cm, ckv, cfw"
[ $# -gt 0 ] || { echo "gpu_checkpoint_groups: name one or more groups ($known)" >&2; exit 2; }
for g in "$@"; do  # every name checked before anything is unpacked or started
  case $g in
    c|c2|cm|ckv|cfw) ;;
    *) echo "gpu_checkpoint_groups: unknown group '$g' ($known)" >&2; exit 2 ;;
  esac
done
for g in "$@"; do
  case $g in
    c|c2|ckv|cfw) unpack pretrained /tmp/tbmodel || exit 1 ;;&
    cm) unpack moe /tmp/moe || exit 1 ;;
    cfw) unpack fp8w /tmp/fp8w || exit 1 ;;
  esac
done
mkdir -p "$OUT"
export CONSA_GPU_REFERENCE_DEVICE=cuda
port=20000
for g in "$@"; do
  model=/tmp/tbmodel/pretrained kv=""
  case $g in
    c) allocs=$A/consa-kv_head-global-0.75.json,$A/consa-kv_head-per-layer-0.75.json,$A/consa-kv_head-per-layer-0.75-sink64.json,$A/duo-0.75.json ;;
    c2) allocs=$A/consa-kv_head-global-0.5.json,$A/consa-kv_head-per-layer-0.5.json,$A/duo-0.5.json,$A/duo-0.75-sink64.json ;;
    cm) model=/tmp/moe/continued allocs=$A3,benchmarks/results/testbed_v2_run7_moe/allocations/consa-kv_head-global-0.75-moe.json ;;
    ckv) allocs=$A3 kv=fp8 ;;
    cfw) model=/tmp/fp8w/ct-fp8-channel allocs=$A3 ;;
  esac
  CONSA_GPU_CHECKPOINT=$model CONSA_GPU_CHECKPOINT_ALLOCATIONS=$allocs CONSA_GPU_CHECKPOINT_KV_CACHE_DTYPE=$kv \
    ONLY=checkpoint OUT=$OUT/$g PORT_BASE=$port bash benchmarks/gpu_checks.sh >"$OUT/$g.txt" 2>&1 &
  port=$((port + 6000))  # each group's processes their own ports (gpu_checks.sh: 200 per process)
done
wait
tail -n 3 "$OUT"/*.txt
