#!/usr/bin/env bash
# The only packages testbed v2 needs on the GPU machine beyond its image (torch, transformers,
# tokenizers, safetensors, matplotlib, tqdm, numpy): pydantic and its three dependencies, as
# wheels for the machine's Python 3.12 on x86-64, in .gpu/testbed-wheels (git-ignored, about
# 3 MB). A lease that runs only the testbed carries them instead of the 143 MB vLLM bundle:
#
#   bash benchmarks/testbed/gpu_wheels.sh                        # here, once per checkout
#   run(command="python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .gpu/testbed-wheels/*.whl && ...",
#       carry=[".gpu/testbed-wheels"])                            # there; then PYTHONPATH=/tmp/site:$PWD
#
# The versions are those of the vLLM 0.26.0 bundle that benchmarks/gpu_env.sh unpacks, so the
# same /tmp/site serves both.
set -euo pipefail
cd "$(dirname "$0")/../.."
dst=.gpu/testbed-wheels
mkdir -p "$dst"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$dst" pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
ls -l "$dst"
