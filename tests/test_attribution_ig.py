"""EAP-IG from the store (``extract --grad METRIC --grad-ig STEPS --corrupt DATA``) against EAP-IG computed online
on the live bridge the way hannamw/EAP-IG does it: the token embeddings (``hook_embed``) moved from the corrupt to
the clean ones in m steps (k = 0..m-1), the gradients at the receivers' own inputs (split q/k/v inputs,
``hook_mlp_in``, the final residual) and at ``hook_z`` averaged over the steps, and the senders' deltas from live
clean and corrupt runs. Nothing below reuses the code it checks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_attribution import _live_mode  # split q/k/v inputs on, as in the plain-gradient tests

import headstore
from headstore.analyze import attribution_patching, edge_attribution
from headstore.extract import ExtractRequest, extract
from headstore.store_schema import HeadstoreError, Provenance, validate

METRIC = "logit-diff:io_token,s_token@end_pos"
STEPS = 3
KW: dict[str, Any] = {"n_seq": 3, "batch_size": 2}  # a short last batch
IG: dict[str, Any] = {"grad": METRIC, "grad_ig": STEPS, "corrupt": "ioi-abc", **KW}


@pytest.fixture(scope="module")
def ig_pair(make_store: Callable[..., Path]) -> Callable[[str], tuple[Any, Any]]:
    def get(model: str) -> tuple[Any, Any]:
        clean = make_store(model, "ioi", **IG)
        corrupt = make_store(model, "ioi-abc", fields=("default", "resid_pre"), **KW)
        return headstore.open_store(clean), headstore.open_store(corrupt)

    return get


def _hooks(n_layers: int) -> list[str]:
    per = ("attn.hook_z", "attn.hook_result", "hook_q_input", "hook_k_input", "hook_v_input", "hook_mlp_in",
           "hook_mlp_out", "hook_resid_pre")  # fmt: skip
    return [f"blocks.{L}.{h}" for L in range(n_layers) for h in per] + [f"blocks.{n_layers - 1}.hook_resid_post"]


def _run(bridge: Any, toks: np.ndarray, embed: torch.Tensor | None, cols: Any | None) -> tuple[dict, dict]:
    """Activations at every hook and, with ``cols`` (the store's IOI columns), the gradients of sum_b
    logit[end, IO] - logit[end, S]; ``embed`` replaces ``hook_embed``'s output (EAP-IG's interpolated input)."""
    acts: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}

    def keep(t: torch.Tensor, name: str) -> torch.Tensor:
        acts[name] = t
        if t.requires_grad:
            t.register_hook(lambda g: grads.__setitem__(name, g))
        return t

    fwd: list[tuple[str, Any]] = [(n, lambda t, hook, n=n: keep(t, n)) for n in _hooks(bridge.cfg.n_layers)]
    if embed is not None:
        fwd.append(("hook_embed", lambda t, hook: embed.clone().requires_grad_(True)))
    x = torch.as_tensor(toks, dtype=torch.long)
    with _live_mode(bridge):
        logits = bridge.run_with_hooks(x, fwd_hooks=fwd)
        if cols is not None:
            b = torch.arange(x.shape[0])
            end, io, s = (torch.as_tensor(np.asarray(cols[c].values)) for c in ("end_pos", "io_token", "s_token"))
            (logits[b, end, io] - logits[b, end, s]).sum().backward()
    return {k: v.detach() for k, v in acts.items()}, grads


def _embeddings(bridge: Any, toks: np.ndarray) -> torch.Tensor:
    got: dict[str, torch.Tensor] = {}

    def keep(t: torch.Tensor, hook: Any) -> None:
        got["e"] = t.detach().clone()

    with torch.no_grad():
        bridge.run_with_hooks(torch.as_tensor(toks, dtype=torch.long), fwd_hooks=[("hook_embed", keep)])
    return got["e"]


def online_ig(m: Any, clean: Any, corrupt: Any) -> tuple[dict, dict, dict]:
    """(clean activations, corrupt activations, gradients averaged over the m points e' + (k/m)(e - e'),
    k = 0..m-1, of the token embeddings e (clean) and e' (corrupt))."""
    bridge = m.bridge
    toks, bad = np.asarray(clean["tokens"].values), np.asarray(corrupt["tokens"].values)
    e, e_bad = _embeddings(bridge, toks), _embeddings(bridge, bad)
    mean: dict[str, torch.Tensor] = {}
    for k in range(STEPS):
        _, grads = _run(bridge, toks, e_bad + (k / STEPS) * (e - e_bad), clean)
        for name, g in grads.items():
            mean[name] = mean.get(name, 0) + g.double() / STEPS
    acts, _ = _run(bridge, toks, None, None)
    acts_bad, _ = _run(bridge, bad, None, None)
    return acts, acts_bad, mean


def _close(got: np.ndarray, want: np.ndarray, rel: float) -> None:
    err = float(np.abs(got - want).max() / np.abs(want).max())
    assert err < rel, err


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_eap_ig_and_atp_ig_equal_online(model: str, ig_pair: Any, live_model: Any) -> None:
    clean, corrupt = ig_pair(model)
    m = live_model(model)
    acts, bad, g = online_ig(m, clean, corrupt)
    n_layers = m.bridge.cfg.n_layers
    d = {k: (bad[k] - acts[k]).double() for k in acts}
    send = [d["blocks.0.hook_resid_pre"][:, :, None]]
    recv = []
    for L in range(n_layers):
        send += [d[f"blocks.{L}.attn.hook_result"], d[f"blocks.{L}.hook_mlp_out"][:, :, None]]
        recv += [g[f"blocks.{L}.hook_{w}_input"] for w in "qkv"] + [g[f"blocks.{L}.hook_mlp_in"][:, :, None]]
    recv.append(g[f"blocks.{n_layers - 1}.hook_resid_post"][:, :, None])
    s, r = torch.cat(send, 2), torch.cat(recv, 2)
    online = (torch.einsum("bpsd,bprd->sr", s, r) / s.shape[0]).numpy()
    res = edge_attribution(clean, corrupt)
    edge = res["edge"].values
    _close(res["score"].values[edge], online[edge], 1e-5)
    assert res.attrs["grad_ig"] == STEPS and res.attrs["metric"] == METRIC

    atp = np.stack([(d[f"blocks.{L}.attn.hook_z"] * g[f"blocks.{L}.attn.hook_z"]).sum((1, 3)).mean(0).numpy()
                    for L in range(n_layers)])  # fmt: skip
    res = attribution_patching(clean, corrupt)
    _close(res["score"].values, atp, 1e-5)
    assert res.attrs["grad_ig"] == STEPS


def test_ig_store_is_a_store(ig_pair: Any, make_store: Callable[..., Path], tmp_path: Path) -> None:
    """Provenance, validate (every IG chunk's checksum), resume by shards, and --dry-run counting the IG fields;
    the IG scores differ from plain EAP's."""
    clean, corrupt = ig_pair("tiny-gpt2")
    prov = clean.hs.provenance
    assert prov.grad_ig == STEPS and prov.corrupt is not None and prov.corrupt.spec == "ioi-abc"
    assert prov.corrupt.sha256 == corrupt.hs.provenance.dataset.sha256
    assert clean["ig_resid_hat"].dims == ("batch", "layer", "ig_step", "pos", "d_model")
    assert clean.sizes["ig_step"] == STEPS and clean["ig_coef_k"].dims[-1] == "kv_head"
    assert validate(make_store("tiny-gpt2", "ioi", **IG)).ok
    out = tmp_path / "s.zarr"
    for shard in ((1, 2), (0, 2)):
        extract(ExtractRequest(model="tiny-gpt2", data="ioi", out=str(out), shard=shard, progress=False,
                               device="cpu", **IG))  # fmt: skip
    again = headstore.open_store(out)
    for name in ("grad_q", "grad_z", "ig_resid_hat", "ig_coef_v"):
        np.testing.assert_array_equal(again[name].values, clean[name].values)
    with pytest.raises(HeadstoreError, match="different grad_ig"):
        extract(ExtractRequest(model="tiny-gpt2", data="ioi", out=str(out), progress=False, device="cpu",
                               **{**IG, "grad_ig": 2}))  # fmt: skip
    plain = headstore.open_store(make_store("tiny-gpt2", "ioi", grad=METRIC, **KW))
    eap = edge_attribution(plain, corrupt)
    assert eap.attrs["grad_ig"] == 0
    assert not np.allclose(eap["score"].values, edge_attribution(clean, corrupt)["score"].values, equal_nan=True)

    from typer.testing import CliRunner

    from headstore.cli import app

    args = ["extract", "--model", "tiny-gpt2", "--data", "ioi", "--out", str(tmp_path / "d.zarr"), "--n-seq", "2",
            "--device", "cpu", "--no-progress", "--dry-run", "--grad", METRIC, "--grad-ig", "2", "--corrupt",
            "ioi-abc"]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert all(n in res.output for n in ("ig_resid_hat", "ig_coef_q", "grad_q")) and not (tmp_path / "d.zarr").exists()
    res = CliRunner().invoke(app, ["info", str(make_store("tiny-gpt2", "ioi", **IG))])
    assert res.exit_code == 0 and f"EAP-IG, {STEPS} steps from ioi-abc" in res.output


def test_bad_input(ig_pair: Any, make_store: Callable[..., Path], tmp_path: Path) -> None:
    out = tmp_path / "x.zarr"
    base: dict[str, Any] = {"model": "tiny-gpt2", "data": "ioi", "out": str(out), "device": "cpu", "progress": False}
    for kw, msg in (
        ({"grad": METRIC, "grad_ig": 3}, "--grad-ig needs --corrupt DATA"),
        ({"grad": METRIC, "corrupt": "ioi-abc"}, "give --grad-ig STEPS with it"),
        ({"grad_ig": 3, "corrupt": "ioi-abc"}, "give --grad METRIC with it"),
        ({"grad": METRIC, "grad_ig": 0, "corrupt": "ioi-abc"}, "positive number of steps"),
    ):
        with pytest.raises(HeadstoreError, match=msg):
            ExtractRequest(**base, **kw, **KW)
    npy = tmp_path / "short.npy"
    np.save(npy, np.ones((3, 7), np.int64))
    with pytest.raises(HeadstoreError, match=r"^--corrupt 'tokens:.*' gives 3 sequences of 7 tokens, --data 'ioi'"):
        extract(ExtractRequest(**base, grad=METRIC, grad_ig=2, corrupt=f"tokens:{npy}", **KW))
    assert not out.exists()
    with pytest.raises(HeadstoreError, match="an EAP-IG field: extract with --grad-ig"):
        extract(ExtractRequest(**base, grad=METRIC, fields=("default", "ig_resid_hat"), **KW))
    clean, _ = ig_pair("tiny-gpt2")
    attrs = clean.hs.provenance.to_dict()
    assert Provenance.from_dict(attrs) == clean.hs.provenance
    with pytest.raises(HeadstoreError, match="grad_ig and corrupt come together"):
        Provenance.from_dict({**attrs, "corrupt": None})
    other = headstore.open_store(make_store("tiny-gpt2", "ioi", grad=METRIC, **KW))  # the clean prompts
    with pytest.raises(HeadstoreError, match=r"EAP-IG gradients run from --corrupt 'ioi-abc', but the corrupt store"):
        edge_attribution(clean, other)
