"""``code-ifelse[:PATHS]``: next-token prompts cut from real Python source, for ' else' anomaly detection.

Sources: the Python standard library on this machine (``text.stdlib_files()``) by default, or the
files matching ``PATHS`` (comma-separated globs). Each file is parsed with ``ast``:

- **trusted** prompt: a conditional expression ``x if cond else y`` whose condition is followed by
  exactly `` else`` in the source; the prompt is the source text up to the end of ``cond``, so the
  correct next token is `` else``.
- **anomalous** prompt: the text up to the end of the condition of an ``if``/``elif`` *statement*
  or of a comprehension ``if`` clause, where `` else`` does not follow (the source goes on with
  ``:``, `` for``, ``]``...): predicting `` else`` there is not justified by the source.

Each prompt is BOS + the last ``seq_len - 1`` tokens before the cut (default ``seq_len`` 32; without
BOS, the last ``seq_len`` tokens), so every prompt ends at ``last_pos = seq_len - 1``. Prompts with
too few tokens before the cut are skipped. Sampling is seeded and balanced: half trusted, half
anomalous (fewer of both when one kind runs short). Columns:

- ``split``: ``trusted`` / ``anomalous``;
- ``subset``: ``train`` / ``test``: a seeded half of the trusted prompts is ``train`` (for fitting
  detectors), the other trusted half and every anomalous prompt are ``test``;
- ``source``: ``file:line`` of the cut;
- ``last_pos``: ``seq_len - 1``.
"""

from __future__ import annotations

import ast
import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from headstore.extract.data.base import DataRequest, TokenDataset, bos_id
from headstore.extract.data.text import stdlib_files
from headstore.store_schema.errors import HeadstoreError

DEFAULT_SEQ_LEN = 32
DEFAULT_N_SEQ = 256
# Characters of source kept before a cut before tokenising (plenty for seq_len tokens of code).
CHARS_PER_TOKEN = 12
OVERSAMPLE = 4


@dataclass(frozen=True)
class Cut:
    """A prompt: the source bytes of ``file`` up to ``offset`` (line ``line``)."""

    file: int
    offset: int
    line: int
    label: str


def _line_starts(data: bytes) -> list[int]:
    newlines = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 0x0A) + 1
    return [0, *newlines.tolist()]


def find_cuts(data: bytes, file: int = 0) -> list[Cut]:
    """Every trusted and anomalous cut point in one source file (``ast`` offsets are UTF-8 bytes)."""
    try:
        tree = ast.parse(data)
    except (SyntaxError, ValueError):
        return []
    starts = _line_starts(data)

    def end_of(node: ast.expr) -> int | None:
        if node.end_lineno is None or node.end_col_offset is None:
            return None
        return starts[node.end_lineno - 1] + node.end_col_offset

    cuts: list[Cut] = []
    for node in ast.walk(tree):
        conds: list[tuple[ast.expr, str]] = []
        if isinstance(node, ast.IfExp):
            conds.append((node.test, "trusted"))
        elif isinstance(node, ast.If):
            conds.append((node.test, "anomalous"))
        elif isinstance(node, ast.comprehension):
            conds.extend((c, "anomalous") for c in node.ifs)
        for cond, label in conds:
            off = end_of(cond)
            if off is None:
                continue
            after = data[off + 5 : off + 6]
            follows_else = data[off : off + 5] == b" else" and not (after.isalnum() or after == b"_")
            if (label == "trusted") != follows_else:
                continue  # trusted needs exactly ' else' next; anomalous needs anything else
            cuts.append(Cut(file, off, int(cond.end_lineno or 0), label))
    return sorted(cuts, key=lambda c: c.offset)


def _paths(arg: str) -> list[tuple[Path, str]]:
    if not arg:
        return [(p, p.name) for p in stdlib_files()]
    paths = [Path(p) for pattern in arg.split(",") if pattern.strip() for p in sorted(glob.glob(pattern.strip()))]
    if not paths:
        raise HeadstoreError(f"no files match {arg!r}: give Python files or globs (comma-separated)")
    return [(p, str(p)) for p in paths if p.is_file()]


def _prompt_tokens(data: bytes, offset: int, body: int, tokenizer: Any) -> list[int] | None:
    """The last ``body`` tokens of the source before ``offset``; None if there are too few."""
    start = max(0, offset - CHARS_PER_TOKEN * (body + 8))
    text = data[start:offset].decode("utf-8", errors="ignore")
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    # A window cut mid-file may split its first token: keep one spare token to drop.
    need = body + (1 if start > 0 else 0)
    if len(ids) < need:
        return None
    return ids[-body:]


def _pools(
    files: list[tuple[Path, str]], want: dict[str, int], rng: np.random.Generator
) -> tuple[dict[int, bytes], dict[str, list[Cut]]]:
    """Parse files in a seeded order until both pools hold OVERSAMPLE x what is wanted (parsing the whole
    standard library takes seconds): the sources read, and the cuts of each label in (file, offset) order."""
    sources: dict[int, bytes] = {}
    pools: dict[str, list[Cut]] = {"trusted": [], "anomalous": []}
    for i in rng.permutation(len(files)).tolist():
        if all(len(pools[k]) >= OVERSAMPLE * max(want[k], 1) for k in pools):
            break
        try:
            data = files[i][0].read_bytes()
        except OSError:
            continue
        sources[i] = data
        for c in find_cuts(data, i):
            pools[c.label].append(c)
    for pool in pools.values():
        pool.sort(key=lambda c: (c.file, c.offset))
    return sources, pools


def _draw(
    pool: list[Cut], n: int, sources: dict[int, bytes], body: int, tokenizer: Any, rng: np.random.Generator
) -> list[tuple[Cut, list[int]]]:
    """Up to ``n`` cuts drawn at random from ``pool``, each with its prompt's tokens (cuts with too few skipped)."""
    got: list[tuple[Cut, list[int]]] = []
    for j in rng.permutation(len(pool)):
        if len(got) == n:
            break
        c = pool[int(j)]
        ids = _prompt_tokens(sources[c.file], c.offset, body, tokenizer)
        if ids is not None:
            got.append((c, ids))
    return got


def build_ifelse(arg: str, req: DataRequest, tokenizer: Any) -> TokenDataset:
    seq_len = req.seq_len or DEFAULT_SEQ_LEN
    n_seq = req.n_seq or DEFAULT_N_SEQ
    body = seq_len - 1 if req.prepend_bos else seq_len
    if body < 1:
        raise HeadstoreError(f"--seq-len {seq_len} leaves no room for code after BOS: use at least 2")
    files = _paths(arg)
    rng = np.random.default_rng(req.seed)
    want = {"trusted": (n_seq + 1) // 2, "anomalous": n_seq // 2}
    sources, pools = _pools(files, want, rng)
    chosen = {label: _draw(pool, want[label], sources, body, tokenizer, rng) for label, pool in pools.items()}
    if not chosen["trusted"] or not chosen["anomalous"]:
        where = arg or "the Python standard library"
        raise HeadstoreError(
            f"code-ifelse found {len(chosen['trusted'])} trusted and {len(chosen['anomalous'])} anomalous prompts "
            f"of {seq_len} tokens in {where}: give more Python files or a shorter --seq-len"
        )
    # Balanced: trim the longer side when the other ran short (trusted keeps the odd one).
    n_an = min(len(chosen["anomalous"]), len(chosen["trusted"]))
    n_tr = min(len(chosen["trusted"]), n_an + (n_seq % 2))
    rows = chosen["trusted"][:n_tr] + chosen["anomalous"][:n_an]
    split = np.array(["trusted"] * n_tr + ["anomalous"] * n_an)
    subset = np.full(len(rows), "test", dtype=object)
    train = rng.permutation(n_tr)[: n_tr // 2]
    subset[train] = "train"
    order = rng.permutation(len(rows))
    prefix = [bos_id(tokenizer)] if req.prepend_bos else []
    tokens = np.asarray([prefix + rows[i][1] for i in order], dtype=np.int32)
    source = np.array([f"{files[rows[i][0].file][1]}:{rows[i][0].line}" for i in order])
    columns = {
        "split": split[order],
        "subset": subset[order].astype(str),
        "source": source,
        "last_pos": np.full(len(rows), seq_len - 1, dtype=np.int32),
    }
    options = {
        "source": arg or "python-stdlib",
        "seq_len": seq_len,
        "n_trusted": n_tr,
        "n_anomalous": n_an,
        "n_train": len(train),
    }
    return TokenDataset("code-ifelse", req.spec, tokens, columns, options)
