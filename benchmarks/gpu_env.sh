# Source at the start of every command on the GPU machine (from the project's root):
#   . benchmarks/gpu_env.sh
# Unpacks the vLLM 0.26.0 bundle from /tmp/chunks once (see benchmarks/README.md), installs
# this project into it so that vLLM's engine processes find the plugins' entry points, and
# exports what every run needs.
if [ ! -d /tmp/site/vllm ]; then
  mkdir -p /tmp/site && cat /tmp/chunks/part* | xz -d -T16 | tar -C /tmp/site -xf -
fi
export PYTHONPATH=/tmp/site:$PWD:$PWD/tests VLLM_USE_FLASHINFER_SAMPLER=0
# Reinstall when the working tree changed since the last call on this machine.
stamp=$(find consa_vllm pyproject.toml -type f \( -name '*.py' -o -name '*.toml' \) | sort | xargs cat | sha1sum | cut -c1-12)
if [ ! -f "/tmp/site/.consa-$stamp" ]; then
  rm -rf /tmp/site/consa_vllm /tmp/site/consa_vllm-*.dist-info
  pip install -q --no-deps --no-build-isolation --target /tmp/site . >/tmp/consa-install.log 2>&1 \
    && touch "/tmp/site/.consa-$stamp" || { echo "install failed"; tail -20 /tmp/consa-install.log; }
fi
