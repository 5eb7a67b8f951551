"""``headstore extract``'s option strings turned into ``ExtractRequest``'s values, at the command line's edge.

``--fields default,-pattern,q,k`` -> ``fields=("default", "q", "k"), drop=("pattern",)``; ``--layers 2-5`` ->
``(2, 3, 4, 5)``; ``--layers all`` -> ``"all"``; ``--shard 0/2`` -> ``(0, 2)``. Errors name the option as written.
"""

from __future__ import annotations

from typing import Literal

from headstore.store_schema import HeadstoreError, parse_fields


def fields_option(spec: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``"default,-pattern,q"`` -> ``(("default", "q"), ("pattern",))``: the names and presets, the removals."""
    parse_fields(spec)  # refuses an unknown name or a removal of nothing, naming --fields as written
    items = [s.strip() for s in spec.split(",") if s.strip()]
    return tuple(s for s in items if not s.startswith("-")), tuple(s[1:].strip() for s in items if s.startswith("-"))


def layers_option(spec: str, option: str = "--layers") -> tuple[int, ...] | Literal["all"]:
    """``all`` (or empty) | ``0,3,5`` | ``2-5``; the model's range is checked when it is loaded."""
    if spec.strip() in ("all", ""):
        return "all"
    out: set[int] = set()
    try:
        for part in spec.split(","):
            if "-" in part:
                a, b = part.split("-")
                out.update(range(int(a), int(b) + 1))
            else:
                out.add(int(part))
    except ValueError as e:
        raise HeadstoreError(f"{option} {spec!r} is not 'all', a list like 0,3,5 or a range like 2-5") from e
    if not out or min(out) < 0:
        raise HeadstoreError(f"{option} {spec!r} is not 'all', a list like 0,3,5 or a range like 2-5")
    return tuple(sorted(out))


def shard_option(spec: str) -> tuple[int, int]:
    """``"0/2"`` -> ``(0, 2)``."""
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError as e:
        raise HeadstoreError(f"--shard {spec!r} must look like i/N (e.g. 0/2)") from e
    if n < 1 or not 0 <= i < n:
        raise HeadstoreError(f"--shard {spec!r} needs 0 <= i < N")
    return i, n
