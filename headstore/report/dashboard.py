"""``headstore dashboard STORE OUT/``: a static site about every head of a store, from the store alone.

``OUT/index.html`` is a grid of every head coloured by its census kind (``headstore.pipeline.census.head_kinds`` on
``head_scores``); ``OUT/heads/L{layer}H{head}.html`` is one page per head: its census scores, its top-attention
examples as text with the attended tokens highlighted (hovering a token shows its weight), its top direct
effects, OV top tokens and QK top pairs (from the weights, for the tokens of its examples) and its most similar
heads. Plain HTML and CSS with relative links: it opens from ``file://`` and from ``headstore serve OUT``. Each
page holds examples, never arrays: its size depends on ``k`` and the window, not on the store.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import xarray as xr

from headstore.analyze import copy_suppression, head_scores, head_similarity, top_attention, top_effects
from headstore.analyze._circuits import _embedding, _keys, _ln1, _queries, _w, _w_write
from headstore.analyze._copy_suppression import layers_per_block
from headstore.analyze._maths import kv_index, normalize_rows
from headstore.pipeline.census import head_kinds
from headstore.report.dashboard_pages import SiteData, head_page, index_page
from headstore.store_schema import HeadstoreError, open_store

N_SIMILAR = 5  # most similar heads listed per head
N_CIRCUIT = 3  # tokens of the examples looked up in the OV / QK circuits
N_CIRCUIT_TOP = 5  # outputs / keys listed per token


def _query_rows(ds: xr.Dataset, top: xr.Dataset) -> dict[tuple[int, int, int], np.ndarray]:
    """The attention row ``pattern[b, L, h, q, :q + 1]`` of every top example (a copy: a view would keep its whole
    block alive), read one layer and one batch chunk at a time (only the sequences some example comes from)."""
    labels = {int(v): i for i, v in enumerate(np.asarray(ds["batch"].values))}
    chunk = np.cumsum(ds["pattern"].chunksizes.get("batch", (ds.sizes["batch"],)))  # each chunk's end along batch
    query_pos = np.asarray(top["query_pos"].values)
    out: dict[tuple[int, int, int], np.ndarray] = {}
    for i in range(ds.sizes["layer"]):
        seq = np.asarray(top["sequence"].isel(layer=i).values)  # head, rank
        at = {(h, r): labels[int(seq[h, r])] for h, r in zip(*np.nonzero(seq >= 0))}  # (head, rank) -> row
        by_chunk: dict[int, list[int]] = {}
        for row in sorted(set(at.values())):
            by_chunk.setdefault(int(np.searchsorted(chunk, row, side="right")), []).append(row)
        for rows in by_chunk.values():
            block = np.asarray(ds["pattern"].isel(layer=i, batch=rows).values)  # b, head, q, k
            for (h, r), row in at.items():
                if row in rows:
                    q = int(query_pos[i, h, r])
                    out[(i, int(h), int(r))] = block[rows.index(row), h, q, : q + 1].copy()
    return out


def _example_tokens(ds: xr.Dataset, sequences: list[xr.DataArray]) -> dict[int, np.ndarray]:
    """``batch`` label -> the token ids of its real positions, for the sequences the examples come from (never
    the whole ``tokens``: (batch, pos) grows with the store)."""
    labels = np.asarray(ds["batch"].values)
    wanted = np.unique(np.concatenate([np.asarray(s.values).ravel() for s in sequences]))
    rows = np.flatnonzero(np.isin(labels, wanted[wanted >= 0]))
    if rows.size == 0:
        return {}
    tokens = np.asarray(ds["tokens"].isel(batch=rows).values)
    n = np.asarray(ds["length"].isel(batch=rows).values) if "length" in ds else np.full(rows.size, ds.sizes["pos"])
    return {int(labels[r]): tokens[j, : int(n[j])].copy() for j, r in enumerate(rows)}


def _ov_qk(ds: xr.Dataset, top: xr.Dataset) -> dict[tuple[int, int], dict[str, list[tuple[str, str, float]]]]:
    """Per head: ``ov`` (source token, output token, C_OV) for the first distinct key tokens of its examples and
    their top outputs; ``qk`` (query token, key token, C_QK) for the first distinct query tokens and their top
    keys over the vocabulary (``analyze/_circuits.py``'s circuits, one row at a time)."""
    if any(n not in ds for n in ("W_E", "W_Q", "W_K", "W_V", "W_O", "W_U", "vocab")):
        return {}
    emb = _ln1(ds, _embedding(ds, "W_E"))  # (d_vocab, d_model)
    w_v, w_q, w_k, w_o, w_u = _w(ds, "W_V"), _w(ds, "W_Q"), _w(ds, "W_K"), _w_write(ds), _w(ds, "W_U")
    vocab, kv = ds.hs.vocab, kv_index(ds).values
    out: dict[tuple[int, int], dict[str, list[tuple[str, str, float]]]] = {}
    for i in range(ds.sizes["layer"]):
        keys_all = _keys(ds, emb, i) if ds.hs.config.qk_norm else None  # (d_vocab, kv, d_head)
        for h in range(ds.sizes["head"]):
            ex = top.isel(layer=i, head=h)
            srcs = _distinct(ex["key_token"].values)
            queries = _distinct(ex["query_token"].values)
            ov = normalize_rows((emb[srcs] @ w_v[i, kv[h]]) @ w_o[i, h], ds) @ w_u if srcs else np.zeros((0, 0))
            if keys_all is not None:
                qs = _queries(ds, emb[queries], i)[:, h]  # (n, d_head)
                qk = qs @ keys_all[:, kv[h]].T
            else:
                # (query rows through W_Q, then back through W_K^T) against every key row: never (d_vocab, d_head)
                qk = ((emb[queries] @ w_q[i, h]) @ w_k[i, kv[h]].T) @ emb.T if queries else np.zeros((0, 0))
            out[(i, h)] = {"ov": _best(vocab, srcs, ov), "qk": _best(vocab, queries, qk)}
    return out


def _distinct(ids: np.ndarray) -> list[int]:
    return [int(t) for t in dict.fromkeys(ids.tolist()) if t >= 0][:N_CIRCUIT]


def _best(vocab: np.ndarray, rows: list[int], scores: np.ndarray) -> list[tuple[str, str, float]]:
    """(row token, column token, score) of each row's top columns, largest first (ties: the smaller id)."""
    out = []
    for r, t in enumerate(rows):
        top = np.argsort(-scores[r], kind="stable")[:N_CIRCUIT_TOP]
        out += [(str(vocab[t]), str(vocab[c]), float(scores[r, c])) for c in top]
    return out


def _by_layers(ds: xr.Dataset, size: int, analysis: Callable[[xr.Dataset], xr.Dataset]) -> xr.Dataset:
    """The (layer, head) means of a lazy analysis, computed ``size`` layers at a time and joined along ``layer``.

    Each layer group is its own dask graph of a batch chunk per block (the analysis' blocks: a group is aligned with
    its layer blocks, so every mean is bitwise the one of the whole store's graph); the per-sequence variables are
    never computed. One graph of the whole store let the threaded scheduler read ahead and hold what it freed:
    peak memory grew with the store (head_scores 72 -> 256 MB from 10^4 to 10^5 tokens)."""
    parts = []
    for start in range(0, ds.sizes["layer"], size):
        res = analysis(ds.isel(layer=slice(start, start + size)))
        parts.append(res[[n for n, v in res.data_vars.items() if v.dims == ("layer", "head")]].compute())
    return xr.concat(parts, "layer", combine_attrs="override")


def collect(ds: xr.Dataset, title: str, k: int = 10) -> SiteData:
    """Compute what the site shows: census scores and kinds, top attention, top effects, similarity, circuits."""
    if "pattern" not in ds:
        raise HeadstoreError(
            "dashboard needs pattern, which this store lacks and cannot derive: extract with --fields default "
            "(or compact, which derives it from q and k)"
        )
    notes: list[str] = []
    scores = _by_layers(ds, 1, lambda part: head_scores(part))
    if all(n in ds for n in ("v", "ln_final_scale", "W_O", "W_U")):
        group = layers_per_block(ds)  # about BLOCK_BYTES of float32 pattern per (batch chunk, group): memory bounded
        scores["copy_suppression"] = _by_layers(ds, group, lambda part: copy_suppression(part)[["score"]])["score"]
    top = top_attention(ds, k=k)
    effects = None
    if all(n in ds for n in ("z", "ln_final_scale", "W_O", "W_U")):
        effects = top_effects(ds, k=k, by="next")
    else:
        notes.append("no top effects: the store lacks z, ln_final_scale, W_O or W_U")
    data = SiteData(ds, title, scores, head_kinds(scores), top, _query_rows(ds, top), effects, head_similarity(ds))
    data.token_ids = _example_tokens(ds, [top["sequence"], *([] if effects is None else [effects["sequence"]])])
    data.circuits = _ov_qk(ds, top)
    if not data.circuits:
        notes.append("no OV / QK circuits: the store lacks some of W_E, W_Q, W_K, W_V, W_O, W_U, vocab")
    data.notes = notes
    return data


def similar_heads(sim: xr.Dataset, layer: int, head: int) -> list[tuple[int, int, float]]:
    """The ``N_SIMILAR`` heads most correlated with ``(layer, head)``, highest first (NaN left out)."""
    row = sim["similarity"].sel(layer_a=layer, head_a=head).values  # layer_b, head_b
    layers = sim["layer_b"].values
    flat = [(float(row[i, h]), int(layers[i]), h) for i in range(row.shape[0]) for h in range(row.shape[1])]
    flat = [x for x in flat if np.isfinite(x[0]) and (x[1], x[2]) != (layer, head)]
    flat.sort(key=lambda x: (-x[0], x[1], x[2]))
    return [(L, h, v) for v, L, h in flat[:N_SIMILAR]]


def page_name(layer: int, head: int) -> str:
    return f"L{layer}H{head}.html"


def write_dashboard(store: str, out: Path, *, k: int = 10, partial: bool = False) -> Path:
    """Write the site under ``out`` (``index.html``, ``heads/*.html``); returns the index page."""
    if not 1 <= int(k) <= 100:
        raise HeadstoreError(f"--k {k}: give between 1 and 100 examples per head")
    ds = open_store(store, partial=partial)
    data = collect(ds, Path(str(store).rstrip("/")).name, int(k))
    (out / "heads").mkdir(parents=True, exist_ok=True)
    for i, layer in enumerate(ds.hs.layers):
        for h in range(ds.sizes["head"]):
            page = head_page(data, i, layer, h, similar_heads(data.similarity, layer, h), page_name)
            _write(out / "heads" / page_name(layer, h), page)
    index = out / "index.html"
    _write(index, index_page(data, page_name))
    return index


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
