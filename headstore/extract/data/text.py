"""``text[:PATHS]``: text files, globs or JSONL (field ``text``) cut into windows of seq_len with BOS.

With no paths: the docstrings of the Python standard library on this machine (real English prose
that every machine has).
"""

from __future__ import annotations

import ast
import glob
import json
import sysconfig
from pathlib import Path
from typing import Any

import numpy as np

from headstore.extract.data.base import DataRequest, TokenDataset, bos_id
from headstore.store_schema.errors import HeadstoreError

DEFAULT_SEQ_LEN = 128


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py") if not p.name.startswith("_"))


def stdlib_docstrings(limit_chars: int) -> list[str]:
    """The standard library's docstrings of more than 200 characters, in file order, up to about ``limit_chars``."""
    out, total = [], 0
    for path in stdlib_files():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    out.append(doc)
                    total += len(doc)
        if total > limit_chars:
            break
    return out


def _read_texts(arg: str) -> list[str]:
    texts = []
    paths = [Path(p) for pattern in arg.split(",") for p in sorted(glob.glob(pattern))]
    if not paths:
        raise HeadstoreError(f"no files match {arg!r}: give text files, globs or .jsonl files")
    for p in paths:
        if p.suffix == ".jsonl":
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
                if line.strip():
                    try:
                        texts.append(str(json.loads(line)["text"]))
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise HeadstoreError(f"{p}:{i + 1} is not a JSON object with a 'text' field") from e
        else:
            texts.append(p.read_text(encoding="utf-8", errors="replace"))
    return texts


def build_text(arg: str, req: DataRequest, tokenizer: Any) -> TokenDataset:
    seq_len = req.seq_len or DEFAULT_SEQ_LEN
    n_seq = req.n_seq or 64
    body = seq_len - 1 if req.prepend_bos else seq_len
    texts = _read_texts(arg) if arg else stdlib_docstrings(limit_chars=n_seq * body * 8)
    stream: list[int] = []
    sep = tokenizer.eos_token_id
    for t in texts:
        stream.extend(tokenizer.encode(t, add_special_tokens=False))
        if sep is not None:
            stream.append(int(sep))
        if len(stream) >= n_seq * body:
            break
    n = min(n_seq, len(stream) // body)
    arr = np.asarray(stream[: n * body], dtype=np.int32).reshape(n, body)
    if req.prepend_bos:
        arr = np.concatenate([np.full((n, 1), bos_id(tokenizer), np.int32), arr], axis=1)
    return TokenDataset("text", req.spec, arr, {}, {"source": arg or "python-stdlib-docstrings"})
