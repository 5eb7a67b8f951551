"""Head-type scores: TransformerLens's ``detect_head`` for every head and sequence, from the store.

Each kind is a detection pattern ``D[b, q, k]`` (0 or 1, lower triangular) built from the sequence's
tokens ``t``, exactly as ``transformer_lens.head_detector`` builds it:

- ``previous_token``:  ``D[q, k] = [k == q - 1]``
- ``duplicate_token``: ``D[q, k] = [t[k] == t[q] and k < q]``
- ``induction``:       ``D[q, k] = [t[k - 1] == t[q] and 1 <= k <= q]`` (the duplicate pattern shifted one key right)
- ``bos``:             ``D[q, k] = [k == 0]`` (attention sink)
- ``self``:            ``D[q, k] = [k == q]``

With ``w[q, k] = [k != 0 or not exclude_bos] * [k != q or not exclude_current_token]`` and
``A = pattern[b, L, h]`` over the sequence's ``n`` real tokens (``q, k < n``)::

    mul: score[b, L, h] = sum_qk(w A D) / sum_qk(w A)
    abs: score[b, L, h] = 1 - sum_qk(w |A - D|) / n

which is ``detect_head``'s ``sum(pattern * detection) / sum(pattern)`` with the BOS column and the
diagonal of the *pattern* zeroed (``mul``), and ``1 - mean(|pattern - detection|) * n`` with those
entries of the difference zeroed (``abs``; TransformerLens rounds this one to 3 decimals, headstore
does not). Every query counts, BOS included, as in ``detect_head``. ``bos`` and ``self`` are the mean
attention to position 0 and to the current token under ``mul`` with no exclusions, and follow the
options like the other kinds (so ``exclude_bos`` makes ``bos`` 0).

Padding: in a store with a ``length`` column (IOI, own prompts), each sequence is scored on its
first ``length`` tokens only, as ``detect_head`` would score the unpadded prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xarray as xr

from headstore.analyze._apply import apply_blocks, store_blocks
from headstore.analyze._maths import lead_axes, require, sequence_lengths
from headstore.analyze.registry import AnalyzerSpec, register_analyzer
from headstore.analyze.types import ErrorMeasure, HeadScoreKinds
from headstore.store_schema import HeadstoreError

KINDS = ("previous_token", "duplicate_token", "induction", "bos", "self")
ERROR_MEASURES = ("mul", "abs")
REQUIRES = ("tokens", "pattern")


def detection_patterns(tokens: np.ndarray, kinds: Sequence[str]) -> np.ndarray:
    """numpy: one sequence's tokens (n,) -> (kind, q, k) float64 detection patterns (see the module docstring)."""
    n = tokens.shape[0]
    q, k = np.arange(n)[:, None], np.arange(n)[None, :]
    dup = (tokens[:, None] == tokens[None, :]) & (k < q)
    out = np.zeros((len(kinds), n, n))
    for i, kind in enumerate(kinds):
        if kind == "previous_token":
            out[i] = k == q - 1
        elif kind == "duplicate_token":
            out[i] = dup
        elif kind == "induction":
            out[i, :, 1:] = dup[:, :-1]
        elif kind == "bos":
            out[i, :, 0] = 1.0
        elif kind == "self":
            out[i] = k == q
    return out


def _block(
    tokens: np.ndarray,
    length: np.ndarray,
    pattern: np.ndarray,
    kinds: tuple[str, ...],
    exclude_bos: bool,
    exclude_current_token: bool,
    error_measure: str,
) -> np.ndarray:
    """One (batch chunk, layer) block: (batch, layer, head, kind) scores of every head.

    ``tokens`` (b, pos), ``length`` (b,), ``pattern`` (b, l, head, q, k): the module docstring's sums
    over each sequence's ``n = length[b]`` real tokens, as one (heads, n * n) @ (n * n, 1 + kinds) product.
    """
    tokens, length = lead_axes(tokens, 1)[:, 0], lead_axes(length, 0)[:, 0]
    pattern = lead_axes(pattern, 3)
    n_b, n_l, n_h = pattern.shape[:3]
    out = np.empty((n_b, n_l, n_h, len(kinds)))
    for i in range(n_b):
        n = int(length[i])
        a = pattern[i, :, :, :n, :n].reshape(n_l * n_h, n * n).astype(np.float64)
        w = np.ones((n, n))
        if exclude_bos:
            w[:, 0] = 0.0
        if exclude_current_token:
            np.fill_diagonal(w, 0.0)
        wd = detection_patterns(tokens[i, :n], kinds) * w  # (kind, q, k)
        sums = a @ np.concatenate([w.reshape(1, -1), wd.reshape(len(kinds), -1)]).T  # (heads, 1 + kind)
        s_a, s_ad = sums[:, :1], sums[:, 1:]
        if error_measure == "mul":
            score = s_ad / s_a
        else:  # |A - D| = A + D - 2 A D for D in {0, 1} and 0 <= A <= 1
            score = 1.0 - (s_a + wd.sum((1, 2))[None, :] - 2.0 * s_ad) / n
        out[i] = score.reshape(n_l, n_h, len(kinds))
    return out


def _kinds(kinds: str | Sequence[str]) -> tuple[str, ...]:
    out = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    bad = [k for k in out if k not in KINDS]
    if bad or not out or len(set(out)) != len(out):
        raise HeadstoreError(f"kinds must be distinct names among {', '.join(KINDS)}, got {list(out)}")
    return out


def head_scores(
    ds: xr.Dataset,
    *,
    kinds: str | Sequence[str] = KINDS,
    exclude_bos: bool = False,
    exclude_current_token: bool = False,
    error_measure: ErrorMeasure = "mul",
) -> xr.Dataset:
    """TransformerLens's ``detect_head`` score of every head on every sequence, and its mean.

    For each kind ``K`` (``previous_token``, ``duplicate_token``, ``induction``, ``bos``, ``self``):
    ``K_per_sequence[layer, head, batch]`` = ``sum_qk(w A D_K) / sum_qk(w A)`` (``mul``) or
    ``1 - sum_qk(w |A - D_K|) / n`` (``abs``), ``A = pattern[batch, layer, head]`` over the ``n`` real
    tokens, ``w`` the BOS-column / diagonal exclusions; ``K[layer, head] = mean_batch K_per_sequence``.
    Lazy; one task per (batch chunk, stored layer block). See the module docstring for the detection patterns.
    """
    kinds = _kinds(kinds)
    if error_measure not in ERROR_MEASURES:
        raise HeadstoreError(f"error_measure must be 'mul' or 'abs', got {error_measure!r}")
    require(ds, REQUIRES, "head-scores")
    block = store_blocks(ds, "pattern")  # the store's batch chunk x its stored layer block (a shard), whole elsewhere
    scores = apply_blocks(
        _block,
        block(ds["tokens"]),
        block(sequence_lengths(ds)),
        block(ds["pattern"]),
        kwargs={
            "kinds": kinds, "exclude_bos": bool(exclude_bos), "exclude_current_token": bool(exclude_current_token),
            "error_measure": error_measure,
        },
        input_core_dims=[["pos"], [], ["head", "query_pos", "key_pos"]],
        output_core_dims=[["head", "kind"]],
        output_dtypes=[np.float64],
        output_sizes={"kind": len(kinds)},
    )  # fmt: skip
    out = xr.Dataset()
    for i, kind in enumerate(kinds):
        per_sequence = scores.isel(kind=i).transpose("layer", "head", "batch")
        out[kind] = per_sequence.mean("batch", skipna=False)  # a layer without a stored pattern stays NaN
        out[f"{kind}_per_sequence"] = per_sequence
    out.attrs.update(
        {
            "analyzer": "head-scores", "kinds": ",".join(kinds), "exclude_bos": int(bool(exclude_bos)),
            "exclude_current_token": int(bool(exclude_current_token)), "error_measure": error_measure,
        }
    )  # fmt: skip
    return out


SPEC = AnalyzerSpec(
    "head-scores", head_scores, REQUIRES,
    doc="TransformerLens detect_head scores per head and sequence: previous-token, duplicate, induction, BOS, self",
    params={
        "kinds": HeadScoreKinds, "exclude_bos": bool, "exclude_current_token": bool, "error_measure": ErrorMeasure,
    },
)  # fmt: skip
register_analyzer(SPEC)
