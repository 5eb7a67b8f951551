"""``ds.hs``: what every analyzer and notebook needs from a store's Dataset, parsed once.

Registered with :func:`xarray.register_dataset_accessor` when ``headstore`` is imported::

    ds = headstore.open_store("ioi.zarr")
    ds.hs.config.n_heads          # typed ModelConfig
    ds.hs.str_tokens(0)           # ['<|endoftext|>', 'Then', ',', ' Mary', ...]
    ds.hs.token_id(" Mary")       # exactly one token of the vocabulary, or an error
    ds.hs.logits(batch=0, pos=-1) # (d_vocab,) recomputed from resid_final, at sequence 0's last real token

It works on any Dataset that carries the store's attrs (``ds.isel(batch=...)`` keeps them).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import numpy as np
import xarray as xr

from headstore.store_schema.attention import softcap
from headstore.store_schema.errors import HeadstoreError
from headstore.store_schema.layout import ATTRS_KEY
from headstore.store_schema.provenance import ModelConfig, Provenance
from headstore.store_schema.selection import positions, scalar


def normalize_final(resid: xr.DataArray, scale: xr.DataArray, config: ModelConfig) -> xr.DataArray:
    """ln_final with folded weights and a frozen scale: ``(resid - mean_d_model(resid)) / scale`` (LN) or ``resid / scale`` (RMS)."""
    resid = resid if resid.dtype == np.float32 else resid.astype(np.float32)
    if config.normalization_type == "LN":
        resid = resid - resid.mean("d_model")
    return resid / scale


def matmul_rows(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(..., m) @ (m, n) -> (..., n) as one 2-D product."""
    w2 = w.reshape(w.shape[-2], w.shape[-1])
    return (x.reshape(-1, x.shape[-1]) @ w2).reshape(*x.shape[:-1], w2.shape[-1])


def final_logits(ds: xr.Dataset, resid: xr.DataArray, scale: xr.DataArray, *, capped: bool = True) -> xr.DataArray:
    """``logits[..., d_vocab] = cap(normalize_final(resid, scale) @ W_U + b_U)``: ``cap`` is the model's final
    soft-cap (``config.final_logit_softcap``; none on most models), left out with ``capped=False``."""
    w_u = ds["W_U"] if ds["W_U"].dtype == np.float32 else ds["W_U"].astype(np.float32)
    x = normalize_final(resid, scale, ds.hs.config)
    # one BLAS product per block, (rows, d_vocab) in C order: numpy's plain einsum loop (xr.dot) ran it at ~6
    # GFLOP/s, and its BLAS path (optimize=True) returns d_vocab as the slowest axis, which kernels then stride over
    pre = xr.apply_ufunc(
        matmul_rows, x, w_u, input_core_dims=[["d_model"], ["d_model", "d_vocab"]], output_core_dims=[["d_vocab"]],
        dask="parallelized", output_dtypes=[np.result_type(x.dtype, w_u.dtype)],
    ) + ds["b_U"]  # fmt: skip
    return softcap(pre, ds.hs.config.final_logit_softcap) if capped else pre


@xr.register_dataset_accessor("hs")
class HeadstoreAccessor:
    """The ``ds.hs`` namespace (see the module docstring)."""

    def __init__(self, ds: xr.Dataset):
        self._ds = ds

    @functools.cached_property
    def provenance(self) -> Provenance:
        """The store's :class:`Provenance` (model, tokenizer, dataset, fields, layers), parsed once."""
        attrs = self._ds.attrs.get(ATTRS_KEY)
        if attrs is None:
            raise HeadstoreError("this Dataset has no headstore attrs: open the store with headstore.open_store")
        return Provenance.from_dict(attrs)

    @functools.cached_property
    def config(self) -> ModelConfig:
        """The model's shape: ``n_layers, n_heads, n_key_value_heads, d_model, d_head, d_vocab, ...``."""
        return self.provenance.model_config

    @property
    def layers(self) -> list[int]:
        """Model layer numbers along ``layer`` (a store may hold a subset)."""
        return (
            [int(x) for x in self._ds["layer"].values] if "layer" in self._ds.coords else list(self.provenance.layers)
        )

    @property
    def heads(self) -> list[tuple[int, int]]:
        """Every ``(layer, head)`` the store holds, in store order."""
        heads = self._ds["head"].values if "head" in self._ds.coords else range(self.config.n_heads)
        return [(L, int(h)) for L in self.layers for h in np.atleast_1d(heads)]

    def kv_head(self, head: int) -> int:
        """The kv head that query head ``head`` reads: ``head // (n_heads // n_key_value_heads)``."""
        if not 0 <= int(head) < self.config.n_heads:
            raise HeadstoreError(f"head {head} is out of range: the model has heads 0..{self.config.n_heads - 1}")
        return int(head) // self.config.group_size

    @functools.cached_property
    def vocab(self) -> np.ndarray:
        """(d_vocab,) the token strings, as a plain ``str`` array (the store may hold numpy StringDType)."""
        if "vocab" not in self._ds:
            raise HeadstoreError("this store has no 'vocab' variable: re-extract it with a current headstore")
        return np.array(np.asarray(self._ds["vocab"].values).tolist(), dtype=str)

    def str_tokens(self, batch: int) -> list[str]:
        """The token strings of sequence ``batch`` (index along ``batch``)."""
        n = self._ds.sizes["batch"]
        if not -n <= int(batch) < n:
            raise HeadstoreError(f"batch {batch} is out of range: the store has {n} sequences")
        ids = np.asarray(self._ds["tokens"].isel(batch=int(batch)).values)
        return [str(s) for s in self.vocab[ids].tolist()]

    def token_id(self, token: str) -> int:
        """The id of the vocabulary entry that is exactly ``token`` (e.g. ``" Mary"``, leading space included)."""
        if not isinstance(token, str):
            raise HeadstoreError(f"token_id takes a token string, got {type(token).__name__} {token!r}")
        hits = np.flatnonzero(self.vocab == token)
        if hits.size == 0:
            near = [s for s in (token.strip(), " " + token.strip()) if s != token and (self.vocab == s).any()]
            hint = f" (the vocabulary has {near[0]!r})" if near else ""
            raise HeadstoreError(f"{token!r} is not one token of this model's vocabulary{hint}: give a single token")
        if hits.size > 1:
            raise HeadstoreError(f"{token!r} is {hits.size} vocabulary entries (ids {hits[:8].tolist()}): give an id")
        return int(hits[0])

    def token_ids(self, tokens: Iterable[str] | xr.DataArray) -> xr.DataArray:
        """Per-sequence token strings (a list, or a string column such as ``ds["io_name"]``) -> (batch,) int64 ids."""
        values = np.asarray(tokens.values if isinstance(tokens, xr.DataArray) else list(tokens)).tolist()
        if len(values) != self._ds.sizes["batch"]:
            raise HeadstoreError(f"token_ids got {len(values)} strings for {self._ds.sizes['batch']} sequences")
        return xr.DataArray(np.array([self.token_id(str(s)) for s in values], np.int64), dims="batch")

    def logits(self, batch: Any = None, pos: Any = None, *, capped: bool = True) -> xr.DataArray:
        """Logits recomputed from ``resid_final`` with ``ln_final_scale`` frozen: ``normalize(resid) @ W_U + b_U``,
        through the model's final soft-cap where it has one (Gemma-2; ``capped=False``: the pre-cap logits).

        They equal the model's logits up to one constant per position (``center_unembed`` centres ``W_U`` over
        the vocabulary; probabilities are unchanged), and exactly on soft-capped models, whose unembedding is
        not centred.

        ``batch`` picks sequences by index, as ``isel`` does (an int, a slice, a list); None keeps all.
        ``pos`` follows the analyzers' position rules (``headstore.store_schema.selection``): None keeps every
        position (dims ``batch, pos, d_vocab``); an int is that position in every chosen sequence, negative
        counting back from the end of each sequence's real tokens (``-1``: the last real token, not the last
        padded slot); one int per chosen sequence (a list, an array, a DataArray along ``batch`` such as
        ``ds["end_pos"]``, matched by ``batch`` label) is pointwise. With ``pos`` the dims are
        ``batch, d_vocab``, and ``d_vocab`` alone when ``batch`` is an int.
        """
        ds, one = self._ds, scalar(batch)
        if one is not None:
            n = ds.sizes["batch"]
            if not -n <= one < n:
                raise HeadstoreError(f"batch {one} is out of range: the store has {n} sequences")
            ds = ds.isel(batch=[one])
        elif batch is not None:
            ds = ds.isel(batch=batch)
        resid, scale = ds["resid_final"], ds["ln_final_scale"]
        if pos is not None:
            at = positions(ds, pos, "pos")
            resid, scale = resid.isel(pos=at), scale.isel(pos=at)
        out = final_logits(self._ds, resid, scale, capped=capped)
        return out.isel(batch=0) if one is not None else out
