"""Building blocks shared by analyzers: named-dim ops on a store's Dataset. No torch, no model."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import xarray as xr

from headstore.store_schema import HeadstoreError, provenance
from headstore.store_schema.layout import FIELDS

# The extract option that stores each variable (for error messages).
EXTRACT_OPTION = {name: f"--fields default,{name}" for name in FIELDS}


def require(ds: xr.Dataset, names: Iterable[str], analyzer: str) -> None:
    """Refuse, naming the ``extract`` option that stores what is missing."""
    missing = [n for n in names if n not in ds]
    if missing:
        hint = "; ".join(f"{n}: extract with {EXTRACT_OPTION.get(n, 'a newer headstore')}" for n in missing)
        raise HeadstoreError(f"{analyzer} needs {', '.join(missing)}, which this store lacks ({hint})")


def f32(da: xr.DataArray) -> xr.DataArray:
    """Upcast before any contraction (float16 matmul on CPU is ~300x slower)."""
    return da if da.dtype == np.float32 else da.astype(np.float32)


def kv_index(ds: xr.Dataset) -> xr.DataArray:
    """(head,) -> kv head read by each query head: ``h // (n_heads // n_kv_heads)``."""
    cfg = provenance(ds).config
    group = int(cfg["n_heads"]) // int(cfg["n_key_value_heads"])
    return xr.DataArray(np.arange(int(cfg["n_heads"])) // group, dims="head")


def per_head(da: xr.DataArray, ds: xr.Dataset) -> xr.DataArray:
    """Map a ``kv_head`` array (v, k, W_V, W_K, b_V, b_K) onto query heads (dim ``head``).

    One dask chunk along ``head`` (the gather would otherwise split it per kv head, multiplying the
    tasks of everything downstream)."""
    out = da.isel(kv_head=kv_index(ds))
    return out.chunk({"head": -1}) if out.chunks is not None else out


def lead_axes(x: np.ndarray, n_core: int, n_loop: int = 2) -> np.ndarray:
    """Give ``x`` exactly ``n_loop`` leading (loop) axes, adding size-1 ones in front.

    Inside ``xr.apply_ufunc`` an input lacking a loop dim gets a size-1 axis for it, except for
    the leading ones: this adds those, so every block sees the same (batch, layer) axes."""
    missing = n_loop - (x.ndim - n_core)
    return x.reshape((1,) * missing + x.shape) if missing else x


def head_unembed(x: np.ndarray, w_o: np.ndarray, w_u: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``x @ W_O[L, h] @ W_U``: (n, d_head) -> (n, d_vocab), multiplied in the cheaper order.

    ``(x @ W_O) @ W_U`` costs ``n d_model (d_head + d_vocab)`` flops, ``x @ (W_O @ W_U)`` costs
    ``d_head d_vocab (d_model + n)``: the second wins once ``n`` is above about ``d_head``.
    """
    n, d_head = x.shape
    d_model, d_vocab = w_u.shape
    if d_head * d_vocab * (d_model + n) < n * d_model * (d_head + d_vocab):
        return np.matmul(x, w_o @ w_u, out=out)
    return np.matmul(x @ w_o, w_u, out=out)


def normalize_final(resid: xr.DataArray, scale: xr.DataArray, ds: xr.Dataset) -> xr.DataArray:
    """ln_final with folded weights: ``(resid - mean_d_model(resid)) / scale`` (LN) or ``resid / scale`` (RMS)."""
    resid = f32(resid)
    if provenance(ds).config["normalization_type"] == "LN":
        resid = resid - resid.mean("d_model")
    return resid / scale


def logits(ds: xr.Dataset, resid: xr.DataArray | None = None) -> xr.DataArray:
    """``logits[..., d_vocab] = normalize(resid_final) @ W_U + b_U`` with ln_final_scale frozen."""
    resid = ds["resid_final"] if resid is None else resid
    return xr.dot(normalize_final(resid, ds["ln_final_scale"], ds), f32(ds["W_U"]), dim="d_model") + ds["b_U"]


def next_tokens(ds: xr.Dataset) -> xr.DataArray:
    """(batch, pos) token at pos+1; -1 at the last position."""
    nxt = ds["tokens"].shift(pos=-1, fill_value=-1)
    return nxt.astype(np.int64)


def bos_id(ds: xr.Dataset) -> int | None:
    tid = provenance(ds).tokenizer.get("bos_token_id")
    return None if tid is None else int(tid)


def strings(ds: xr.Dataset, name: str = "vocab") -> np.ndarray:
    """A string variable (``vocab``, ``split``...) as a fixed-width unicode array.

    The store may hand back numpy's variable-width StringDType, on which ``.astype(str)`` fails.
    """
    return np.array(ds[name].values.tolist(), dtype=str)
