"""``--fields auto``, resolved without torch (for runs and for plans from a model's config alone): the pattern
swapped for q, k where those take fewer bytes per token, and z derived on open where it can be."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from headstore.store_schema.layout import FIELDS, PRESETS, auto_stores_qk, derived_fields


class HeadShape(Protocol):
    """What the choice reads of a model (a ``ModelConfig`` has it)."""

    @property
    def n_heads(self) -> int: ...
    @property
    def n_key_value_heads(self) -> int: ...
    @property
    def d_head(self) -> int: ...


def auto_fields(
    items: Sequence[str],
    drop: Sequence[str],
    fields: tuple[str, ...],
    cfg: HeadShape,
    seq_len: int,
    all_pattern_layers: bool,
    cannot: Sequence[str] = (),
) -> tuple[str, ...]:
    """``fields`` as ``--fields auto`` (among ``items``) resolves them at ``seq_len``: pattern swapped for q, k
    when ``auto_stores_qk`` (unless another item selects pattern, ``--pattern-layers`` keeps only some layers,
    or the family ``cannot`` store q or k), and z stored again wherever open_store could not derive it."""
    if "auto" not in items:
        return fields
    others = {f for item in items if item != "auto" for f in PRESETS.get(item, (item,))} - set(drop)
    swap = (
        "pattern" in fields and "pattern" not in others and all_pattern_layers and not {"q", "k"} & set(cannot)
        and auto_stores_qk(cfg.n_heads, cfg.n_key_value_heads, cfg.d_head, seq_len)
    )  # fmt: skip
    out = set(fields) - {"pattern"} | {"q", "k"} if swap else set(fields)
    if "z" not in out and ("z" not in derived_fields(tuple(out)) or not all_pattern_layers):
        out.add("z")
    return tuple(n for n in FIELDS if n in out)
