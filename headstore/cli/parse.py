"""The one place where command-line strings become the Python values the analyzers take.

``9.6`` -> ``(9, 6)``; ``9.6,9.9`` -> ``[(9, 6), (9, 9)]``; ``all`` -> ``"all"``; ``io=3`` -> ``3``;
``io=io_pos`` (a column of the store) -> that column; ``target=" Mary"`` -> its token id; the report's
``--sequences 0,1`` and ``--heads 0.1,1.2``, checked against the store. Errors name the option as written;
the analyzers' own errors pass through unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import xarray as xr

from headstore.analyze import _args
from headstore.store_schema import HeadstoreError

Parser = Callable[[str, xr.Dataset], Any]
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


def heads_or_all(text: str, what: str = "heads") -> list[tuple[int, int]] | str:
    return "all" if text.strip() == "all" else heads(text, what)


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


def _int(text: str) -> int | None:
    try:
        return int(text.strip())
    except ValueError:
        return None


def integer(text: str, ds: xr.Dataset) -> int:
    value = _int(text)
    if value is None:
        raise HeadstoreError(f"{text!r} is not an integer")
    return value


def boolean(text: str, ds: xr.Dataset) -> bool:
    low = text.strip().lower()
    if low not in ("true", "false", "1", "0", "yes", "no"):
        raise HeadstoreError(f"{text!r} is not true or false")
    return low in ("true", "1", "yes")


def string(text: str, ds: xr.Dataset) -> str:
    return text


def one_of(*choices: str) -> Parser:
    def parse(text: str, ds: xr.Dataset) -> str:
        if text not in choices:
            raise HeadstoreError(f"{text!r} is not one of {', '.join(choices)}")
        return text

    return parse


def some_of(*choices: str) -> Parser:
    """A comma list of distinct names among ``choices``: ``"Q,V"`` -> ``("Q", "V")``."""

    def parse(text: str, ds: xr.Dataset) -> tuple[str, ...]:
        items = tuple(s.strip() for s in text.split(",") if s.strip())
        bad = [s for s in items if s not in choices]
        if bad or not items:
            raise HeadstoreError(f"{text!r}: give a comma list of {', '.join(choices)}")
        return items

    return parse


def head_param(text: str, ds: xr.Dataset) -> tuple[int, int]:
    return head(text)


def heads_param(text: str, ds: xr.Dataset) -> list[tuple[int, int]] | str:
    return heads_or_all(text)


def column(text: str, ds: xr.Dataset) -> xr.DataArray:
    name = text.strip()
    if name not in ds or ds[name].dims != ("batch",):
        cols = [str(k) for k, v in ds.data_vars.items() if v.dims == ("batch",)]
        raise HeadstoreError(f"{name!r} is neither an integer nor a column of the store (columns: {', '.join(cols)})")
    return ds[name].load()


def position(text: str, ds: xr.Dataset) -> int | xr.DataArray:
    """An int, or the name of a per-sequence column of the store."""
    value = _int(text)
    return column(text, ds) if value is None else value


def token(text: str, ds: xr.Dataset) -> int | str:
    """A token id, or a token string (looked up by the analyzer with ``ds.hs.token_id``)."""
    value = _int(text)
    return text if value is None else value


def token_ids(text: str, ds: xr.Dataset) -> int | str | xr.DataArray:
    """A token id, ``next``, a per-sequence column of ids, or one token string (``ds.hs.token_id``)."""
    value = _int(text)
    if value is not None:
        return value
    if text == "next":
        return text
    if text.strip() in ds and ds[text.strip()].dims == ("batch",):
        return column(text, ds)
    return ds.hs.token_id(text)


def number(text: str, ds: xr.Dataset) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise HeadstoreError(f"{text!r} is not a number") from None


def predicate(text: str, ds: xr.Dataset) -> Any:
    """attention-search's ``query`` / ``key``: ``rel:any``, ``rel:previous``, ``rel:earlier-copy``, ``re:REGEX``,
    an integer (a token id), else a token string (``' if'``)."""
    import re

    from headstore.analyze import Relation

    relations = {"rel:any": Relation.ANY, "rel:previous": Relation.PREVIOUS, "rel:earlier-copy": Relation.EARLIER_COPY}
    if text.startswith("rel:"):
        if text not in relations:
            raise HeadstoreError(f"{text!r}: the relations are {', '.join(relations)}")
        return relations[text]
    if text.startswith("re:"):
        try:
            return re.compile(text[3:])
        except re.error as e:
            raise HeadstoreError(f"{text!r} is not a regular expression ({e})") from None
    value = _int(text)
    return text if value is None else value


def params(pairs: Sequence[str], parsers: Mapping[str, Parser], ds: xr.Dataset) -> dict[str, Any]:
    """``["top_k=3", "senders=9.6,9.9"]`` -> keyword arguments, each value through its parser."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in parsers:
            choices = ", ".join(parsers) or "(this analyzer takes none)"
            raise HeadstoreError(f"--param {pair!r}: expected key=value with key one of {choices}")
        try:
            out[key] = parsers[key](value, ds)
        except HeadstoreError as e:
            raise HeadstoreError(f"--param {key}: {e}") from None
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
