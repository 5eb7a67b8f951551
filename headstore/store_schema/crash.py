"""Test-only crash injection: the process SIGKILLs itself at a named point of creating or writing a store."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from headstore.store_schema.durable import batch_files

# Used by tests/test_reliability.py. When the environment variable is set to
# "create:before_rename", "batch:N:after_field:NAME" or "batch:N:torn_field:NAME" (N = batch index,
# NAME a field or "batch_done"), the process SIGKILLs itself at that point; "torn_field" first cuts
# the batch's first chunk file of NAME in half and leaves a stray ".partial" file beside it, as a
# crash in the middle of a chunk write would. Unset in normal use: costs one dict lookup.
TEST_KILL_ENV = "HEADSTORE_TEST_KILL_AT"


def _test_kill(point: str, batch: tuple[Path, int] | None = None) -> None:
    """``batch``: (field folder, batch index) whose first file "torn_field" cuts."""
    want = os.environ.get(TEST_KILL_ENV)
    if not want or want.replace(":torn_field:", ":after_field:") != point:
        return
    if ":torn_field:" in want and batch is not None:
        first = batch_files(*batch)[0]
        data = first.read_bytes()
        first.write_bytes(data[: len(data) // 2])
        first.with_suffix(".0123.partial").write_bytes(data[: len(data) // 3])
    os.kill(os.getpid(), signal.SIGKILL)
