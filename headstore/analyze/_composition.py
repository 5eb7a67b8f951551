"""Composition scores between heads, from the weights only (Elhage et al., "A Mathematical Framework for
Transformer Circuits"), as TransformerLens's ``all_composition_scores`` computes them.

For an earlier head ``a`` and a later head ``b`` (``kv(h)`` the kv head a query head reads)::

    W_OV(h) = W_V[L, kv(h)] @ W_O[L, h]          (d_model, d_model), rank d_head
    W_QK(h) = W_Q[L, h] @ W_K[L, kv(h)]^T        (d_model, d_model)
    score(a, b) = ||W_OV(a) @ M(b)||_F / (||W_OV(a)||_F ||M(b)||_F)
    M(b) = W_QK(b) (Q), W_QK(b)^T (K), W_OV(b) (V)

TransformerLens builds these as ``FactoredMatrix`` products and zeroes every pair with
``layer_b <= layer_a``; here those pairs are NaN (the score is not defined there: b cannot read a).

No ``d_model x d_model`` matrix is formed. Write the left matrix as ``A B`` and the right one as
``C D`` (``A, C`` d_model x d_head, ``B, D`` d_head x d_model) and take ``d_head x d_head`` roots of
the Gram matrices, ``R_A^T R_A = A^T A`` and ``R_D^T R_D = D D^T`` (the R factors of QR
factorisations, up to rotation): ``||A X||_F = ||R_A X||_F``, so with ``P = R_A B`` (d_head x d_model)
and ``S = C R_D^T`` (d_model x d_head), ``score = ||P S||_F / (||P||_F ||S||_F)``: one
(d_head x d_model) @ (d_model x d_head) product per pair, all pairs of a layer in one matrix
product. Factors in float64, the pair products in float32 (relative error ~1e-7).

Baseline: the same score for independent standard Gaussian matrices of the same shapes (``n_draws``
draws, seeded), whose mean and std say how large a score chance alone gives. (The score does not
depend on the matrices' scale; Q, K and V have the same shapes, so their baselines differ only by
sampling noise.)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xarray as xr
from threadpoolctl import threadpool_limits

from headstore.analyze._maths import kv_index, require
from headstore.analyze.registry import AnalyzerSpec, register_analyzer
from headstore.analyze.types import CompositionKinds
from headstore.store_schema import HeadstoreError

KINDS = ("Q", "K", "V")
REQUIRES = ("W_Q", "W_K", "W_V", "W_O")


def gram_root(a: np.ndarray) -> np.ndarray:
    """numpy, float64: stacks of (d_model, d_head) -> (d_head, d_head) ``R`` with ``R^T R = A^T A``, so
    ``||A X||_F = ||R X||_F`` for every ``X`` (the R of a QR factorisation, up to rotation): the
    Cholesky factor of the small Gram matrix, or its eigen-root when ``A`` is rank-deficient."""
    gram = np.swapaxes(a, -1, -2) @ a
    try:
        return np.swapaxes(np.linalg.cholesky(gram), -1, -2)
    except np.linalg.LinAlgError:
        lam, vec = np.linalg.eigh(gram)
        return np.swapaxes(vec * np.sqrt(np.clip(lam, 0.0, None))[..., None, :], -1, -2)


def left_factor(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``A B`` (stacks of ``(d_model, d_head) @ (d_head, d_model)``) -> ``P = R_A B`` (n, d_head, d_model):
    ``||P X||_F = ||A B X||_F`` for every ``X``."""
    with threadpool_limits(1):  # stacks of small products: BLAS threads only slow them down (docs/benchmarks.md)
        return gram_root(a) @ b


def right_factor(c: np.ndarray, d: np.ndarray) -> np.ndarray:
    """``C D`` -> ``S = C R_D^T`` (n, d_model, d_head), ``R_D = gram_root(D^T)``: ``||X S||_F = ||X C D||_F``."""
    with threadpool_limits(1):
        return c @ np.swapaxes(gram_root(np.swapaxes(d, -1, -2)), -1, -2)


def norms(x: np.ndarray) -> np.ndarray:
    """Frobenius norms of a stack of matrices, float64."""
    return np.sqrt(np.einsum("nij,nij->n", x, x))


def pair_norms(p: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``||p_i @ S_j||_F`` for every i, j: ``p`` (n_p, d_head, d_model), ``s`` (d_model, n_s * d_head) float32,
    the ``S_j`` side by side -> (n_p, n_s), through one matrix product (float32, like TransformerLens;
    squares summed in float64: relative error ~1e-7)."""
    n_p, dh, dm = p.shape
    prod = (p.reshape(n_p * dh, dm).astype(np.float32) @ s).astype(np.float64).reshape(n_p, dh, -1, dh)
    return np.sqrt(np.einsum("ijkl,ijkl->ik", prod, prod))


def _right(
    kind: str, w_q: np.ndarray, w_k: np.ndarray, w_v: np.ndarray, w_o: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The right matrix ``C D`` of ``kind``, per head (stacks over heads)."""
    if kind == "Q":
        return w_q, np.swapaxes(w_k, -1, -2)
    if kind == "K":
        return w_k, np.swapaxes(w_q, -1, -2)
    return w_v, w_o


def _kinds(kinds: str | Sequence[str]) -> tuple[str, ...]:
    out = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    if not out or any(k not in KINDS for k in out) or len(set(out)) != len(out):
        raise HeadstoreError(f"kinds must be distinct names among Q, K, V, got {list(out)}")
    return out


def baseline(d_model: int, d_head: int, n_draws: int, rng: np.random.Generator) -> np.ndarray:
    """(n_draws,) composition scores of independent Gaussian ``A B`` and ``C D`` of the heads' shapes."""
    a, c = (rng.standard_normal((n_draws, d_model, d_head)) for _ in range(2))
    b, d = (rng.standard_normal((n_draws, d_head, d_model)) for _ in range(2))
    p, s = left_factor(a, b), right_factor(c, d)
    with threadpool_limits(1):
        return norms(p @ s) / norms(p) / norms(s)


def composition(ds: xr.Dataset, *, kinds: str | Sequence[str] = KINDS, n_draws: int = 100, seed: int = 0) -> xr.Dataset:
    """Q-, K- and V-composition scores of every head pair ``(layer_a, head_a) -> (layer_b, head_b)``.

    ``Q[layer_a, head_a, layer_b, head_b] = ||W_OV(a) W_QK(b)||_F / (||W_OV(a)||_F ||W_QK(b)||_F)``,
    ``K`` the same with ``W_QK(b)^T``, ``V`` with ``W_OV(b)``; NaN where ``layer_b <= layer_a``. A store of one
    layer (``extract --layers 1``) has no such pair and is refused.
    ``baseline_mean[kind]``, ``baseline_std[kind]``: the score of Gaussian matrices of the same shapes
    (``n_draws`` draws, ``seed``). Computed on call (weights only, as TransformerLens: the scores are defined
    on the weight matrices, so soft-caps, sliding windows and q/k norms do not enter them; on post-norm models
    ``W_O`` is taken times the post-attention norm's gain, what a head writes up to the norm's scale).
    """
    kinds = _kinds(kinds)
    if n_draws < 2:
        raise HeadstoreError(f"n_draws must be at least 2 (a mean and a std), got {n_draws}")
    require(ds, REQUIRES, "composition")
    kv = kv_index(ds).values

    def w(name: str, dims: tuple[str, ...]) -> np.ndarray:
        return np.asarray(ds[name].transpose(*dims).values, dtype=np.float64)

    w_q = w("W_Q", ("layer", "head", "d_model", "d_head"))
    w_k = w("W_K", ("layer", "kv_head", "d_model", "d_head"))[:, kv]
    w_v = w("W_V", ("layer", "kv_head", "d_model", "d_head"))[:, kv]
    w_o = w("W_O", ("layer", "head", "d_head", "d_model"))
    if ds.hs.config.post_norm:  # a head writes through its layer's post-attention norm: its gain scales W_O
        require(ds, ("ln1_post_w",), "composition")
        w_o = w_o * w("ln1_post_w", ("layer", "d_model"))[:, None, None, :]
    n_l, n_h, d_model, d_head = w_q.shape
    flat = lambda x: x.reshape(n_l * n_h, *x.shape[2:])  # noqa: E731
    layers = np.asarray(ds.hs.layers)
    if layers.size < 2:
        held = f"only layer {int(layers[0])}" if layers.size else "no layer"
        raise HeadstoreError(
            f"composition needs at least two layers (a head composes with heads of later layers), but this store "
            f"holds {held}: extract with --layers naming two or more layers (or all)"
        )
    if np.any(np.diff(layers) <= 0):
        raise HeadstoreError(f"composition needs the store's layers in increasing order, got {layers.tolist()}")
    p_left = left_factor(flat(w_v), flat(w_o))  # (heads, d_head, d_model), heads in (layer, head) order
    p_norm = norms(p_left).reshape(n_l, n_h)
    rng = np.random.default_rng(seed)
    out = xr.Dataset(coords={"layer_a": layers, "layer_b": layers, "kind": list(kinds)})
    means, stds = [], []
    for kind in kinds:
        s_right = right_factor(*(flat(x) for x in _right(kind, w_q, w_k, w_v, w_o)))  # (heads, d_model, d_head)
        s_norm = norms(s_right).reshape(n_l, n_h)
        s_side = np.moveaxis(s_right, 0, 1).reshape(d_model, -1).astype(np.float32)  # S_j side by side
        scores = np.full((n_l, n_h, n_l, n_h), np.nan)
        for i in range(n_l - 1):  # head b in a later layer than head a: layers i + 1 ...
            num = pair_norms(p_left[i * n_h : (i + 1) * n_h], s_side[:, (i + 1) * n_h * d_head :])
            scores[i, :, i + 1 :] = num.reshape(n_h, n_l - i - 1, n_h) / p_norm[i][:, None, None] / s_norm[i + 1 :]
        out[kind] = xr.DataArray(scores, dims=("layer_a", "head_a", "layer_b", "head_b"))
        draws = baseline(d_model, d_head, n_draws, rng)
        means.append(draws.mean())
        stds.append(draws.std())
    out["baseline_mean"] = xr.DataArray(np.asarray(means), dims="kind")
    out["baseline_std"] = xr.DataArray(np.asarray(stds), dims="kind")
    out.attrs.update({"analyzer": "composition", "kinds": ",".join(kinds), "n_draws": int(n_draws), "seed": int(seed)})
    return out


SPEC = AnalyzerSpec(
    "composition", composition, REQUIRES,
    doc="Q/K/V composition scores of every earlier head into every later one, from the weights, with a random baseline",
    params={"kinds": CompositionKinds, "n_draws": int, "seed": int},
)  # fmt: skip
register_analyzer(SPEC)
