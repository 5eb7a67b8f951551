"""Named points of creating and writing a store, where a test may stop the process (crash injection).

``create_store`` reaches ``"create:before_rename"``; ``StoreWriter.write_batch`` reaches
``"batch:N:after_field:NAME"`` after each field of batch ``N`` is written (and made durable), NAME a field
or ``"batch_done"`` (the manifest), with the field's folder and the batch index. Nothing happens there
unless a test installed a hook (tests/crash_cli.py kills the process at a chosen point): the production
write path reads no environment and costs one ``None`` check per point.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

Checkpoint = Callable[[str, "tuple[Path, int] | None"], None]
_hook: Checkpoint | None = None


def install(hook: Checkpoint | None) -> None:
    """Call ``hook(point, batch)`` at each checkpoint from now on (None: remove it). ``batch``: (field folder,
    batch index) of the field just written, None at creation."""
    global _hook
    _hook = hook


def reached(point: str, batch: tuple[Path, int] | None = None) -> None:
    if _hook is not None:
        _hook(point, batch)
