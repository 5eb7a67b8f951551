"""The one place where command-line strings become the Python values the analyzers take.

``9.6`` -> ``(9, 6)``; ``9.6,9.9`` -> ``[(9, 6), (9, 9)]``; ``all`` -> ``"all"``; ``io=3`` -> ``3``;
``io=io_pos`` (a column of the store) -> that column; ``target=" Mary"`` -> its token id; the report's
``--sequences 0,1`` and ``--heads 0.1,1.2``, checked against the store. Errors name the option as written;
the analyzers' own errors pass through unchanged. Each declared parameter type
(``headstore.analyze.types``) has one parser here: :func:`parser_for`.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import xarray as xr

from headstore.analyze import types as T
from headstore.report.options import MAX_DEFAULT_SEQUENCES as MAX_DEFAULT_SEQUENCES
from headstore.report.options import head as head
from headstore.report.options import heads as heads
from headstore.report.options import integers as integers
from headstore.report.options import parse_heads as parse_heads
from headstore.report.options import parse_sequences as parse_sequences
from headstore.store_schema import HeadstoreError

Parser = Callable[[str, xr.Dataset], Any]


def heads_or_all(text: str, what: str = "heads") -> list[tuple[int, int]] | str:
    return "all" if text.strip() == "all" else heads(text, what)


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


BY_TYPE: dict[Any, Parser] = {
    int: integer,
    bool: boolean,
    str: string,
    T.Head: head_param,
    T.Heads: heads_param,
    T.Positions: position,
    T.Token: token,
    T.TokenIds: token_ids,
}


def parser_for(tp: Any) -> Parser:
    """The parser of a declared parameter type: one of ``BY_TYPE``, a ``Literal`` choice (:func:`one_of`) or a
    tuple of ``Literal`` choices (:func:`some_of`)."""
    if tp in BY_TYPE:
        return BY_TYPE[tp]
    if typing.get_origin(tp) is typing.Literal:
        return one_of(*typing.get_args(tp))
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple and len(args) == 2 and args[1] is Ellipsis:
        if typing.get_origin(args[0]) is typing.Literal:
            return some_of(*typing.get_args(args[0]))
    raise HeadstoreError(f"no --param parser for the type {tp!r}: add one to headstore/cli/parse.py")


def parsers(params: Mapping[str, Any]) -> dict[str, Parser]:
    """A declaration's ``params`` (name -> type) -> name -> parser of its ``--param`` string."""
    return {name: parser_for(tp) for name, tp in params.items()}
