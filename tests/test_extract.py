"""Every stored array equals the live TransformerBridge on the same tokens (issue: foundation)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import headstore
from headstore.store_schema import DEFAULT_FIELDS, FIELDS, provenance
from headstore.store_schema.layout import GRAD_FIELDS, IG_FIELDS

MODELS = ("tiny-gpt2", "tiny-llama")


def _live(model, tokens: np.ndarray):
    with torch.inference_mode():
        return model.bridge.run_with_cache(torch.as_tensor(tokens, dtype=torch.long))


# TransformerLens hook names, written out here (not taken from the extractor): field -> hook of layer L.
# q and k are read post-rotary on rotary models (hook_rot_q / hook_rot_k).
PER_LAYER_HOOKS = {
    "pattern": "blocks.{L}.attn.hook_pattern",
    "v": "blocks.{L}.attn.hook_v",
    "z": "blocks.{L}.attn.hook_z",
    "result": "blocks.{L}.attn.hook_result",
    "q": "blocks.{L}.attn.hook_{rot}q",
    "k": "blocks.{L}.attn.hook_{rot}k",
    "ln1_scale": "blocks.{L}.ln1.hook_scale",
    "ln2_scale": "blocks.{L}.ln2.hook_scale",
    "ln1_post_scale": "blocks.{L}.ln1_post.hook_scale",
    "resid_pre": "blocks.{L}.hook_resid_pre",
}
GLOBAL_HOOKS = {"ln_final_scale": "ln_final.hook_scale", "resid_final": "blocks.{last}.hook_resid_post"}


def _stored_vs_live(ds, model, logits, cache) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """field -> (stored, live) in storage layout for every field the store holds (not derived), built
    independently of the extractor: literal hook names, read from the bridge's own run_with_cache."""
    cfg = model.bridge.cfg
    rot = "rot_" if str(cfg.positional_embedding_type) == "rotary" else ""
    last = cfg.n_layers - 1
    layers = [int(L) for L in ds["layer"].values]
    stored = set(provenance(ds).fields)
    out = {}
    for name, hook in PER_LAYER_HOOKS.items():
        if name in stored:
            live = np.stack([cache[hook.format(L=L, rot=rot)].float().numpy() for L in layers], axis=1)
            out[name] = (ds[name].values, live[..., 0] if name.endswith("_scale") else live)
    for name, hook in GLOBAL_HOOKS.items():
        if name in stored:
            live = cache[hook.format(last=last)].float().numpy()
            out[name] = (ds[name].values, live[..., 0] if name.endswith("_scale") else live)
    return out


def test_literal_hooks_cover_every_hooked_field():
    assert set(PER_LAYER_HOOKS) | set(GLOBAL_HOOKS) == set(FIELDS) - {"tokens", "loss", *GRAD_FIELDS, *IG_FIELDS}
    assert all(FIELDS[n].per_layer for n in PER_LAYER_HOOKS)
    assert not any(FIELDS[n].per_layer for n in GLOBAL_HOOKS)


@pytest.mark.parametrize("model_name", MODELS)
def test_float32_store_equals_live_cache(model_name, make_store, live_model):
    path = make_store(model_name, "ioi", fields=("all",), n_seq=10, batch_size=4)
    ds = headstore.open_store(path)
    model = live_model(model_name)
    tokens = ds["tokens"].values
    logits, cache = _live(model, tokens)
    pairs = _stored_vs_live(ds, model, logits, cache)
    # fields=("all",): every hooked field is stored, but the post-norm scale, which GPT-2 and Llama have no norm for
    grads = {*GRAD_FIELDS, *IG_FIELDS}  # tests/test_attribution.py, tests/test_attribution_ig.py
    assert set(pairs) == set(FIELDS) - {"tokens", "loss", "ln1_post_scale", *grads}
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
    path = make_store(model_name, "ioi", n_seq=10, batch_size=4)  # default fields (auto): z and result derived
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
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        torch.as_tensor(tokens[:, 1:]).long().reshape(-1),
        reduction="none",
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
    assert "z" not in prov.fields and prov.derived == ("z", "result")  # auto at IOI lengths: pattern stored
    live_z = np.stack([cache[f"blocks.{L}.attn.hook_z"].numpy() for L in prov.layers], axis=1)
    np.testing.assert_allclose(ds["z"].values, live_z, rtol=1e-5, atol=1e-6)  # derived z == the model's hook_z
    if model_name == "tiny-llama":
        assert n_kv < n_h  # grouped-query really exercised


@pytest.mark.parametrize("model_name", MODELS)
def test_float16_store_within_precision(model_name, make_store, live_model):
    path = make_store(model_name, "ioi", n_seq=8, batch_size=4, dtype="float16")
    ds = headstore.open_store(path)
    assert ds["pattern"].dtype == np.float16 and ds["resid_final"].dtype == np.float32
    _, cache = _live(live_model(model_name), ds["tokens"].values)
    pairs = _stored_vs_live(ds, live_model(model_name), None, cache)
    assert set(pairs) == {"pattern", "v", "ln1_scale", "ln2_scale", "ln_final_scale", "resid_final"}
    assert set(pairs) == set(DEFAULT_FIELDS) - {"tokens", "loss", "ln1_post_scale", "z"}  # auto: z derived
    live_z = np.stack([cache[f"blocks.{L}.attn.hook_z"].numpy() for L in ds["layer"].values], axis=1)
    np.testing.assert_allclose(ds["z"].values, live_z, rtol=2e-3, atol=2e-3)  # from float16 pattern and v
    for name, (stored, live) in pairs.items():
        if FIELDS[name].dtype == "storage":
            np.testing.assert_allclose(stored.astype(np.float32), live, rtol=2e-3, atol=2e-3, err_msg=name)
        else:
            np.testing.assert_allclose(stored, live, rtol=0, atol=1e-6, err_msg=name)


def test_rotary_tables_reproduce_rotated_queries(make_store, live_model):
    path = make_store("tiny-llama", "ioi", fields=("default", "q"), n_seq=4, batch_size=4)
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

    req = ExtractRequest(
        model="tiny-gpt2", data="ioi", out=str(tmp_path / "s.zarr"), n_seq=8, batch_size=4, progress=False
    )
    first = extract(req)
    assert (first.written, first.skipped) == (2, 0)
    before = headstore.open_store(req.out)["z"].values
    again = extract(req)
    assert (again.written, again.skipped) == (0, 2)
    np.testing.assert_array_equal(headstore.open_store(req.out)["z"].values, before)


def test_layer_subset(make_store, live_model):
    ds = headstore.open_store(make_store("tiny-gpt2", "ioi", layers=(1,), n_seq=4, batch_size=4))
    assert list(ds["layer"].values) == [1] and "W_EE" not in ds
    _, cache = _live(live_model("tiny-gpt2"), ds["tokens"].values)
    np.testing.assert_allclose(ds["z"].sel(layer=1).values, cache["blocks.1.attn.hook_z"].numpy(), atol=1e-6)
    np.testing.assert_array_equal(ds["W_O"].sel(layer=1).values, live_model("tiny-gpt2").bridge.W_O[1].detach().numpy())


def test_text_windows_start_with_bos(make_store):
    ds = headstore.open_store(make_store("tiny-gpt2", "text", n_seq=4, seq_len=16, batch_size=4))
    assert ds.sizes["pos"] == 16 and (ds["tokens"].values[:, 0] == provenance(ds).tokenizer.bos_token_id).all()
    assert np.nanmean(ds["loss"].values) > 0.5 * math.log(provenance(ds).config["d_vocab"])  # random init: high loss


def test_reused_buffers_survive_a_slow_writer(tmp_path, live_model, monkeypatch):
    """Batches are stacked into two reused sets of host buffers while the writer thread still writes the previous
    batch: with the writer slowed down (each batch's write starts 0.2 s late), every batch still holds its own
    tokens' activations, equal to the live bridge with its per-head result off (no `result` stored), and the
    loaded model's flag is as it was."""
    import time

    from headstore.extract import ExtractRequest, extract
    from headstore.store_schema.write.writer import StoreWriter

    write = StoreWriter.write_batch

    def slow(self, start, arrays):
        time.sleep(0.2)
        write(self, start, arrays)

    monkeypatch.setattr(StoreWriter, "write_batch", slow)
    model = live_model("tiny-llama")
    monkeypatch.setattr("headstore.extract.run.load_model", lambda *args, **kwargs: model)
    out = tmp_path / "slow.zarr"
    extract(  # 5 batches, each buffer set reused twice
        ExtractRequest(
            model="tiny-llama",
            data="ioi",
            out=str(out),
            n_seq=20,
            batch_size=4,
            device="cpu",
            progress=False,
            fields=("default",),  # z stored: every hooked field compared to the bit
        )
    )
    assert model.bridge.cfg.use_attn_result  # restored after extraction turned it off
    ds = headstore.open_store(out)
    tokens = ds["tokens"].values
    model.bridge.set_use_attn_result(False)
    try:
        for b0 in range(0, len(tokens), 4):  # the extractor's batches: the same matmul shapes, so equal to the bit
            logits, cache = _live(model, tokens[b0 : b0 + 4])
            pairs = _stored_vs_live(ds.isel(batch=slice(b0, b0 + 4)), model, logits, cache)
            assert {"pattern", "v", "z", "resid_final"} <= set(pairs)
            for name, (stored, live) in pairs.items():
                np.testing.assert_array_equal(stored, live, err_msg=f"batch from {b0}: {name}")
            want = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1),
                                                     torch.as_tensor(tokens[b0 : b0 + 4, 1:]).long().flatten(),
                                                     reduction="none").view(4, -1)  # fmt: skip
            np.testing.assert_allclose(ds["loss"].values[b0 : b0 + 4, :-1], want.numpy(), rtol=1e-6, atol=1e-6)
    finally:
        model.bridge.set_use_attn_result(True)
