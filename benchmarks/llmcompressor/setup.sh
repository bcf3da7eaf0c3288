#!/usr/bin/env bash
# Create benchmarks/llmcompressor/.venv: an isolated environment for running
# llm-compressor's GPTQ next to ours. llm-compressor pins its own transformers
# (<=5.17), which conflicts with the project's dev venv, hence a separate venv.
#
# torch is pinned to 2.13.0 (the local CPU wheel) and enforced through a
# constraint file, so llm-compressor's dependency resolution cannot swap it for
# a CUDA build. llmcompressor 0.14.0.1 requires torch>=2.10.0,<=2.14.0, which
# admits 2.13.0, so no --no-deps trickery is needed.
#
# Idempotent: if the venv exists and imports the pinned versions, it only
# prints them. Set LLMC_SETUP_FORCE=1 to rebuild from scratch.
# After the first run everything is installed; running the benchmark needs no
# network (set HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.venv"
PY="${PYTHON:-python3.11}"

TORCH_VERSION="2.13.0"
LLMCOMPRESSOR_VERSION="0.14.0.1"
# llmcompressor 0.14.0.1 pins compressed-tensors==0.19.0 and
# transformers>=5.15.0,<=5.17.0; we pin the newest allowed transformers.
TRANSFORMERS_VERSION="5.17.0"

check() {
    "$VENV/bin/python" - "$TORCH_VERSION" "$LLMCOMPRESSOR_VERSION" "$TRANSFORMERS_VERSION" <<'EOF'
import sys
import torch, transformers, llmcompressor, compressed_tensors, datasets
want_torch, want_llmc, want_tf = sys.argv[1:4]
ok = (torch.__version__.split("+")[0] == want_torch
      and llmcompressor.__version__ == want_llmc
      and transformers.__version__ == want_tf)
from llmcompressor import oneshot  # noqa: F401
from llmcompressor.modifiers.quantization import GPTQModifier  # noqa: F401
print(f"python              {sys.version.split()[0]}")
print(f"torch               {torch.__version__}")
print(f"transformers        {transformers.__version__}")
print(f"llmcompressor       {llmcompressor.__version__}")
print(f"compressed-tensors  {compressed_tensors.__version__}")
print(f"datasets            {datasets.__version__}")
sys.exit(0 if ok else 1)
EOF
}

if [[ "${LLMC_SETUP_FORCE:-0}" != "1" && -x "$VENV/bin/python" ]]; then
    if check 2>/dev/null; then
        echo "llmcompressor venv already set up at $VENV"
        exit 0
    fi
    echo "existing venv at $VENV is incomplete; (re)installing"
fi

if [[ "${LLMC_SETUP_FORCE:-0}" == "1" ]]; then
    rm -rf "$VENV"
fi
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"

CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
cat >"$CONSTRAINTS" <<EOF
torch==$TORCH_VERSION
transformers==$TRANSFORMERS_VERSION
EOF

PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install --upgrade pip
# 1) the CPU torch wheel first (pinned: an unpinned torch pulls CUDA packages)
"${PIP[@]}" install "torch==$TORCH_VERSION"
# 2) llm-compressor and its dependencies, constrained so torch stays put
"${PIP[@]}" install -c "$CONSTRAINTS" \
    "llmcompressor==$LLMCOMPRESSOR_VERSION" \
    "transformers==$TRANSFORMERS_VERSION" \
    psutil

check
