"""glibc malloc settings for an extraction process: one arena, no separately mapped blocks, no trimming.

An extraction frees and takes back the same few hundred MB every batch (the logits, zarr's inner chunks and
shard buffers). By default glibc hands blocks over 32 MB, emptied thread heaps and a heap's free top back to
the kernel, so every batch faults fresh pages in again; on a VM with free page reporting each of them is a
fault on the host. With these settings the process keeps what it freed and reuses it: less fill time and far
less kernel CPU, peak memory the same (the measurement: docs/benchmarks.md, section (b)).
The memory is not handed back before the process ends, which suits a job process and not a notebook.

glibc reads these only when a process starts, so ``headstore extract`` starts itself again, once, with
``GLIBC_TUNABLES`` set (tunables already in it come after ours, so they win); ``HEADSTORE_MALLOC_TUNING=0``
turns this off. Not ``headstore run``, whose analyses run many threads in the same process afterwards, nor
``extract()`` called from Python.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Sequence

TUNABLES = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
DONE = "HEADSTORE_MALLOC_TUNED"  # set in the restarted process, so it does not restart again
OPT_OUT = "HEADSTORE_MALLOC_TUNING"


def tuned_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` with the tunables put before any the caller set, and the restart marked done."""
    theirs = env.get("GLIBC_TUNABLES")
    return {**env, "GLIBC_TUNABLES": f"{TUNABLES}:{theirs}" if theirs else TUNABLES, DONE: "1"}


def restart_tuned(args: Sequence[str]) -> None:
    """Replace this process by ``python *args`` with the tunables set; returns (doing nothing) where that is
    done already, turned off, not glibc on Linux, or the restart fails."""
    if DONE in os.environ or os.environ.get(OPT_OUT, "1") == "0":
        return
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return
    try:
        os.execve(sys.executable, [sys.executable, *args], tuned_env(dict(os.environ)))
    except OSError:  # pragma: no cover - the same interpreter that runs this one
        return
