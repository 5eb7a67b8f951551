"""projection-loss against the seed's online method ('Change in loss', return_new_loss=True)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from headstore import open_store
from headstore.analyze import projection_loss
from headstore.analyze._projection_loss import MODES
from headstore.cli.registry import analyzers
from headstore.report import figures

SPEC = analyzers()["projection-loss"]

MODELS = ("tiny-gpt2", "tiny-llama")


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape
    assert np.isfinite(want).all() and np.isfinite(got).all()
    return float(np.abs(got - want).max() / np.abs(want).max())


# --- the seed's hook functions (000), with return_new_loss=True ----------------------------------


def project(x: Any, dir: Any) -> tuple[Any, Any, Any]:
    """The seed's ``project(x, dir, return_type="both")``: orthogonal projection of x onto dir (per row)."""
    coeffs = (x * dir).sum(-1) / (dir * dir).sum(-1)
    proj = coeffs[..., None] * dir
    return proj, x - proj, coeffs


def hook_fn_cache_v(v: Any, hook: Any, ctx: dict[str, Any], kv_idx: int) -> None:
    ctx["v"] = v[:, :, kv_idx]


def hook_fn_cache_attn(pattern: Any, hook: Any, ctx: dict[str, Any], head_idx: int) -> None:
    ctx["pattern"] = pattern[:, head_idx]


def hook_fn_at_result(
    result: Any, hook: Any, ctx: dict[str, Any], toks: Any, model: Any, layer: int, head_idx: int, only_neg: bool
) -> None:
    import einops

    v = ctx.pop("v")
    unembeddings = model.W_U.T[toks]
    result_pre_attn = einops.einsum(
        v, model.W_O[layer, head_idx], "batch seqK d_head, d_head d_model -> batch seqK d_model"
    )
    pattern = ctx.pop("pattern")
    projected, _perp, coeffs = project(result_pre_attn, unembeddings)
    if only_neg:
        projected = projected * (coeffs < 0).float()[..., None]
    ctx["result_orig"] = result[:, :, head_idx]
    ctx["result_new"] = einops.einsum(projected, pattern, "batch seqK d_model, batch seqQ seqK -> batch seqQ d_model")


def hook_fn_at_scale(ln_scale: Any, hook: Any, ctx: dict[str, Any], model: Any) -> None:
    import einops

    result_orig = ctx.pop("result_orig") / ln_scale
    result_new = ctx.pop("result_new") / ln_scale
    proj = einops.einsum(
        result_new - result_orig, model.W_U, "batch seqQ d_model, d_model d_vocab -> batch seqQ d_vocab"
    )
    ablation = einops.einsum(-result_orig, model.W_U, "batch seqQ d_model, d_model d_vocab -> batch seqQ d_vocab")
    ctx["logit_change_for_proj"] = proj
    ctx["logit_change_for_perp"] = ablation - proj
    ctx["logit_change_for_ablation"] = ablation


def online_losses(
    bridge: Any, toks_np: np.ndarray, layer: int, head_idx: int, only_neg: bool
) -> tuple[np.ndarray, np.ndarray]:
    """-> (clean per-token loss (batch, pos-1), losses (mode, batch, pos-1)) as the seed computes them."""
    import torch
    from transformer_lens.utilities import lm_cross_entropy_loss

    toks = torch.tensor(toks_np, dtype=torch.long)
    cfg = bridge.cfg
    n_kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    ctx: dict[str, Any] = {}
    fwd_hooks = [
        (f"blocks.{layer}.attn.hook_v", partial(hook_fn_cache_v, ctx=ctx, kv_idx=head_idx // (cfg.n_heads // n_kv))),
        (f"blocks.{layer}.attn.hook_pattern", partial(hook_fn_cache_attn, ctx=ctx, head_idx=head_idx)),
        (
            f"blocks.{layer}.attn.hook_result",
            partial(
                hook_fn_at_result, ctx=ctx, toks=toks, model=bridge, layer=layer, head_idx=head_idx, only_neg=only_neg
            ),
        ),
        ("ln_final.hook_scale", partial(hook_fn_at_scale, ctx=ctx, model=bridge)),
    ]
    with torch.no_grad():
        logits = bridge.run_with_hooks(toks, return_type="logits", fwd_hooks=fwd_hooks)
        clean = lm_cross_entropy_loss(logits, toks, per_token=True)
        losses = [
            lm_cross_entropy_loss(logits + ctx.pop(f"logit_change_for_{name}"), toks, per_token=True)
            for name in ("proj", "perp", "ablation")
        ]
    return clean.numpy().astype(np.float64), torch.stack(losses).numpy().astype(np.float64)


# --- tests ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ioi_store(make_store: Callable[..., Path]) -> Callable[[str], Path]:
    return lambda model: make_store(model, "ioi", n_seq=8, batch_size=4)


@pytest.mark.parametrize(
    ("only_negative", "gram", "row_tile"), [(False, True, 32), (True, True, 32), (False, False, 32), (False, True, 5)]
)
@pytest.mark.parametrize("model", MODELS)
def test_matches_online_hooks(
    model: str,
    only_negative: bool,
    gram: bool,
    row_tile: int,
    ioi_store: Callable[[str], Path],
    live_model: Callable[[str], Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``gram``: the source tokens' unembedding shared by all heads (short sequences), else per head;
    ``row_tile`` 5: each sequence's positions in runs of 5 rows (the causal key cut per run), one stored batch
    chunk a block (32: whole sequences, both chunks in one block)."""
    import headstore.analyze._apply as ap
    import headstore.analyze._projection_loss as pl

    monkeypatch.setattr(pl, "GRAM_MAX_POS_PER_D_MODEL", 1e9 if gram else 0.0)
    monkeypatch.setattr(ap, "VOCAB_ROW_TILE", row_tile)
    monkeypatch.setattr(ap, "VOCAB_BLOCK_BYTES", 1 if row_tile < 32 else 1 << 30)
    ds = open_store(ioi_store(model))
    toks = ds["tokens"].values
    # IOI rows are right-padded: prediction q is real only if q + 1 < length (the seed's prompts had no padding)
    real = np.arange(toks.shape[1] - 1)[None, :] + 1 < ds["length"].values[:, None]
    assert (~real).sum() > 0
    res = projection_loss(ds, only_negative=only_negative).compute()
    assert res.attrs["analyzer"] == "projection-loss" and res.attrs["only_negative"] == int(only_negative)
    assert res["loss"].dims == ("layer", "head", "mode", "batch", "pos")
    assert list(res["mode"].values) == list(MODES) == ["project", "perpendicular", "ablation"]
    assert res["loss_original"].dims == ("batch", "pos")
    assert res["mean_increase"].dims == ("layer", "head", "mode")
    # no next token at the last position, nor where the next token is padding
    assert np.isnan(res["loss_original"].values[:, -1]).all() and np.isnan(res["loss"].values[..., -1]).all()
    assert np.isnan(res["loss_original"].values[:, :-1][~real]).all()
    assert np.isnan(res["loss"].values[..., :-1][..., ~real]).all()
    got_clean = res["loss_original"].values[:, :-1][real]
    bridge = live_model(model).bridge
    for layer in ds["layer"].values:
        for h in range(ds.sizes["head"]):
            clean, want = online_losses(bridge, toks, int(layer), h, only_negative)
            clean, want = clean[real], want[:, real]  # (n_real,), (mode, n_real)
            # the clean loss recomputed from the store equals the bridge's own
            assert rel_err(got_clean, clean) <= 1e-4
            got = res["loss"].sel(layer=layer).isel(head=h).transpose("mode", "batch", "pos").values[..., :-1][:, real]
            assert rel_err(got, want) <= 1e-4, (layer, h)
            # the changes themselves (small on random-init models) agree too, not only the totals
            d_got, d_want = got - got_clean, want - clean
            assert np.abs(d_want).max() > 1e-4
            assert rel_err(d_got, d_want) <= 2e-3, (layer, h)
            mean_inc = res["mean_increase"].sel(layer=layer).isel(head=h).sel(mode=list(MODES)).values
            np.testing.assert_allclose(mean_inc, d_want.mean(axis=1), rtol=0, atol=2e-3 * np.abs(d_want).max())


def test_loss_original_matches_stored_loss(ioi_store: Callable[[str], Path]) -> None:
    """At every real prediction; the stored ``loss`` also holds the padded ones, which projection-loss leaves out."""
    ds = open_store(ioi_store("tiny-llama"))
    res = projection_loss(ds).compute()
    stored = ds["loss"].values
    real = np.arange(stored.shape[1])[None, :] + 1 < ds["length"].values[:, None]
    assert rel_err(res["loss_original"].values[real], stored[real]) <= 1e-5
    assert np.isnan(res["loss_original"].values[~real]).all()
    assert np.isfinite(stored[:, :-1][~real[:, :-1]]).all() and (~real[:, :-1]).any()  # stored: padded ones too


def test_projection_identities(ioi_store: Callable[[str], Path]) -> None:
    """only_negative changes 'project'/'perpendicular' but never 'ablation' (which does not project)."""
    ds = open_store(ioi_store("tiny-gpt2"))
    full = projection_loss(ds).compute()["loss"]
    neg = projection_loss(ds, only_negative=True).compute()["loss"]
    np.testing.assert_array_equal(full.sel(mode="ablation").values, neg.sel(mode="ablation").values)
    real = np.isfinite(full.sel(mode="project").values)
    assert real.sum() > 0 and (np.isfinite(neg.sel(mode="project").values) == real).all()
    assert not np.allclose(full.sel(mode="project").values[real], neg.sel(mode="project").values[real])


def test_spec_registered_summary_and_plot(ioi_store: Callable[[str], Path], tmp_path: Path) -> None:
    assert SPEC.func is projection_loss and SPEC.name == "projection-loss"
    assert SPEC.summary is figures.projection_loss_summary and SPEC.plot is figures.projection_loss_plot
    ds = open_store(ioi_store("tiny-llama"))
    res = projection_loss(ds).compute()
    table = SPEC.summary(res)
    assert list(table.columns) == ["layer", "head", *MODES]
    assert len(table) == ds.sizes["layer"] * ds.sizes["head"]
    assert table["ablation"].is_monotonic_decreasing
    assert table["ablation"].iloc[0] == pytest.approx(float(res["mean_increase"].sel(mode="ablation").max()))
    paths = SPEC.plot(res, tmp_path)
    assert {p.suffix for p in paths} == {".png", ".html"}
    assert all(p.stat().st_size > 0 for p in paths)


def test_missing_field_is_refused(ioi_store: Callable[[str], Path]) -> None:
    from headstore.store_schema import HeadstoreError

    ds = open_store(ioi_store("tiny-gpt2")).drop_vars("resid_final")
    with pytest.raises(HeadstoreError, match="resid_final"):
        projection_loss(ds)


def test_does_not_import_torch(ioi_store: Callable[[str], Path], run_without_torch: Callable[[str], dict]) -> None:
    path = ioi_store("tiny-gpt2")
    out = run_without_torch(
        "import headstore\n"
        "from headstore.analyze import projection_loss\n"
        f"res = projection_loss(headstore.open_store({str(path)!r})).compute()\n"
        "out['m'] = float(abs(res['mean_increase']).sum())\n"
    )
    assert out["m"] > 0


@pytest.mark.parametrize("model", MODELS)
def test_padding_is_excluded_when_pad_is_not_bos(
    model: str, pad_not_bos_store: Callable[[str], tuple[Path, str]], live_model: Callable[[str], Any]
) -> None:
    """A right-padded store of own prompts (pad token not BOS, as SmolLM2's): each real prediction's losses are the
    seed's on that prompt alone, unpadded, on the live model; the others are NaN, and the mean is over real ones."""
    path, folder = pad_not_bos_store(model)
    ds = open_store(path)
    toks, length = ds["tokens"].values, ds["length"].values
    assert (length < toks.shape[1]).sum() >= 4 and (length == toks.shape[1]).any()
    real = np.arange(toks.shape[1])[None, :] + 1 < length[:, None]  # q + 1 < length[b]
    res = projection_loss(ds).compute()
    assert np.isnan(res["loss_original"].values[~real]).all() and np.isnan(res["loss"].values[..., ~real]).all()
    bridge = live_model(folder).bridge
    n_differ = 0
    for layer in ds["layer"].values:
        for h in range(ds.sizes["head"]):
            rows = [online_losses(bridge, toks[b : b + 1, : length[b]], int(layer), h, False) for b in range(len(toks))]
            clean = np.concatenate([c[0] for c, _ in rows])  # every real prediction, row by row
            want = np.concatenate([w[:, 0] for _, w in rows], axis=1)  # mode, prediction
            assert rel_err(res["loss_original"].values[real], clean) <= 1e-4
            got = res["loss"].sel(layer=layer).isel(head=h).transpose("mode", "batch", "pos").values[:, real]
            assert rel_err(got, want) <= 1e-4, (layer, h)
            d_want = want - clean
            assert rel_err(got - res["loss_original"].values[real], d_want) <= 2e-3, (layer, h)
            mean_inc = res["mean_increase"].sel(layer=layer).isel(head=h).sel(mode=list(MODES)).values
            np.testing.assert_allclose(mean_inc, d_want.mean(axis=1), rtol=0, atol=2e-3 * np.abs(d_want).max())
            # averaging over the padded positions too (the seed's formula on the padded rows) gives another number
            p_clean, p_want = online_losses(bridge, toks, int(layer), h, False)
            padded_mean = (p_want - p_clean).mean(axis=(1, 2))
            n_differ += int(np.abs(padded_mean - d_want.mean(axis=1)).max() > 1e-2 * np.abs(d_want).max())
    assert n_differ >= ds.sizes["layer"] * ds.sizes["head"] // 2
