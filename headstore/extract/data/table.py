"""``jsonl:FILE``, ``csv:FILE``, ``parquet:FILE``: the researcher's own prompts, one per row.

A row has either a ``text`` column (a string, tokenised without special tokens, BOS prepended
unless ``--no-prepend-bos``) or a ``tokens`` column (a list of token ids, used as is: no BOS is
added, as for ``tokens:FILE.npy``). Rows are right-padded with the pad token to the longest row, or
to ``--seq-len``; ``--n-seq N`` takes the first N rows.

Every other integer or string column becomes a per-sequence store column, kept as it is. Three
suffixes name positions and tokens in the row's own terms (``NAME`` is the stored column):

- ``NAME_char`` (integer): a character offset into ``text``; ``NAME`` = the position of the token
  whose span holds that character (positions count the BOS token).
- ``NAME_word`` (integer): a 0-based index of a whitespace-separated word of ``text``; ``NAME`` =
  the position of the word's first token.
- ``NAME_str`` (string): ``NAME`` = the id of the one token this string is (``" Mary"``).

The suffixed columns are stored too. ``length`` (real tokens, BOS included) and ``end_pos``
(``length - 1``) are added unless the file gives them: a file's ``length`` must equal the real
length, a file's ``end_pos`` is kept (it must lie inside the row).

Rows are counted from 0, the row's ``batch`` index in the store. The same column rules serve the
sidecar of ``tokens:FILE.npy,COLUMNS`` (see :func:`sidecar_columns`), where there is no text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from headstore.extract.data.base import DataRequest, TokenDataset, bos_id, pad_id
from headstore.store_schema.errors import HeadstoreError
from headstore.store_schema.layout import DIMS, FIELDS, MANIFEST, WEIGHTS
from headstore.store_schema.strings import stored_names

FORMATS = {"jsonl": ".jsonl", "csv": ".csv", "parquet": ".parquet"}
SUFFIXES = ("_char", "_word", "_str")
# Names a column cannot take: every array and dimension a store has (vocab stored as vocab_bytes, vocab_offsets).
RESERVED = frozenset(FIELDS) | frozenset(WEIGHTS) | frozenset(DIMS) | {"vocab", *stored_names("vocab"), MANIFEST}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_WORD = re.compile(r"\S+")


def read_table(path: Path, fmt: str) -> pd.DataFrame:
    """The file as a DataFrame, every read problem a one-line HeadstoreError naming the file."""
    if not path.is_file():
        raise HeadstoreError(f"{fmt} file {path} does not exist")
    try:
        if fmt == "jsonl":
            # dtype=False: no guessing (a string of digits stays a string, no date parsing)
            df = pd.read_json(path, lines=True, dtype=False)
        elif fmt == "csv":
            header = pd.read_csv(path, nrows=0).columns
            # the text, token lists and *_str cells stay strings (" 12" is not the number 12); only
            # an empty cell is missing ("NA" and "None" are names, not missing values)
            as_str = {c: str for c in header if c in ("text", "tokens") or str(c).endswith("_str")}
            df = pd.read_csv(path, dtype=as_str, keep_default_na=False, na_values=[""])
        else:
            df = pd.read_parquet(path)
    except ImportError as e:
        raise HeadstoreError(f"reading {path} needs pyarrow ({e}): pip install 'headstore[extract]'") from e
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    except Exception as e:  # pandas, its csv parser and pyarrow raise many types, some with long messages
        why = _where_json_breaks(path, fmt) or _first_line(e)
        raise HeadstoreError(f"{path} is not a readable {fmt} file: {why}") from e
    return df


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _where_json_breaks(path: Path, fmt: str) -> str:
    """For a JSONL file pandas could not read: the first line that is not one JSON object."""
    if fmt != "jsonl":
        return ""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        return str(e)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            return f"line {i + 1} is not JSON ({e.msg}): write one JSON object per line"
        if not isinstance(obj, dict):
            return f"line {i + 1} is not a JSON object: write one object per line"
    return ""


# --- columns ----------------------------------------------------------------------------------


def _column_array(df: pd.DataFrame, name: str, where: str) -> np.ndarray:
    """An integer or string column as a numpy array (integers keep their dtype); refuse the rest."""
    s = df[name]
    missing = np.flatnonzero(s.isna().to_numpy())
    if missing.size:
        raise HeadstoreError(
            f"column {name!r} of {where} has no value in row {int(missing[0])}: fill every row or drop the column"
        )
    dt = s.dtype
    if pd.api.types.is_bool_dtype(dt):
        raise HeadstoreError(f"column {name!r} of {where} holds booleans: write them as 0/1 or drop the column")
    if pd.api.types.is_integer_dtype(dt):
        return s.to_numpy(dtype=np.dtype(dt.numpy_dtype if hasattr(dt, "numpy_dtype") else dt))
    if pd.api.types.is_float_dtype(dt):
        raise HeadstoreError(
            f"column {name!r} of {where} holds floats: only integer and string columns are stored; "
            "write it as integers or strings, or drop it"
        )
    values = s.tolist()
    if all(isinstance(v, str) for v in values):
        return np.asarray(values, dtype=str)
    if all(isinstance(v, int | np.integer) and not isinstance(v, bool | np.bool_) for v in values):
        return np.asarray(values, dtype=np.int64)
    kinds = sorted({type(v).__name__ for v in values})
    raise HeadstoreError(
        f"column {name!r} of {where} holds {'/'.join(kinds)} values ({dt}): only integer and string columns "
        "are stored; write one integer or string per row, or drop the column"
    )


def _check_names(names: list[Any], where: str, source: tuple[str, ...]) -> None:
    for name in names:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise HeadstoreError(
                f"column name {name!r} of {where} is not a plain name: use letters, digits, '_' and '-', "
                "starting with a letter or '_'"
            )
        if name in RESERVED and name not in source:
            raise HeadstoreError(f"column {name!r} of {where} has the name of a store array: rename it")
        for suf in SUFFIXES:
            if name == suf:
                raise HeadstoreError(f"column {name!r} of {where} needs a name before {suf} (e.g. io_pos{suf})")
    if len(set(names)) != len(names):
        raise HeadstoreError(f"{where} has two columns of the same name: rename one")


def _stored_name(name: str) -> tuple[str, str]:
    for suf in SUFFIXES:
        if name.endswith(suf):
            return name[: -len(suf)], suf
    return name, ""


class _Rows:
    """Token positions of a text table's rows (the offset mapping, fetched once when needed)."""

    def __init__(self, texts: list[str], ids: list[list[int]], shift: int, tokenizer: Any, where: str) -> None:
        self.texts, self.ids, self.shift, self.tokenizer, self.where = texts, ids, shift, tokenizer, where
        self._offsets: list[list[tuple[int, int]]] | None = None

    def offsets(self, column: str) -> list[list[tuple[int, int]]]:
        if self._offsets is None:
            if not getattr(self.tokenizer, "is_fast", False):
                raise HeadstoreError(
                    f"column {column!r} of {self.where} needs the tokenizer's offset mapping, which only fast "
                    "tokenizers have: give the token position itself as an integer column"
                )
            enc = self.tokenizer(self.texts, add_special_tokens=False, return_offsets_mapping=True)
            if [list(x) for x in enc["input_ids"]] != self.ids:
                raise HeadstoreError(f"the tokenizer gave other ids with offsets than without for {self.where}")
            self._offsets = [[(int(a), int(b)) for a, b in row] for row in enc["offset_mapping"]]
        return self._offsets

    def char_pos(self, row: int, char: int, column: str, what: str) -> int:
        text = self.texts[row]
        if not 0 <= char < len(text):
            raise HeadstoreError(
                f"row {row} of {self.where}: {what} is outside the text (0..{len(text) - 1}): "
                f"fix {column}, a 0-based character offset"
            )
        for k, (a, b) in enumerate(self.offsets(column)[row]):
            if a <= char < b:
                return k + self.shift
        raise HeadstoreError(
            f"row {row} of {self.where}: {what} ({text[char]!r}) is on no token (the tokenizer drops it): "
            f"point {column} at a character of the word itself"
        )

    def char(self, row: int, value: int, column: str) -> int:
        return self.char_pos(row, value, column, f"{column} = {value}")

    def word(self, row: int, value: int, column: str) -> int:
        words = [m.start() for m in _WORD.finditer(self.texts[row])]
        if not 0 <= value < len(words):
            raise HeadstoreError(
                f"row {row} of {self.where}: {column} = {value} but the text has {len(words)} words "
                f"(0..{len(words) - 1}): fix {column}, a 0-based index of a whitespace-separated word"
            )
        return self.char_pos(
            row, words[value], column, f"{column} = {value} (word starting at character {words[value]})"
        )


def _token_ids(values: np.ndarray, column: str, where: str, tokenizer: Any) -> np.ndarray:
    cache: dict[str, int] = {}
    out = np.empty(len(values), np.int32)
    for row, s in enumerate(values.tolist()):
        if s not in cache:
            ids = list(tokenizer.encode(s, add_special_tokens=False))
            if len(ids) != 1:
                pieces = [tokenizer.decode([t]) for t in ids]
                raise HeadstoreError(
                    f"row {row} of {where}: {column} {s!r} is {len(ids)} tokens {pieces}, not one: "
                    "use a string that is a single token (mind the leading space, e.g. ' Mary')"
                )
            cache[s] = int(ids[0])
        out[row] = cache[s]
    return out


def table_columns(
    df: pd.DataFrame,
    where: str,
    tokenizer: Any,
    rows: _Rows | None,
    source: tuple[str, ...] = (),
) -> dict[str, np.ndarray]:
    """The store columns of ``df`` (``source`` columns excluded), suffixes resolved.

    ``rows`` gives positions for ``_char``/``_word``; None refuses them (no text to point into).
    """
    names = list(df.columns)
    _check_names(names, where, source)
    kept = [n for n in names if n not in source]
    # what each suffixed column gives, refused before any work if it clashes
    gives: dict[str, str] = {}
    for name in kept:
        stored, suf = _stored_name(name)
        if not suf:
            continue
        if stored in gives:
            raise HeadstoreError(f"columns {gives[stored]!r} and {name!r} of {where} both give {stored!r}: keep one")
        if stored in RESERVED or stored in source:
            raise HeadstoreError(f"column {name!r} of {where} gives {stored!r}, the name of a store array: rename it")
        if stored in kept:
            raise HeadstoreError(f"column {name!r} of {where} gives {stored!r}, a column of the file too: keep one")
        if not _NAME.fullmatch(stored):
            raise HeadstoreError(f"column {name!r} of {where} gives the name {stored!r}: rename it")
        gives[stored] = name
    cols = {name: _column_array(df, name, where) for name in kept}
    for stored, name in gives.items():
        arr, suf = cols[name], _stored_name(name)[1]
        if suf == "_str":
            if arr.dtype.kind != "U":
                raise HeadstoreError(f"column {name!r} of {where} must hold strings (a token's text, e.g. ' Mary')")
            cols[stored] = _token_ids(arr, name, where, tokenizer)
            continue
        if arr.dtype.kind not in "iu":
            raise HeadstoreError(f"column {name!r} of {where} must hold integers (0-based {suf[1:]} offsets)")
        if rows is None:
            raise HeadstoreError(
                f"column {name!r} of {where} points into a text, and there is none here: "
                f"give the token position itself as a column {stored!r}"
            )
        resolve: Callable[[int, int, str], int] = rows.char if suf == "_char" else rows.word
        cols[stored] = np.asarray([resolve(i, int(v), name) for i, v in enumerate(arr.tolist())], np.int32)
    return cols


def sidecar_columns(arg: str, n_rows: int, tokenizer: Any) -> dict[str, np.ndarray]:
    """Columns for ``tokens:FILE.npy,COLUMNS`` from the table at ``arg`` (one row per sequence)."""
    path = Path(arg)
    fmt = next((f for f, suf in FORMATS.items() if path.suffix == suf), None)
    if fmt is None:
        raise HeadstoreError(f"columns file {path} must end in {', '.join(FORMATS.values())}")
    df = read_table(path, fmt)
    where = path.name
    if len(df) != n_rows:
        raise HeadstoreError(
            f"columns file {path} has {len(df)} rows but the token array has {n_rows} sequences: give one row per sequence"
        )
    return table_columns(df, where, tokenizer, None)


# --- the builder ------------------------------------------------------------------------------


def _token_list(value: Any, row: int, where: str, vocab: int) -> list[int]:
    if isinstance(value, str):  # csv: a JSON list in the cell
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise HeadstoreError(f"row {row} of {where}: tokens {value[:40]!r} is not a JSON list of integers") from e
    if isinstance(value, np.ndarray):
        if value.ndim != 1 or (value.size and value.dtype.kind not in "iu"):
            raise HeadstoreError(
                f"row {row} of {where}: tokens must be a list of integers, got {value.dtype} {value.shape}"
            )
        out = [int(x) for x in value]
    elif isinstance(value, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        out = value
    else:
        raise HeadstoreError(f"row {row} of {where}: tokens must be a list of integers, got {str(value)[:40]}")
    bad = [x for x in out if not 0 <= x < vocab]
    if bad:
        raise HeadstoreError(f"row {row} of {where}: token id {bad[0]} is outside [0, {vocab}): wrong tokenizer?")
    return out


def _length_and_end(cols: dict[str, np.ndarray], length: np.ndarray, where: str) -> None:
    """Add ``length`` and ``end_pos = length - 1``; a file's own must be integers inside the row
    (``length`` equal to the real one, ``end_pos`` anywhere in the row: kept as given)."""
    for name in ("length", "end_pos"):
        if name in cols and cols[name].dtype.kind not in "iu":
            raise HeadstoreError(f"column {name!r} of {where} must hold integers")
    if "length" in cols:
        wrong = np.flatnonzero(cols["length"] != length)
        if wrong.size:
            i = int(wrong[0])
            raise HeadstoreError(
                f"row {i} of {where}: column 'length' is {int(cols['length'][i])} but the row has {int(length[i])} "
                "tokens (BOS included): drop the column, headstore fills it"
            )
    else:
        cols["length"] = length
    if "end_pos" in cols:
        end = cols["end_pos"]
        outside = np.flatnonzero((end < 0) | (end >= length))
        if outside.size:
            i = int(outside[0])
            raise HeadstoreError(
                f"row {i} of {where}: end_pos {int(end[i])} is outside the row's {int(length[i])} tokens: fix or drop it"
            )
    else:
        cols["end_pos"] = length - 1


def build_table(arg: str, req: DataRequest, tokenizer: Any) -> TokenDataset:
    fmt = req.spec.split(":")[0]
    if not arg:
        raise HeadstoreError(f"data {fmt!r} needs a file: --data {fmt}:prompts{FORMATS[fmt]}")
    path = Path(arg)
    df = read_table(path, fmt)
    where = path.name
    if req.n_seq is not None:
        df = df.iloc[: req.n_seq].reset_index(drop=True)
    options: dict[str, Any] = {"file": path.name, "format": fmt}
    if len(df) == 0:
        return TokenDataset(fmt, req.spec, np.zeros((0, 1), np.int32), {}, options)
    has_text, has_tokens = "text" in df.columns, "tokens" in df.columns
    if has_text == has_tokens:
        raise HeadstoreError(
            f"{where} needs {'one of' if has_text else 'a'} 'text' (a string per row) or 'tokens' "
            f"(a list of token ids) column{', not both' if has_text else ''}"
        )
    source = ("text",) if has_text else ("tokens",)
    rows_pos: _Rows | None = None
    if has_text:
        texts = df["text"].tolist()
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            if pd.isna(texts[bad]):
                raise HeadstoreError(f"row {bad} of {where} has no text: give every row a text")
            raise HeadstoreError(f"row {bad} of {where}: text must be a string, got {str(texts[bad])[:40]!r}")
        ids = [list(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        shift = 1 if req.prepend_bos else 0
        seqs = [[bos_id(tokenizer), *r] for r in ids] if req.prepend_bos else [list(r) for r in ids]
        rows_pos = _Rows(texts, ids, shift, tokenizer, where)
    else:
        vocab = len(tokenizer)
        seqs = [_token_list(v, i, where, vocab) for i, v in enumerate(df["tokens"].tolist())]
    length = np.asarray([len(s) for s in seqs], np.int32)
    empty = np.flatnonzero(length == 0)
    if empty.size:
        raise HeadstoreError(f"row {int(empty[0])} of {where} has no tokens: give every row some text")
    seq_len = req.seq_len or int(length.max())
    over = np.flatnonzero(length > seq_len)
    if over.size:
        i = int(over[0])
        raise HeadstoreError(
            f"row {i} of {where} has {int(length[i])} tokens but --seq-len is {seq_len}: raise --seq-len (or shorten the row)"
        )
    cols = table_columns(df, where, tokenizer, rows_pos, source)
    _length_and_end(cols, length, where)
    tokens = np.full((len(seqs), seq_len), pad_id(tokenizer), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = s
    options["columns"] = sorted(cols)
    return TokenDataset(fmt, req.spec, tokens, cols, options)
