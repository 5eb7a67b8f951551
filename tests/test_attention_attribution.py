"""attention-attribution against the live model, on the tiny model of every family.

The oracle is written here from the live bridge's cache alone, in torch, with TransformerLens hook names
(``hook_embed``, ``hook_pos_embed``, each head's ``hook_result``, ``hook_mlp_out``, ``ln1.hook_scale``, the q/k
norms' ``hook_scale``), the live ``W_Q``/``W_K``, the untouched Hugging Face model's norm gains and its own rotary
functions: each (query component) x (key component) term, and the model's own pre-softmax score
(``hook_attn_scores``; on GPT-J and OPT, whose bridge puts the pattern there, the live ``q . k * scaling``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import xarray as xr

import headstore
from headstore.analyze import attention_attribution
from headstore.extract.tiny import TINY_FAMILIES
from headstore.store_schema import HeadstoreError

SCORES_HOOK_HOLDS_PATTERN = ("GPTJForCausalLM", "OPTForCausalLM")  # the bridge's hook_attn_scores there: softmaxed
HF_ROTARY = {"LlamaForCausalLM": "llama", "GemmaForCausalLM": "gemma", "Gemma2ForCausalLM": "gemma2",
             "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", "MistralForCausalLM": "mistral",
             "Olmo2ForCausalLM": "olmo2", "GPTNeoXForCausalLM": "gpt_neox", "Phi3ForCausalLM": "phi3"}  # fmt: skip


@dataclass
class Live:
    family: str
    model: Any  # LoadedModel (the bridge, compatibility mode)
    hf: Any  # a Hugging Face copy the bridge never touched (norm gains, rotary)
    ds: xr.Dataset
    cache: dict[str, torch.Tensor]
    path: Path  # the store

    @property
    def arch(self) -> str:
        return str(self.model.architecture)


@pytest.fixture(scope="module")
def live_family(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Live]:
    """``live_family(family)`` -> its tiny model, a ``default,resid_pre,q,k`` IOI store and the live cache."""
    from unittest import mock

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import headstore.extract.run as extract_run
    from headstore.extract import ExtractRequest, extract
    from headstore.extract.models import load_model
    from headstore.extract.tiny import build_family, build_tokenizer

    hf_logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("attention-attribution")
    built: dict[str, Live] = {}

    def get(family: str) -> Live:
        if family not in built:
            if not (root / "tok").exists():
                build_tokenizer(root / "tok")
            folder, out = root / family, root / f"{family}.zarr"
            build_family(family, folder, root / "tok")
            model = load_model(str(folder), "cpu")
            with mock.patch.object(extract_run, "load_model", lambda *a, **k: model):
                extract(ExtractRequest(model=str(folder), data="ioi", out=str(out), fields=("default", "resid_pre", "q", "k"),
                                       n_seq=4, batch_size=4, device="cpu", progress=False, seed=1))  # fmt: skip
            ds = headstore.open_store(out)
            if model.has_result_hook:
                model.bridge.set_use_attn_result(True)
            with torch.inference_mode():
                _, cache = model.bridge.run_with_cache(torch.as_tensor(ds["tokens"].values).long())
            hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            built[family] = Live(family, model, hf, ds, dict(cache.items()), out)
        return built[family]

    return get


# ------------------------------------------------------------------------------------------------ the oracle


def _bias(bridge: Any, name: str, layer: int, shape: tuple[int, ...]) -> torch.Tensor:
    """``bridge.b_X[layer]``, or zeros of ``shape`` on bias-free models (where the bridge raises)."""
    try:
        b = getattr(bridge, name)
    except AttributeError:
        b = None
    return torch.zeros(shape) if b is None else b[layer].detach()


def _hf_layer(live: Live, layer: int) -> Any:
    return live.hf.model.layers[layer]


def _online_components(live: Live, layer: int, pos: np.ndarray) -> tuple[list[str], torch.Tensor]:
    """(names, (batch, component, d_model)) the residual's parts at ``pos[b]`` from the live hooks; they sum to the
    live ``hook_resid_pre``."""
    c, bridge, rows = live.cache, live.model.bridge, np.arange(len(pos))
    names, parts = ["embed"], [c["hook_embed"][rows, pos]]
    if "hook_pos_embed" in c:
        names.append("pos_embed")
        parts.append(c["hook_pos_embed"][rows, pos])
    for L in range(layer):
        if f"blocks.{L}.attn.hook_result" in c:
            result = c[f"blocks.{L}.attn.hook_result"][rows, pos]
        else:  # GPT-J, OPT: no hook_result in the bridge
            result = torch.einsum("bhd,hdm->bhm", c[f"blocks.{L}.attn.hook_z"][rows, pos], bridge.W_O[L].detach())
        b_o = _bias(bridge, "b_O", L, (bridge.cfg.d_model,)).expand(len(pos), -1)
        if f"blocks.{L}.ln1_post.hook_scale" in c:  # post-norm: the head's write passes the frozen norm
            w = _hf_layer(live, L).post_attention_layernorm.weight.detach()
            gain = 1.0 + w if live.family.startswith("gemma") else w
            scale = c[f"blocks.{L}.ln1_post.hook_scale"][rows, pos]  # (batch, 1)
            result, b_o = result * gain / scale[:, None], b_o * gain / scale
        names += [f"a{L}.h{h}" for h in range(result.shape[1])] + [f"a{L}.b_O", f"m{L}"]
        parts += [*result.unbind(1), b_o, c[f"blocks.{L}.hook_mlp_out"][rows, pos]]
    comps = torch.stack(parts, 1)
    torch.testing.assert_close(comps.sum(1), c[f"blocks.{layer}.hook_resid_pre"][rows, pos], rtol=0, atol=1e-5)
    return names, comps


def _rotate(live: Live, x: torch.Tensor, layer: int, pos: np.ndarray) -> torch.Tensor:
    """Hugging Face's own rotary of ``x`` (batch, n, d_head) at ``pos[b]`` (unchanged on models without rotary)."""
    t = x[:, None]  # (batch, 1 position, n as heads, d_head)
    if live.arch == "GPTJForCausalLM":
        from transformers.models.gptj import modeling_gptj

        d_rot = live.hf.config.rotary_dim
        sin, cos = live.hf.transformer.rotary_emb(t, torch.as_tensor(pos)[:, None])
        rotated = modeling_gptj.apply_rotary_pos_emb(t[..., :d_rot], sin, cos)
        return torch.cat([rotated, t[..., d_rot:]], -1)[:, 0]
    if live.arch not in HF_ROTARY:
        return x
    fn = importlib.import_module(f"transformers.models.{HF_ROTARY[live.arch]}.modeling_{HF_ROTARY[live.arch]}")
    cos, sin = (live.cache[f"blocks.{layer}.attn.hook_{n}"][0, pos][:, None] for n in ("cos", "sin"))
    return fn.apply_rotary_pos_emb(t, t, cos, sin, unsqueeze_dim=2)[0][:, 0]


def _online_side(live: Live, layer: int, idx: int, pos: np.ndarray, which: str) -> tuple[list[str], torch.Tensor]:
    """(names, (batch, component, d_head)) each component's share of the live query (``q``) or key (``k``)."""
    c, bridge, rows = live.cache, live.model.bridge, np.arange(len(pos))
    names, x = _online_components(live, layer, pos)
    if f"blocks.{layer}.ln1.hook_scale" in c:
        if "RMS" not in str(bridge.cfg.normalization_type):
            x = x - x.mean(-1, keepdim=True)
        x = x / c[f"blocks.{layer}.ln1.hook_scale"][rows, pos][:, None]
    w = (bridge.W_Q if which == "q" else bridge.W_K)[layer, idx].detach()
    b = _bias(bridge, f"b_{which.upper()}", layer, (idx + 1, w.shape[1]))[idx]
    shares = torch.cat([x @ w, b.expand(len(pos), 1, -1)], 1)
    names.append(f"b_{which.upper()}")
    norm = f"blocks.{layer}.attn.{which}_norm.hook_scale"
    if norm in c:  # the live q/k norm, its scale frozen: gain / hook_scale
        gain = getattr(_hf_layer(live, layer).self_attn, f"{which}_norm").weight.detach()
        scale = c[norm]
        if scale.dim() == 4:  # per head: (batch, head, pos, 1)
            scale = scale[rows, idx, pos]
        else:  # over every head (OLMo-2): (batch, pos, 1), one gain vector over (head, d_head)
            gain, scale = gain.reshape(-1, w.shape[1])[idx], scale[rows, pos]
        shares = shares * gain / scale[:, None]
    return names, _rotate(live, shares, layer, pos)


def _live_score(live: Live, layer: int, h: int, q_pos: np.ndarray, k_pos: np.ndarray) -> torch.Tensor:
    """(batch,) the model's own pre-softmax score (after its soft-cap, where it has one)."""
    c, rows = live.cache, np.arange(len(q_pos))
    if live.arch not in SCORES_HOOK_HOLDS_PATTERN:
        return c[f"blocks.{layer}.attn.hook_attn_scores"][rows, h, q_pos, k_pos]
    held = c[f"blocks.{layer}.attn.hook_attn_scores"][rows, h, q_pos]  # (batch, key_pos): a softmax, not scores
    torch.testing.assert_close(held.sum(-1), torch.ones(len(rows)), rtol=0, atol=1e-5)
    kv = h // (live.model.bridge.cfg.n_heads // c[f"blocks.{layer}.attn.hook_k"].shape[2])
    q = _rotate(live, c[f"blocks.{layer}.attn.hook_q"][rows, q_pos, h][:, None], layer, q_pos)[:, 0]
    k = _rotate(live, c[f"blocks.{layer}.attn.hook_k"][rows, k_pos, kv][:, None], layer, k_pos)[:, 0]
    return (q * k).sum(-1) * live.model.bridge.blocks[layer].attn.original_component.scaling


def online_terms(live: Live, head: tuple[int, int], q_pos: np.ndarray, k_pos: np.ndarray) -> dict[str, Any]:
    """The live model's terms (batch, q_component, k_component) with their names."""
    layer, h = head
    kv = h // (live.model.bridge.cfg.n_heads // live.cache[f"blocks.{layer}.attn.hook_k"].shape[2])
    q_names, q = _online_side(live, layer, h, q_pos, "q")
    k_names, k = _online_side(live, layer, kv, k_pos, "k")
    scaling = live.model.bridge.blocks[layer].attn.original_component.scaling
    return {"q_names": q_names, "k_names": k_names, "terms": torch.einsum("bid,bjd->bij", q, k) * scaling, "kv": kv}


# ------------------------------------------------------------------------------------------------ the tests


def _cases(ds: xr.Dataset) -> list[tuple[tuple[int, int], Any, Any]]:
    """(head, query_pos, key_pos): a layer-1 head reading kv head 1 (GQA) with per-sequence positions two apart
    (inside Mistral's and Gemma-2's windows of 4), and a layer-0 head with ints counted back from the end."""
    end = ds["end_pos"]
    return [((1, 3), end, end.values - 2), ((0, 1), -1, -3)]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_terms_equal_the_live_model(family: str, live_family: Callable[[str], Live]) -> None:
    live = live_family(family)
    ds = live.ds
    for head, query_pos, key_pos in _cases(ds):
        res = attention_attribution(ds, head=head, query_pos=query_pos, key_pos=key_pos, top_k=5).compute()
        q_pos, k_pos = res["query_pos"].values, res["key_pos"].values
        on = online_terms(live, head, q_pos, k_pos)
        assert list(res["q_component"].values) == on["q_names"] and list(res["k_component"].values) == on["k_names"]
        assert res.attrs["kv_head"] == on["kv"]
        want = on["terms"].numpy()
        np.testing.assert_allclose(res["terms"].values, want, rtol=1e-5, atol=1e-6, err_msg=f"{family} {head}")
        # the terms sum to the model's own pre-softmax score (through its soft-cap where it has one)
        live_score = _live_score(live, head[0], head[1], q_pos, k_pos).numpy()
        total = res["terms"].sum(["q_component", "k_component"]).values
        cap = ds.hs.config.attn_logit_softcap
        np.testing.assert_allclose(cap * np.tanh(total / cap) if cap else total, live_score, rtol=0, atol=1e-5)
        np.testing.assert_allclose(res["score"].values, total, rtol=0, atol=1e-5)
        np.testing.assert_allclose(res["score_stored"].values, res["score"].values, rtol=0, atol=1e-5)
        assert res.attrs["scores"] == ("model" if not cap else "pre-softcap (model score = c * tanh(score / c), c = 5)")
        assert float(np.abs(res["terms"]).max()) > 1e-3  # something to decompose


def test_top_pairs_follow_the_documented_rule(live_family: Callable[[str], Live]) -> None:
    """top_k pairs: the largest |mean over sequences of the term|, largest first, with that signed mean."""
    ds = live_family("llama").ds
    res = attention_attribution(ds, head=(1, 2), query_pos=-1, key_pos=0, top_k=7).compute()
    mean = res["terms"].values.mean(0)
    order = np.argsort(-np.abs(mean).reshape(-1), kind="stable")[:7]
    qi, ki = np.unravel_index(order, mean.shape)
    assert list(res["top_q_component"].values) == list(res["q_component"].values[qi])
    assert list(res["top_k_component"].values) == list(res["k_component"].values[ki])
    np.testing.assert_allclose(res["top_term"].values, mean[qi, ki], rtol=1e-6)
    np.testing.assert_allclose(res["mean_terms"].values, mean, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(res["by_q_component"].values, res["terms"].values.sum(2), rtol=1e-6, atol=1e-7)
    attention = ds["pattern"].sel(layer=1).isel(head=2).values[np.arange(4), res["query_pos"].values, 0]
    np.testing.assert_allclose(res["attention"].values, attention, rtol=1e-6)
    assert res.attrs["query_pos"] == -1 and res.attrs["key_pos"] == 0 and res.attrs["head"] == "1.2"
    big = attention_attribution(ds, head=(1, 2), query_pos=-1, key_pos=0, top_k=10**6)
    assert big.sizes["rank"] == res.sizes["q_component"] * res.sizes["k_component"]


def _error(call: Callable[[], Any]) -> str:
    with pytest.raises(HeadstoreError) as ei:
        call()
    msg = str(ei.value)
    assert "\n" not in msg, msg
    return msg


def test_bad_input_is_refused_in_one_line(live_family: Callable[[str], Live]) -> None:
    ds = live_family("llama").ds

    def attr(d: xr.Dataset = ds, **kw: Any) -> Callable[[], Any]:
        return lambda: attention_attribution(d, **{"head": (1, 0), "query_pos": -1, "key_pos": 0, **kw})

    assert "--fields default,resid_pre" in _error(attr(ds.drop_vars("resid_pre")))
    assert "ln1_scale" in _error(attr(ds.drop_vars("ln1_scale")))
    assert "rotary_cos" in _error(attr(ds.drop_vars(["rotary_cos", "rotary_sin"])))
    assert "lacks layers [0]" in _error(attr(ds.sel(layer=[1])))
    assert "head 4 is out of range" in _error(attr(head=(1, 4)))
    assert "layer 2 is not in this store" in _error(attr(head=(2, 0)))
    assert "(layer, head) pair" in _error(attr(head=1))
    assert "key_pos (5) is after query_pos (3)" in _error(attr(query_pos=3, key_pos=5))
    assert "query_pos" in _error(attr(query_pos=ds.sizes["pos"]))
    assert "key_pos" in _error(attr(key_pos=-100))
    assert "top_k must be a positive int" in _error(attr(top_k=0))
    no_columns = ds.drop_vars(["end_pos", "io_pos"])
    assert "'end_pos'" in _error(lambda: attention_attribution(no_columns, head=(1, 0)))
    mistral = live_family("mistral").ds  # a window of 4 on every layer
    assert "sliding window of 4" in _error(attr(mistral, query_pos=8, key_pos=4))
    attention_attribution(mistral, head=(1, 0), query_pos=8, key_pos=5)  # the oldest key the window keeps


def test_defaults_read_the_ioi_columns(live_family: Callable[[str], Live]) -> None:
    ds = live_family("gpt2").ds
    res = attention_attribution(ds, head=(1, 0))
    assert (res["query_pos"].values == ds["end_pos"].values).all() and (
        res["key_pos"].values == ds["io_pos"].values
    ).all()
    assert res.attrs["query_pos"] == "end_pos" and res.attrs["key_pos"] == "io_pos" and res.attrs["top_k"] == 10
    named = attention_attribution(ds, head=(1, 0), key_pos=ds["s1_pos"], query_pos=ds["end_pos"] - 1)
    assert named.attrs["key_pos"] == "s1_pos" and named.attrs["query_pos"] == "per-sequence"


def test_cli_writes_the_top_pairs_and_the_figure(live_family: Callable[[str], Live], tmp_path: Path) -> None:
    from headstore.cli.registry import analyzers
    from headstore.cli.run import run_analyzer

    live = live_family("gpt2")
    store = str(live.path)
    spec = analyzers()["attention-attribution"]
    with pytest.raises(HeadstoreError, match="needs --param head"):
        run_analyzer(spec, [store], tmp_path)
    params = ["head=1.2", "query_pos=end_pos", "key_pos=s1_pos", "top_k=4"]
    summary, paths = run_analyzer(spec, [store], tmp_path, param_strings=params)
    want = attention_attribution(live.ds, head=(1, 2), key_pos=live.ds["s1_pos"], top_k=4).compute()
    assert list(summary.columns) == ["layer", "head", "rank", "q_component", "k_component", "mean_term",
                                     "share_of_score", "mean_score"]  # fmt: skip
    assert list(summary["q_component"]) == list(want["top_q_component"].values) and len(summary) == 4
    np.testing.assert_allclose(summary["mean_term"], want["top_term"].values, rtol=1e-6)
    assert (summary[["layer", "head"]].values == [1, 2]).all()
    assert {"attention_attribution.png", "attention_attribution.html", "summary.csv"} <= {p.name for p in paths}


def test_heatmap_keeps_the_components_of_largest_total() -> None:
    from headstore.report.figures_attention import MAX_SHOWN, _largest

    rng = np.random.default_rng(0)
    m = rng.normal(size=(MAX_SHOWN + 10, MAX_SHOWN - 5))
    names = [f"c{i}" for i in range(m.shape[0])]
    rows, kept, note = _largest(m, names, 1)
    want = np.sort(np.argsort(-np.abs(m).sum(1))[:MAX_SHOWN])
    assert kept == [names[i] for i in want] and (rows == m[want]).all() and f"{MAX_SHOWN} of {m.shape[0]}" in note
    cols, kept_cols, note_cols = _largest(m, [f"k{i}" for i in range(m.shape[1])], 0)
    assert cols is m and len(kept_cols) == m.shape[1] and note_cols == ""
