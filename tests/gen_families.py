"""Regenerate docs/families.md's support table from the family matrix: ``python -m tests.gen_families``.

Runs ``tests/test_families.py`` with ``HEADSTORE_WRITE_FAMILIES=1``: the table test writes the table it computes
into docs/families.md (between its markers) instead of only comparing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def main() -> int:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HEADSTORE_WRITE_FAMILIES": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_families.py"]
    return subprocess.call(cmd, cwd=root, env=env)


if __name__ == "__main__":
    sys.exit(main())
