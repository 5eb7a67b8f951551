"""Every attention family (issue 14): a random tiny model of each, saved with headstore's tokenizer and loaded
as ``--model FOLDER``; extraction with the default fields and ``--fields all``; every stored array against
the live bridge (literal TransformerLens hook names; where the bridge has no hook, an oracle computed from
what it has with Hugging Face's own functions); logits from the store against the Hugging Face model's own;
every registered analyzer run, and the ones with a cheap oracle checked against it.

``docs/families.md`` holds the support table this matrix computes (``test_support_table_in_docs``):
regenerate it with ``python -m tests.gen_families``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import xarray as xr

import headstore
from headstore import analyze as A
from headstore.cli.registry import analyzers
from headstore.extract import ExtractRequest, extract
from headstore.extract.tiny import TINY_FAMILIES, build_family, build_tokenizer
from headstore.store_schema import FIELDS, HeadstoreError, provenance
from headstore.store_schema.attention import derived_pattern
from headstore.store_schema.layout import GRAD_FIELDS, IG_FIELDS

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "families.md"
WRITE_ENV = "HEADSTORE_WRITE_FAMILIES"
KW: dict[str, Any] = {"n_seq": 4, "batch_size": 4, "device": "cpu", "progress": False, "seed": 1}
SENDERS, RECEIVER = [(0, 0), (0, 2)], (1, 3)  # receiver head 3 reads kv head 1 (GQA) or 0 (MQA)
HOOKED = ("pattern", "v", "z", "result", "q", "k", "ln1_scale", "ln2_scale", "ln1_post_scale", "ln_final_scale",
          "resid_pre", "resid_final", "loss")  # fmt: skip


# ------------------------------------------------------------------------------------------------ the runs


@dataclass
class Run:
    """One family: its folder, live bridge, an untouched Hugging Face model, its stores and analyzer results."""

    family: str
    folder: Path
    model: Any
    hf: Any
    extract: dict[str, str] = field(default_factory=dict)  # store name -> "ok" or the refusal
    stores: dict[str, xr.Dataset] = field(default_factory=dict)
    results: dict[str, xr.Dataset | HeadstoreError] = field(default_factory=dict)

    @property
    def ds(self) -> xr.Dataset:
        return self.stores["all"]

    @property
    def arch(self) -> str:
        return self.model.architecture


STORES = {  # name -> (data, fields)
    "default": ("ioi", ("default",)),
    "all": ("ioi", ("all",)),
    "abc": ("ioi-abc", ("all",)),
    "compact": ("ioi", ("compact",)),
    "ifelse": ("code-ifelse", ("default",)),  # built once (tokenizer shared), extracted from tokens:FILE.npy,COLUMNS
}


def _calls(run: Run) -> dict[str, Callable[[], xr.Dataset]]:
    """Every registered analyzer, called as a researcher would on this family's stores."""
    ds, abc = run.ds, run.stores["abc"]
    return {
        "attention-attribution": lambda: A.attention_attribution(ds, head=RECEIVER, key_pos=ds["end_pos"] - 2),
        "attention-search": lambda: A.attention_search(ds, query=A.Relation.ANY, key=A.Relation.PREVIOUS),
        "attention-stats": lambda: A.attention_stats(ds),
        "calibration": lambda: A.calibration(ds),
        "circuits": lambda: A.circuits(ds),
        "composition": lambda: A.composition(ds, n_draws=8),
        "copy-suppression": lambda: A.copy_suppression(ds),
        "head-scores": lambda: A.head_scores(ds),
        "head-similarity": lambda: A.head_similarity(ds),
        "ifelse-detector": lambda: A.ifelse_detector(run.stores["ifelse"]),
        "ioi": lambda: A.ioi(ds),
        "ioi-pair": lambda: A.ioi_pair(ds, abc),
        "logit-attribution": lambda: A.logit_attribution(ds, target=ds["io_token"]),
        "path-patch-query": lambda: A.path_patch_query(ds, abc, senders=SENDERS, receiver=RECEIVER),
        "projection-loss": lambda: A.projection_loss(ds),
        "top-attention": lambda: A.top_attention(ds),
        "top-effects": lambda: A.top_effects(ds),
        # against live autograd in tests/test_attribution.py; here: they run, or refuse as documented
        "attribution-patching": lambda: A.attribution_patching(_grad_store(run), abc),
        "edge-attribution": lambda: A.edge_attribution(_grad_store(run), abc),
    }


GRAD = "logit-diff:io_token,s_token@end_pos"


def _grad_store(run: Run) -> xr.Dataset:
    """The family's IOI store with gradients (``extract --grad``), or the extraction's refusal raised."""
    got = run.stores.get("grad")
    if got is None:
        out = run.folder.parent / f"{run.family}-grad.zarr"
        from unittest import mock

        import headstore.extract.run as extract_run

        with mock.patch.object(extract_run, "load_model", lambda *args, **kwargs: run.model):
            extract(ExtractRequest(model=str(run.folder), data="ioi", out=str(out), grad=GRAD, **KW))
        got = run.stores["grad"] = headstore.open_store(out)
    return got


@pytest.fixture(scope="session")
def family_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Run]:
    """``family_run(family)`` -> its Run, built once per session (model folder, stores, analyzer results).

    The model is loaded once per family, as ``extract --model FOLDER`` loads it, and handed to that family's
    extractions (each would load it again)."""
    from unittest import mock

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import headstore.extract.run as extract_run
    from headstore.extract.models import load_model

    hf_logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("families")
    tok = root / "tokenizer"
    runs: dict[str, Run] = {}

    def data_spec(data: str) -> str:
        if data != "code-ifelse":
            return data
        npy = root / "ifelse.npy"
        if not npy.exists():  # the same tokens for every family (one tokenizer): build them once
            import pandas as pd
            from transformers import AutoTokenizer

            from headstore.extract.data import DataRequest, build_dataset

            built = build_dataset(DataRequest("code-ifelse", 32, 16, 1, True), AutoTokenizer.from_pretrained(tok), 64)
            np.save(npy, built.tokens)
            pd.DataFrame({k: np.asarray(v) for k, v in built.columns.items()}).to_csv(root / "ifelse.csv", index=False)
        return f"tokens:{npy},{root / 'ifelse.csv'}"

    def get(family: str) -> Run:
        if family in runs:
            return runs[family]
        if not tok.exists():
            build_tokenizer(tok)
        folder = root / family
        build_family(family, folder, tok)
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()  # the bridge edits its own copy
        run = Run(family, folder, load_model(str(folder), "cpu"), hf)
        with mock.patch.object(extract_run, "load_model", lambda *args, **kwargs: run.model):
            for name, (data, fields) in STORES.items():
                out = root / f"{family}-{name}.zarr"
                kw = {**KW, "n_seq": 32} if data == "code-ifelse" else KW
                try:
                    extract(ExtractRequest(model=str(folder), data=data_spec(data), out=str(out), fields=fields, **kw))
                    run.extract[name] = "ok"
                    run.stores[name] = headstore.open_store(out)
                except HeadstoreError as e:
                    run.extract[name] = str(e)
        for name, call in _calls(run).items():
            try:
                run.results[name] = call().compute()
            except HeadstoreError as e:
                run.results[name] = e
        runs[family] = run
        return run

    return get


@pytest.fixture(scope="session")
def live(family_run: Callable[[str], Run]) -> Callable[[str], tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """``live(family)`` -> (logits, full run_with_cache) of the bridge on the "all" store's tokens; with
    ``per_head_result=False`` the bridge runs its attention outputs through ``o_proj`` (no ``hook_result``), as
    extraction does for a store without ``result``."""
    cached: dict[tuple[str, bool], tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}

    def get(family: str, per_head_result: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        key = (family, per_head_result)
        if key not in cached:
            run = family_run(family)
            bridge = run.model.bridge
            if run.model.has_result_hook:
                bridge.set_use_attn_result(per_head_result)
            try:
                with torch.inference_mode():
                    logits, cache = bridge.run_with_cache(torch.as_tensor(run.ds["tokens"].values).long())
            finally:
                if run.model.has_result_hook:
                    bridge.set_use_attn_result(True)
            cached[key] = logits, dict(cache.items())
        return cached[key]

    return get


def _hf_logits(run: Run, tokens: np.ndarray) -> torch.Tensor:
    with torch.inference_mode():
        return run.hf(torch.as_tensor(tokens).long()).logits.float()


# ------------------------------------------------------------------------------------------------ (a) extraction


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_extraction_default_and_all(family: str, family_run: Callable[[str], Run]) -> None:
    run = family_run(family)
    assert run.extract == dict.fromkeys(STORES, "ok"), run.extract
    prov = provenance(run.ds)
    # presets hold every field the family can represent, and nothing else
    missing = run.model.unrepresentable
    assert set(prov.fields) == set(FIELDS) - set(missing) - set(GRAD_FIELDS) - set(IG_FIELDS)  # grads come with --grad
    assert set(provenance(run.stores["default"]).fields) == {n for n, f in FIELDS.items() if f.default} - set(missing)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_plan_from_the_config_alone_matches_the_store(family: str, family_run: Callable[[str], Run]) -> None:
    """``extract --dry-run`` on the family's config.json alone (no weights): the fields the booted model stores, at
    the shapes of the store written, and the uncompressed ones' bytes exactly (extract.plan_config)."""
    import zarr

    from headstore.extract.plan_config import plan_from_config

    run = family_run(family)
    store, prov = run.folder.parent / f"{family}-all.zarr", provenance(run.ds)
    req = ExtractRequest(model=str(run.folder / "config.json"), dry_run=True, seq_len=prov.seq_len,
                         n_seq=prov.dataset.n_sequences, fields=("all",), batch_size=prov.batch_size)  # fmt: skip
    plan = plan_from_config(req, run.folder / "config.json")
    assert [f.name for f in plan.fields] == [n for n in prov.fields if n != "tokens"]
    for f in plan.fields:
        arr = zarr.open_array(store / f.name, mode="r")
        assert f.nbytes == arr.nbytes, f.name
        if f.name != "pattern":
            assert f.total_bytes == sum(p.stat().st_size for p in (store / f.name).rglob("*") if p.is_file()), f.name


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_unrepresentable_field_named_is_refused_in_one_line(family: str, family_run: Callable[[str], Run],
                                                             tmp_path: Path) -> None:  # fmt: skip
    run = family_run(family)
    for name in run.model.unrepresentable:
        out = tmp_path / f"{name}.zarr"
        req = ExtractRequest(model=str(run.folder), data="ioi", out=str(out), fields=("default", name), **KW)
        with pytest.raises(HeadstoreError) as ei:
            extract(req)
        msg = str(ei.value)
        assert "\n" not in msg and name in msg and run.arch in msg, msg
        assert not out.exists()


# ------------------------------------------------------------------------------------------------ (b) stored == live


def _rotary_oracle(run: Run, cache: dict[str, torch.Tensor], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Post-rotary (q, k) of ``layer`` where the bridge has no hook_rot_q: pre-rotary hook_q / hook_k through the
    model's own ``apply_rotary_pos_emb`` (Hugging Face's function, not headstore's)."""
    q, k = cache[f"blocks.{layer}.attn.hook_q"], cache[f"blocks.{layer}.attn.hook_k"]
    if run.arch == "GPTJForCausalLM":
        from transformers.models.gptj import modeling_gptj

        d_rot = run.hf.config.rotary_dim
        pos = torch.arange(q.shape[1])[None]
        sin, cos = run.hf.transformer.rotary_emb(q, pos)

        def turn(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([modeling_gptj.apply_rotary_pos_emb(x[..., :d_rot], sin, cos), x[..., d_rot:]], -1)

        return turn(q), turn(k)
    module = {"GPTNeoXForCausalLM": "gpt_neox", "Phi3ForCausalLM": "phi3"}[run.arch]
    import importlib

    fn = importlib.import_module(f"transformers.models.{module}.modeling_{module}").apply_rotary_pos_emb
    cos, sin = cache[f"blocks.{layer}.attn.hook_cos"], cache[f"blocks.{layer}.attn.hook_sin"]
    return fn(q, k, cos, sin, unsqueeze_dim=2)


def live_field(run: Run, cache: dict[str, torch.Tensor], name: str, logits: torch.Tensor) -> np.ndarray:
    """Field ``name`` in storage layout from the live bridge's cache, hook names written out here."""
    layers = list(provenance(run.ds).layers)
    n_b, n_p = run.ds.sizes["batch"], run.ds.sizes["pos"]
    last = run.model.cfg.n_layers - 1
    rotary = "rotary_cos" in run.ds

    def per_layer(fn: Callable[[int], torch.Tensor]) -> np.ndarray:
        return np.stack([fn(L).float().numpy() for L in layers], axis=1)

    def scale(hook: str) -> torch.Tensor:
        return cache[hook].reshape(n_b, n_p)  # OPT's ln2 runs on (batch * pos) flattened tokens

    def qk(L: int, which: str) -> torch.Tensor:
        if not rotary:
            return cache[f"blocks.{L}.attn.hook_{which}"]
        if f"blocks.{L}.attn.hook_rot_{which}" in cache:
            return cache[f"blocks.{L}.attn.hook_rot_{which}"]
        return _rotary_oracle(run, cache, L)[0 if which == "q" else 1]

    def result(L: int) -> torch.Tensor:
        if f"blocks.{L}.attn.hook_result" in cache:
            return cache[f"blocks.{L}.attn.hook_result"]
        return torch.einsum("bphd,hdm->bphm", cache[f"blocks.{L}.attn.hook_z"], run.model.bridge.W_O[L].detach())

    if name == "loss":
        ce = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), torch.as_tensor(run.ds["tokens"].values[:, 1:]).long().reshape(-1),
            reduction="none",
        ).reshape(n_b, -1)  # fmt: skip
        return np.concatenate([ce.numpy(), np.full((n_b, 1), np.nan, np.float32)], axis=1)
    fns: dict[str, Callable[[], np.ndarray]] = {
        "pattern": lambda: per_layer(lambda L: cache[f"blocks.{L}.attn.hook_pattern"]),
        "v": lambda: per_layer(lambda L: cache[f"blocks.{L}.attn.hook_v"]),
        "z": lambda: per_layer(lambda L: cache[f"blocks.{L}.attn.hook_z"]),
        "result": lambda: per_layer(result),
        "q": lambda: per_layer(lambda L: qk(L, "q")),
        "k": lambda: per_layer(lambda L: qk(L, "k")),
        "ln1_scale": lambda: per_layer(lambda L: scale(f"blocks.{L}.ln1.hook_scale")),
        "ln2_scale": lambda: per_layer(lambda L: scale(f"blocks.{L}.ln2.hook_scale")),
        "ln1_post_scale": lambda: per_layer(lambda L: scale(f"blocks.{L}.ln1_post.hook_scale")),
        "resid_pre": lambda: per_layer(lambda L: cache[f"blocks.{L}.hook_resid_pre"]),
        "ln_final_scale": lambda: scale("ln_final.hook_scale").numpy(),
        "resid_final": lambda: cache[f"blocks.{last}.hook_resid_post"].numpy(),
    }
    return fns[name]()


def test_hooked_fields_cover_the_schema() -> None:
    assert set(HOOKED) == set(FIELDS) - {"tokens", *GRAD_FIELDS, *IG_FIELDS}  # grads: tests/test_attribution.py


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_stored_arrays_equal_live_bridge(family: str, family_run: Callable[[str], Run], live: Any) -> None:
    run = family_run(family)
    logits, cache = live(family)
    for name in provenance(run.ds).fields:
        if name == "tokens":
            continue
        want = live_field(run, cache, name, logits)
        got = run.ds[name].values
        assert got.shape == want.shape, name
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6, err_msg=f"{family} {name}")
    # the default store (no `result`: the model's own o_proj ran) holds that forward's numbers, result derived from z
    default = run.stores["default"]
    logits, cache = live(family, per_head_result=False)
    for name in [*provenance(default).fields, "result"]:
        if name != "tokens":
            want = live_field(run, cache, name, logits)
            np.testing.assert_allclose(default[name].values, want, rtol=1e-5, atol=2e-6, err_msg=f"{family} {name}")


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_queries_and_keys_give_the_live_pattern(family: str, family_run: Callable[[str], Run], live: Any) -> None:
    """The stored (post-rotary) q, k through the model's own score rule (its attention module's ``scaling``,
    its config's soft-cap and sliding windows, written out here) give hook_pattern; and so does headstore's
    ``derived_pattern`` with the store's config (what compact stores read)."""
    run = family_run(family)
    _, cache = live(family)
    cfg = run.hf.config
    cap = getattr(cfg, "attn_logit_softcapping", None) or 0.0
    for i, L in enumerate(provenance(run.ds).layers):
        attn = run.model.bridge.blocks[L].attn.original_component
        window = getattr(attn, "sliding_window", None) or (getattr(cfg, "sliding_window", None) or 0)
        if getattr(cfg, "layer_types", None):
            window = window if cfg.layer_types[L] == "sliding_attention" else 0
        q = torch.as_tensor(run.ds["q"].isel(layer=i).values)
        k = torch.as_tensor(run.ds["k"].isel(layer=i).values).repeat_interleave(
            q.shape[2] // run.ds.sizes["kv_head"], 2
        )
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) * attn.scaling
        if cap:
            s = cap * torch.tanh(s / cap)
        n = s.shape[-1]
        i_q, i_k = torch.arange(n)[:, None], torch.arange(n)[None, :]
        hidden = (i_k > i_q) | ((i_k <= i_q - window) if window else torch.zeros((n, n), dtype=torch.bool))
        want = cache[f"blocks.{L}.attn.hook_pattern"]
        torch.testing.assert_close(torch.softmax(s.masked_fill(hidden, -torch.inf), -1), want, rtol=0, atol=2e-6)
    derived = derived_pattern(run.ds["q"], run.ds["k"], run.ds.hs.config).values
    np.testing.assert_allclose(derived, run.ds["pattern"].values, rtol=0, atol=2e-6)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_compact_store_derives_the_pattern(family: str, family_run: Callable[[str], Run]) -> None:
    run = family_run(family)
    ds = run.stores["compact"]
    assert "pattern" not in provenance(ds).fields
    np.testing.assert_allclose(ds["pattern"].values, run.ds["pattern"].values, rtol=0, atol=2e-6)


# ------------------------------------------------------------------------------------------------ (c) logits vs HF


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_store_logits_equal_hugging_face(family: str, family_run: Callable[[str], Run]) -> None:
    """``ds.hs.logits()`` against ``hf_model(tokens).logits`` of a model TransformerBridge never touched: equal up to
    one constant per position (``center_unembed``), and exactly under a final soft-cap (no centring there),
    which ``ds.hs.logits()`` applies: the pre-cap logits are far from the model's."""
    run = family_run(family)
    ds = run.ds
    hf = _hf_logits(run, ds["tokens"].values).numpy()
    got = ds.hs.logits().values
    tol = 2e-5 * float(np.abs(hf).max())
    cap = ds.hs.config.final_logit_softcap
    if cap:
        np.testing.assert_allclose(got, hf, rtol=0, atol=tol)
        pre = ds.hs.logits(capped=False).values
        assert np.abs(pre - hf).max() > 0.1 and np.abs(pre).max() > cap
        np.testing.assert_allclose(cap * np.tanh(pre / cap), hf, rtol=0, atol=tol)
    else:
        np.testing.assert_allclose(got - got.mean(-1, keepdims=True), hf - hf.mean(-1, keepdims=True), rtol=0, atol=tol)


# ------------------------------------------------------------------------------------------------ the config

DEFAULTS = {"final_logit_softcap": 0.0, "attn_logit_softcap": 0.0, "sliding_window": 0, "sliding_window_layers": (),
            "qk_norm": "", "parallel_residual": False, "rotary_dim": 0, "rotary_style": "half", "pre_norm": True,
            "post_norm": False}  # fmt: skip
EXPECTED_CONFIG: dict[str, dict[str, Any]] = {  # what each tiny config switches on (headstore.extract.tiny)
    "gpt-neox": {"parallel_residual": True, "rotary_dim": 2},
    "gpt-j": {"parallel_residual": True, "rotary_dim": 4, "rotary_style": "interleaved"},
    "gemma-2": {"final_logit_softcap": 3.0, "attn_logit_softcap": 5.0, "attn_scale": 0.25, "sliding_window": 4,
                "sliding_window_layers": (0,), "post_norm": True},
    "qwen3": {"qk_norm": "per_head"},
    "mistral": {"sliding_window": 4, "sliding_window_layers": (0, 1)},
    "phi-3": {"rotary_dim": 4},
    "olmo-2": {"qk_norm": "full", "pre_norm": False, "post_norm": True},
}  # fmt: skip


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_config_records_the_models_nonlinearities(family: str, family_run: Callable[[str], Run]) -> None:
    run = family_run(family)
    cfg = run.ds.hs.config
    want = {**DEFAULTS, "attn_scale": 8**-0.5, **EXPECTED_CONFIG.get(family, {})}
    if cfg.positional_embedding_type == "rotary" and "rotary_dim" not in EXPECTED_CONFIG.get(family, {}):
        want["rotary_dim"] = cfg.d_head
    assert {k: getattr(cfg, k) for k in want} == pytest.approx(want)
    assert cfg.architecture == run.arch
    if cfg.positional_embedding_type == "rotary":
        assert run.ds.sizes["d_rot"] == cfg.d_rot
    proc = provenance(run.ds).model.processing
    assert proc["center_unembed"] == (not cfg.final_logit_softcap)  # not translation invariant under a cap
    # TransformerBridge folds every family's norms but OLMo-2's: headstore folds its ln_final into W_U
    assert proc["fold_ln"] == (family != "olmo-2") and proc.get("ln_final_folded", False) == (family == "olmo-2")


def test_config_of_older_stores_reads_with_defaults() -> None:
    from headstore.store_schema.provenance import ModelConfig

    old = {"n_layers": 2, "n_heads": 4, "n_key_value_heads": 2, "d_model": 32, "d_head": 8, "d_vocab": 10,
           "n_ctx": 64, "normalization_type": "RMS", "eps": 1e-5, "positional_embedding_type": "rotary"}  # fmt: skip
    cfg = ModelConfig.from_dict(old)
    assert {k: getattr(cfg, k) for k in DEFAULTS} == DEFAULTS
    assert cfg.score_scale == 8**-0.5 and cfg.d_rot == 8 and cfg.window(0) == 0
    with pytest.raises(HeadstoreError, match="qk_norm"):
        ModelConfig.from_dict({**old, "qk_norm": "sideways"})
    with pytest.raises(HeadstoreError, match="sliding_window_layers must be a list of ints"):
        ModelConfig.from_dict({**old, "sliding_window_layers": "0"})


# ------------------------------------------------------------------------------------------------ (d) analyzers

# Analyzers checked against an oracle for every family: below (attention-attribution: test_attention_attribution.py;
# the example analyzers: test_dashboard.py).
ORACLES = ("attention-attribution", "calibration", "copy-suppression", "ioi", "logit-attribution", "path-patch-query",
           "projection-loss", "attention-search", "head-similarity", "top-attention", "top-effects")  # fmt: skip
# (family, analyzer) -> text of the documented one-line refusal; every other pair must run.
_GRAD_REFUSED = "which headstore's gradients do not cover yet: extract without --grad"
_POST_NORM = "(post-norm), so a head's result is not what it adds to the residual: not supported"
REFUSALS: dict[tuple[str, str], str] = {
    **{(f, n): _GRAD_REFUSED for f in ("gpt-j", "opt") for n in ("attribution-patching", "edge-attribution")},
    **{(f, "edge-attribution"): _POST_NORM for f in ("gemma-2", "olmo-2")},
}


def test_matrix_calls_every_registered_analyzer(family_run: Callable[[str], Run]) -> None:
    run = Run("gpt2", Path(), None, None, stores=dict.fromkeys(STORES, xr.Dataset()))  # type: ignore[arg-type]
    assert set(_calls(run)) == set(analyzers())


def _finite(res: xr.Dataset) -> list[str]:
    """Float variables with an inf, or with no finite value at all."""
    bad = []
    for name, var in res.data_vars.items():
        if var.dtype.kind == "f":
            v = np.asarray(var.values)
            if np.isinf(v).any() or not np.isfinite(v).any():
                bad.append(str(name))
    return bad


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_analyzer_runs_or_refuses_as_documented(family: str, family_run: Callable[[str], Run]) -> None:
    run = family_run(family)
    for name, res in run.results.items():
        want = REFUSALS.get((family, name))
        if isinstance(res, HeadstoreError):
            assert want is not None, f"{family}: {name} refused: {res}"
            assert "\n" not in str(res) and want in str(res), str(res)
        else:
            assert want is None, f"{family}: {name} ran but REFUSALS documents {want!r}"
            assert res.attrs.get("analyzer") == name
            assert not _finite(res), f"{family}: {name}: not finite: {_finite(res)}"


def _post_norm_factor(run: Run, cache: dict[str, torch.Tensor], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(gain (d_model,), scale (batch, pos)) of the norm on layer ``layer``'s attention output, read from the
    untouched Hugging Face model's weights (Gemma's ``1 + w``) and the bridge's hook; (1, 1) on pre-norm models."""
    if not run.ds.hs.config.post_norm:
        return torch.ones(1), torch.ones(1, 1)
    w = run.hf.model.layers[layer].post_attention_layernorm.weight.detach().float()
    gain = 1.0 + w if run.family.startswith("gemma") else w
    return gain, cache[f"blocks.{layer}.ln1_post.hook_scale"][..., 0]


def _head_writes(run: Run, cache: dict[str, torch.Tensor], layer: int) -> torch.Tensor:
    """(batch, pos, head, d_model) what each head of ``layer`` adds to the residual stream, frozen norms."""
    z = cache[f"blocks.{layer}.attn.hook_z"]
    gain, scale = _post_norm_factor(run, cache, layer)
    return torch.einsum("bphd,hdm->bphm", z, run.model.bridge.W_O[layer].detach()) * gain / scale[:, :, None, None]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_ioi_logit_diff_equals_hugging_face(family: str, family_run: Callable[[str], Run]) -> None:
    run = family_run(family)
    ds, res = run.ds, run.results["ioi"]
    assert isinstance(res, xr.Dataset)
    hf = _hf_logits(run, ds["tokens"].values).numpy()
    b = np.arange(ds.sizes["batch"])
    end = ds["end_pos"].values
    want = hf[b, end, ds["io_token"].values] - hf[b, end, ds["s_token"].values]
    np.testing.assert_allclose(res["logit_diff"].values, want, rtol=0, atol=2e-5 * np.abs(hf).max())


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_logit_attribution_equals_live_direct_effects(family: str, family_run: Callable[[str], Run], live: Any) -> None:
    """per_head[L, h, b] is head (L, h)'s output at dest, through its layer's frozen post-attention norm (post-norm
    models) and ln_final's frozen scale, dotted with the target's unembedding: from the live bridge. The logit it
    decomposes is the pre-cap one under a soft-cap (attrs say so), the model's logit being its cap."""
    run = family_run(family)
    ds, res = run.ds, run.results["logit-attribution"]
    assert isinstance(res, xr.Dataset)
    _, cache = live(family)
    b = np.arange(ds.sizes["batch"])
    dest, target = ds["end_pos"].values, ds["io_token"].values
    w_u = torch.as_tensor(ds["W_U"].values)[:, target]  # (d_model, batch), the store's (checked against HF above)
    if ds.hs.config.normalization_type == "LN":
        w_u = w_u - w_u.mean(0)
    s_final = cache["ln_final.hook_scale"][b, dest, 0]
    for i, L in enumerate(provenance(ds).layers):
        writes = _head_writes(run, cache, L)[b, dest]  # (batch, head, d_model)
        want = torch.einsum("bhm,mb->hb", writes, w_u) / s_final
        np.testing.assert_allclose(res["per_head"].isel(layer=i).values, want.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(res["reconstruction_error"].values, 0, atol=2e-5 * float(np.abs(res["logit"]).max()))
    cap = ds.hs.config.final_logit_softcap
    hf = _hf_logits(run, ds["tokens"].values).numpy()[b, dest, target]
    if cap:
        assert res.attrs["logits"].startswith("pre-softcap")
        np.testing.assert_allclose(cap * np.tanh(res["logit"].values / cap), hf, rtol=0, atol=1e-4)
    else:
        assert res.attrs["logits"] == "model"


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_copy_suppression_equals_live_formula(family: str, family_run: Callable[[str], Run], live: Any) -> None:
    """score[L, h] from the live bridge: coef[b, k] = (v[b, k, kv(h)] @ W_O[L, h] * g) . W_U[:, tok[b, k]] weighted
    by the attention between real (``< length``), non-BOS tokens / (ln_final_scale * ln1_post_scale) at the query
    (g, ln1_post_scale: post-norm only)."""
    run = family_run(family)
    ds, res = run.ds, run.results["copy-suppression"]
    assert isinstance(res, xr.Dataset)
    _, cache = live(family)
    toks = torch.as_tensor(ds["tokens"].values).long()
    real = torch.arange(toks.shape[1])[None, :] < torch.as_tensor(ds["length"].values)[:, None]  # not padding
    keep = ((toks != provenance(ds).tokenizer.bos_token_id) & real).float()  # (b, pos)
    u = torch.as_tensor(ds["W_U"].values)[:, toks].permute(1, 2, 0)  # (b, k, d_model)
    group = ds.sizes["head"] // ds.sizes["kv_head"]
    for i, L in enumerate(provenance(ds).layers):
        gain, s_post = _post_norm_factor(run, cache, L)
        v = cache[f"blocks.{L}.attn.hook_v"].repeat_interleave(group, 2)  # (b, k, head, d_head)
        coef = torch.einsum("bkhd,hdm,bkm->bhk", v, run.model.bridge.W_O[L].detach() * gain, u)
        a = cache[f"blocks.{L}.attn.hook_pattern"] * keep[:, None, :, None] * keep[:, None, None, :]
        inv = 1.0 / (cache["ln_final.hook_scale"][..., 0] * s_post)  # (b, q)
        per_pos = coef * torch.einsum("bq,bhqk->bhk", inv, a)
        attn = a.sum(2)
        score = ((per_pos * attn).sum(-1) / attn.sum(-1)).mean(0)
        np.testing.assert_allclose(res["score"].isel(layer=i).values, score.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_projection_loss_equals_live_formula(family: str, family_run: Callable[[str], Run], live: Any) -> None:
    """All three modes from the live cache: the model's own logits (HF, through its soft-cap) with head (L, h)'s
    frozen direct effect replaced by its projection onto the source tokens' unembeddings (``project``), by the
    rest (``perpendicular``) or removed (``ablation``), changed in the pre-cap logits, then the next-token loss.
    A source token with a zero unembedding projects to zero: Gemma-2's padding token (a zero-initialised
    embedding row, tied to ``W_U``), which its IOI prompts contain. Only real predictions (``q + 1 < length``) have
    a loss: the padded ones are NaN."""
    run = family_run(family)
    ds, res = run.ds, run.results["projection-loss"]
    assert isinstance(res, xr.Dataset)
    logits, cache = live(family)
    cap = ds.hs.config.final_logit_softcap
    pre = cache["unembed.hook_out"] if cap else logits  # the bridge's unembedding output is pre-cap
    w_u = torch.as_tensor(ds["W_U"].values)
    toks = torch.as_tensor(ds["tokens"].values).long()
    nxt = toks[:, 1:]
    real = np.arange(1, toks.shape[1])[None, :] < ds["length"].values[:, None]  # (batch, pos - 1): q + 1 < length
    assert np.isnan(res["loss"].values[..., :-1][..., ~real]).all()
    u = w_u.T[toks]  # batch, key_pos, d_model
    uu = (u * u).sum(-1)
    s_final = cache["ln_final.hook_scale"]
    n_kv = ds.sizes.get("kv_head", ds.sizes["head"])
    zero_u = bool((uu == 0).any())
    for i, L in enumerate(provenance(ds).layers):
        writes = _head_writes(run, cache, L)
        gain, post_scale = _post_norm_factor(run, cache, L)
        v = cache[f"blocks.{L}.attn.hook_v"]  # batch, key_pos, kv_head, d_head
        pattern = cache[f"blocks.{L}.attn.hook_pattern"]  # batch, head, query_pos, key_pos
        for h in range(ds.sizes["head"]):
            before = v[:, :, h // (ds.sizes["head"] // n_kv)] @ run.model.bridge.W_O[L, h].detach() * gain
            coeff = torch.where(uu > 0, (before * u).sum(-1) / torch.where(uu > 0, uu, 1.0), 0.0)
            new = torch.einsum("bqk,bk,bkm->bqm", pattern[:, h], coeff, u) / post_scale[..., None]
            changes = {"project": new - writes[:, :, h], "perpendicular": -new, "ablation": -writes[:, :, h]}
            for mode, change in changes.items():
                lg = pre + (change / s_final) @ w_u
                if cap:
                    lg = cap * torch.tanh(lg / cap)
                ce = torch.nn.functional.cross_entropy(lg[:, :-1].transpose(1, 2), nxt, reduction="none")
                got = res["loss"].sel(mode=mode).isel(layer=i, head=h).values[:, :-1][real]
                np.testing.assert_allclose(
                    got, ce.numpy()[real], rtol=1e-4, atol=1e-5, err_msg=f"{family} {L}.{h} {mode}"
                )
    if family == "gemma-2":  # its IOI prompts hold the padding token (tied, zero row): the case must be exercised
        assert zero_u


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_calibration_baseline_equals_hugging_face(family: str, family_run: Callable[[str], Run]) -> None:
    """Baseline bucket counts from the top-3 probabilities of the Hugging Face model's own logits, at the real
    next-token predictions (``q + 1 < length``: IOI prompts are right-padded)."""
    run = family_run(family)
    ds, res = run.ds, run.results["calibration"]
    assert isinstance(res, xr.Dataset)
    real = torch.as_tensor(np.arange(1, ds.sizes["pos"])[None, :] < ds["length"].values[:, None])
    probs = torch.softmax(_hf_logits(run, ds["tokens"].values)[:, :-1][real], -1)  # (real predictions, d_vocab)
    top = probs.topk(3, -1)
    correct = top.indices == torch.as_tensor(ds["tokens"].values[:, 1:]).long()[real][..., None]
    n_bins = res.sizes["bin"]
    edges = np.arange(n_bins + 1, dtype=np.float32) / np.float32(n_bins)
    bins = np.searchsorted(edges, top.values.numpy().ravel(), side="right") - 1
    freq = np.bincount(bins, minlength=n_bins)[:n_bins]
    corr = np.bincount(bins[correct.numpy().ravel()], minlength=n_bins)[:n_bins]
    np.testing.assert_array_equal(res["bucket_frequency"].values, freq)
    np.testing.assert_array_equal(res["bucket_correct_frequency"].values, corr)


# Families whose processed attention has no biases (checked below; LayerNorm models get some from folding the
# norm's bias): circuits leaves biases out, as the seed.
BIAS_FREE = ("llama", "gemma", "gemma-2", "qwen3", "mistral", "phi-3", "olmo-2")


@pytest.mark.parametrize("family", BIAS_FREE)
def test_circuits_equal_a_one_token_forward(family: str, family_run: Callable[[str], Run]) -> None:
    """On a one-token sequence layer 0 reads the token alone, at position 0 where rotary is the identity:
    ``C_QK[t, t]`` is the live ``q . k`` (after the model's q/k norms) and ``C_OV[t, o]`` the live head output
    (through the post-attention norm's gain on post-norm models) normalised and unembedded."""
    run = family_run(family)  # booted and extracted outside inference mode (a first use extracts with gradients)
    ds = run.ds
    assert all(float(np.abs(ds[b].values).max()) == 0 for b in ("b_Q", "b_K", "b_V")), "not bias-free"
    t, o = 5, 7
    res = A.circuits(ds, query_token=t, key_token=t, src_token=t, out_token=o)
    with torch.inference_mode():
        _, cache = run.model.bridge.run_with_cache(torch.tensor([[t]]))
    rot = "rot_" if "blocks.0.attn.hook_rot_q" in cache else ""
    q, k = cache[f"blocks.0.attn.hook_{rot}q"][0, 0], cache[f"blocks.0.attn.hook_{rot}k"][0, 0]
    kv = np.arange(ds.sizes["head"]) // (ds.sizes["head"] // ds.sizes["kv_head"])
    np.testing.assert_allclose(res["qk_value"].isel(layer=0).values, (q * k[kv]).sum(-1).numpy(), rtol=2e-3, atol=1e-5)
    gain, _ = _post_norm_factor(run, cache, 0)
    y = torch.einsum("hd,hdm->hm", cache["blocks.0.attn.hook_z"][0, 0], run.model.bridge.W_O[0].detach()) * gain
    if ds.hs.config.normalization_type == "LN":
        y = y - y.mean(-1, keepdim=True)
    y = y / torch.sqrt((y * y).mean(-1, keepdim=True) + ds.hs.config.eps)
    want = (y @ torch.as_tensor(ds["W_U"].values)[:, o]).numpy()
    np.testing.assert_allclose(res["ov_value"].isel(layer=0).values, want, rtol=2e-3, atol=1e-5)


def _q_input(run: Run, resid: torch.Tensor) -> torch.Tensor:
    """What layer 1's attention reads: folded ln1 with its scale recomputed, or the residual itself (no ln1)."""
    cfg = run.model.bridge.cfg
    if not run.ds.hs.config.pre_norm:
        return resid
    if "RMS" not in str(cfg.normalization_type):
        resid = resid - resid.mean(-1, keepdim=True)
    return resid / torch.sqrt((resid * resid).mean(-1, keepdim=True) + cfg.eps)


@torch.inference_mode()
def online_path_patch(run: Run, clean: np.ndarray, corrupt: np.ndarray) -> torch.Tensor:
    """(batch, key_pos) the receiver's live pattern at the end with the senders' z taken from the corrupt run.

    The model's own forward: the senders' hook_z is replaced in a clean run with layer 0's MLP output held clean
    (only the direct path), so the post-attention norm of post-norm models acts as the model does; the
    receiver's query input is then ln1 of that run's resid_pre[1], written into its hook_q (pre-rotary, pre
    q-norm) of a clean run, where the model's own rotary, q-norm, scale, soft-cap and window act."""
    bridge, (l_r, h_r) = run.model.bridge, RECEIVER
    x_c, x_x = torch.as_tensor(clean).long(), torch.as_tensor(corrupt).long()
    _, cc = bridge.run_with_cache(x_c, names_filter=["blocks.0.attn.hook_z", "blocks.0.hook_mlp_out"])
    _, xc = bridge.run_with_cache(x_x, names_filter=["blocks.0.attn.hook_z"])
    heads = [h for _, h in SENDERS]

    def corrupt_z(t: torch.Tensor, hook: Any) -> torch.Tensor:
        t = t.clone()
        t[:, :, heads] = xc["blocks.0.attn.hook_z"][:, :, heads]
        return t

    got: dict[str, torch.Tensor] = {}

    def grab(t: torch.Tensor, hook: Any) -> None:
        got["resid"] = t.clone()

    bridge.run_with_hooks(x_c, fwd_hooks=[("blocks.0.attn.hook_z", corrupt_z),
                                          ("blocks.0.hook_mlp_out", lambda t, hook: cc["blocks.0.hook_mlp_out"]),
                                          (f"blocks.{l_r}.hook_resid_pre", grab)])  # fmt: skip
    try:
        b_q = bridge.b_Q[l_r, h_r]
    except AttributeError:
        b_q = torch.zeros(bridge.cfg.d_head)
    q_new = _q_input(run, got["resid"]) @ bridge.W_Q[l_r, h_r].detach() + (0 if b_q is None else b_q.detach())

    def set_q(t: torch.Tensor, hook: Any) -> torch.Tensor:
        t = t.clone()
        t[:, :, h_r] = q_new
        return t

    def grab_pattern(t: torch.Tensor, hook: Any) -> None:
        got["pattern"] = t[:, h_r].clone()

    bridge.run_with_hooks(x_c, fwd_hooks=[(f"blocks.{l_r}.attn.hook_q", set_q),
                                          (f"blocks.{l_r}.attn.hook_pattern", grab_pattern)])  # fmt: skip
    return got["pattern"]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_path_patch_equals_online_patch(family: str, family_run: Callable[[str], Run]) -> None:
    run = family_run(family)
    clean, corrupt, res = run.ds, run.stores["abc"], run.results["path-patch-query"]
    assert isinstance(res, xr.Dataset)
    pattern = online_path_patch(run, clean["tokens"].values, corrupt["tokens"].values).numpy()
    b = np.arange(clean.sizes["batch"])
    end, io, s1 = (clean[c].values for c in ("end_pos", "io_pos", "s1_pos"))
    got_row = res["pattern_end_patched"].transpose("batch", "key_pos").values
    np.testing.assert_allclose(got_row, pattern[b, end], rtol=1e-4, atol=2e-6)
    np.testing.assert_allclose(res["patched"].values, pattern[b, end, io] - pattern[b, end, s1], rtol=1e-4, atol=2e-6)
    np.testing.assert_allclose(res["clean"].values, res["clean_stored"].values, rtol=1e-4, atol=2e-6)
    # the patch did something (IO and S1 can lie outside a sliding window: then only the row shows it)
    assert np.abs(res["pattern_end_patched"].values - res["pattern_end_clean"].values).max() > 1e-6


# ------------------------------------------------------------------------------------------------ the table

TABLE_START = (
    "<!-- families-table: generated by tests/test_families.py; regenerate with python -m tests.gen_families -->"
)
TABLE_END = "<!-- end of families-table -->"
TABLE_FIELDS = ("pattern", "v", "z", "result", "q", "k", "ln1_scale", "ln2_scale", "ln1_post_scale", "resid_pre")
LABELS = {"gpt2": "GPT-2", "llama": "Llama", "gpt-neox": "GPT-NeoX (Pythia)", "gpt-j": "GPT-J", "opt": "OPT",
          "gemma": "Gemma", "gemma-2": "Gemma-2", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral",
          "phi-3": "Phi-3", "olmo-2": "OLMo-2"}  # fmt: skip


def _traits(run: Run) -> str:
    cfg = run.ds.hs.config
    out = []
    if cfg.n_key_value_heads < cfg.n_heads:
        out.append("MQA" if cfg.n_key_value_heads == 1 else "GQA")
    if cfg.positional_embedding_type == "rotary":
        part = f" {cfg.d_rot}/{cfg.d_head}" if cfg.d_rot < cfg.d_head else ""
        out.append(f"rotary{part}" + (" interleaved" if cfg.rotary_style == "interleaved" else ""))
    if cfg.parallel_residual:
        out.append("parallel residual")
    if cfg.score_scale != cfg.d_head**-0.5:
        out.append("own attention scale")
    if cfg.attn_logit_softcap:
        out.append("attention soft-cap")
    if cfg.final_logit_softcap:
        out.append("final soft-cap")
    if cfg.sliding_window:
        every = len(cfg.sliding_window_layers) == cfg.n_layers
        out.append("sliding window" + ("" if every else " (some layers)"))
    if cfg.qk_norm:
        out.append("q/k norm" + (" (all heads)" if cfg.qk_norm == "full" else ""))
    if not cfg.pre_norm:
        out.append("no pre-norm")
    if cfg.post_norm:
        out.append("post-norm")
    return ", ".join(out) or "-"


def _field_cell(run: Run, name: str) -> str:
    if name in run.model.unrepresentable:
        return "-"
    hook = FIELDS[name].hook.replace("{L}", "0").replace("{rot_}", "rot_" if run.model.rotary else "")
    if name == "result" and not run.model.has_result_hook:
        return "z @ W_O"
    if hook not in run.model.hooks:
        return "from q, k + rotary" if name in ("q", "k") else "computed"
    return "hook"


def _analyzer_cell(run: Run, name: str) -> str:
    res = run.results[name]
    if isinstance(res, HeadstoreError):
        return f"refused: {res}"
    oracle = name in ORACLES or (name == "circuits" and run.family in BIAS_FREE)
    return "= oracle" if oracle else "runs"


def _markdown(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def support_table(runs: list[Run]) -> str:
    """docs/families.md's tables, from the matrix's runs (markdown): extraction, then analyzers."""
    names = list(analyzers())
    label = {r.family: f"{LABELS[r.family]} (`{r.arch}`)" for r in runs}
    fields = []
    for run in runs:
        logits = (
            "= HF through its soft-cap" if run.ds.hs.config.final_logit_softcap else "= HF (+ constant per position)"
        )
        fields.append([label[run.family], _traits(run), logits, *(_field_cell(run, f) for f in TABLE_FIELDS)])
    table_a = _markdown(["family (architecture)", "non-linearities applied", "`ds.hs.logits()`", *TABLE_FIELDS], fields)
    table_b = _markdown(["family", *names], [[LABELS[r.family], *(_analyzer_cell(r, n) for n in names)] for r in runs])
    notes = sorted({f"- `{f}` on {LABELS[r.family]}: {family_reason(r, f)}" for r in runs for f in r.model.unrepresentable
                    if f in TABLE_FIELDS and f != "ln1_post_scale"})  # fmt: skip
    return "\n".join([TABLE_START, "", *table_a, "", *notes, "", *table_b, "", TABLE_END])


def family_reason(run: Run, name: str) -> str:
    return f"the model {run.model.unrepresentable[name]}"


def test_support_table_in_docs(family_run: Callable[[str], Run]) -> None:
    table = support_table([family_run(f) for f in TINY_FAMILIES])
    text = DOCS.read_text(encoding="utf-8") if DOCS.exists() else ""
    if os.environ.get(WRITE_ENV):
        if TABLE_START in text and TABLE_END in text:
            text = text[: text.index(TABLE_START)] + table + text[text.index(TABLE_END) + len(TABLE_END) :]
        else:
            text = text + "\n" + table + "\n"
        DOCS.write_text(text, encoding="utf-8")
    assert TABLE_START in text and TABLE_END in text, "docs/families.md lacks the table: python -m tests.gen_families"
    got = text[text.index(TABLE_START) : text.index(TABLE_END) + len(TABLE_END)]
    assert got == table, "docs/families.md's table is out of date: regenerate it with python -m tests.gen_families"
