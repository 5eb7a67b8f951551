"""The report's own options, as the command line writes them: ``--sequences 0,1`` and ``--heads 0.1,1.2``,
checked against the store (``headstore.cli.parse`` turns analyzer ``--param`` strings into values).
"""

from __future__ import annotations

import xarray as xr

from headstore.analyze import _args
from headstore.store_schema import HeadstoreError

MAX_DEFAULT_SEQUENCES = 2  # the report's attention viewer, without --sequences


def head(text: str, what: str = "head") -> tuple[int, int]:
    """``"9.6"`` -> ``(9, 6)``."""
    layer, dot, h = text.strip().partition(".")
    if not dot or not layer.strip().isdigit() or not h.strip().isdigit():
        raise HeadstoreError(f"{what} {text.strip()!r} is not LAYER.HEAD (e.g. 9.6)")
    return int(layer), int(h)


def heads(text: str, what: str = "heads") -> list[tuple[int, int]]:
    """``"9.6, 9.9"`` -> ``[(9, 6), (9, 9)]``; ``""`` -> ``[]``."""
    return [head(item, what) for item in text.split(",") if item.strip()]


def integers(text: str, what: str) -> list[int]:
    """``"0,1"`` -> ``[0, 1]``."""
    out = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        try:
            out.append(int(item))
        except ValueError:
            raise HeadstoreError(f"{what} item {item!r} is not an integer: write e.g. 0,1") from None
    return out


def parse_sequences(spec: str | None, n: int) -> list[int]:
    """``"0,1"`` -> ``[0, 1]`` (indices among the store's completed sequences); default: the first two."""
    if spec is None or not spec.strip():
        return list(range(min(MAX_DEFAULT_SEQUENCES, n)))
    out: list[int] = []
    for i in integers(spec, "--sequences"):
        if not 0 <= i < n:
            raise HeadstoreError(f"--sequences {i} is out of range: the store has {n} sequences (0..{n - 1})")
        if i not in out:
            out.append(i)
    return out


def parse_heads(spec: str | None, ds: xr.Dataset) -> list[tuple[int, int]]:
    """``"0.1,1.2"`` -> ``[(0, 1), (1, 2)]`` (model layer, head); checked against the store, repeats dropped."""
    if spec is None or not spec.strip():
        return []
    pairs = list(dict.fromkeys(heads(spec, "--heads")))
    return _args.heads(ds, pairs, "--heads")
