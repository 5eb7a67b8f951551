"""calibration: counts and overconfidence against the seed's online computation on the live bridge."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from headstore import open_store
from headstore.analyze import _args, calibration, n_empty_bins, overconfidence
from headstore.cli import parse
from headstore.cli.registry import analyzers
from headstore.store_schema import HeadstoreError

STORE_KW = {"n_seq": 8, "batch_size": 4, "seq_len": 24}


def seed_overconfidence(accuracy: torch.Tensor) -> float:
    """Seed 003 ``calculate_overconfidence`` (verbatim arithmetic, empty bins dropped first)."""
    acc = accuracy.double()
    n = len(acc)
    perfect = (torch.arange(n) + 0.5) / n
    keep = ~torch.isnan(acc)
    f = acc[keep] - perfect[keep]
    x = torch.full((n,), 0.5)[keep] - perfect[keep]
    return float((f * x).sum() / (x * x).sum())


def oracle(bridge, tokens: torch.Tensor, heads: list[tuple[int, int]], top_k: int, n_bins: int):
    """Seed ``measure_calibration_minus_heads`` on one batch of tokens, on the live model."""
    next_toks = tokens[:, 1:].unsqueeze(-1).expand(-1, -1, top_k)
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(
            tokens, names_filter=lambda n: n.endswith("hook_result") or n == "ln_final.hook_scale", return_type="logits"
        )
    logits = logits[:, :-1]
    scale = cache["ln_final.hook_scale"][:, :-1]
    W_U = bridge.W_U
    freq = torch.zeros(len(heads) + 1, n_bins)
    corr = torch.zeros(len(heads) + 1, n_bins)
    for i, head in enumerate([None, *heads]):
        if head is None:
            new_logits = logits
        else:
            layer, h = head
            result = cache[f"blocks.{layer}.attn.hook_result"][:, :-1, h] / scale
            new_logits = logits - torch.einsum("bsd,dv->bsv", result, W_U)
        top = new_logits.softmax(-1).topk(k=top_k, dim=-1)
        is_correct = (top.indices - next_toks) == 0
        edges = (torch.arange(n_bins + 1) / n_bins).view(1, 1, 1, -1)
        in_bin = (top.values.unsqueeze(-1) >= edges[..., :-1]) & (top.values.unsqueeze(-1) < edges[..., 1:])
        freq[i] += in_bin.sum((0, 1, 2))
        corr[i] += (in_bin & is_correct.unsqueeze(-1)).sum((0, 1, 2))
    return freq, corr


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize(("top_k", "n_bins"), [(3, 50), (5, 20000), (17, 50)])  # 17: the argpartition branch
def test_matches_live_seed(make_store, live_model, model: str, top_k: int, n_bins: int) -> None:
    fields = ("default", "result") if model == "tiny-llama" else ("default",)  # stored and derived result
    ds = open_store(make_store(model, "text", fields=fields, **STORE_KW))
    res = calibration(ds, top_k=top_k, n_bins=n_bins).compute()
    lm = live_model(model)
    heads = [(int(L), h) for L in ds["layer"].values for h in range(ds.sizes["head"])]
    tokens = torch.as_tensor(ds["tokens"].values.astype(np.int64))
    freq, corr = oracle(lm.bridge, tokens, heads, top_k, n_bins)

    # Exact counts, baseline and every head.
    np.testing.assert_array_equal(res["bucket_frequency"].values, freq[0].numpy().astype(np.int64))
    np.testing.assert_array_equal(res["bucket_correct_frequency"].values, corr[0].numpy().astype(np.int64))
    assert int(res["bucket_frequency"].sum()) == tokens.shape[0] * (tokens.shape[1] - 1) * top_k
    for i, (L, h) in enumerate(heads, start=1):
        np.testing.assert_array_equal(res["head_bucket_frequency"].sel(layer=L).isel(head=h).values, freq[i].numpy())
        np.testing.assert_array_equal(
            res["head_bucket_correct_frequency"].sel(layer=L).isel(head=h).values, corr[i].numpy()
        )
    # The large-bin run spreads tiny random-model probabilities over many bins: the check is not vacuous.
    if n_bins == 20000:
        assert int((freq[0] > 0).sum()) > 5
        assert int((freq[1:] != freq[0]).any(-1).sum()) > 0  # some head ablation changes the histogram

    base = seed_overconfidence(corr[0] / freq[0])
    assert float(res["overconfidence"]) == pytest.approx(base, rel=1e-4)
    assert int(res["n_empty_bins"]) == int((freq[0] == 0).sum())
    for i, (L, h) in enumerate(heads, start=1):
        o = seed_overconfidence(corr[i] / freq[i])
        got = res.sel(layer=L).isel(head=h)
        assert float(got["head_overconfidence"]) == pytest.approx(o, rel=1e-4)
        assert float(got["overconfidence_change"]) == pytest.approx(o - base, rel=1e-4, abs=1e-9)
        assert float(got["overconfidence_ratio"]) == pytest.approx(o / base - 1, rel=1e-4, abs=1e-9)
    acc = res["accuracy"].values
    p = res["p_mid"].values
    fr = res["bucket_frequency"].values
    ne = fr > 0
    np.testing.assert_allclose(res["variance"].values[ne], p[ne] * (1 - p[ne]) / fr[ne])
    np.testing.assert_allclose(acc[ne], res["bucket_correct_frequency"].values[ne] / fr[ne])
    # Empty bins: NaN accuracy and variance (the seed's variance would be inf there).
    assert np.isnan(acc[~ne]).all() and np.isnan(res["variance"].values[~ne]).all()


def test_selected_heads_and_dims(make_store) -> None:
    ds = open_store(make_store("tiny-gpt2", "text", **STORE_KW))
    full = calibration(ds, n_bins=400).compute()
    part = calibration(ds, n_bins=400, heads=[(1, 2), (0, 0)]).compute()
    assert part["head_accuracy"].dims == ("layer", "head", "bin")
    assert part["accuracy"].dims == ("bin",)
    assert part["selected"].values.sum() == 2
    for L, h in [(1, 2), (0, 0)]:
        np.testing.assert_array_equal(
            part["head_bucket_frequency"].sel(layer=L).isel(head=h).values,
            full["head_bucket_frequency"].sel(layer=L).isel(head=h).values,
        )
    assert np.isnan(float(part["head_overconfidence"].sel(layer=0).isel(head=1)))
    np.testing.assert_array_equal(part["bucket_frequency"].values, full["bucket_frequency"].values)
    assert part.attrs["heads"] == "1.2,0.0"
    with pytest.raises(HeadstoreError, match="layer 7 is not in this store"):
        calibration(ds, heads=[(7, 0)])
    with pytest.raises(HeadstoreError, match="head 9 is out of range"):
        calibration(ds, heads=[(0, 9)])
    with pytest.raises(HeadstoreError, match="names a head twice"):
        calibration(ds, heads=[(1, 2), (1, 2)])
    with pytest.raises(HeadstoreError, match=r"write \[\(1, 2\)\], not \(1, 2\)"):
        calibration(ds, heads=(1, 2))
    with pytest.raises(HeadstoreError, match="heads is empty"):
        calibration(ds, heads=[])
    with pytest.raises(HeadstoreError, match="'all' or a list"):
        calibration(ds, heads="1.2")  # strings are for the command line (headstore.cli.parse)
    with pytest.raises(HeadstoreError, match=r"not LAYER\.HEAD"):
        parse.heads("1-2")


@pytest.mark.parametrize("block_bytes", [1, 1 << 30])
def test_blockwise_graph(make_store, monkeypatch: pytest.MonkeyPatch, block_bytes: int) -> None:
    """One baseline task per batch block and one counting task per (batch block, layer); blocks group the store's
    batch chunks up to ``VOCAB_BLOCK_BYTES`` of logits; results independent of the chunking."""
    import headstore.analyze._apply as ap

    monkeypatch.setattr(ap, "VOCAB_BLOCK_BYTES", block_bytes)
    ds = open_store(make_store("tiny-gpt2", "text", **STORE_KW))
    n_blocks = len(ds["resid_final"].chunksizes["batch"]) if block_bytes == 1 else 1
    assert len(ds["resid_final"].chunksizes["batch"]) == 2
    res = calibration(ds, n_bins=300)
    keys = [k if isinstance(k, str) else k[0] for k in dict(res["bucket_frequency"].data.dask)]
    assert len({k for k in keys if "_base_counts" in k}) == n_blocks
    assert len({k for k in keys if "_layer_counts" in k}) == n_blocks * ds.sizes["layer"]
    one = calibration(ds.chunk(batch=-1), n_bins=300).compute()
    np.testing.assert_array_equal(one["head_bucket_frequency"].values, res["head_bucket_frequency"].values)
    np.testing.assert_array_equal(one["bucket_frequency"].values, res["bucket_frequency"].values)


def test_overconfidence_edge_cases() -> None:
    n = 100
    perfect = (np.arange(n) + 0.5) / n
    assert overconfidence(perfect) == pytest.approx(0.0, abs=1e-12)
    assert overconfidence(np.full(n, 0.5)) == pytest.approx(1.0)
    step = np.where(perfect < 0.5, 0.0, 1.0)  # the most underconfident curve in [0, 1]
    assert overconfidence(step) == pytest.approx(-0.5, abs=1e-3)
    rng = np.random.default_rng(0)
    assert min(overconfidence(np.sort(rng.random(n))) for _ in range(200)) > -0.5
    sig = torch.linspace(-5, 5, 100).sigmoid().numpy()
    assert round(overconfidence(sig), 4) == -0.3157  # not "about -0.7" as the seed docstring says
    # Empty bins are left out of both sums.
    acc = np.full(n, 0.5)
    acc[[3, 50, 97]] = np.nan
    assert overconfidence(acc) == pytest.approx(1.0)
    assert n_empty_bins(acc) == 3
    acc2 = perfect.copy()
    acc2[10:20] = np.nan
    acc2[60] = 0.9
    keep = ~np.isnan(acc2)
    f, x = acc2[keep] - perfect[keep], 0.5 - perfect[keep]
    assert overconfidence(acc2) == pytest.approx(float((f * x).sum() / (x * x).sum()))
    assert np.isnan(overconfidence(np.full(4, np.nan)))


def test_parse_heads(make_store) -> None:
    ds = open_store(make_store("tiny-gpt2", "text", **STORE_KW))
    assert parse.heads_or_all("all") == "all"
    assert parse.heads("9.9,10.7") == [(9, 9), (10, 7)]
    assert parse.heads_or_all(" 9.9, 10.7 ") == [(9, 9), (10, 7)]
    assert _args.heads(ds, "all", "heads") == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3)]
    assert _args.heads(ds, [(1, 2), (0, 0)], "heads") == [(1, 2), (0, 0)]
    spec = analyzers()["calibration"]
    assert parse.params(["heads=1.2,0.0", "n_bins=7"], spec.params, ds) == {"heads": [(1, 2), (0, 0)], "n_bins": 7}
    assert parse.params(["heads=all"], spec.params, ds) == {"heads": "all"}


def test_cli_outputs(make_store, tmp_path: Path) -> None:
    from headstore.cli.run import run_analyzer

    spec = analyzers()["calibration"]
    summary, paths = run_analyzer(spec, [str(make_store("tiny-gpt2", "text", **STORE_KW))], tmp_path, {"n_bins": 200})
    assert len(summary) == 8 and {"layer", "head", "overconfidence_change"} <= set(summary.columns)
    assert all(p.exists() for p in paths)
    assert {p.suffix for p in paths} >= {".png", ".html", ".csv"}
    # --param strings go through headstore.cli.parse: the same table
    again, _ = run_analyzer(
        spec, [str(make_store("tiny-gpt2", "text", **STORE_KW))], tmp_path / "p", param_strings=["n_bins=200"]
    )
    pd.testing.assert_frame_equal(again, summary)


@pytest.mark.parametrize("n", [2, 500])  # below / above the size where W_O @ W_U first is cheaper
def test_head_unembedder_either_order_equals_float64(n: int) -> None:
    from headstore.analyze._maths import head_unembedder

    rng = np.random.default_rng(n)
    x, w_o, w_u = (rng.standard_normal(s).astype(np.float32) for s in ((n, 8), (8, 32), (32, 1000)))
    want = x.astype(np.float64) @ w_o.astype(np.float64) @ w_u.astype(np.float64)
    out = np.empty((n, 1000), np.float32)
    got = head_unembedder(w_o, w_u, n)(x, out)
    assert got is out
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_padding_is_excluded_when_pad_is_not_bos(pad_not_bos_store, live_model, model: str) -> None:
    """A right-padded store of own prompts (pad token not BOS, as SmolLM2's) counts exactly the predictions of the
    seed run on each prompt alone, unpadded: position q of row b counts only if q + 1 < length[b]."""
    path, folder = pad_not_bos_store(model)
    ds = open_store(path)
    length = ds["length"].values
    assert (length < ds.sizes["pos"]).sum() >= 4
    top_k, n_bins = 3, 20000  # many bins: the random model's probabilities spread over them
    res = calibration(ds, top_k=top_k, n_bins=n_bins).compute()
    bridge = live_model(folder).bridge
    heads = [(int(L), h) for L in ds["layer"].values for h in range(ds.sizes["head"])]
    tokens = torch.as_tensor(ds["tokens"].values.astype(np.int64))
    freq, corr = torch.zeros(len(heads) + 1, n_bins), torch.zeros(len(heads) + 1, n_bins)
    for b, n in enumerate(length):
        f, c = oracle(bridge, tokens[b : b + 1, : int(n)], heads, top_k, n_bins)
        freq += f
        corr += c
    assert int(freq[0].sum()) == int((length - 1).sum()) * top_k < tokens.shape[0] * (tokens.shape[1] - 1) * top_k
    assert int((freq[0] > 0).sum()) > 5
    np.testing.assert_array_equal(res["bucket_frequency"].values, freq[0].numpy().astype(np.int64))
    np.testing.assert_array_equal(res["bucket_correct_frequency"].values, corr[0].numpy().astype(np.int64))
    for i, (L, h) in enumerate(heads, start=1):
        got = res.sel(layer=L).isel(head=h)
        np.testing.assert_array_equal(got["head_bucket_frequency"].values, freq[i].numpy().astype(np.int64))
        np.testing.assert_array_equal(got["head_bucket_correct_frequency"].values, corr[i].numpy().astype(np.int64))
        assert float(got["head_overconfidence"]) == pytest.approx(seed_overconfidence(corr[i] / freq[i]), rel=1e-4)
    assert float(res["overconfidence"]) == pytest.approx(seed_overconfidence(corr[0] / freq[0]), rel=1e-4)
