"""The main job's text: a Hugging Face dataset on disk, read through ``--data hf:`` like any named dataset.

By default it is the Python standard library's long docstrings (real English prose that every machine has, so
the job runs offline), saved once with ``Dataset.save_to_disk`` under ``OUT/datasets/``. A researcher who has a
dataset at hand names it instead (``headstore run --text-data hf:stas/openwebtext-10k``): the text store's
windows are then exactly ``tokenize_and_concatenate``'s on that dataset, as ``--data hf:`` makes them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

DEFAULT_NAME = "python-stdlib-docstrings"


def stdlib_docstrings_dataset(folder: Path, limit_chars: int = 1_000_000) -> Path:
    """``folder`` as a saved ``datasets.Dataset`` with one ``text`` column: the standard library's docstrings of
    more than 200 characters, in file order (written aside, then renamed: complete or absent)."""
    import datasets

    from headstore.extract.data.text import stdlib_docstrings

    if (folder / "state.json").is_file():
        return folder
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    quiet = not datasets.utils.are_progress_bars_disabled()
    if quiet:  # save_to_disk's bar, inside the job's own stage lines
        datasets.disable_progress_bars()
    try:
        datasets.Dataset.from_dict({"text": stdlib_docstrings(limit_chars)}).save_to_disk(str(tmp))
    finally:
        if quiet:
            datasets.enable_progress_bars()
    tmp.rename(folder)
    return folder


def text_data(out: Path, named: str | None) -> str:
    """The ``--data`` of the main job's text store: ``named`` when given, else the default dataset under ``out``."""
    if named:
        return named
    return f"hf:{stdlib_docstrings_dataset(out / 'datasets' / DEFAULT_NAME)}"
