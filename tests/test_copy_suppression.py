"""copy-suppression against the seed's online method: hooks on the live bridge, one head at a time."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from headstore import open_store
from headstore.analyze import copy_suppression
from headstore.cli.registry import analyzers
from headstore.report import figures

MODELS = ("tiny-gpt2", "tiny-llama")


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape
    assert np.isfinite(want).all() and np.isfinite(got).all()
    return float(np.abs(got - want).max() / np.abs(want).max())


# --- the seed's hook functions (000, Part 1), with return_new_loss=False -------------------------


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
    coeffs = einops.einsum(result_pre_attn, unembeddings, "batch seqK d_model, batch seqK d_model -> batch seqK")
    if only_neg:
        coeffs = coeffs * (coeffs < 0).float()
    ctx["unembedding_coeffs"] = coeffs


def hook_fn_at_scale(ln_scale: Any, hook: Any, ctx: dict[str, Any], toks: Any, bos: int) -> None:
    import einops

    coeffs = ctx.pop("unembedding_coeffs")
    pattern = ctx.pop("pattern")
    is_not_bos_2d = (toks != bos).float()
    mask = einops.einsum(is_not_bos_2d, is_not_bos_2d, "batch seqQ, batch seqK -> batch seqQ seqK")
    non_bos_attn = pattern * mask
    non_bos_attn_per_src = einops.reduce(non_bos_attn, "batch seqQ seqK -> batch seqK", "sum")
    per_src_and_dest = einops.einsum(coeffs, non_bos_attn, "batch seqK, batch seqQ seqK -> batch seqQ seqK") / ln_scale
    per_src = einops.reduce(per_src_and_dest, "batch seqQ seqK -> batch seqK", "sum")
    per_seq = einops.einsum(
        per_src, non_bos_attn_per_src, "batch seqK, batch seqK -> batch"
    ) / non_bos_attn_per_src.sum(dim=-1)
    ctx["out"] = {"per_position": per_src, "per_sequence": per_seq}


def online_copy_suppression(
    bridge: Any, toks_np: np.ndarray, layer: int, head_idx: int, only_neg: bool
) -> dict[str, np.ndarray]:
    import torch

    toks = torch.tensor(toks_np, dtype=torch.long)
    cfg = bridge.cfg
    n_kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    kv_idx = head_idx // (cfg.n_heads // n_kv)
    ctx: dict[str, Any] = {}
    fwd_hooks = [
        (f"blocks.{layer}.attn.hook_v", partial(hook_fn_cache_v, ctx=ctx, kv_idx=kv_idx)),
        (f"blocks.{layer}.attn.hook_pattern", partial(hook_fn_cache_attn, ctx=ctx, head_idx=head_idx)),
        (
            f"blocks.{layer}.attn.hook_result",
            partial(
                hook_fn_at_result, ctx=ctx, toks=toks, model=bridge, layer=layer, head_idx=head_idx, only_neg=only_neg
            ),
        ),
        ("ln_final.hook_scale", partial(hook_fn_at_scale, ctx=ctx, toks=toks, bos=bridge.tokenizer.bos_token_id)),
    ]
    with torch.no_grad():
        bridge.run_with_hooks(toks, return_type="logits", fwd_hooks=fwd_hooks)
    return {k: t.detach().cpu().numpy().astype(np.float64) for k, t in ctx["out"].items()}


# --- tests ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ioi_store(make_store: Callable[..., Path]) -> Callable[[str], Path]:
    return lambda model: make_store(model, "ioi", n_seq=8, batch_size=4)


@pytest.mark.parametrize("only_negative", [False, True])
@pytest.mark.parametrize("model", MODELS)
def test_matches_online_hooks(
    model: str, only_negative: bool, ioi_store: Callable[[str], Path], live_model: Callable[[str], Any]
) -> None:
    ds = open_store(ioi_store(model))
    toks = ds["tokens"].values
    bos = ds.attrs["headstore"]["tokenizer"]["bos_token_id"]
    # the BOS mask is exercised: BOS at 0 and right padding (pad == bos) in some rows
    assert (toks[:, 0] == bos).all()
    assert ((toks[:, 1:] == bos).sum(axis=1) > 0).any()

    res = copy_suppression(ds, only_negative=only_negative).compute()
    assert res["per_position"].dims == ("layer", "head", "batch", "pos")
    assert res["per_sequence"].dims == ("layer", "head", "batch")
    assert res["score"].dims == ("layer", "head")
    bridge = live_model(model).bridge
    for layer in ds["layer"].values:
        for h in range(ds.sizes["head"]):
            want = online_copy_suppression(bridge, toks, int(layer), h, only_negative)
            got_pos = res["per_position"].sel(layer=layer).isel(head=h).values
            got_seq = res["per_sequence"].sel(layer=layer).isel(head=h).values
            assert rel_err(got_pos, want["per_position"]) <= 1e-4, (layer, h)
            assert rel_err(got_seq, want["per_sequence"]) <= 1e-4, (layer, h)
            score = float(res["score"].sel(layer=layer).isel(head=h))
            assert abs(score - want["per_sequence"].mean()) <= 1e-4 * np.abs(want["per_sequence"]).max()
            # masked positions (BOS / pad sources) carry nothing
            assert np.all(got_pos[toks == bos] == 0)
            if only_negative:
                assert np.all(got_pos <= 0)


def test_only_negative_differs_and_is_the_negative_part(ioi_store: Callable[[str], Path]) -> None:
    ds = open_store(ioi_store("tiny-gpt2"))
    full = copy_suppression(ds).compute()["per_position"].values
    neg = copy_suppression(ds, only_negative=True).compute()["per_position"].values
    # per_position = coef[k] * w[k] with w >= 0, so the negative-only variant is its negative part
    np.testing.assert_allclose(neg, np.minimum(full, 0), rtol=1e-5, atol=1e-6 * np.abs(full).max())
    assert (full > 0).any() and (full < 0).any()


def test_spec_registered_summary_and_plot(ioi_store: Callable[[str], Path], tmp_path: Path) -> None:
    SPEC = analyzers()["copy-suppression"]
    assert SPEC.func is copy_suppression and SPEC.name == "copy-suppression"
    assert SPEC.summary is figures.copy_suppression_summary and SPEC.plot is figures.copy_suppression_plot
    assert set(SPEC.params) == {"only_negative"}
    ds = open_store(ioi_store("tiny-llama"))
    res = copy_suppression(ds).compute()
    assert res.attrs["analyzer"] == SPEC.name
    table = SPEC.summary(res)
    assert list(table.columns) == ["layer", "head", "score"]
    assert len(table) == ds.sizes["layer"] * ds.sizes["head"]
    assert table["score"].is_monotonic_increasing
    first = table.iloc[0]
    assert first["score"] == pytest.approx(float(res["score"].min()))
    paths = SPEC.plot(res, tmp_path)
    assert {p.suffix for p in paths} == {".png", ".html"}
    assert all(p.stat().st_size > 0 for p in paths)


def test_missing_field_is_refused(ioi_store: Callable[[str], Path]) -> None:
    from headstore.store_schema import HeadstoreError

    ds = open_store(ioi_store("tiny-gpt2")).drop_vars("v")
    with pytest.raises(HeadstoreError, match="v"):
        copy_suppression(ds)


def test_does_not_import_torch(ioi_store: Callable[[str], Path], run_without_torch: Callable[[str], dict]) -> None:
    path = ioi_store("tiny-gpt2")
    out = run_without_torch(
        "import headstore\n"
        "from headstore.analyze import copy_suppression\n"
        f"res = copy_suppression(headstore.open_store({str(path)!r})).compute()\n"
        "out['score'] = float(abs(res['score']).sum())\n"
    )
    assert out["score"] > 0


def test_float16_store_is_upcast(make_store: Callable[..., Path], ioi_store: Callable[[str], Path]) -> None:
    ds32 = open_store(ioi_store("tiny-llama"))
    ds16 = open_store(make_store("tiny-llama", "ioi", n_seq=8, batch_size=4, dtype="float16"))
    assert ds16["v"].dtype == np.float16 and ds16["pattern"].dtype == np.float16
    np.testing.assert_array_equal(ds16["tokens"].values, ds32["tokens"].values)
    r16 = copy_suppression(ds16).compute()
    r32 = copy_suppression(ds32).compute()
    assert r16["per_position"].dtype == np.float32
    assert rel_err(r16["per_position"].values, r32["per_position"].values) <= 1e-2


@pytest.mark.parametrize("model", MODELS)
def test_padding_is_excluded_when_pad_is_not_bos(
    model: str, pad_not_bos_store: Callable[[str], tuple[Path, str]], live_model: Callable[[str], Any]
) -> None:
    """A right-padded store of own prompts whose pad token is not BOS (SmolLM2: bos 1, pad 2) scores each sequence
    exactly as the seed scores that prompt alone, unpadded, on the live model: padded queries and keys never count."""
    path, folder = pad_not_bos_store(model)
    ds = open_store(path)
    toks, length = ds["tokens"].values, ds["length"].values
    tk = ds.attrs["headstore"]["tokenizer"]
    bos, pad = tk["bos_token_id"], tk["pad_token_id"]
    assert pad != bos and (length < toks.shape[1]).sum() >= 4 and (length == toks.shape[1]).any()
    real = np.arange(toks.shape[1])[None, :] < length[:, None]
    assert (toks[~real] == pad).all() and not (toks[real] == pad).any()

    res = copy_suppression(ds).compute()
    bridge = live_model(folder).bridge
    n_differ = 0
    for layer in ds["layer"].values:
        for h in range(ds.sizes["head"]):
            rows = [online_copy_suppression(bridge, toks[b : b + 1, : length[b]], int(layer), h, False) for b in
                    range(len(toks))]  # fmt: skip
            want_seq = np.concatenate([r["per_sequence"] for r in rows])
            got_pos = res["per_position"].sel(layer=layer).isel(head=h).values
            got_seq = res["per_sequence"].sel(layer=layer).isel(head=h).values
            assert rel_err(got_seq, want_seq) <= 1e-4, (layer, h)
            assert rel_err(got_pos[real], np.concatenate([r["per_position"][0] for r in rows])) <= 1e-4, (layer, h)
            assert np.all(got_pos[~real] == 0)  # padded sources carry nothing
            score = float(res["score"].sel(layer=layer).isel(head=h))
            assert abs(score - want_seq.mean()) <= 1e-4 * np.abs(want_seq).max()
            # what counting the padding gives (the seed's BOS-only mask on the padded rows) is another number
            padded = online_copy_suppression(bridge, toks, int(layer), h, False)["per_sequence"]
            n_differ += int(np.abs(padded - want_seq).max() > 1e-2 * np.abs(want_seq).max())
    assert n_differ >= ds.sizes["layer"] * ds.sizes["head"] // 2
