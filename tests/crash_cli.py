"""Test-only entry point: the headstore CLI with a crash hook installed (tests/test_reliability.py).

``HEADSTORE_TEST_KILL_AT`` names the point where the process SIGKILLs itself: "create:before_rename",
"batch:N:after_field:NAME" or "batch:N:torn_field:NAME" (N a batch index, NAME a field or "batch_done").
"torn_field" first cuts the batch's first chunk file of NAME in half and leaves a stray ".partial" file
beside it, as a crash in the middle of a chunk write would. The hook goes in through
``headstore.store_schema.write.checkpoint.install``; headstore itself never reads this variable.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

KILL_ENV = "HEADSTORE_TEST_KILL_AT"


def kill_at(want: str) -> None:
    """The hook: SIGKILL this process at the point ``want`` (tearing a file first for "torn_field")."""
    from headstore.store_schema.write import checkpoint
    from headstore.store_schema.write.durable import batch_files

    def hook(point: str, batch: tuple[Path, int] | None) -> None:
        if want.replace(":torn_field:", ":after_field:") != point:
            return
        if ":torn_field:" in want and batch is not None:
            first = batch_files(*batch)[0]
            data = first.read_bytes()
            first.write_bytes(data[: len(data) // 2])
            first.with_suffix(".0123.partial").write_bytes(data[: len(data) // 3])
        os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.install(hook)


if __name__ == "__main__":
    from headstore.cli import main
    from headstore.cli.malloc import restart_tuned

    if sys.argv[1:2] == ["extract"]:  # as `python -m headstore.cli extract` does, re-running this script
        restart_tuned([__file__, *sys.argv[1:]])
    if os.environ.get(KILL_ENV):
        kill_at(os.environ[KILL_ENV])
    main()
