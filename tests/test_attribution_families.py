"""``extract --grad`` across the family matrix (docs/families.md): on each tiny family model, the stored gradients,
the receivers' q/k/v input gradients rebuilt from them, attribution patching and edge attribution against live
TransformerLens autograd (the references of tests/test_attribution.py); the families it refuses, refused."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_attribution import METRIC, _close, _online_eap, live_run

import headstore
from headstore.analyze import attribution_patching, edge_attribution
from headstore.analyze._attribution_patching import head_input_grads
from headstore.extract import ExtractRequest, extract
from headstore.store_schema import HeadstoreError

SERVED = ("gpt-neox", "gemma", "qwen2", "qwen3", "mistral", "phi-3")  # + gpt2, llama above (tiny-gpt2, tiny-llama)
POST_NORM = ("gemma-2", "olmo-2")  # gradients and AtP; edge attribution refused
REFUSED = {"gpt-j": "feeds its MLP from ln1", "opt": "no split q/k/v inputs"}


@pytest.fixture(scope="module")
def family_folder(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    from headstore.extract.tiny import build_family, build_tokenizer

    root = tmp_path_factory.mktemp("grad-families")

    def get(family: str) -> Path:
        if not (root / "tok").exists():
            build_tokenizer(root / "tok")
        if not (root / family).exists():
            build_family(family, root / family, root / "tok")
        return root / family

    return get


@pytest.mark.parametrize("family", SERVED)
def test_family_grads_and_eap_equal_live(family: str, family_folder: Callable[[str], Path], tmp_path: Path) -> None:
    """Per family: stored gradients (z, mlp_in, final residual), the receivers' rebuilt q/k/v input gradients and
    EAP against live autograd (GQA, rotary partial or not, parallel residual, Gemma's scaled embedding)."""
    from headstore.extract.models import load_model

    folder = family_folder(family)
    kw: dict[str, Any] = {"n_seq": 4, "batch_size": 4, "progress": False, "device": "cpu", "seed": 1}
    extract(ExtractRequest(model=str(folder), data="ioi", out=str(tmp_path / "c.zarr"), grad=METRIC, **kw))
    extract(
        ExtractRequest(
            model=str(folder), data="ioi-abc", out=str(tmp_path / "k.zarr"), fields=("default", "resid_pre"), **kw
        )
    )
    clean, corrupt = headstore.open_store(tmp_path / "c.zarr"), headstore.open_store(tmp_path / "k.zarr")
    m = load_model(str(folder), "cpu")
    _, grads = live_run(m, np.asarray(clean["tokens"].values), clean)
    n_layers, layer_norm = m.bridge.cfg.n_layers, clean.hs.config.normalization_type == "LN"
    resid_pre, scale = np.asarray(clean["resid_pre"].values), np.asarray(clean["ln1_scale"].values)
    for L in range(n_layers):
        _close(np.asarray(clean["grad_z"].isel(layer=L).values), grads[f"blocks.{L}.attn.hook_z"].numpy(), 1e-5)
        _close(np.asarray(clean["grad_mlp_in"].isel(layer=L).values), grads[f"blocks.{L}.hook_mlp_in"].numpy(), 1e-5)
        for which in "qkv":
            w, g = (np.asarray(clean[f"{n}"].isel(layer=L).values) for n in (f"W_{which.upper()}", f"grad_{which}"))
            got = np.stack([head_input_grads(g[b], w, resid_pre[b, L], scale[b, L], layer_norm) for b in range(len(g))])
            _close(got, grads[f"blocks.{L}.hook_{which}_input"].numpy(), 1e-5)
    _close(np.asarray(clean["grad_resid_final"].values), grads[f"blocks.{n_layers - 1}.hook_resid_post"].numpy(), 1e-5)
    res = edge_attribution(clean, corrupt)
    edge = res["edge"].values
    _close(res["score"].values[edge], _online_eap(m, clean, corrupt)[edge], 1e-5)
    _close(attribution_patching(clean, corrupt)["score"].values, _online_atp(m, clean, corrupt), 1e-5)


def _online_atp(m: Any, clean: Any, corrupt: Any) -> np.ndarray:
    acts, grads = live_run(m, np.asarray(clean["tokens"].values), clean)
    bad, _ = live_run(m, np.asarray(corrupt["tokens"].values))
    z = [f"blocks.{L}.attn.hook_z" for L in range(m.bridge.cfg.n_layers)]
    return np.stack([((bad[n] - acts[n]) * grads[n]).sum((1, 3)).mean(0).numpy() for n in z])


@pytest.mark.parametrize("family", POST_NORM)
def test_post_norm_family_grads_and_atp(family: str, family_folder: Callable[[str], Path], tmp_path: Path) -> None:
    """Post-norm families (Gemma-2, OLMo-2, whose q/k norm comes after hook_q): the stored gradients and AtP equal
    the live ones; edge attribution is refused (a head's result is not what it adds to the residual)."""
    from headstore.extract.models import load_model

    folder = family_folder(family)
    kw: dict[str, Any] = {"n_seq": 4, "batch_size": 4, "progress": False, "device": "cpu", "seed": 1}
    extract(ExtractRequest(model=str(folder), data="ioi", out=str(tmp_path / "c.zarr"), grad=METRIC, **kw))
    extract(ExtractRequest(model=str(folder), data="ioi-abc", out=str(tmp_path / "k.zarr"), **kw))
    clean, corrupt = headstore.open_store(tmp_path / "c.zarr"), headstore.open_store(tmp_path / "k.zarr")
    m = load_model(str(folder), "cpu")
    _, grads = live_run(m, np.asarray(clean["tokens"].values), clean)
    for name, hook in (("grad_z", "attn.hook_z"), ("grad_mlp_in", "hook_mlp_in")):
        for L in range(m.bridge.cfg.n_layers):
            _close(np.asarray(clean[name].isel(layer=L).values), grads[f"blocks.{L}.{hook}"].numpy(), 1e-5)
    _close(attribution_patching(clean, corrupt)["score"].values, _online_atp(m, clean, corrupt), 1e-5)
    with pytest.raises(HeadstoreError, match=r"post-norm.*attribution_patching scores its heads"):
        edge_attribution(clean, corrupt)


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_family_refused_with_grad(family: str, family_folder: Callable[[str], Path], tmp_path: Path) -> None:
    out = tmp_path / "c.zarr"
    with pytest.raises(HeadstoreError, match=rf"^--grad: .*{re.escape(REFUSED[family])}.*extract without --grad$"):
        extract(ExtractRequest(model=str(family_folder(family)), data="ioi", out=str(out), grad=METRIC, n_seq=4,
                               progress=False, device="cpu"))  # fmt: skip
    assert not out.exists()
