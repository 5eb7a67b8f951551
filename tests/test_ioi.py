"""ioi / ioi_pair: logit diff and END->IO vs END->S1 attention recomputed from the store equal the live bridge."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import xarray as xr

from headstore.analyze import ioi, ioi_pair
from headstore.cli.registry import analyzers
from headstore.cli.run import run_analyzer
from headstore.report.figures import ioi_pair_plot, ioi_pair_summary
from headstore.store_schema import HeadstoreError, open_store

FIELDS = ("default", "resid_pre", "k", "q")
KW: dict[str, Any] = {"fields": FIELDS, "n_seq": 12, "batch_size": 4, "seed": 0}


def stores(make_store: Callable[..., Path], model: str) -> tuple[xr.Dataset, xr.Dataset]:
    return open_store(make_store(model, "ioi", **KW)), open_store(make_store(model, "ioi-abc", **KW))


def live_end_logit_diff(bridge: Any, tokens: np.ndarray, end: np.ndarray, io: np.ndarray, s: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        lg = bridge(torch.as_tensor(tokens, dtype=torch.long)).float()
    rows = torch.arange(len(end))
    at_end = lg[rows, torch.as_tensor(end)]
    return (at_end[rows, torch.as_tensor(io)] - at_end[rows, torch.as_tensor(s)]).numpy()


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_ioi_equals_live_model(make_store: Callable[..., Path], live_model: Callable[[str], Any], model: str) -> None:
    ds, _ = stores(make_store, model)
    r = ioi(ds).compute()
    bridge = live_model(model).bridge
    tokens = ds["tokens"].values
    end, io_pos, s1_pos = (ds[c].values.astype(int) for c in ("end_pos", "io_pos", "s1_pos"))
    want_ld = live_end_logit_diff(bridge, tokens, end, ds["io_token"].values, ds["s_token"].values)
    assert r["logit_diff"].dims == ("batch",)
    assert r["attn_diff"].dims == ("layer", "head", "batch")
    assert r.attrs["analyzer"] == "ioi"
    np.testing.assert_allclose(r["logit_diff"].values, want_ld, rtol=1e-4, atol=1e-5)
    assert float(r["logit_diff_mean"]) == pytest.approx(float(want_ld.mean()), rel=1e-4, abs=1e-5)

    n_layers = int(bridge.cfg.n_layers)
    names = [f"blocks.{L}.attn.hook_pattern" for L in range(n_layers)]
    with torch.inference_mode():
        _, cache = bridge.run_with_cache(torch.as_tensor(tokens, dtype=torch.long), names_filter=names)
    rows = np.arange(len(end))
    want = np.stack(
        [
            (cache[n][rows, :, end, io_pos] - cache[n][rows, :, end, s1_pos]).numpy()  # (batch, head)
            for n in names
        ],
        axis=1,
    )  # (batch, layer, head)
    got = r["attn_diff"].transpose("batch", "layer", "head").values
    assert np.abs(want).max() > 0  # a real signal, not all zeros
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r["attn_diff_mean"].transpose("layer", "head").values, want.mean(0), atol=1e-6)
    io_want = np.stack([cache[n][rows, :, end, io_pos].numpy() for n in names], axis=1).mean(0)
    np.testing.assert_allclose(r["attn_io_mean"].transpose("layer", "head").values, io_want, atol=1e-6)


def test_ioi_pair_scores_abc_with_ioi_names(make_store: Callable[..., Path], live_model: Callable[[str], Any]) -> None:
    a, b = stores(make_store, "tiny-llama")
    r = ioi_pair(a, b).compute()
    single = ioi(a).compute()
    assert r.attrs["analyzer"] == "ioi-pair"
    np.testing.assert_array_equal(r["attn_diff_ioi"].values, single["attn_diff"].values)
    np.testing.assert_array_equal(r["logit_diff_ioi"].values, single["logit_diff"].values)
    bridge = live_model("tiny-llama").bridge
    want = live_end_logit_diff(
        bridge, b["tokens"].values, b["end_pos"].values, a["io_token"].values, a["s_token"].values
    )
    np.testing.assert_allclose(r["logit_diff_abc"].values, want, rtol=1e-4, atol=1e-5)
    # The ABC prompt's tokens at IO/S1 are other names: its own columns differ from the IOI ones.
    assert not np.array_equal(b["io_token"].values, a["io_token"].values)
    # the ABC side is ioi on the ABC store at the IOI store's positions, scored with the IOI names
    abc = ioi(
        b, io=a["io_pos"], s1=a["s1_pos"], end=a["end_pos"], io_token=a["io_token"], s_token=a["s_token"]
    ).compute()
    for name in abc.data_vars:
        np.testing.assert_array_equal(r[f"{name}_abc"].values, abc[name].values, err_msg=str(name))
    # a second store is ioi_pair's job: ioi takes one (its options are keyword-only)
    with pytest.raises(TypeError):
        ioi(a, b)  # type: ignore[misc]


def test_ioi_summary_sorted_and_plots(make_store: Callable[..., Path], tmp_path: Path) -> None:
    spec = analyzers()["ioi"]
    assert spec.n_stores == 1
    table, paths = run_analyzer(spec, [str(make_store("tiny-gpt2", "ioi", **KW))], tmp_path, {})
    assert len(table) == 2 * 4
    col = table["attn_end_io"].to_numpy()
    assert (np.diff(col) <= 0).all()  # heads sorted by END->IO attention, highest first
    np.testing.assert_allclose(table["attn_diff"], table["attn_end_io"] - table["attn_end_s1"], atol=1e-6)
    names = {p.name for p in paths}
    assert {"result.zarr", "summary.csv", "ioi_attn_diff.png", "ioi_attn_diff.html"} <= names
    assert all(p.exists() and (p.is_dir() or p.stat().st_size > 0) for p in paths)
    saved = xr.open_zarr(tmp_path / "ioi" / "result.zarr", zarr_format=3, consolidated=False)
    assert saved["attn_diff"].dims == ("layer", "head", "batch")


def test_ioi_pair_summary_and_plot(make_store: Callable[..., Path], tmp_path: Path) -> None:
    a, b = stores(make_store, "tiny-gpt2")
    r = ioi_pair(a, b).compute()
    PAIR_SPEC = analyzers()["ioi-pair"]
    assert PAIR_SPEC.n_stores == 2 and PAIR_SPEC.name == "ioi-pair" and PAIR_SPEC.func is ioi_pair
    assert PAIR_SPEC.summary is ioi_pair_summary and PAIR_SPEC.plot is ioi_pair_plot
    t = ioi_pair_summary(r)
    assert (np.diff(t["attn_end_io_ioi"].to_numpy()) <= 0).all()
    assert {"attn_end_io_abc", "attn_diff_ioi", "attn_diff_abc", "logit_diff_abc"} <= set(t.columns)
    paths = ioi_pair_plot(r, tmp_path)
    assert [p.suffix for p in paths] == [".png", ".html"] and all(p.stat().st_size > 0 for p in paths)


def test_ioi_positions_and_tokens_as_arguments(make_store: Callable[..., Path]) -> None:
    """Positions and tokens default to the store's columns; ints, per-sequence arrays and negatives
    (counted back from each sequence's length) give the same numbers."""
    a, _ = stores(make_store, "tiny-gpt2")
    want = ioi(a).compute()
    cols = ("io_pos", "s1_pos", "end_pos", "io_token", "s_token")
    bare = a.drop_vars(list(cols))
    given = ioi(
        bare, io=a["io_pos"].values, s1=list(a["s1_pos"].values), end=a["end_pos"] - a["length"],
        io_token=a["io_token"], s_token=a["s_token"].values,
    ).compute()  # fmt: skip
    xr.testing.assert_equal(given.drop_attrs(), want.drop_attrs())
    # one int for every sequence
    one = ioi(a, end=int(a["end_pos"][0]), io=int(a["io_pos"][0]), s1=int(a["s1_pos"][0])).compute()
    first = ioi(a.isel(batch=[0])).compute()
    np.testing.assert_array_equal(one["attn_diff"].isel(batch=[0]).values, first["attn_diff"].values)
    # the logits are a BLAS product per block: one row alone may round differently from the batch (1 ulp)
    np.testing.assert_allclose(one["logit_diff"].isel(batch=[0]).values, first["logit_diff"].values, rtol=1e-6)


def test_ioi_refusals(make_store: Callable[..., Path]) -> None:
    a, b = stores(make_store, "tiny-gpt2")
    with pytest.raises(HeadstoreError, match=r"io was not given and this store has no 'io_pos' column: pass io="):
        ioi(a.drop_vars("io_pos"))
    with pytest.raises(HeadstoreError, match=r"io_token was not given .* no 'io_token' column"):
        ioi(a.drop_vars("io_token"))
    with pytest.raises(HeadstoreError, match=r"resid_final.*--fields default,resid_final"):
        ioi(a.drop_vars("resid_final"))
    with pytest.raises(HeadstoreError, match=r"end is outside sequence 0"):
        ioi(a, end=a.sizes["pos"])
    with pytest.raises(HeadstoreError, match=r"io must be an int or 12 integers"):
        ioi(a, io=[1, 2])
    with pytest.raises(HeadstoreError, match=r"s_token holds ids outside the vocabulary"):
        ioi(a, s_token=-1)
    with pytest.raises(HeadstoreError, match=r"takes token ids: write ds.hs.token_id\(' Mary'\)"):
        ioi(a, io_token=" Mary")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ioi(a, "some/path.zarr")  # type: ignore[misc]
    other, _ = stores(make_store, "tiny-llama")
    with pytest.raises(HeadstoreError, match=r"differ in model\.name"):
        ioi_pair(a, other)
    with pytest.raises(HeadstoreError, match="batch size"):
        ioi_pair(a, b.isel(batch=slice(0, 8)))
    shifted = b.assign(s1_pos=b["s1_pos"] + 1)
    with pytest.raises(HeadstoreError, match=r"s1_pos differ.*not aligned"):
        ioi_pair(a, shifted)


def test_key_positions_after_end_are_refused(make_store: Callable[..., Path]) -> None:
    """Attention from END is causal: an io or s1 after end would read an exact 0, so it is refused per sequence."""
    a, b = stores(make_store, "tiny-gpt2")
    end, length = a["end_pos"].values, a["length"].values
    assert (length > 12).all()
    with pytest.raises(
        HeadstoreError, match=r"^io \(12\) is after end \(5\) in sequence 0: attention from end cannot reach it"
    ):
        ioi(a, io=12, s1=2, end=5)
    with pytest.raises(HeadstoreError, match=r"^s1 \(12\) is after end \(5\) in sequence 0"):
        ioi_pair(a, b, io=2, s1=12, end=5)
    io = a["io_pos"].values
    early = end.copy()
    early[3] = io[3] - 1  # one sequence only, named
    with pytest.raises(HeadstoreError, match=rf"^io \({io[3]}\) is after end \({io[3] - 1}\) in sequence 3: ") as e:
        ioi(a, end=early)
    assert "\n" not in str(e.value)
    with pytest.raises(HeadstoreError, match=r"in sequence 3: "):  # named by its number in the store
        ioi(a.isel(batch=[1, 3]), end=early[[1, 3]])
    # a key at the query position itself is allowed: the token attends to itself
    at_end = ioi(a, io=a["end_pos"]).compute()
    pattern = a["pattern"].values  # (batch, layer, head, query_pos, key_pos)
    rows = np.arange(len(end))
    want = pattern[rows, :, :, end, end] - pattern[rows, :, :, end, a["s1_pos"].values]
    np.testing.assert_allclose(at_end["attn_diff"].transpose("batch", "layer", "head").values, want, rtol=1e-6)


def test_pairing_refusals_name_what_differs(make_store: Callable[..., Path]) -> None:
    """Same model, other --layers: blamed on the layers (the weights hash differs too, as a consequence); other
    prompt shapes: blamed on the prompt sets, never on the model."""
    a, _ = stores(make_store, "tiny-gpt2")
    one_layer = open_store(make_store("tiny-gpt2", "ioi-abc", layers=(1,), **KW))
    pa, pb = a.hs.provenance, one_layer.hs.provenance
    assert pa.model.name == pb.model.name and pa.model.weights_sha256 != pb.model.weights_sha256
    with pytest.raises(
        HeadstoreError, match=r"differ in layers \(\[0, 1\] vs \[1\]\): extract both with the same --layers"
    ):
        ioi_pair(a, one_layer)
    text = open_store(make_store("tiny-gpt2", "text", n_seq=12, seq_len=32, batch_size=4))
    assert a.sizes["pos"] != 32
    with pytest.raises(HeadstoreError, match=rf"differ in seq_len \({a.sizes['pos']} vs 32\): the prompt sets") as e:
        ioi_pair(a, text, io=1, s1=2, end=5, io_token=7, s_token=8)
    assert "same model" not in str(e.value) and "same shape" in str(e.value)
    with pytest.raises(HeadstoreError, match=r"batch size \(12 vs 8\), the number of sequences of their prompt sets"):
        ioi_pair(a, a.isel(batch=slice(0, 8)))
