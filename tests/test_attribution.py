"""Gradients at extraction (``extract --grad``), attribution patching and edge attribution, against the live model:
every reference below is TransformerLens autograd on the live bridge (``use_split_qkv_input`` for the receivers'
own inputs, ``hook_mlp_in``, ``hook_result`` and ``hook_mlp_out`` for the senders), never the code it checks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import headstore
from headstore.analyze import attribution_patching, edge_attribution, top_edges
from headstore.analyze._attribution_patching import head_input_grads
from headstore.extract import ExtractRequest, extract
from headstore.extract.grad import GradMetric, parse_metric, resolve_metric
from headstore.store_schema import HeadstoreError, validate

MODELS = ("tiny-gpt2", "tiny-llama")
METRIC = "logit-diff:io_token,s_token@end_pos"
KW: dict[str, Any] = {"n_seq": 6, "batch_size": 4}  # a short last batch


@pytest.fixture(scope="module")
def pair(make_store: Callable[..., Path]) -> Callable[[str], tuple[Any, Any]]:
    def get(model: str) -> tuple[Any, Any]:
        clean = make_store(model, "ioi", grad=METRIC, **KW)
        corrupt = make_store(model, "ioi-abc", fields=("default", "resid_pre"), **KW)
        return headstore.open_store(clean), headstore.open_store(corrupt)

    return get


@contextmanager
def _live_mode(bridge: Any) -> Iterator[None]:
    """Split q/k/v inputs, hook_mlp_in and per-head results on (where the bridge has them), as they were after."""
    names = ("split_qkv_input", "hook_mlp_in", "attn_result")
    was = {n: bool(getattr(bridge.cfg, f"use_{n}", False)) for n in names}
    try:
        for n in names:
            with suppress(NotImplementedError):
                getattr(bridge, f"set_use_{n}")(True)
        yield
    finally:
        for n in names:
            with suppress(NotImplementedError):
                getattr(bridge, f"set_use_{n}")(was[n])


def live_run(
    model: Any, toks: np.ndarray, ds: Any | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Activations of the live bridge on ``toks`` and, when ``ds`` (the clean store, for its IOI columns) is given,
    the gradients of sum_b logit[end, IO] - logit[end, S] at every hook, by autograd."""
    bridge = model.bridge
    n_layers = bridge.cfg.n_layers
    per_layer = ("attn.hook_z", "attn.hook_result", "hook_q_input", "hook_k_input", "hook_v_input", "hook_mlp_in",
                 "hook_mlp_out", "hook_resid_pre")  # fmt: skip
    if not model.has_result_hook:  # GPT-J, OPT: the per-head result is z @ W_O (_online_eap)
        per_layer = tuple(h for h in per_layer if h != "attn.hook_result")
    names = [f"blocks.{L}.{h}" for L in range(n_layers) for h in per_layer] + [f"blocks.{n_layers - 1}.hook_resid_post"]
    acts: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}

    def keep(t: torch.Tensor, hook: Any, name: str) -> torch.Tensor:
        acts[name] = t
        if t.requires_grad:
            t.register_hook(lambda g: grads.__setitem__(name, g))
        return t

    x = torch.as_tensor(toks, dtype=torch.long)
    with _live_mode(bridge):
        logits = bridge.run_with_hooks(x, fwd_hooks=[(n, lambda t, hook, n=n: keep(t, hook, n)) for n in names])
        if ds is not None:
            b = torch.arange(x.shape[0])
            end, io, s = (
                torch.as_tensor(np.asarray(ds[c].values), dtype=torch.long) for c in ("end_pos", "io_token", "s_token")
            )
            (logits[b, end, io] - logits[b, end, s]).sum().backward()
    return {k: v.detach() for k, v in acts.items()}, grads


def _close(got: np.ndarray, want: np.ndarray, rel: float) -> float:
    """max |got - want| / max |want|, asserted below ``rel``."""
    err = float(np.abs(got - want).max() / np.abs(want).max())
    assert err < rel, err
    return err


@pytest.mark.parametrize("model", MODELS)
def test_stored_grads_equal_live_autograd(model: str, pair: Any, live_model: Any) -> None:
    clean, _ = pair(model)
    m = live_model(model)
    toks = np.asarray(clean["tokens"].values)
    acts, grads = live_run(m, toks, clean)
    n_layers = m.bridge.cfg.n_layers
    layer_norm = clean.hs.config.normalization_type == "LN"
    resid_pre = np.asarray(clean["resid_pre"].values)
    scale = np.asarray(clean["ln1_scale"].values)
    for L in range(n_layers):
        _close(np.asarray(clean["grad_z"].isel(layer=L).values), grads[f"blocks.{L}.attn.hook_z"].numpy(), 1e-5)
        _close(np.asarray(clean["grad_mlp_in"].isel(layer=L).values), grads[f"blocks.{L}.hook_mlp_in"].numpy(), 1e-5)
        np.testing.assert_allclose(resid_pre[:, L], acts[f"blocks.{L}.hook_resid_pre"].numpy(), atol=1e-5)
        for which in "qkv":  # the receivers' own inputs, rebuilt through ln1 from the head-space gradients
            w = np.asarray(clean[f"W_{which.upper()}"].isel(layer=L).values)
            g = np.asarray(clean[f"grad_{which}"].isel(layer=L).values)
            got = np.stack([head_input_grads(g[b], w, resid_pre[b, L], scale[b, L], layer_norm) for b in range(len(g))])
            want = grads[f"blocks.{L}.hook_{which}_input"].numpy()
            assert got.shape == want.shape  # (batch, pos, kv_head, d_model) for k and v on the GQA model
            _close(got, want, 1e-5)
    final = grads[f"blocks.{n_layers - 1}.hook_resid_post"].numpy()
    _close(np.asarray(clean["grad_resid_final"].values), final, 1e-5)


@pytest.mark.parametrize("model", MODELS)
def test_attribution_patching_equals_online_atp(model: str, pair: Any, live_model: Any) -> None:
    clean, corrupt = pair(model)
    m = live_model(model)
    acts, grads = live_run(m, np.asarray(clean["tokens"].values), clean)
    bad, _ = live_run(m, np.asarray(corrupt["tokens"].values))
    n_layers = m.bridge.cfg.n_layers
    online = np.stack([
        ((bad[f"blocks.{L}.attn.hook_z"] - acts[f"blocks.{L}.attn.hook_z"]) * grads[f"blocks.{L}.attn.hook_z"])
        .sum((1, 3)).mean(0).numpy()
        for L in range(n_layers)
    ])  # fmt: skip
    res = attribution_patching(clean, corrupt, per_position=True)
    assert res["score"].dims == ("layer", "head") and res["per_position"].dims == ("layer", "head", "pos")
    _close(res["score"].values, online, 1e-5)
    np.testing.assert_allclose(res["per_position"].sum("pos").values, res["score"].values, rtol=1e-5, atol=1e-9)
    assert res.attrs["metric"] == METRIC


def _online_eap(m: Any, clean: Any, corrupt: Any) -> np.ndarray:
    """EAP from live runs: senders the embeddings, live ``hook_result`` and ``hook_mlp_out``; receivers the live
    gradients at ``hook_q/k/v_input``, ``hook_mlp_in`` and the final residual; ``(sender, receiver)``."""
    acts, grads = live_run(m, np.asarray(clean["tokens"].values), clean)
    bad, _ = live_run(m, np.asarray(corrupt["tokens"].values))
    n_layers = m.bridge.cfg.n_layers
    d = {k: bad[k] - acts[k] for k in acts}
    send = [d["blocks.0.hook_resid_pre"][:, :, None]]
    recv = []
    for L in range(n_layers):
        result = d.get(f"blocks.{L}.attn.hook_result")
        if result is None:
            result = torch.einsum("bphe,hem->bphm", d[f"blocks.{L}.attn.hook_z"], m.bridge.W_O[L].detach())
        send += [result, d[f"blocks.{L}.hook_mlp_out"][:, :, None]]
        recv += [grads[f"blocks.{L}.hook_{w}_input"] for w in "qkv"] + [grads[f"blocks.{L}.hook_mlp_in"][:, :, None]]
    recv.append(grads[f"blocks.{n_layers - 1}.hook_resid_post"][:, :, None])
    s, r = torch.cat(send, 2).double(), torch.cat(recv, 2).double()
    return (torch.einsum("bpsd,bprd->sr", s, r) / s.shape[0]).numpy()


@pytest.mark.parametrize("model", MODELS)
def test_edge_attribution_equals_online_eap(model: str, pair: Any, live_model: Any) -> None:
    clean, corrupt = pair(model)
    m = live_model(model)
    res = edge_attribution(clean, corrupt)
    online = _online_eap(m, clean, corrupt)
    edge = res["edge"].values
    got = res["score"].values
    assert np.isnan(got[~edge]).all() and not np.isnan(got[edge]).any()
    _close(got[edge], online[edge], 1e-5)
    cfg = clean.hs.config
    names = list(res["receiver"].values)
    assert names[-1] == "logits" and "m1" in names and "a1.h3<q>" in names
    assert ("a1.kv1<k>" in names) == (cfg.n_key_value_heads < cfg.n_heads)
    assert not edge[list(res["sender"].values).index("a1.h0"), names.index("a1.h2<q>")]  # same layer: no edge
    assert edge[list(res["sender"].values).index("a1.h0"), names.index("m1")]  # sequential blocks
    top = top_edges(res, 5)
    assert (
        top.sizes["edge"] == 5
        and str(top["edge"].values[0]) == f"{top['sender'].values[0]}->{top['receiver'].values[0]}"
    )
    assert abs(float(top["score"][0])) == pytest.approx(float(np.nanmax(np.abs(got))))


def test_metric_grammar() -> None:
    assert parse_metric("loss") == GradMetric("loss")
    m = parse_metric("logit-diff:io_token,s_token@end_pos")
    assert (
        m == GradMetric("logit-diff", ("io_token", "s_token"), "end_pos")
        and str(m) == "logit-diff:io_token,s_token@end_pos"
    )
    assert parse_metric("logit:5@-1") == GradMetric("logit", (5,), -1)
    for bad in ("logits:5@-1", "logit:5", "logit-diff:5@3", "logit:-5@3", "logit:5@", "loss:1", "logit:a b@1"):
        with pytest.raises(HeadstoreError, match="expected loss, logit:TOK@POS"):
            parse_metric(bad)
    toks = np.zeros((2, 5), np.int32)
    cols = {"length": np.array([5, 3]), "io_token": np.array([1, 2])}
    t = resolve_metric(parse_metric("logit:io_token@-1"), toks, cols, 10)
    assert t.pos.tolist() == [4, 2] and t.tok[:, 0].tolist() == [1, 2]
    with pytest.raises(HeadstoreError, match="column 'end_pos', which this data lacks"):
        resolve_metric(parse_metric("logit:3@end_pos"), toks, cols, 10)
    with pytest.raises(HeadstoreError, match="position 4 is outside sequence 1"):
        resolve_metric(parse_metric("logit:3@4"), toks, cols, 10)
    with pytest.raises(HeadstoreError, match="outside the vocabulary"):
        resolve_metric(parse_metric("logit:30@0"), toks, cols, 10)


def test_bad_input(pair: Any, make_store: Callable[..., Path], tmp_path: Path) -> None:
    clean, corrupt = pair("tiny-gpt2")
    assert validate(make_store("tiny-gpt2", "ioi", grad=METRIC, **KW)).ok  # every gradient chunk's checksum
    with pytest.raises(HeadstoreError, match=r"the clean store holds no gradients .*pass the clean store first"):
        attribution_patching(corrupt, clean)
    loss = headstore.open_store(make_store("tiny-gpt2", "ioi-abc", grad="loss", **KW))
    with pytest.raises(HeadstoreError, match="gradients of different metrics"):
        edge_attribution(clean, loss)
    with pytest.raises(HeadstoreError, match="differ in batch size"):
        attribution_patching(clean, headstore.open_store(make_store("tiny-gpt2", "ioi-abc", n_seq=4, batch_size=4)))
    with pytest.raises(HeadstoreError, match=r"differ in model\.name"):
        attribution_patching(clean, headstore.open_store(make_store("tiny-llama", "ioi-abc", **KW)))
    with pytest.raises(HeadstoreError):
        attribution_patching(clean, corrupt.isel(batch=[0, 1, 2, 3, 5, 4]))
    with pytest.raises(HeadstoreError, match="needs every layer"):
        edge_attribution(clean.sel(layer=[1]), corrupt.sel(layer=[1]))
    with pytest.raises(HeadstoreError, match=r"lacks.*resid_pre"):
        edge_attribution(clean, headstore.open_store(make_store("tiny-gpt2", "ioi-abc", **KW)))
    out = tmp_path / "x.zarr"
    for grad, msg in (("logit:io_token@name_pos", "column 'name_pos'"), ("logit:3@40", "position 40 is outside"),
                      ("logit-diff:1@2", "expected loss")):  # fmt: skip
        with pytest.raises(HeadstoreError, match=msg):
            extract(
                ExtractRequest(
                    model="tiny-gpt2", data="ioi", out=str(out), grad=grad, progress=False, device="cpu", **KW
                )
            )
        assert not out.exists()
    with pytest.raises(HeadstoreError, match="extract with --grad METRIC"):
        extract(
            ExtractRequest(
                model="tiny-gpt2", data="ioi", out=str(out), fields=("default", "grad_z"), device="cpu", **KW
            )
        )


def test_cli_grad_dry_run_counts_the_gradients(tmp_path: Path, make_store: Callable[..., Path]) -> None:
    from typer.testing import CliRunner

    from headstore.cli import app

    args = ["extract", "--model", "tiny-gpt2", "--data", "ioi", "--out", str(tmp_path / "s.zarr"), "--n-seq", "4",
            "--device", "cpu", "--no-progress", "--dry-run", "--grad", METRIC]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert all(name in res.output for name in ("grad_z", "grad_q", "grad_k", "grad_v", "grad_mlp_in", "resid_pre"))
    assert not (tmp_path / "s.zarr").exists()
    res = CliRunner().invoke(app, ["info", str(make_store("tiny-gpt2", "ioi", grad=METRIC, **KW))])
    assert res.exit_code == 0 and f"gradients  of {METRIC}" in res.output
    res = CliRunner().invoke(app, [*args[:-1], "logit:io_token@nowhere"])
    assert res.exit_code != 0 and "column 'nowhere', which this data lacks" in res.output


def test_api_conventions(pair: Any) -> None:
    """Lazy until .compute(), plain attrs, and the one-line refusal of a Dataset whose layer dim was dropped."""
    clean, corrupt = pair("tiny-gpt2")
    for name, func in (("attribution-patching", attribution_patching), ("edge-attribution", edge_attribution)):
        res = func(clean, corrupt)
        assert res.attrs["analyzer"] == name and all(isinstance(v, str | int | float) for v in res.attrs.values())
        assert res["score"].chunks is not None, "lazy until .compute()"
        for given in ((clean.sel(layer=1), corrupt), (clean, corrupt.sel(layer=1))):
            with pytest.raises(HeadstoreError) as e:
                func(*given)
            want = f"{name}: ds has no layer dimension (selecting one layer drops it): keep it with ds.sel(layer=[1])"
            assert str(e.value) == want


def test_loss_metric_grads_equal_live_autograd(make_store: Callable[..., Path], live_model: Any) -> None:
    """``--grad loss``: the sum of each sequence's next-token losses over its real positions (right-padded IOI,
    so the pads' predictions are left out), against torch's cross-entropy on the live logits."""
    store = headstore.open_store(make_store("tiny-gpt2", "ioi-abc", grad="loss", **KW))
    assert store.hs.provenance.grad == "loss"
    m = live_model("tiny-gpt2")
    toks = torch.as_tensor(np.asarray(store["tokens"].values), dtype=torch.long)
    length = np.asarray(store["length"].values)
    assert (length < toks.shape[1]).any(), "some sequences are padded"
    z: dict[str, torch.Tensor] = {}

    def keep(t: torch.Tensor, hook: Any) -> torch.Tensor:
        z[hook.name] = t
        t.retain_grad()
        return t

    logits = m.bridge.run_with_hooks(toks, fwd_hooks=[(lambda n: n.endswith("attn.hook_z"), keep)])
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), toks[:, 1:], reduction="none")
    real = torch.arange(toks.shape[1] - 1)[None] + 1 < torch.as_tensor(length)[:, None]
    (nll * real).sum().backward()
    got = np.asarray(store["grad_z"].values)
    want = np.stack([z[f"blocks.{L}.attn.hook_z"].grad.numpy() for L in range(2)], axis=1)
    _close(got, want, 1e-5)


def test_float16_store_holds_the_gradients_rounded(make_store: Callable[..., Path], pair: Any) -> None:
    clean, _ = pair("tiny-llama")
    half = headstore.open_store(make_store("tiny-llama", "ioi", grad=METRIC, dtype="float16", **KW))
    for name in ("grad_z", "grad_q", "grad_k", "grad_v", "grad_mlp_in", "grad_resid_final"):
        assert half[name].dtype == np.float16
        _close(np.asarray(half[name].values, np.float32), np.asarray(clean[name].values), 2e-3)


def test_grad_store_fills_by_shards_and_resumes(pair: Any, tmp_path: Path) -> None:
    """Two shard runs into one store (the second a resume of the same command) give the one-run store's gradients;
    resuming with another metric is refused."""
    clean, _ = pair("tiny-gpt2")
    out = tmp_path / "s.zarr"
    kw: dict[str, Any] = {**KW, "progress": False, "device": "cpu", "grad": METRIC}
    for shard in ((1, 2), (0, 2)):
        extract(ExtractRequest(model="tiny-gpt2", data="ioi", out=str(out), shard=shard, **kw))
    ds = headstore.open_store(out)
    for name in ("grad_z", "grad_q", "grad_k", "grad_v", "grad_mlp_in", "grad_resid_final", "resid_pre"):
        np.testing.assert_array_equal(ds[name].values, clean[name].values)
    with pytest.raises(HeadstoreError, match="different grad"):
        extract(ExtractRequest(model="tiny-gpt2", data="ioi", out=str(out), **{**kw, "grad": "loss"}))


def test_tables_and_figures(pair: Any, tmp_path: Path) -> None:
    from headstore.report import attribution_figures as F

    clean, corrupt = pair("tiny-llama")
    atp = attribution_patching(clean, corrupt).compute()
    table = F.attribution_patching_summary(atp)
    assert len(table) == 8 and abs(table["score"].iloc[0]) == pytest.approx(float(np.abs(atp["score"]).max()))
    eap = edge_attribution(clean, corrupt).compute()
    edges = F.edge_attribution_summary(eap, 5)
    assert list(edges.columns) == ["edge", "sender", "receiver", "score"] and len(edges) == 5
    paths = F.attribution_patching_plot(atp, tmp_path) + F.edge_attribution_plot(eap, tmp_path)
    assert [p.suffix for p in paths] == [".png", ".html", ".png", ".html"] and all(p.stat().st_size > 0 for p in paths)


def test_main_job_exact_patching_equals_live_hook_result_patching(pair: Any, live_model: Any) -> None:
    """The census's exact activation patching (``hook_z`` of one head from the ABC run) equals patching that head's
    ``hook_result`` (z_h @ W_O[h], per-head outputs on) from the ABC run, written here on the live bridge, with
    M = logit[IO] - logit[S] at END read off the logits here too."""
    from headstore.pipeline.census_attribution import exact_patching

    clean, corrupt = pair("tiny-gpt2")
    m = live_model("tiny-gpt2")
    bridge, heads = m.bridge, [(0, 1), (1, 2)]
    exact, m_clean = exact_patching(m, clean, corrupt, heads, METRIC, batch_size=4)  # 6 prompts: a short last batch
    x, xc = (torch.as_tensor(np.asarray(ds["tokens"].values)) for ds in (clean, corrupt))
    b, end = torch.arange(x.shape[0]), torch.as_tensor(np.asarray(clean["end_pos"].values, np.int64))
    io, s = (torch.as_tensor(np.asarray(clean[c].values, np.int64)) for c in ("io_token", "s_token"))

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[b, end, io] - logits[b, end, s]

    with _live_mode(bridge), torch.no_grad():
        _, bad = bridge.run_with_cache(xc, names_filter=lambda n: n.endswith("attn.hook_result"))
        base = metric(bridge(x, return_type="logits"))
        want = []
        for L, h in heads:

            def swap(r: torch.Tensor, hook: Any, L: int = L, h: int = h) -> torch.Tensor:
                r = r.clone()
                r[:, :, h] = bad[f"blocks.{L}.attn.hook_result"][:, :, h]
                return r

            patched = bridge.run_with_hooks(x, fwd_hooks=[(f"blocks.{L}.attn.hook_result", swap)])
            want.append(float((metric(patched) - base).mean()))
    assert m_clean == pytest.approx(float(base.mean()), rel=1e-5)
    np.testing.assert_allclose(exact, want, rtol=1e-3, atol=1e-7)
    assert np.abs(np.asarray(want)).min() > 1e-5  # the heads do move M: the comparison is not of zeros
