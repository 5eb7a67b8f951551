"""``ifelse-detector``: Mahalanobis anomaly detectors on per-head logit attribution (seed: if/else).

Meant for ``code-ifelse`` stores (columns ``split`` trusted/anomalous and ``subset`` train/test).
At the last position of each prompt, every head's output is attributed to the effect token ``t``
(default `` else``), source position by source position::

    contrib[b, L, h, k] = pattern[b, L, h, last, k] * (v[b, L, k, kv(h)] @ W_O[L, h] @ u) / ln_final_scale[b, last]

with ``u = W_U[:, t]``, centred over ``d_model`` on LN models (``(x - mean x) . u = x . (u - mean u)``:
exactly the head's share of the ``t`` logit through the folded ln_final, ``b_O`` left out; ``v - b_V`` where a
store carries a value bias: ``_maths.source_contributions``, the same decomposition as logit-attribution).

Detectors (each a Gaussian with Ledoit-Wolf shrunk covariance, fitted on ``trusted`` & ``train``,
features standardised by the training mean and standard deviation first; score = squared
Mahalanobis distance; AUROC of trusted-vs-anomalous on the ``test`` subset):

- ``per_head``: ``sum_k contrib`` per (layer, head): n_layers x n_heads features;
- ``per_head_token``: per head, the contributions summed by source token id, for the
  ``max_tokens`` source tokens most frequent in the training prompts (ties by id; the seed's
  per-(head, source token) idea on a vocabulary restricted to tokens seen in training) plus one
  ``other`` bucket for the rest: n_layers x n_heads x (max_tokens + 1) features;
- ``resid_final``: baseline, ``resid_final`` at the last position (d_model features).
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from headstore.analyze import _args
from headstore.analyze._maths import f32, logits_kind, require, source_contributions, strings
from headstore.analyze.registry import AnalyzerSpec, register_analyzer
from headstore.analyze.types import Token
from headstore.store_schema import HeadstoreError

REQUIRES = ("pattern", "v", "ln_final_scale", "resid_final", "tokens", "W_O", "W_U", "split", "subset")
DETECTORS = ("per_head", "per_head_token", "resid_final")


def fit_score(train: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distance of rows of ``x`` under a Ledoit-Wolf Gaussian fitted on ``train``.

    Features are standardised by the training mean and std (std floored at 1e-12 x its max) first.
    """
    from sklearn.covariance import LedoitWolf

    train = np.asarray(train, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    if train.ndim != 2 or train.shape[0] < 2:
        raise HeadstoreError(f"a detector needs at least 2 training rows, got {train.shape[0]}")
    mu, sd = train.mean(0), train.std(0)
    sd = np.where(sd > 1e-12 * max(float(sd.max()), 1e-30), sd, 1.0)
    lw = LedoitWolf().fit((train - mu) / sd)
    return np.asarray(lw.mahalanobis((x - mu) / sd))


def auroc(scores: np.ndarray, anomalous: np.ndarray) -> float:
    """AUROC of ``scores`` for anomalous (1) vs trusted (0); NaN without both classes."""
    from sklearn.metrics import roc_auc_score

    anomalous = np.asarray(anomalous, dtype=bool)
    if anomalous.all() or not anomalous.any():
        return float("nan")
    return float(roc_auc_score(anomalous, scores))


def head_contributions(ds: xr.Dataset, effect_token: str | int = " else") -> xr.DataArray:
    """(batch, layer, head, key_pos) ``contrib`` above (lazy)."""
    t = _args.token(ds, effect_token, "effect_token")
    last = _args.positions(ds, None if "last_pos" in ds else -1, "last", column="last_pos")
    return source_contributions(ds, last, xr.DataArray(np.full(ds.sizes["batch"], t), dims="batch"))


def _labels(ds: xr.Dataset, name: str) -> np.ndarray:
    return strings(ds, name)


def token_features(contrib: np.ndarray, tokens: np.ndarray, vocab_ids: np.ndarray) -> np.ndarray:
    """(batch, layer, head, key_pos) contributions summed by source token -> (batch, layer, head, len(ids) + 1).

    Bucket ``j`` sums the positions holding ``vocab_ids[j]``; the last bucket sums every other token.
    """
    onehot = tokens[:, :, None] == vocab_ids[None, None, :]  # (batch, key_pos, n_ids)
    onehot = np.concatenate([onehot, ~onehot.any(-1, keepdims=True)], axis=-1).astype(contrib.dtype)
    return np.einsum("blhk,bkj->blhj", contrib, onehot)


def ifelse_detector(ds: xr.Dataset, *, effect_token: int | str = " else", max_tokens: int = 16) -> xr.Dataset:
    """Scores per prompt for each detector, AUROC per detector, per-head AUROCs and counts per split."""
    require(ds, REQUIRES, "ifelse-detector")
    split, subset = _labels(ds, "split"), _labels(ds, "subset")
    trusted, anomalous = split == "trusted", split == "anomalous"
    train = trusted & (subset == "train")
    test = subset == "test"
    if train.sum() < 2:
        raise HeadstoreError(
            "ifelse-detector needs at least 2 trusted prompts with subset 'train': use code-ifelse data"
        )
    if not (test & anomalous).any() or not (test & trusted).any():
        raise HeadstoreError("ifelse-detector needs trusted and anomalous prompts in subset 'test'")
    contrib = head_contributions(ds, effect_token).values.astype(np.float64)
    n, n_layers, n_heads, _ = contrib.shape
    per_head_feat = contrib.sum(-1)  # (batch, layer, head)
    tokens = np.asarray(ds["tokens"].values)
    seen, counts = np.unique(tokens[train], return_counts=True)
    keep = np.lexsort((seen, -counts))[:max_tokens]
    vocab_ids = np.sort(seen[keep])
    tok_feat = token_features(contrib, tokens, vocab_ids)
    last = _args.positions(ds, None if "last_pos" in ds else -1, "last", column="last_pos")
    resid = f32(ds["resid_final"]).isel(pos=last).values.astype(np.float64)
    features = {
        "per_head": per_head_feat.reshape(n, -1),
        "per_head_token": tok_feat.reshape(n, -1),
        "resid_final": resid.reshape(n, -1),
    }
    scores = np.stack([fit_score(f[train], f) for f in features.values()])
    is_anom = anomalous[test]
    aurocs = [auroc(s[test], is_anom) for s in scores]
    head_auc = np.array([[auroc(per_head_feat[test, L, h], is_anom) for h in range(n_heads)] for L in range(n_layers)])
    groups = ["trusted_train", "trusted_test", "anomalous_train", "anomalous_test"]
    masks = [train, trusted & test, anomalous & ~test, anomalous & test]
    res = xr.Dataset(
        {
            "score": (("detector", "batch"), scores),
            "auroc": (("detector",), np.array(aurocs)),
            "n_features": (("detector",), np.array([f.shape[1] for f in features.values()])),
            "head_feature": (("layer", "head", "batch"), per_head_feat.transpose(1, 2, 0)),
            "head_auroc": (("layer", "head"), head_auc),
            "token_bucket_id": (("token_bucket",), np.append(vocab_ids, -1)),
            "count": (("group",), np.array([int(m.sum()) for m in masks])),
        },
        coords={
            "detector": list(DETECTORS),
            **{c: ds[c].values for c in ("layer", "head", "batch") if c in ds.coords},  # labels of a subset kept
            "group": groups,
            "split": ("batch", split),
            "subset": ("batch", subset),
        },
    )
    res.attrs = {
        "analyzer": "ifelse-detector",
        "effect_token": effect_token,
        "effect_token_id": _args.token(ds, effect_token, "effect_token"),
        "max_tokens": max_tokens,
        "logits": logits_kind(ds),
    }
    return res


SPEC = AnalyzerSpec(
    "ifelse-detector", ifelse_detector, REQUIRES,
    doc="Mahalanobis detectors on per-head logit attribution to ' else' (seed: if/else anomaly detection)",
    params={"effect_token": Token, "max_tokens": int},
)  # fmt: skip
register_analyzer(SPEC)
