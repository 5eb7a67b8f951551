"""Every stored array equals the live TransformerBridge on the same tokens (issue: foundation)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import headstore
from headstore.extract.run import hook_names
from headstore.store_schema import FIELDS, provenance

MODELS = ("tiny-gpt2", "tiny-llama")


def _live(model, tokens: np.ndarray):
    with torch.inference_mode():
        return model.bridge.run_with_cache(torch.as_tensor(tokens, dtype=torch.long))


def _stored_vs_live(ds, model, logits, cache) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """field -> (stored, live) in storage layout, built independently of the extractor's stacking code."""
    prov = provenance(ds)
    hooks = hook_names(prov.fields, prov.layers, prov.config["n_layers"], model.rotary)
    out = {}
    for name, names in hooks.items():
        live = [cache[h].float().numpy() for h in names]
        if name.endswith("_scale"):
            live = [x[..., 0] for x in live]
        arr = np.stack(live, axis=1) if FIELDS[name].per_layer else live[0]
        out[name] = (ds[name].values, arr)
    return out


@pytest.mark.parametrize("model_name", MODELS)
def test_float32_store_equals_live_cache(model_name, make_store, live_model):
    path = make_store(model_name, "ioi", fields="all", n_seq=10, batch_size=4)
    ds = headstore.open_store(path)
    model = live_model(model_name)
    tokens = ds["tokens"].values
    logits, cache = _live(model, tokens)
    pairs = _stored_vs_live(ds, model, logits, cache)
    assert set(pairs) == set(FIELDS) - {"tokens", "loss"}
    for name, (stored, live) in pairs.items():
        assert stored.shape == live.shape, name
        np.testing.assert_allclose(stored, live, rtol=0, atol=1e-6, err_msg=name)
    # weights are the processed ones
    b = model.bridge
    np.testing.assert_array_equal(ds["W_O"].values, b.W_O.detach().numpy())
    np.testing.assert_array_equal(ds["W_U"].values, b.W_U.detach().numpy())
    np.testing.assert_array_equal(ds["W_V"].values, b.W_V.detach().numpy())


@pytest.mark.parametrize("model_name", MODELS)
def test_derived_result_logits_loss_and_z(model_name, make_store, live_model):
    path = make_store(model_name, "ioi", n_seq=10, batch_size=4)  # default fields: result derived
    ds = headstore.open_store(path)
    prov = provenance(ds)
    assert "result" not in prov.fields and "result" in ds
    model = live_model(model_name)
    tokens = ds["tokens"].values
    logits, cache = _live(model, tokens)
    # derived result == hook_result
    live_result = np.stack([cache[f"blocks.{L}.attn.hook_result"].numpy() for L in prov.layers], axis=1)
    np.testing.assert_allclose(ds["result"].values, live_result, rtol=1e-5, atol=1e-5)
    # logits from resid_final, ln_final_scale, W_U, b_U
    resid = ds["resid_final"].values.astype(np.float64)
    if prov.config["normalization_type"] == "LN":
        resid = resid - resid.mean(-1, keepdims=True)
    rec = (resid / ds["ln_final_scale"].values[..., None]) @ ds["W_U"].values + ds["b_U"].values
    np.testing.assert_allclose(rec, logits.numpy(), rtol=0, atol=1e-4)
    # loss == per-token cross entropy of the model's logits
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), torch.as_tensor(tokens[:, 1:]).long().reshape(-1), reduction="none"
    ).reshape(tokens.shape[0], -1)
    loss = ds["loss"].values
    np.testing.assert_allclose(loss[:, :-1], ce.numpy(), rtol=1e-5, atol=1e-5)
    assert np.isnan(loss[:, -1]).all()
    # z == pattern @ v, heads mapped to kv heads
    n_h, n_kv = prov.config["n_heads"], prov.config["n_key_value_heads"]
    kv = np.arange(n_h) // (n_h // n_kv)
    v = ds["v"].values[:, :, :, kv]  # batch layer pos head d_head
    z = np.einsum("blhqk,blkhd->blqhd", ds["pattern"].values, v)
    np.testing.assert_allclose(ds["z"].values, z, rtol=1e-5, atol=1e-6)
    if model_name == "tiny-llama":
        assert n_kv < n_h  # grouped-query really exercised


@pytest.mark.parametrize("model_name", MODELS)
def test_float16_store_within_precision(model_name, make_store, live_model):
    path = make_store(model_name, "ioi", n_seq=8, batch_size=4, dtype="float16")
    ds = headstore.open_store(path)
    assert ds["pattern"].dtype == np.float16 and ds["resid_final"].dtype == np.float32
    _, cache = _live(live_model(model_name), ds["tokens"].values)
    for name, (stored, live) in _stored_vs_live(ds, live_model(model_name), None, cache).items():
        if FIELDS[name].dtype == "storage":
            np.testing.assert_allclose(stored.astype(np.float32), live, rtol=2e-3, atol=2e-3, err_msg=name)
        else:
            np.testing.assert_allclose(stored, live, rtol=0, atol=1e-6, err_msg=name)


def test_rotary_tables_reproduce_rotated_queries(make_store, live_model):
    path = make_store("tiny-llama", "ioi", fields="default,q", n_seq=4, batch_size=4)
    ds = headstore.open_store(path)
    _, cache = _live(live_model("tiny-llama"), ds["tokens"].values)
    q = cache["blocks.1.attn.hook_q"].numpy()  # pre-rotary (batch, pos, head, d_head)
    cos, sin = ds["rotary_cos"].values[None, :, None], ds["rotary_sin"].values[None, :, None]
    half = q.shape[-1] // 2
    rot = np.concatenate([-q[..., half:], q[..., :half]], axis=-1)
    np.testing.assert_allclose(q * cos + rot * sin, ds["q"].sel(layer=1).values, atol=1e-5)


def test_effective_embedding_is_single_token_forward(make_store, live_model):
    """On a bias-free rotary model a one-token sequence attends only to itself: W_EE[t] == resid_post_0."""
    ds = headstore.open_store(make_store("tiny-llama", "ioi", n_seq=4, batch_size=4))
    model = live_model("tiny-llama")
    toks = torch.arange(0, 50).reshape(-1, 1)
    with torch.inference_mode():
        _, cache = model.bridge.run_with_cache(toks, names_filter=["blocks.0.hook_resid_post"])
    np.testing.assert_allclose(ds["W_EE"].values[:50], cache["blocks.0.hook_resid_post"][:, 0].numpy(), atol=1e-5)


def test_ioi_positions_and_abc_alignment(make_store, live_model):
    ioi = headstore.open_store(make_store("tiny-gpt2", "ioi", n_seq=16, batch_size=4, seed=3))
    abc = headstore.open_store(make_store("tiny-gpt2", "ioi-abc", n_seq=16, batch_size=4, seed=3))
    t = ioi["tokens"].values
    b = np.arange(t.shape[0])
    io, s1, s2, end = (ioi[c].values for c in ("io_pos", "s1_pos", "s2_pos", "end_pos"))
    assert (t[b, io] == ioi["io_token"].values).all()
    assert (t[b, s1] == ioi["s_token"].values).all() and (t[b, s2] == t[b, s1]).all()
    assert (io != s1).all() and (s1 < s2).all() and (s2 < end).all()
    for c in ("io_pos", "s1_pos", "s2_pos", "end_pos", "length"):
        np.testing.assert_array_equal(ioi[c].values, abc[c].values)
    ta = abc["tokens"].values
    names = np.stack([ta[b, io], ta[b, s1], ta[b, s2]], axis=1)
    assert all(len(set(row)) == 3 for row in names.tolist())  # three distinct names in ABC
    tok = live_model("tiny-gpt2").tokenizer
    assert tok.decode(t[0, end[0]]).strip() in ("to", "it")  # the prompt ends before the answer


def test_resume_skips_completed_batches(make_store, tmp_path):
    from headstore.extract import ExtractRequest, extract

    req = ExtractRequest(model="tiny-gpt2", data="ioi", out=str(tmp_path / "s.zarr"), n_seq=8, batch_size=4, progress=False)
    first = extract(req)
    assert (first.written, first.skipped) == (2, 0)
    before = headstore.open_store(req.out)["z"].values
    again = extract(req)
    assert (again.written, again.skipped) == (0, 2)
    np.testing.assert_array_equal(headstore.open_store(req.out)["z"].values, before)


def test_layer_subset(make_store, live_model):
    ds = headstore.open_store(make_store("tiny-gpt2", "ioi", layers="1", n_seq=4, batch_size=4))
    assert list(ds["layer"].values) == [1] and "W_EE" not in ds
    _, cache = _live(live_model("tiny-gpt2"), ds["tokens"].values)
    np.testing.assert_allclose(ds["z"].sel(layer=1).values, cache["blocks.1.attn.hook_z"].numpy(), atol=1e-6)
    np.testing.assert_array_equal(ds["W_O"].sel(layer=1).values, live_model("tiny-gpt2").bridge.W_O[1].detach().numpy())


def test_text_windows_start_with_bos(make_store):
    ds = headstore.open_store(make_store("tiny-gpt2", "text", n_seq=4, seq_len=16, batch_size=4))
    assert ds.sizes["pos"] == 16 and (ds["tokens"].values[:, 0] == provenance(ds).tokenizer["bos_token_id"]).all()
    assert np.nanmean(ds["loss"].values) > 0.5 * math.log(provenance(ds).config["d_vocab"])  # random init: high loss
