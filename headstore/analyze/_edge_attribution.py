"""Edge attribution patching (EAP; Syed, Rager, Conmy 2023) for every edge of the model's graph, from a clean
store with gradients (``extract --grad METRIC``) and its corrupt twin. Nodes are named as the EAP-IG library
(hannamw/EAP-IG) writes them.

Senders u (what they write to the residual stream, d_model), as ``delta_u = a_u(corrupt) - a_u(clean)``:

    input:     resid_pre[b, 0, pos]                                   (embeddings)
    a{L}.h{H}: z[b, L, pos, H] @ W_O[L, H]                            (the head's result)
    m{L}:      resid_pre[b, L+1, pos] - resid_pre[b, L, pos] - sum_h z[b, L, pos, h] @ W_O[L, h]
               (the last layer's with resid_final in place of resid_pre[b, L+1])

Receivers v (the gradient of the metric at their own copy of the residual, at the clean input, d_model):

    a{L}.h{H}<q>:   J_L (W_Q[L, H] @ grad_q[b, L, pos, H])           J_L: ln1's Jacobian (headstore.analyze._attribution)
    a{L}.h{H}<k>:   J_L (W_K[L, H] @ grad_k[b, L, pos, H])           a{L}.kv{J}<k> on grouped-query models (kv head J)
    a{L}.h{H}<v>:   J_L (W_V[L, H] @ grad_v[b, L, pos, H])           a{L}.kv{J}<v> likewise
    m{L}:           grad_mlp_in[b, L, pos]
    logits:         grad_resid_final[b, pos]

    score[sender, receiver] = mean_b sum_pos delta_sender[b, pos] . g_receiver[b, pos]

where the sender comes before the receiver (an MLP reads its own layer's heads, except on parallel-residual
models); NaN elsewhere (no such edge). The gradients go through every norm with its scale recomputed (nothing
frozen), as online EAP takes them. Streams over the stores' batch chunks (one sequence at a time inside one).

EAP-IG (Hanna et al. 2024) from a store extracted with ``--grad-ig STEPS --corrupt DATA``: every receiver's
gradient is its mean over the m points of the path from the corrupt to the clean input embeddings
(``headstore.extract.grad_ig``); the q/k/v ones are ``mean_k J_k W g_k = P W grad_q - mean_k ig_resid_hat[k] .
ig_coef_q[k]``, ln1's Jacobian taken at each point. ``attrs["grad_ig"]`` = m (0: plain EAP).
"""

from __future__ import annotations

import itertools
from typing import Any

import dask
import dask.array as dsa
import numpy as np
import xarray as xr

from headstore.analyze._attribution_patching import check_pair, head_input_grads, ig_head_input_grads, ig_steps
from headstore.analyze.registry import AnalyzerSpec, register_analyzer
from headstore.store_schema import HeadstoreError

NAME = "edge-attribution"
REQUIRES = ("z", "resid_pre", "resid_final", "ln1_scale", "W_Q", "W_K", "W_V", "W_O",
         "grad_q", "grad_k", "grad_v", "grad_mlp_in", "grad_resid_final")  # fmt: skip
_PER_SEQUENCE = ("z", "resid_pre", "resid_final")  # read from both stores
_CLEAN_ONLY = ("ln1_scale", "grad_q", "grad_k", "grad_v", "grad_mlp_in", "grad_resid_final")
_IG = ("ig_resid_hat", "ig_coef_q", "ig_coef_k", "ig_coef_v")  # EAP-IG stores: the q/k/v receivers' path terms


def node_names(n_layers: int, n_heads: int, n_kv: int) -> tuple[list[str], list[str]]:
    """(senders, receivers) in EAP-IG's names, in the order of the ``score`` matrix."""
    kv = "kv" if n_kv < n_heads else "h"
    senders, receivers = ["input"], []
    for L in range(n_layers):
        senders += [f"a{L}.h{h}" for h in range(n_heads)] + [f"m{L}"]
        receivers += [f"a{L}.h{h}<q>" for h in range(n_heads)]
        receivers += [f"a{L}.{kv}{j}<{w}>" for w in "kv" for j in range(n_kv)] + [f"m{L}"]
    return senders, [*receivers, "logits"]


def _edges(n_layers: int, n_heads: int, n_kv: int, parallel: bool) -> np.ndarray:
    """(sender, receiver) bool: the sender writes before the receiver reads. Write/read times: input 0; heads of
    layer L read and write at 2L+1; the MLP of L at 2L+2 (2L+1 on parallel-residual models); logits at the end."""
    mlp = (lambda L: 2 * L + 1) if parallel else (lambda L: 2 * L + 2)
    writes, reads = [0], []
    for L in range(n_layers):
        writes += [2 * L + 1] * n_heads + [mlp(L)]
        reads += [2 * L + 1] * (n_heads + 2 * n_kv) + [mlp(L)]
    reads.append(2 * n_layers + 2)
    return np.asarray(writes)[:, None] < np.asarray(reads)[None, :]


def edge_attribution(clean: xr.Dataset, corrupt: xr.Dataset) -> xr.Dataset:
    """EAP score of every edge (module docstring): ``score`` (sender, receiver), NaN where there is no edge, and
    ``edge`` (sender, receiver) True where there is one. Needs every layer of the model in both stores."""
    cfg = clean.hs.config
    if cfg.post_norm or not cfg.pre_norm:
        raise HeadstoreError(
            f"edge-attribution: {cfg.architecture or 'this model'} normalises the attention and MLP outputs before "
            "the residual (post-norm), so a head's result is not what it adds to the residual: not supported; "
            "attribution_patching scores its heads"
        )
    steps = ig_steps(clean)
    metric = check_pair(clean, corrupt, NAME, (*REQUIRES, *(_IG if steps else ())))
    if list(clean.hs.layers) != list(range(cfg.n_layers)):
        raise HeadstoreError(
            f"edge-attribution needs every layer of the model (its MLP outputs are derived from consecutive "
            f"resid_pre), and this store holds layers {list(clean.hs.layers)}: extract with --layers all"
        )
    weights = {n: np.asarray(clean[n].values, np.float32) for n in ("W_Q", "W_K", "W_V", "W_O")}
    edges = _edges(cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads, cfg.parallel_residual)
    blocks = _blocks(edges)
    parts = []
    for sl in _batch_slices(clean):
        arrays = {f"{k}_{n}": _data(ds[n], sl) for n in _PER_SEQUENCE for k, ds in (("c", clean), ("k", corrupt))}
        arrays.update({n: _data(clean[n], sl) for n in (*_CLEAN_ONLY, *(_IG if steps else ()))})
        parts.append(dask.delayed(_chunk_scores)(arrays, weights, cfg.normalization_type == "LN", blocks))
    total = dask.delayed(sum)(parts)
    shape = edges.shape
    score = dsa.from_delayed(total, shape=shape, dtype=np.float64) / clean.sizes["batch"]
    senders, receivers = node_names(cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads)
    coords = {"sender": senders, "receiver": receivers}
    edge = xr.DataArray(edges, dims=("sender", "receiver"), coords=coords)
    out = xr.Dataset(
        {"score": xr.DataArray(score, dims=("sender", "receiver"), coords=coords).where(edge), "edge": edge}
    )
    out["score"] = out["score"].astype(np.float32)
    out.attrs = {"analyzer": "edge-attribution", "metric": metric, "grad_ig": steps}
    return out


def _batch_slices(ds: xr.Dataset) -> list[slice]:
    chunks = ds["z"].chunks
    sizes = chunks[0] if chunks is not None else (ds.sizes["batch"],)
    starts = np.cumsum((0, *sizes))
    return [slice(int(a), int(b)) for a, b in itertools.pairwise(starts)]


def _data(da: xr.DataArray, sl: slice) -> Any:
    return da.isel(batch=sl).data


def _blocks(edges: np.ndarray, n_blocks: int = 8) -> list[tuple[int, int, int]]:
    """(first receiver, end receiver, senders needed) for ``n_blocks`` runs of consecutive receivers: the edges
    are lower-triangular (receivers and senders both in layer order), so each run multiplies only the senders
    that write before its last receiver reads: ~(1 + 1/n_blocks) / 2 of the full product's FLOPs."""
    bounds = np.unique(np.linspace(0, edges.shape[1], n_blocks + 1).round().astype(int))
    out = []
    for r0, r1 in itertools.pairwise(bounds.tolist()):
        used = np.flatnonzero(edges[:, r0:r1].any(1))
        out.append((r0, r1, int(used.max()) + 1 if used.size else 0))
    return out


def _chunk_scores(
    a: dict[str, np.ndarray], w: dict[str, np.ndarray], layer_norm: bool, blocks: list[tuple[int, int, int]]
) -> np.ndarray:
    """sum over the chunk's sequences and positions of delta_sender . g_receiver: (sender, receiver) float64,
    computed within ``blocks`` (``_blocks``; zero outside them, where there is no edge)."""
    a = {k: np.asarray(v, np.float32) for k, v in a.items()}
    acc: np.ndarray | None = None
    for b in range(a["c_z"].shape[0]):
        send = _senders({k: v[b] for k, v in a.items()}, w)  # (sender, pos, d_model)
        recv = _receivers({k: v[b] for k, v in a.items()}, w, layer_norm)  # (receiver, pos, d_model)
        s2, r2 = send.reshape(send.shape[0], -1), recv.reshape(recv.shape[0], -1)
        part = np.zeros((s2.shape[0], r2.shape[0]), np.float32)
        for r0, r1, n_send in blocks:
            part[:n_send, r0:r1] = s2[:n_send] @ r2[r0:r1].T
        acc = part.astype(np.float64) if acc is None else acc + part  # float32 products, float64 across sequences
    assert acc is not None
    return acc


def _senders(a: dict[str, np.ndarray], w: dict[str, np.ndarray]) -> np.ndarray:
    """One sequence's sender deltas (sender, pos, d_model): input, then per layer its heads and its MLP."""
    dz = a["k_z"] - a["c_z"]  # (layer, pos, head, d_head)
    dr = a["k_resid_pre"] - a["c_resid_pre"]  # (layer, pos, d_model)
    df = a["k_resid_final"] - a["c_resid_final"]  # (pos, d_model)
    result = np.einsum("lphe,lhem->lhpm", dz, w["W_O"])  # (layer, head, pos, d_model)
    out = [dr[0][None]]
    n_layers = dz.shape[0]
    for L in range(n_layers):
        after = dr[L + 1] if L + 1 < n_layers else df
        out += [result[L], (after - dr[L] - result[L].sum(0))[None]]
    return np.concatenate(out)


def _receivers(a: dict[str, np.ndarray], w: dict[str, np.ndarray], layer_norm: bool) -> np.ndarray:
    """One sequence's receiver gradients (receiver, pos, d_model): per layer q heads, k and v (kv) heads, the MLP;
    then the logits."""
    out = []
    for L in range(a["grad_q"].shape[0]):
        resid, scale = a["c_resid_pre"][L], a["ln1_scale"][L]
        for which in "QKV":
            g, wl = a[f"grad_{which.lower()}"][L], w[f"W_{which}"][L]
            if "ig_resid_hat" in a:  # EAP-IG: the path-mean of each step's ln1 Jacobian times its gradient
                g = ig_head_input_grads(g, wl, a["ig_resid_hat"][L], a[f"ig_coef_{which.lower()}"][L], layer_norm)
            else:
                g = head_input_grads(g, wl, resid, scale, layer_norm)
            out.append(g.transpose(1, 0, 2))
        out.append(a["grad_mlp_in"][L][None])
    out.append(a["grad_resid_final"][None])
    return np.concatenate(out)


def top_edges(scores: xr.Dataset | xr.DataArray, n: int = 20) -> xr.Dataset:
    """The ``n`` edges of largest ``|score|`` (an ``edge_attribution`` result or its ``score``), along ``edge``
    (named ``sender->receiver`` as EAP-IG writes edges): ``sender``, ``receiver``, ``score``."""
    da = scores["score"] if isinstance(scores, xr.Dataset) else scores
    flat = da.stack(edge=("sender", "receiver")).dropna("edge").compute()
    order = np.argsort(-np.abs(np.asarray(flat.values)), kind="stable")[: max(int(n), 0)]
    s = np.asarray(flat["sender"].values)[order]
    r = np.asarray(flat["receiver"].values)[order]
    names = [f"{x}->{y}" for x, y in zip(s, r, strict=True)]
    return xr.Dataset(
        {"sender": ("edge", s), "receiver": ("edge", r), "score": ("edge", np.asarray(flat.values)[order])},
        coords={"edge": names},
    )


SPEC = AnalyzerSpec(
    NAME,
    edge_attribution,
    REQUIRES,
    n_stores=2,
    doc="EAP score of every edge sender -> receiver (q/k/v input, MLP, logits), EAP-IG's node names (clean store: --grad)",
)
register_analyzer(SPEC)
