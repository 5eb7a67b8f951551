"""code-ifelse data and the ifelse-detector analyzer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from headstore.analyze import ifelse_detector
from headstore.analyze._ifelse_detector import auroc, fit_score, token_features
from headstore.cli.registry import analyzers
from headstore.extract.data import DataRequest
from headstore.extract.data.ifelse import build_ifelse, find_cuts
from headstore.store_schema import HeadstoreError, open_store

STORE = {"n_seq": 48, "seq_len": 16, "batch_size": 8}
SPEC = analyzers()["ifelse-detector"]


def rank_auroc(scores: np.ndarray, anomalous: np.ndarray) -> float:
    """AUROC straight from its definition: P(anomalous score > trusted score), ties counting one half."""
    scores, anomalous = np.asarray(scores, dtype=np.float64), np.asarray(anomalous, dtype=bool)
    a, t = scores[anomalous][:, None], scores[~anomalous][None, :]
    return float(((a > t).sum() + 0.5 * (a == t).sum()) / (a.size * t.size))


SOURCE = b"""\
def f(a, b):
    x = a if b > 0 else -a
    if a is None:
        return [i for i in b if i]
    y = (a if b else None)
    return x if x else y
"""


# --- data ----------------------------------------------------------------------------------------


def test_find_cuts_labels_and_positions() -> None:
    cuts = find_cuts(SOURCE)
    got = {(c.label, SOURCE[: c.offset].decode().splitlines()[-1].strip()) for c in cuts}
    assert got == {
        ("trusted", "x = a if b > 0"),
        ("anomalous", "if a is None"),
        ("anomalous", "return [i for i in b if i"),
        ("trusted", "y = (a if b"),
        ("trusted", "return x if x"),
    }
    for c in cuts:
        follows = SOURCE[c.offset : c.offset + 5]
        assert (follows == b" else") == (c.label == "trusted")


def test_build_ifelse_from_files(tmp_path: Path, live_model: Any) -> None:
    tok = live_model("tiny-gpt2").tokenizer
    (tmp_path / "a.py").write_bytes(SOURCE * 30)
    req = DataRequest(f"code-ifelse:{tmp_path}/*.py", n_seq=20, seq_len=12, seed=3, prepend_bos=True)
    ds = build_ifelse(f"{tmp_path}/*.py", req, tok)
    assert ds.tokens.shape == (20, 12) and ds.tokens.dtype == np.int32
    assert (ds.tokens[:, 0] == tok.bos_token_id).all()
    split, subset = ds.columns["split"], ds.columns["subset"]
    assert (split == "trusted").sum() == (split == "anomalous").sum() == 10
    assert set(subset[split == "anomalous"]) == {"test"}
    assert (subset[split == "trusted"] == "train").sum() == 5
    assert (ds.columns["last_pos"] == 11).all()
    assert all(s.startswith(str(tmp_path)) for s in ds.columns["source"])
    # Each prompt is the last 11 tokens of the source text before its cut.
    for row, src in zip(ds.tokens, ds.columns["source"], strict=True):
        text = tok.decode(row[1:])
        assert text.rstrip().endswith(("0", "None", "b", "x", "i"))
        assert int(src.rsplit(":", 1)[1]) >= 1
    same = build_ifelse(f"{tmp_path}/*.py", req, tok)
    np.testing.assert_array_equal(ds.tokens, same.tokens)
    with pytest.raises(HeadstoreError, match="no files match"):
        build_ifelse(f"{tmp_path}/none*.py", req, tok)
    (tmp_path / "b.txt").write_text("x = 1\n")
    with pytest.raises(HeadstoreError, match="found 0 trusted"):
        build_ifelse(f"{tmp_path}/b.txt", req, tok)


def test_build_ifelse_stdlib_default(live_model: Any) -> None:
    tok = live_model("tiny-gpt2").tokenizer
    ds = build_ifelse("", DataRequest("code-ifelse", n_seq=40, seq_len=None, seed=0, prepend_bos=True), tok)
    assert ds.tokens.shape == (40, 32)
    assert (ds.columns["split"] == "trusted").sum() == 20
    else_id = tok.encode(" else", add_special_tokens=False)
    assert len(else_id) == 1


# --- detector core -------------------------------------------------------------------------------


def test_detector_core_separates_shifted_and_not_unshifted() -> None:
    rng = np.random.default_rng(0)
    cov = rng.normal(size=(12, 12))
    cov = cov @ cov.T / 12 + np.eye(12) * 0.1
    draw = lambda n: rng.multivariate_normal(np.zeros(12), cov, size=n)  # noqa: E731
    train, trusted_test = draw(200), draw(200)
    shifted = draw(200) + 2.0 * np.sqrt(np.diag(cov))
    labels = np.r_[np.zeros(200), np.ones(200)]
    s_shift = fit_score(train, np.r_[trusted_test, shifted])
    s_same = fit_score(train, np.r_[trusted_test, draw(200)])
    auc_shift, auc_same = auroc(s_shift, labels), auroc(s_same, labels)
    assert auc_shift == pytest.approx(rank_auroc(s_shift, labels), rel=1e-12)
    assert auc_same == pytest.approx(rank_auroc(s_same, labels), rel=1e-12)
    assert auc_shift > 0.95
    assert abs(auc_same - 0.5) < 0.15
    # ties count one half; one class only: NaN
    assert (
        auroc(np.array([1.0, 1.0, 2.0, 0.0]), np.array([0, 1, 1, 0]))
        == rank_auroc(np.array([1.0, 1.0, 2.0, 0.0]), np.array([0, 1, 1, 0]))
        == pytest.approx(0.875)
    )
    assert np.isnan(auroc(np.arange(3.0), np.zeros(3))) and np.isnan(auroc(np.arange(3.0), np.ones(3)))
    # the scores are Ledoit-Wolf squared Mahalanobis distances of the standardised features
    from sklearn.covariance import ledoit_wolf

    mu, sd = train.mean(0), train.std(0)
    zt, zx = (train - mu) / sd, (np.r_[trusted_test, shifted] - mu) / sd
    d = zx - zt.mean(0)
    want = np.einsum("ni,ij,nj->n", d, np.linalg.inv(ledoit_wolf(zt)[0]), d)
    np.testing.assert_allclose(s_shift, want, rtol=1e-8)
    # scores are squared Mahalanobis distances: the training mean scores 0
    assert fit_score(train, train.mean(0, keepdims=True))[0] == pytest.approx(0.0, abs=1e-9)


def test_token_features_sum_by_source_token() -> None:
    contrib = np.arange(2 * 1 * 2 * 4, dtype=float).reshape(2, 1, 2, 4)
    tokens = np.array([[5, 7, 5, 9], [7, 7, 1, 5]])
    feat = token_features(contrib, tokens, np.array([5, 7]))
    assert feat.shape == (2, 1, 2, 3)
    np.testing.assert_allclose(feat[0, 0, 0], [0 + 2, 1, 3])
    np.testing.assert_allclose(feat[1, 0, 1], [15, 12 + 13, 14])
    np.testing.assert_allclose(feat.sum(-1), contrib.sum(-1))


# --- end to end ----------------------------------------------------------------------------------


def _reference_head_attr(bridge: Any, tokens: np.ndarray, effect: int, last: int) -> np.ndarray:
    """(batch, layer, head) per-head logit attribution to ``effect`` at ``last``, from the live bridge."""
    cfg = bridge.cfg
    with torch.no_grad():
        _, cache = bridge.run_with_cache(torch.as_tensor(tokens, dtype=torch.long))
        scale = cache["ln_final.hook_scale"].reshape(tokens.shape[0], -1)[:, last]
        out = []
        for L in range(cfg.n_layers):
            pat = cache[f"blocks.{L}.attn.hook_pattern"][:, :, last, :]  # (b, h, k)
            v = cache[f"blocks.{L}.attn.hook_v"]  # (b, k, kv_head, d_head)
            v = v.repeat_interleave(cfg.n_heads // v.shape[2], dim=2)
            per_src = torch.einsum("bkhd,hdm->bhkm", v, bridge.W_O[L])  # head output of each source
            per_src = (pat[..., None] * per_src).sum(2)  # (b, h, d_model)
            if "RMS" not in str(cfg.normalization_type):
                per_src = per_src - per_src.mean(-1, keepdim=True)
            out.append((per_src / scale[:, None, None]) @ bridge.W_U[:, effect])
        return torch.stack(out, 1).double().numpy()


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_end_to_end_matches_live_bridge(
    model: str, make_store: Callable[..., Any], live_model: Any, tmp_path: Path
) -> None:
    ds = open_store(make_store(model, "code-ifelse", **STORE))
    res = ifelse_detector(ds).compute()
    loaded = live_model(model)
    effect = loaded.tokenizer.encode(" else", add_special_tokens=False)[0]
    assert res.attrs["effect_token_id"] == effect
    ref = _reference_head_attr(loaded.bridge, ds["tokens"].values, effect, STORE["seq_len"] - 1)
    assert res.attrs["analyzer"] == "ifelse-detector"
    assert res["head_feature"].dims == ("layer", "head", "batch")
    feat = res["head_feature"].transpose("batch", "layer", "head").values
    np.testing.assert_allclose(feat, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert list(res["detector"].values) == ["per_head", "per_head_token", "resid_final"]
    assert np.isfinite(res["score"].values).all() and (res["score"].values >= 0).all()
    # every AUROC is exactly the rank statistic of its scores on the test subset
    split, subset = res["split"].values.astype(str), res["subset"].values.astype(str)
    test, is_anom = subset == "test", split == "anomalous"
    for d in res["detector"].values:
        scores = res["score"].sel(detector=d).values
        assert float(res["auroc"].sel(detector=d)) == pytest.approx(rank_auroc(scores[test], is_anom[test]), rel=1e-12)
    for L in range(ds.sizes["layer"]):
        for h in range(ds.sizes["head"]):
            got = float(res["head_auroc"].isel(layer=L, head=h))
            assert got == pytest.approx(rank_auroc(feat[test, L, h], is_anom[test]), rel=1e-12), (L, h)
    # the per_head detector scores the (layer, head) features above, fitted on trusted train prompts
    train = (split == "trusted") & (subset == "train")
    flat = feat.reshape(feat.shape[0], -1)
    np.testing.assert_allclose(res["score"].sel(detector="per_head").values, fit_score(flat[train], flat), rtol=1e-10)
    counts = dict(zip(res["group"].values, res["count"].values.tolist(), strict=True))
    assert counts == {"trusted_train": 12, "trusted_test": 12, "anomalous_train": 0, "anomalous_test": 24}
    print(model, dict(zip(res["detector"].values, res["auroc"].values.round(3), strict=True)))
    table = SPEC.summary(res)
    assert len(table) == ds.sizes["layer"] * ds.sizes["head"]
    paths = SPEC.plot(res, tmp_path)
    assert all(p.exists() and p.stat().st_size > 0 for p in paths)


def test_needs_split_columns(make_store: Callable[..., Any]) -> None:
    ds = open_store(make_store("tiny-gpt2", "ioi"))
    with pytest.raises(HeadstoreError, match="split"):
        ifelse_detector(ds)


def test_cli_writes_and_plots_the_result_read_back(make_store: Callable[..., Any], tmp_path: Path) -> None:
    """``headstore analyze ifelse-detector``: the result goes to result.zarr and the plots read it back, where
    the split/subset strings come back as numpy StringDType (``astype(str)`` on them raised TypeError)."""
    from headstore.cli.run import run_analyzer

    store = make_store("tiny-gpt2", "code-ifelse", **STORE)
    summary, paths = run_analyzer(SPEC, [str(store)], tmp_path)
    res = ifelse_detector(open_store(store)).compute()
    np.testing.assert_array_equal(summary.to_numpy(), SPEC.summary(res).to_numpy())
    pngs = [p for p in paths if p.suffix == ".png"]
    assert pngs and all(p.stat().st_size > 0 for p in pngs)
