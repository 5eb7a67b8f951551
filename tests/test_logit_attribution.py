"""logit-attribution: per-head per-source terms against the live bridge, and exact reconstruction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from headstore import open_store
from headstore.analyze import logit_attribution
from headstore.cli import parse
from headstore.cli.registry import analyzers
from headstore.store_schema import HeadstoreError

STORE_KW = {"n_seq": 8, "batch_size": 4, "seq_len": 24}


def live_terms(bridge, tokens: torch.Tensor, dest: np.ndarray, target: np.ndarray, n_heads: int, n_kv: int):
    """Oracle from hooks: contrib (b, L, h, k), head result projection (b, L, h), model logit (b,)."""
    names = ("hook_pattern", "hook_v", "hook_result", "ln_final.hook_scale")
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(tokens, names_filter=lambda n: n.endswith(names), return_type="logits")
        return _terms(bridge, logits, cache, tokens, dest, target, n_heads, n_kv)


@torch.no_grad()
def _terms(bridge, logits, cache, tokens, dest, target, n_heads: int, n_kv: int):
    b = torch.arange(tokens.shape[0])
    d = torch.as_tensor(dest)
    t = torch.as_tensor(target)
    W_U_t = bridge.W_U[:, t]  # (d_model, batch)
    scale = cache["ln_final.hook_scale"][b, d].reshape(-1)  # (batch,)
    group = n_heads // n_kv
    contrib, from_result = [], []
    for L in range(bridge.cfg.n_layers):
        pat = cache[f"blocks.{L}.attn.hook_pattern"][b, :, d]  # (batch, head, key)
        v = cache[f"blocks.{L}.attn.hook_v"]  # (batch, key, kv_head, d_head)
        W_O = bridge.W_O[L]  # (head, d_head, d_model)
        rows = []
        for h in range(n_heads):
            ov = v[:, :, h // group] @ W_O[h]  # (batch, key, d_model)
            proj = torch.einsum("bkd,db->bk", ov, W_U_t)
            rows.append(pat[:, h] * proj / scale[:, None])
        contrib.append(torch.stack(rows, 1))
        res = cache[f"blocks.{L}.attn.hook_result"][b, d]  # (batch, head, d_model)
        from_result.append(torch.einsum("bhd,db->bh", res, W_U_t) / scale[:, None])
    return torch.stack(contrib, 1).numpy(), torch.stack(from_result, 1).numpy(), logits[b, d, t].numpy()


def _lengths(ds) -> np.ndarray:
    return ds["length"].values if "length" in ds else np.full(ds.sizes["batch"], ds.sizes["pos"])


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize(
    ("data", "target", "dest"),
    [
        ("text", "next", None),  # default dest: the last position that has a next token
        ("ioi", "io_token", None),  # default dest on IOI: the end_pos column
        ("text", 7, 9),
        ("text", "next", -3),  # negative: counted back from the end of each sequence
        ("ioi", "s_token", -1),  # per-sequence target ids; -1 = each prompt's last real token
        ("ioi", "next", "s1_pos"),  # per-sequence dest
    ],
)
def test_matches_live_bridge(make_store, live_model, model: str, data: str, target, dest) -> None:
    ds = open_store(make_store(model, data, **STORE_KW))
    n_seq, seq_len = ds.sizes["batch"], ds.sizes["pos"]
    toks = ds["tokens"].values
    length = _lengths(ds)
    arg_target = ds[target] if target in ("io_token", "s_token") else target
    arg_dest = ds[dest] if isinstance(dest, str) else dest
    res = logit_attribution(ds, target=arg_target, dest=arg_dest).compute()
    assert res.attrs["analyzer"] == "logit-attribution"
    if dest is None:
        want_dest = ds["end_pos"].values if "end_pos" in ds else length - 2
        if data == "text":
            assert (want_dest == seq_len - 2).all()
    elif isinstance(dest, str):
        want_dest = ds[dest].values
    else:
        want_dest = np.where(dest < 0, length + dest, dest)
    if target == "next":
        want_t = toks[np.arange(n_seq), want_dest + 1]
    elif isinstance(target, str):
        want_t = ds[target].values
    else:
        want_t = np.full(n_seq, target)
    np.testing.assert_array_equal(res["dest"].values, want_dest)
    np.testing.assert_array_equal(res["target"].values, want_t)
    for name in ("contrib", "per_head", "per_head_from_result"):
        assert res[name].dims[:3] == ("layer", "head", "batch"), name

    # The model folds value biases: the stored b_V is zero, the bias lives in b_O.
    assert res.attrs["b_V_folded"] == 1 and float(abs(ds["b_V"]).max()) == 0.0

    lm = live_model(model)
    cfg = ds.attrs["headstore"]["model"]["config"]
    contrib, from_result, logit = live_terms(
        lm.bridge, torch.as_tensor(toks.astype(np.int64)), res["dest"].values, res["target"].values,
        cfg["n_heads"], cfg["n_key_value_heads"],
    )  # fmt: skip
    got = res["contrib"].transpose("batch", "layer", "head", "key_pos").values
    scale = float(np.abs(contrib).max())
    np.testing.assert_allclose(got, contrib, rtol=1e-4, atol=1e-6 * scale)
    # Causal: nothing from sources after dest.
    after = np.arange(seq_len)[None, :] > res["dest"].values[:, None]
    assert np.abs(got.transpose(0, 3, 1, 2)[after]).max() == 0.0
    # sum over sources == the head's own hook_result projected the same way.
    per_head = res["per_head"].transpose("batch", "layer", "head").values
    np.testing.assert_allclose(per_head, from_result, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(res["per_head"].values, res["per_head_from_result"].values, rtol=1e-4, atol=1e-6)
    # heads + everything else + b_U == the model's actual logit from the bridge forward.
    total = res["per_head"].sum(["layer", "head"]) + res["residual_other"] + res["b_U_term"]
    np.testing.assert_allclose(total.values, logit, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(res["logit"].values, logit, rtol=1e-4, atol=1e-5)
    assert float(abs(res["reconstruction_error"]).max()) < 1e-5
    # Heads carry a real share of the logit (the decomposition is not trivially "all in other").
    assert float(abs(res["per_head"]).max()) > 1e-3


def test_ln_centring_of_unembed(make_store) -> None:
    """LN: normalize subtracts the mean over d_model, so a per-column constant added to W_U changes nothing.

    (fold_ln already centres W_U over d_model on this model; the analyzer centres it again so the
    decomposition does not depend on that.)
    """
    ds = open_store(make_store("tiny-gpt2", "text", **STORE_KW))
    assert float(abs(ds["W_U"].mean("d_model")).max()) < 1e-6
    base = logit_attribution(ds, target="next").compute()
    shift = np.random.default_rng(1).normal(size=ds.sizes["d_vocab"]).astype(np.float32)
    res = logit_attribution(ds.assign(W_U=ds["W_U"] + xr.DataArray(shift, dims="d_vocab")), target="next").compute()
    for name in ("contrib", "per_head", "logit", "residual_other"):
        np.testing.assert_allclose(res[name].values, base[name].values, rtol=1e-4, atol=1e-5)
    assert float(abs(res["reconstruction_error"]).max()) < 1e-5


def test_unfolded_value_bias_goes_to_other(make_store) -> None:
    """A store with a non-zero b_V (bias not folded) gives the same head terms; the bias moves to other."""
    ds = open_store(make_store("tiny-llama", "text", **STORE_KW))
    base = logit_attribution(ds, target="next").compute()
    rng = np.random.default_rng(0)
    b_V = xr.DataArray(rng.normal(size=ds["b_V"].shape).astype(np.float32), dims=ds["b_V"].dims)
    kv = xr.DataArray(np.arange(4) // 2, dims="head")
    bvo = xr.dot(b_V.isel(kv_head=kv), ds["W_O"], dim="d_head")  # (layer, head, d_model)
    ds2 = ds.assign(
        b_V=b_V,
        v=ds["v"] + b_V,
        result=ds["result"] + bvo,
        resid_final=ds["resid_final"] + bvo.sum(["layer", "head"]),
    )
    res = logit_attribution(ds2, target="next").compute()
    assert res.attrs["b_V_folded"] == 0
    np.testing.assert_allclose(res["contrib"].values, base["contrib"].values, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(res["per_head"].values, res["per_head_from_result"].values, rtol=1e-4, atol=1e-5)
    assert not np.allclose(res["residual_other"].values, base["residual_other"].values, atol=1e-3)
    assert float(abs(res["reconstruction_error"]).max()) < 1e-4


def test_targets_and_errors(make_store) -> None:
    ds = open_store(make_store("tiny-gpt2", "ioi", **STORE_KW))
    vocab = [str(x) for x in np.asarray(ds["vocab"].values).tolist()]
    tid = int(ds["io_token"].values[0])
    # a token string is looked up first (exact, unique vocabulary entry), then passed as an id
    assert ds.hs.token_id(vocab[tid]) == tid
    by_str = logit_attribution(ds, target=ds.hs.token_id(vocab[tid]), dest=5).compute()
    by_id = logit_attribution(ds, target=tid, dest=5).compute()
    by_seq = logit_attribution(ds, target=np.full(ds.sizes["batch"], tid), dest=[5] * ds.sizes["batch"]).compute()
    assert (by_str["target"].values == tid).all() and (by_str["dest"].values == 5).all()
    np.testing.assert_array_equal(by_str["contrib"].values, by_id["contrib"].values)
    np.testing.assert_array_equal(by_seq["contrib"].values, by_id["contrib"].values)
    assert by_str["target_str"].values[0] == vocab[tid]
    assert list(by_str["key_token_str"].values[0, :2]) == [vocab[int(t)] for t in ds["tokens"].values[0, :2]]
    with pytest.raises(HeadstoreError, match=r"takes token ids: write ds.hs.token_id"):
        logit_attribution(ds, target=vocab[tid])  # type: ignore[arg-type]
    with pytest.raises(HeadstoreError, match=r"takes token ids"):
        logit_attribution(ds, target=str(tid))  # digit strings are not ids any more
    with pytest.raises(HeadstoreError, match="not one token of this model's vocabulary"):
        ds.hs.token_id("no such token string")
    dup = np.array([*vocab[:-1], vocab[tid]], dtype=object)
    with pytest.raises(HeadstoreError, match=r"is 2 vocabulary entries"):
        ds.assign(vocab=("d_vocab", dup)).hs.token_id(vocab[tid])
    with pytest.raises(HeadstoreError, match="outside the vocabulary"):
        logit_attribution(ds, target=ds.sizes["d_vocab"])
    with pytest.raises(HeadstoreError, match="outside the vocabulary"):
        logit_attribution(ds, target=-1)
    with pytest.raises(HeadstoreError, match="needs a token after dest"):
        logit_attribution(ds, target="next", dest=-1)  # each prompt's last real token
    with pytest.raises(HeadstoreError, match="dest is outside sequence"):
        logit_attribution(ds, target=5, dest=ds.sizes["pos"])
    with pytest.raises(HeadstoreError, match="dest is outside sequence"):
        logit_attribution(ds, target=5, dest=-ds.sizes["pos"] - 1)
    with pytest.raises(HeadstoreError, match=r"dest must be an int or \d+ integers"):
        logit_attribution(ds, target=5, dest=[1, 2])
    # 'next' on IOI with the default dest (end_pos): the token after end_pos is padding, so it is refused
    end, length = ds["end_pos"].values, ds["length"].values
    assert (end + 1 >= length).all()
    with pytest.raises(HeadstoreError, match=r"needs a token after dest.*target=ds\['io_token'\]"):
        logit_attribution(ds, target="next")
    with pytest.raises(TypeError):
        logit_attribution(ds, "next")  # type: ignore[misc]


def test_key_token_str_per_sequence_and_scalar_attrs(make_store) -> None:
    """Each sequence's source tokens are labelled with its own strings; one integer (numpy ones too) is recorded."""
    ds = open_store(make_store("tiny-gpt2", "ioi", **STORE_KW))
    vocab = [str(x) for x in np.asarray(ds["vocab"].values).tolist()]
    toks = ds["tokens"].transpose("batch", "pos").values
    res = logit_attribution(ds, target=ds["io_token"]).compute()
    assert res["key_token_str"].dims == ("batch", "key_pos")
    want = [[vocab[int(t)] for t in row] for row in toks]
    assert res["key_token_str"].values.tolist() == want
    assert len({tuple(row) for row in want}) > 1, "the prompts differ, so sequence 0's labels would be wrong"
    tid = int(ds["io_token"].values[0])
    for target, dest, want_dest in ((np.int64(tid), np.int64(-1), -1), (np.array(tid), np.array(3), 3), (tid, 3, 3)):
        attrs = logit_attribution(ds, target=target, dest=dest).attrs
        assert (attrs["target"], attrs["dest"]) == (tid, want_dest), attrs
        assert type(attrs["target"]) is int and type(attrs["dest"]) is int  # plain values zarr can write
    attrs = logit_attribution(ds, target=ds["io_token"], dest=ds["end_pos"]).attrs
    assert (attrs["target"], attrs["dest"]) == ("per-sequence", "per-sequence")


def test_unstored_pattern_layers_are_nan_not_zero(make_store) -> None:
    """``--pattern-layers 1``: layer 0's source terms and their sum are NaN; layer 1's equal the full store's."""
    kw = {"n_seq": 10, "batch_size": 4}  # the stores test_pattern_layers and test_census use
    part = open_store(make_store("tiny-gpt2", "ioi", pattern_layers=(1,), **kw))
    full = open_store(make_store("tiny-gpt2", "ioi", fields=("default",), **kw))  # z stored, as in part
    res = logit_attribution(part, target=part["io_token"]).compute()
    ref = logit_attribution(full, target=full["io_token"]).compute()
    assert np.isnan(res["contrib"].sel(layer=0).values).all()
    assert np.isnan(res["per_head"].sel(layer=0).values).all()
    assert np.isnan(res["reconstruction_error"].values).all()  # the heads' sum is not known
    np.testing.assert_array_equal(res["per_head"].sel(layer=1).values, ref["per_head"].sel(layer=1).values)
    # the head's own output is stored for every layer: its projection stays, and equals the full store's sum
    np.testing.assert_array_equal(res["per_head_from_result"].values, ref["per_head_from_result"].values)
    np.testing.assert_allclose(
        res["per_head_from_result"].sel(layer=0).values, ref["per_head"].sel(layer=0).values, rtol=1e-4, atol=1e-6
    )
    assert np.abs(ref["per_head"].sel(layer=0).values).max() > 1e-4  # a 0 there would have been a wrong number


def test_cli_param_strings(make_store) -> None:
    """--param strings: an int id, 'next', a column of ids, a token string (looked up); dest an int or a column."""
    ds = open_store(make_store("tiny-gpt2", "ioi", **STORE_KW))
    parsers = analyzers()["logit-attribution"].params
    vocab = ds.hs.vocab
    tid = int(ds["io_token"].values[0])
    assert parse.params(["target=7", "dest=5"], parsers, ds) == {"target": 7, "dest": 5}
    assert parse.params(["target=next", "dest=-2"], parsers, ds) == {"target": "next", "dest": -2}
    got = parse.params(["target=io_token", "dest=s1_pos"], parsers, ds)
    np.testing.assert_array_equal(got["target"].values, ds["io_token"].values)
    np.testing.assert_array_equal(got["dest"].values, ds["s1_pos"].values)
    assert parse.params([f"target={vocab[tid]}"], parsers, ds) == {"target": tid}
    with pytest.raises(HeadstoreError, match=r"--param target: .* is not one token"):
        parse.params(["target=no such token string"], parsers, ds)
    with pytest.raises(HeadstoreError, match=r"--param dest: 'nope' is neither an integer nor a column"):
        parse.params(["dest=nope"], parsers, ds)
    with pytest.raises(HeadstoreError, match=r"key one of target, dest"):
        parse.params(["tagret=7"], parsers, ds)


def test_cli_outputs(make_store, tmp_path: Path) -> None:
    from headstore.cli.run import run_analyzer

    spec = analyzers()["logit-attribution"]
    store = str(make_store("tiny-llama", "ioi", **STORE_KW))
    summary, paths = run_analyzer(spec, [store], tmp_path, param_strings=["target=io_token"])
    assert len(summary) == 8 and {"layer", "head", "mean_contribution"} <= set(summary.columns)
    assert all(p.exists() for p in paths)
    assert {p.name for p in paths} >= {"sources_seq0.png", "sources_seq0.html", "per_head.png", "summary.csv"}
    from headstore.report.embed import plotly_figures_in_html

    (sources,) = [p for p in paths if p.name == "sources_seq0.html"]
    ((data, layout, _),) = plotly_figures_in_html(sources.read_text(encoding="utf-8"))
    assert layout["yaxis"]["type"] == "category", "'L.h' row labels must not be read as numbers (rows would overlap)"
    assert len(set(data[0]["y"])) == len(data[0]["y"]) == 8, "one row per (layer, head)"
