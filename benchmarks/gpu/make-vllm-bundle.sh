#!/usr/bin/env bash
# Build vLLM (CUDA build) for the offline GPU machines, in pieces that fit one command each: a
# command carries at most 64 MiB, the working tree included, so a piece is 58 MiB less the tracked
# files (34 MiB, 5 pieces, with the 25 MB tree of December 2026; the device tool refused a 41 MiB
# piece beside that tree, which the files' sizes alone put 1 MiB under the limit, so keep 4 MiB spare).
#
# usage (on a CPU machine with package access):  bash benchmarks/gpu/make-vllm-bundle.sh [VLLM_VERSION]
# result: .gpu/c1 .. .gpu/cN under the repository's root (/.gpu/ is git-ignored; the rest of .gpu/,
# such as testbed wheels or checkpoints, is kept).
# Then follow "Running them on the GPU machines" in benchmarks/README.md to move and unpack them.
#
# Needs python3 with pip and packaging, and xz. The build (wheels, then one tar.xz of the
# site-packages tree) is cached under ${TMPDIR:-/tmp}/vllm-bundle-VERSION, so a second run only
# splits it again.
set -euo pipefail
VER=${1:-0.26.0}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)  # the repository's root, whatever the current directory
WORK=${TMPDIR:-/tmp}/vllm-bundle-$VER

# No build cache, but pieces from an earlier run (the tree grew since): join them and split again.
if [ ! -f "$WORK/site.tar.xz" ] && ls "$ROOT"/.gpu/c[0-9]*/part* >/dev/null 2>&1; then
  mkdir -p "$WORK" && cat $(find "$ROOT/.gpu" -path '*/c[0-9]*/part*' -printf '%f %p\n' | sort | cut -d' ' -f2-) \
      > "$WORK/site.tar.xz.part"
  xz -t "$WORK/site.tar.xz.part" && mv "$WORK/site.tar.xz.part" "$WORK/site.tar.xz"
fi
if [ ! -f "$WORK/site.tar.xz" ]; then
  rm -rf "$WORK" && mkdir -p "$WORK/wheels"
  # pins first: the first requirement seen for a name picks its version
  python3 "$HERE/resolve_wheels.py" "$WORK/wheels" "apache-tvm-ffi==0.1.11" "vllm==$VER" >&2
  plat=(); for n in 5 12 17 18 24 26 27 28 29 31 32 34 35 36 38 39; do plat+=(--platform "manylinux_2_${n}_x86_64"); done
  pip install -q --no-deps --no-compile --target "$WORK/site" --python-version 3.12 --implementation cp \
      --only-binary=:all: "${plat[@]}" --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
      --platform linux_x86_64 --platform any "$WORK"/wheels/*.whl >&2
  # Hopper runs FlashAttention 3; FA2, the Rust front end and Blackwell/DeepGEMM sources are not needed there.
  rm -rf "$WORK/site/vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so" "$WORK/site/vllm/vllm-rs" \
         "$WORK/site/vllm/third_party/deep_gemm" "$WORK/site/vllm/third_party/fmha_sm100"
  find "$WORK/site" -name '__pycache__' -prune -exec rm -rf {} +
  tar -C "$WORK/site" -cf - . | xz -T0 -6 > "$WORK/site.tar.xz.part" && mv "$WORK/site.tar.xz.part" "$WORK/site.tar.xz"
fi

tree_mib=$(( ($(git -C "$ROOT" ls-files -z | (cd "$ROOT" && xargs -0 cat) | wc -c) >> 20) + 1 ))
piece=$((58 - tree_mib))
if [ "$piece" -lt 16 ]; then
  echo "make-vllm-bundle: the tracked files take $tree_mib MiB of the 64 MiB a command carries; too little is left for pieces" >&2
  exit 1
fi
rm -rf "$ROOT"/.gpu/c[0-9]* && mkdir -p "$ROOT/.gpu"
( cd "$ROOT/.gpu" && split -b "${piece}M" -d "$WORK/site.tar.xz" part )
i=0
for p in "$ROOT"/.gpu/part*; do
  i=$((i + 1)); mkdir -p "$ROOT/.gpu/c$i"; mv "$p" "$ROOT/.gpu/c$i/"
done
echo "vLLM $VER bundle: $i pieces of $piece MiB in .gpu/c1 .. .gpu/c$i ($(du -sh "$WORK/site.tar.xz" | cut -f1) in all)"
