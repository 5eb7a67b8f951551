"""path-patch-query offline equals an online path patch on the live bridge (hook on the receiver's hook_q)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

from headstore.analyze import path_patch_query
from headstore.cli import parse
from headstore.cli.registry import analyzers
from headstore.cli.run import run_analyzer
from headstore.store_schema import HeadstoreError, open_store

KW: dict[str, Any] = {"fields": ("default", "resid_pre", "k", "q"), "n_seq": 12, "batch_size": 4, "seed": 0}
RECEIVER = (1, 3)  # on tiny-llama (4 heads, 2 kv heads) head 3 reads kv head 1
SENDERS = [(0, 0), (0, 2), (0, 3)]
SENDERS_STR = "0.0,0.2,0.3"  # the same on the command line


def stores(make_store: Callable[..., Path], model: str) -> tuple[xr.Dataset, xr.Dataset]:
    return open_store(make_store(model, "ioi", **KW)), open_store(make_store(model, "ioi-abc", **KW))


def _b_Q(bridge: Any) -> torch.Tensor:
    try:
        b = bridge.b_Q
    except AttributeError:
        b = None
    return torch.zeros(bridge.W_Q.shape[0], bridge.W_Q.shape[1], bridge.W_Q.shape[3]) if b is None else b


def ln1_torch(x: torch.Tensor, cfg: Any) -> torch.Tensor:
    """Folded ln1 with the scale recomputed from x."""
    if "RMS" not in str(cfg.normalization_type):
        x = x - x.mean(-1, keepdim=True)
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


@torch.inference_mode()
def online_path_patch(
    bridge: Any, clean: np.ndarray, corrupt: np.ndarray, senders: list[tuple[int, int]]
) -> dict[str, Any]:
    """Run the clean input with the receiver's q replaced by the q of resid_pre + sum(corrupt - clean sender output)."""
    l_r, h_r = RECEIVER
    x_clean = torch.as_tensor(clean, dtype=torch.long)
    x_corrupt = torch.as_tensor(corrupt, dtype=torch.long)
    res_names = [f"blocks.{L}.attn.hook_result" for L in range(l_r)]
    names = [*res_names, f"blocks.{l_r}.hook_resid_pre", f"blocks.{l_r}.attn.hook_q", f"blocks.{l_r}.attn.hook_pattern"]
    if "blocks.0.attn.hook_rot_q" in bridge.hook_dict:
        names += [f"blocks.{l_r}.attn.hook_rot_q", f"blocks.{l_r}.attn.hook_cos", f"blocks.{l_r}.attn.hook_sin"]
    _, c_cache = bridge.run_with_cache(x_clean, names_filter=names)
    _, x_cache = bridge.run_with_cache(x_corrupt, names_filter=res_names)
    resid = c_cache[f"blocks.{l_r}.hook_resid_pre"].clone()
    for L, h in senders:
        resid += x_cache[f"blocks.{L}.attn.hook_result"][:, :, h] - c_cache[f"blocks.{L}.attn.hook_result"][:, :, h]
    W_Q, b_Q = bridge.W_Q[l_r, h_r], _b_Q(bridge)[l_r, h_r]
    q_clean = ln1_torch(c_cache[f"blocks.{l_r}.hook_resid_pre"], bridge.cfg) @ W_Q + b_Q
    q_new = ln1_torch(resid, bridge.cfg) @ W_Q + b_Q  # (batch, pos, d_head)
    grabbed: dict[str, torch.Tensor] = {}

    def run_with_q(q: torch.Tensor) -> dict[str, torch.Tensor]:
        def set_q(t: torch.Tensor, hook: Any) -> torch.Tensor:
            t = t.clone()
            t[:, :, h_r] = q
            return t

        def grab(t: torch.Tensor, hook: Any) -> None:
            grabbed[hook.name] = t.detach().clone()

        hooks = [(f"blocks.{l_r}.attn.hook_q", set_q), (f"blocks.{l_r}.attn.hook_pattern", grab)]
        if f"blocks.{l_r}.attn.hook_rot_q" in bridge.hook_dict:
            hooks.append((f"blocks.{l_r}.attn.hook_rot_q", grab))
        bridge.run_with_hooks(x_clean, fwd_hooks=hooks)
        return dict(grabbed)

    return {
        "clean_cache": c_cache,
        "q_clean_manual": q_clean,
        "noop": run_with_q(q_clean),
        "zeroed": run_with_q(torch.zeros_like(q_clean)),
        "patched": run_with_q(q_new),
    }


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("direction", ["ioi<-abc", "abc<-ioi"])
def test_offline_equals_online_path_patch(
    make_store: Callable[..., Path], live_model: Callable[[str], Any], model: str, direction: str
) -> None:
    ioi_ds, abc_ds = stores(make_store, model)
    clean_ds, corrupt_ds = (ioi_ds, abc_ds) if direction == "ioi<-abc" else (abc_ds, ioi_ds)
    bridge = live_model(model).bridge
    l_r, h_r = RECEIVER
    assert parse.heads(SENDERS_STR) == SENDERS
    on = online_path_patch(bridge, clean_ds["tokens"].values, corrupt_ds["tokens"].values, SENDERS)
    pat = f"blocks.{l_r}.attn.hook_pattern"
    clean_pattern = on["clean_cache"][pat]

    # The oracle itself: our ln1 + W_Q recomputation is the model's q, a no-op edit of hook_q leaves the
    # pattern as it was, and editing hook_q does reach the scores (and the rotary) of that head only.
    np.testing.assert_allclose(
        on["q_clean_manual"].numpy(), on["clean_cache"][f"blocks.{l_r}.attn.hook_q"][:, :, h_r].numpy(), atol=2e-5
    )
    np.testing.assert_allclose(on["noop"][pat].numpy(), clean_pattern.numpy(), atol=1e-6)
    zeroed = on["zeroed"][pat]
    assert (zeroed[:, h_r] - clean_pattern[:, h_r]).abs().max() > 1e-4
    others = [h for h in range(clean_pattern.shape[1]) if h != h_r]
    torch.testing.assert_close(zeroed[:, others], clean_pattern[:, others], rtol=0, atol=0)

    end, io, s1 = (clean_ds[c].values.astype(int) for c in ("end_pos", "io_pos", "s1_pos"))
    rows = np.arange(len(end))
    assert ("rotary_cos" in clean_ds) == (model == "tiny-llama")
    if model == "tiny-llama":
        # HF rotary: q_rot = q*cos + rotate_half(q)*sin with the stored tables equals hook_rot_q
        # of the patched run (the hook_q edit propagates into the rotary).
        cos = torch.as_tensor(clean_ds["rotary_cos"].values)[None, :, None]
        sin = torch.as_tensor(clean_ds["rotary_sin"].values)[None, :, None]
        q = on["clean_cache"][f"blocks.{l_r}.attn.hook_q"]
        want_rot = on["clean_cache"][f"blocks.{l_r}.attn.hook_rot_q"]
        np.testing.assert_allclose((q * cos + rotate_half(q) * sin).numpy(), want_rot.numpy(), atol=1e-5)
        np.testing.assert_allclose(clean_ds["q"].sel(layer=l_r).values, want_rot.numpy(), atol=1e-5)
        rot_patched = on["patched"][f"blocks.{l_r}.attn.hook_rot_q"][:, :, h_r]
        assert (rot_patched - want_rot[:, :, h_r]).abs().max() > 0

    online = on["patched"][pat][rows, h_r, end].numpy()  # (batch, key_pos)
    online_diff = online[rows, io] - online[rows, s1]
    clean_diff = clean_pattern[rows, h_r, end, io].numpy() - clean_pattern[rows, h_r, end, s1].numpy()

    r = path_patch_query(clean_ds, corrupt_ds, senders=SENDERS, receiver=RECEIVER).compute()
    assert r.attrs["analyzer"] == "path-patch-query"
    assert r.attrs["senders"] == SENDERS_STR and r.attrs["receiver"] == "1.3"
    assert r.attrs["receiver_kv_head"] == (1 if model == "tiny-llama" else 3)
    assert _rel(r["patched"].values, online_diff) <= 1e-4
    assert _rel(r["pattern_end_patched"].transpose("batch", "key_pos").values, online) <= 1e-4
    assert _rel(r["clean"].values, clean_diff) <= 1e-4
    # The patch moved the pattern by far more than the tolerance: the comparison is not vacuous.
    effect = np.abs(online_diff - clean_diff).max()
    assert effect > 100 * np.abs(r["patched"].values - online_diff).max()
    np.testing.assert_allclose(r["change"].values, r["patched"].values - r["clean"].values, atol=0)


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_no_senders_is_the_clean_pattern(make_store: Callable[..., Path], model: str) -> None:
    clean_ds, corrupt_ds = stores(make_store, model)
    l_r, h_r = RECEIVER
    r = path_patch_query(clean_ds, corrupt_ds, senders=[], receiver=RECEIVER).compute()
    assert r.attrs["senders"] == ""
    np.testing.assert_array_equal(r["patched"].values, r["clean"].values)
    np.testing.assert_array_equal(r["pattern_end_patched"].values, r["pattern_end_clean"].values)
    assert not r["change"].values.any()
    np.testing.assert_allclose(r["clean"].values, r["clean_stored"].values, rtol=0, atol=1e-5)
    end = clean_ds["end_pos"].values.astype(int)
    stored = clean_ds["pattern"].sel(layer=l_r).isel(head=h_r).values[np.arange(len(end)), end]
    np.testing.assert_allclose(r["pattern_end_clean"].transpose("batch", "key_pos").values, stored, rtol=0, atol=1e-5)
    np.testing.assert_allclose(r["pattern_end_clean"].sum("key_pos").values, 1.0, atol=1e-6)


def test_senders_all_and_explicit_positions(make_store: Callable[..., Path]) -> None:
    """senders="all" is every head before the receiver's layer; io/s1/end default to the store's columns."""
    clean_ds, corrupt_ds = stores(make_store, "tiny-llama")
    every = path_patch_query(clean_ds, corrupt_ds, senders="all", receiver=RECEIVER).compute()
    listed = path_patch_query(clean_ds, corrupt_ds, senders=[(0, h) for h in range(4)], receiver=RECEIVER).compute()
    assert every.attrs["senders"] == "0.0,0.1,0.2,0.3"
    xr.testing.assert_identical(every, listed)
    cols = clean_ds.drop_vars(["io_pos", "s1_pos", "end_pos"])
    given = path_patch_query(
        cols, corrupt_ds, senders=SENDERS, receiver=RECEIVER,
        io=clean_ds["io_pos"], s1=clean_ds["s1_pos"].values, end=clean_ds["end_pos"] - clean_ds["length"],
    ).compute()  # fmt: skip
    default = path_patch_query(clean_ds, corrupt_ds, senders=SENDERS, receiver=RECEIVER).compute()
    for name in default.data_vars:
        np.testing.assert_array_equal(given[name].values, default[name].values, err_msg=str(name))
    with pytest.raises(HeadstoreError, match=r"end was not given and this store has no 'end_pos' column"):
        path_patch_query(cols, corrupt_ds, senders=SENDERS, receiver=RECEIVER, io=1, s1=2)


def test_cli_spec_summary_and_plots(make_store: Callable[..., Path], tmp_path: Path) -> None:
    spec = analyzers()["path-patch-query"]
    assert spec.n_stores == 2
    paths = [str(make_store("tiny-llama", d, **KW)) for d in ("ioi", "ioi-abc")]
    table, out = run_analyzer(spec, paths, tmp_path, param_strings=[f"senders={SENDERS_STR}", "receiver=1.3"])
    assert list(table[["layer", "head", "senders"]].iloc[0]) == [1, 3, SENDERS_STR]
    py, _ = run_analyzer(spec, paths, tmp_path / "py", {"senders": SENDERS, "receiver": RECEIVER})
    pd.testing.assert_frame_equal(py, table)
    res = xr.open_zarr(tmp_path / "path-patch-query" / "result.zarr", zarr_format=3, consolidated=False)
    assert float(table["patched_mean"].iloc[0]) == pytest.approx(float(res["patched"].mean()), rel=1e-6)
    assert float(table["clean_mean"].iloc[0]) == pytest.approx(float(res["clean"].mean()), rel=1e-6)
    assert int(table["n_prompts"].iloc[0]) == 12
    names = {p.name for p in out}
    assert {"path_patch_query.png", "path_patch_query.html"} <= names
    html = (tmp_path / "path-patch-query" / "path_patch_query.html").read_text()
    assert "Patched" in html and "Clean" in html and "overlay" in html
    with pytest.raises(HeadstoreError, match=r"path-patch-query needs --param receiver=\.\.\. \(no default\)"):
        run_analyzer(spec, paths, tmp_path, {"senders": SENDERS})
    with pytest.raises(HeadstoreError, match=r"needs --param senders=\.\.\. --param receiver=\.\.\."):
        run_analyzer(spec, paths, tmp_path, param_strings=[])
    with pytest.raises(HeadstoreError, match=r"--param receiver: head '1-3' is not LAYER.HEAD"):
        run_analyzer(spec, paths, tmp_path, param_strings=["senders=0.1", "receiver=1-3"])


def test_refusals(make_store: Callable[..., Path]) -> None:
    clean_ds, corrupt_ds = stores(make_store, "tiny-gpt2")
    no_k = open_store(make_store("tiny-gpt2", "ioi", fields=("default", "resid_pre"), n_seq=12, batch_size=4, seed=0))
    with pytest.raises(HeadstoreError, match=r"needs k.*--fields default,k") as e:
        path_patch_query(no_k, corrupt_ds, senders=SENDERS, receiver=RECEIVER)
    assert "\n" not in str(e.value)
    with pytest.raises(HeadstoreError, match=r"resid_pre.*--fields default,resid_pre"):
        path_patch_query(clean_ds.drop_vars("resid_pre"), corrupt_ds, senders=SENDERS, receiver=RECEIVER)
    other = open_store(make_store("tiny-llama", "ioi-abc", **KW))
    with pytest.raises(HeadstoreError, match=r"differ in model\.name"):
        path_patch_query(clean_ds, other, senders=SENDERS, receiver=RECEIVER)
    with pytest.raises(HeadstoreError, match="batch size"):
        path_patch_query(clean_ds, corrupt_ds.isel(batch=slice(0, 8)), senders=SENDERS, receiver=RECEIVER)
    for col in ("io_pos", "s1_pos", "end_pos"):
        shifted = corrupt_ds.assign({col: corrupt_ds[col] + 1})
        with pytest.raises(HeadstoreError, match=rf"{col} differ.*not aligned"):
            path_patch_query(clean_ds, shifted, senders=SENDERS, receiver=RECEIVER)
    with pytest.raises(
        HeadstoreError, match=r"senders must be \(layer, head\) pairs before layer 1 .*\[\(1, 2\)\] are not"
    ):
        path_patch_query(clean_ds, corrupt_ds, senders=[(0, 1), (1, 2)], receiver=(1, 3))
    # the end query cannot attend to a later token: refused, naming the sequence
    with pytest.raises(
        HeadstoreError, match=r"^io \(12\) is after end \(5\) in sequence 0: attention from end cannot reach"
    ):
        path_patch_query(clean_ds, corrupt_ds, senders=SENDERS, receiver=RECEIVER, io=12, s1=2, end=5)
    end = clean_ds["end_pos"].values.copy()
    end[2] = int(clean_ds["s1_pos"][2]) - 1
    with pytest.raises(HeadstoreError, match=rf"^s1 \({end[2] + 1}\) is after end \({end[2]}\) in sequence 2: "):
        path_patch_query(clean_ds, corrupt_ds, senders=SENDERS, receiver=RECEIVER, io=0, end=end)
    with pytest.raises(
        HeadstoreError, match=r"senders must be 'all' or a list of \(layer, head\) pairs, got the string"
    ):
        path_patch_query(clean_ds, corrupt_ds, senders="0.1", receiver=(1, 3))  # strings are for the CLI
    with pytest.raises(HeadstoreError, match=r"not LAYER\.HEAD"):
        parse.heads("0-1", "senders")
    with pytest.raises(
        HeadstoreError, match=r"senders is a list of \(layer, head\) pairs: write \[\(0, 1\)\], not \(0, 1\)"
    ):
        path_patch_query(clean_ds, corrupt_ds, senders=(0, 1), receiver=(1, 3))  # type: ignore[arg-type]
    with pytest.raises(HeadstoreError, match=r"senders names a head twice"):
        path_patch_query(clean_ds, corrupt_ds, senders=[(0, 1), (0, 1)], receiver=(1, 3))
    with pytest.raises(HeadstoreError, match=r"senders \(7, 0\): layer 7 is not in this store"):
        path_patch_query(clean_ds, corrupt_ds, senders=[(7, 0)], receiver=(1, 3))
    with pytest.raises(HeadstoreError, match=r"receiver must be a \(layer, head\) pair of ints"):
        path_patch_query(clean_ds, corrupt_ds, senders=[(0, 1)], receiver=[(1, 3), (1, 2)])  # type: ignore[arg-type]
    with pytest.raises(HeadstoreError, match=r"receiver must be a \(layer, head\) pair of ints"):
        path_patch_query(clean_ds, corrupt_ds, senders=[(0, 1)], receiver="1.3")  # type: ignore[arg-type]
    with pytest.raises(HeadstoreError, match=r"heads 0\.\.3"):
        path_patch_query(clean_ds, corrupt_ds, senders=[(0, 1)], receiver=(1, 7))
    with pytest.raises(
        HeadstoreError, match=r"receiver \(5, 0\): layer 5 is not in this store \(it holds layers \[0, 1\]\)"
    ):
        path_patch_query(clean_ds, corrupt_ds, senders=[(0, 1)], receiver=(5, 0))
