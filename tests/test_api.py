"""The Python API as a notebook user meets it: importable functions, the ds.hs accessor, typed arguments,
one return convention, and path patching on stores that have no IOI columns (against the live model)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import xarray as xr
import zarr

import headstore
import headstore.analyze as A
from headstore.cli.registry import analyzers
from headstore.store_schema import HeadstoreError, open_store

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str) -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter; it prints one JSON line last."""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def test_public_names_are_functions_in_a_fresh_process() -> None:
    names = A.__all__
    assert set(names) >= {
        "copy_suppression", "projection_loss", "calibration", "logit_attribution", "ioi", "ioi_pair",
        "path_patch_query", "circuits", "ifelse_detector",
    }  # fmt: skip
    code = f"""
import inspect, json, sys
from headstore.analyze import {", ".join(names)}
first = {{n: inspect.isfunction(globals()[n]) for n in {names!r}}}
import headstore.analyze as A
second = {{n: inspect.isfunction(getattr(A, n)) for n in {names!r}}}
third = {{n: inspect.isfunction(getattr(A, n)) for n in {names!r}}}
exported = sorted(n for n in dir(A) if not n.startswith("_") and inspect.isfunction(getattr(A, n)))
print(json.dumps({{"first": first, "second": second, "third": third, "exported": exported,
                  "torch": "torch" in sys.modules, "pyplot": "matplotlib.pyplot" in sys.modules}}))
"""
    out = _python(code)
    for key in ("first", "second", "third"):
        assert out[key] == dict.fromkeys(names, True), key
    assert out["exported"] == sorted(names)  # __all__ lists exactly the public functions
    assert out["torch"] is False and out["pyplot"] is False
    # the other import order: the package first, then the names, then the names again
    out = _python(
        "import inspect, json\nimport headstore.analyze as A\n"
        f"a = [inspect.isfunction(getattr(A, n)) for n in {names!r}]\n"
        f"from headstore.analyze import {', '.join(names)}\n"
        f"b = [inspect.isfunction(globals()[n]) for n in {names!r}]\n"
        "print(json.dumps({'ok': all(a) and all(b)}))"
    )
    assert out["ok"] is True


def test_no_module_shares_a_public_function_name() -> None:
    import pkgutil

    modules = {m.name.rsplit(".", 1)[-1] for m in pkgutil.walk_packages(headstore.__path__, "headstore.")}
    assert not modules & set(A.__all__), modules & set(A.__all__)


def test_imports_and_figures_leave_matplotlib_backend_alone(make_store: Callable[..., Path], tmp_path: Path) -> None:
    store = make_store("tiny-gpt2", "ioi")
    code = f"""
import json, sys, matplotlib
before = dict.__getitem__(matplotlib.rcParams, "backend")
import headstore, headstore.analyze, headstore.cli, headstore.cli.registry, headstore.report.page, headstore.pipeline
from headstore.cli.run import run_analyzer
from headstore.cli.registry import analyzers
paths = run_analyzer(analyzers()["copy-suppression"], [{str(store)!r}], __import__("pathlib").Path({str(tmp_path)!r}))[1]
after = dict.__getitem__(matplotlib.rcParams, "backend")
print(json.dumps({{"same": before == after, "pyplot": "matplotlib.pyplot" in sys.modules, "torch": "torch" in sys.modules,
                  "png": [str(p) for p in paths if str(p).endswith(".png")]}}))
"""
    out = _python(code)
    assert out["same"] is True and out["pyplot"] is False and out["torch"] is False
    assert out["png"] and all(Path(p).stat().st_size > 1000 for p in out["png"])


def test_accessor_against_the_live_tokenizer_and_model(
    make_store: Callable[..., Path], live_model: Callable[[str], Any]
) -> None:
    ds = open_store(make_store("tiny-llama", "ioi"))
    m = live_model("tiny-llama")
    tok, cfg = m.tokenizer, ds.hs.config
    assert isinstance(cfg, headstore.ModelConfig) and (cfg.n_heads, cfg.n_key_value_heads, cfg.n_layers) == (4, 2, 2)
    assert cfg.normalization_type == "RMS" and cfg.positional_embedding_type == "rotary"
    assert ds.hs.heads == [(L, h) for L in (0, 1) for h in range(4)]
    assert [ds.hs.kv_head(h) for h in range(4)] == [0, 0, 1, 1]
    ids = ds["tokens"].values[3]
    assert ds.hs.str_tokens(3) == [tok.decode([int(t)]) for t in ids]
    (mary,) = tok.encode(" Mary", add_special_tokens=False)
    assert ds.hs.token_id(" Mary") == mary
    with pytest.raises(HeadstoreError, match="not one token"):
        ds.hs.token_id(" Mary and John")
    with pytest.raises(HeadstoreError, match="out of range"):
        ds.hs.kv_head(4)
    names = xr.DataArray(np.array([" Mary", " John"] * 6), dims="batch")
    np.testing.assert_array_equal(
        ds.hs.token_ids(names).values, [mary, tok.encode(" John", add_special_tokens=False)[0]] * 6
    )
    # logits recomputed from the store == the Hugging Face model's own logits on the same tokens
    hf_logits = m.bridge.original_model(torch.as_tensor(ds["tokens"].values[:2], dtype=torch.long)).logits
    got = ds.hs.logits(batch=slice(0, 2)).transpose("batch", "pos", "d_vocab").values
    np.testing.assert_allclose(got, hf_logits.detach().numpy(), atol=1e-4, rtol=1e-4)
    one = ds.hs.logits(batch=1, pos=5).values
    np.testing.assert_allclose(one, hf_logits[1, 5].detach().numpy(), atol=1e-4, rtol=1e-4)
    # a subset keeps the accessor (attrs travel with isel)
    assert ds.isel(batch=slice(0, 3)).hs.config == cfg


def test_wrong_type_in_the_attrs_is_refused_on_open(make_store: Callable[..., Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.zarr"
    shutil.copytree(make_store("tiny-gpt2", "ioi"), bad)
    root = zarr.open_group(str(bad), mode="r+")
    attrs = dict(root.attrs["headstore"])
    attrs["model"] = {**attrs["model"], "config": {**attrs["model"]["config"], "n_heads": "4"}}
    root.attrs["headstore"] = attrs
    zarr.consolidate_metadata(str(bad))
    with pytest.raises(HeadstoreError, match=r"model\.config\.n_heads must be a positive int"):
        open_store(bad)


# --------------------------------------------------------------------------------------------------
# Path patching from token arrays, positions given in Python (a 3-layer grouped-query Llama)


@pytest.fixture(scope="module")
def llama3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 3-layer Llama (4 heads, 2 kv heads, randomised norm gains) with headstore's tiny tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from headstore.extract.tiny import build_tokenizer

    folder = tmp_path_factory.mktemp("llama3") / "model"
    build_tokenizer(folder)
    torch.manual_seed(7)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(AutoTokenizer.from_pretrained(folder)), hidden_size=64, intermediate_size=128,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            bos_token_id=0, eos_token_id=0, tie_word_embeddings=False,
        )
    )  # fmt: skip
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    return folder


def _extract(model: Path, data: str, out: Path, **kw: Any) -> xr.Dataset:
    from headstore.extract import ExtractRequest, extract

    extract(ExtractRequest(model=str(model), data=data, out=str(out), fields=("default", "k", "resid_pre"), batch_size=4,
                           progress=False, device="cpu", **kw))  # fmt: skip
    return open_store(out)


@torch.inference_mode()
def online_patched_pattern(bridge: Any, clean: np.ndarray, corrupt: np.ndarray, senders: list[tuple[int, int]],
                           receiver: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The seed's path patch on the live bridge: the receiver's hook_q replaced by the query of
    ``resid_pre + sum_senders (result_corrupt - result_clean)``; returns its (clean, patched) patterns."""
    l_r, h_r = receiver
    names = [f"blocks.{L}.attn.hook_result" for L in range(l_r)]
    _, c = bridge.run_with_cache(torch.as_tensor(clean), names_filter=[*names, f"blocks.{l_r}.hook_resid_pre",
                                                                        f"blocks.{l_r}.attn.hook_pattern"])  # fmt: skip
    _, x = bridge.run_with_cache(torch.as_tensor(corrupt), names_filter=names)
    resid = c[f"blocks.{l_r}.hook_resid_pre"].clone()
    for L, h in senders:
        resid += x[f"blocks.{L}.attn.hook_result"][:, :, h] - c[f"blocks.{L}.attn.hook_result"][:, :, h]
    resid = resid / torch.sqrt((resid * resid).mean(-1, keepdim=True) + bridge.cfg.eps)  # folded RMSNorm
    q = resid @ bridge.W_Q[l_r, h_r]
    got: dict[str, torch.Tensor] = {}

    def set_q(t: torch.Tensor, hook: Any) -> torch.Tensor:
        t = t.clone()
        t[:, :, h_r] = q
        return t

    def grab(t: torch.Tensor, hook: Any) -> None:
        got["pattern"] = t[:, h_r].clone()

    bridge.run_with_hooks(torch.as_tensor(clean), fwd_hooks=[(f"blocks.{l_r}.attn.hook_q", set_q),
                                                              (f"blocks.{l_r}.attn.hook_pattern", grab)])  # fmt: skip
    return c[f"blocks.{l_r}.attn.hook_pattern"][:, h_r].numpy(), got["pattern"].numpy()


def test_path_patch_on_token_stores_with_python_positions(llama3: Path, tmp_path: Path) -> None:
    from headstore.extract.models import load_model

    rng = np.random.default_rng(0)
    n, seq = 8, 20
    clean_tok = rng.integers(1, 600, size=(n, seq))
    corrupt_tok = clean_tok.copy()
    corrupt_tok[:, 3:8] = rng.integers(1, 600, size=(n, 5))  # a corrupted span, same length
    np.save(tmp_path / "clean.npy", clean_tok)
    np.save(tmp_path / "corrupt.npy", corrupt_tok)
    clean = _extract(llama3, f"tokens:{tmp_path / 'clean.npy'}", tmp_path / "clean.zarr")
    corrupt = _extract(llama3, f"tokens:{tmp_path / 'corrupt.npy'}", tmp_path / "corrupt.zarr")
    assert "io_pos" not in clean and "end_pos" not in clean

    senders, receiver = [(0, 1), (1, 0)], (2, 3)
    bridge = load_model(str(llama3), "cpu").bridge
    on_clean, on_patched = online_patched_pattern(bridge, clean_tok, corrupt_tok, senders, receiver)
    rows = np.arange(n)
    io_arr, s1_arr = rng.integers(0, 12, size=n), rng.integers(12, 19, size=n)
    end_arr = np.maximum(rng.integers(15, 20, size=n), s1_arr)  # END attends back to io and s1 (causal)
    io_arr[0], s1_arr[0] = 4, 6  # the corrupted span reaches these through the senders
    for io, s1, end, (io_n, s1_n, end_n) in [
        (4, 6, -1, (np.full(n, 4), np.full(n, 6), np.full(n, seq - 1))),  # ints; -1 = the last token
        (io_arr, xr.DataArray(s1_arr, dims="batch"), list(end_arr), (io_arr, s1_arr, end_arr)),  # per sequence
    ]:
        r = A.path_patch_query(clean, corrupt, senders=senders, receiver=receiver, io=io, s1=s1, end=end).compute()
        want_patched = on_patched[rows, end_n, io_n] - on_patched[rows, end_n, s1_n]
        want_clean = on_clean[rows, end_n, io_n] - on_clean[rows, end_n, s1_n]
        scale = np.abs(want_patched - want_clean).max()
        assert scale > 1e-4  # the patch does move the receiver's attention
        np.testing.assert_allclose(r["clean"].values, want_clean, atol=2e-6)
        np.testing.assert_allclose(r["patched"].values, want_patched, atol=2e-6)
        np.testing.assert_allclose(r["change"].values, want_patched - want_clean, atol=2e-6 + 1e-4 * scale)
    with pytest.raises(HeadstoreError, match="no 'io_pos' column"):
        A.path_patch_query(clean, corrupt, senders=senders, receiver=receiver, s1=1, end=-1)
    with pytest.raises(HeadstoreError, match="outside sequence"):
        A.path_patch_query(clean, corrupt, senders=senders, receiver=receiver, io=seq, s1=1, end=-1)
    with pytest.raises(HeadstoreError, match="before layer 2"):
        A.path_patch_query(clean, corrupt, senders=[(2, 0)], receiver=receiver, io=1, s1=2, end=-1)
    with pytest.raises(HeadstoreError, match=r"s1 \(18\) is after end \(15\) in sequence 0"):
        A.path_patch_query(clean, corrupt, senders=senders, receiver=receiver, io=1, s1=18, end=15)


def test_path_patch_store_columns_equal_explicit_positions(llama3: Path, tmp_path: Path) -> None:
    ioi = _extract(llama3, "ioi", tmp_path / "ioi.zarr", n_seq=8)
    abc = _extract(llama3, "ioi-abc", tmp_path / "abc.zarr", n_seq=8)
    kw: dict[str, Any] = {"senders": [(0, 1), (1, 0)], "receiver": (2, 3)}
    by_columns = A.path_patch_query(ioi, abc, **kw).compute()
    given = A.path_patch_query(
        ioi, abc, **kw, io=ioi["io_pos"].values, s1=ioi["s1_pos"], end=list(ioi["end_pos"].values)
    ).compute()
    xr.testing.assert_identical(by_columns, given)
    # positions from the end of the real tokens: end=-1 is each prompt's END (its `length` column)
    from_end = A.path_patch_query(ioi, abc, **kw, end=-1).compute()
    xr.testing.assert_identical(by_columns, from_end)


# --------------------------------------------------------------------------------------------------
# One return convention, for every analyzer the CLI knows


@pytest.mark.parametrize("name", sorted(analyzers()))
def test_every_analyzer_follows_the_return_convention(name: str, analyzer_inputs: Callable[..., Any]) -> None:
    spec = analyzers()[name]
    datasets, kw = analyzer_inputs(name)
    res = spec.func(*datasets, **kw)
    assert isinstance(res, xr.Dataset) and res.attrs["analyzer"] == name
    for var_name, var in res.data_vars.items():
        if "layer" in var.dims and "head" in var.dims:
            assert var.dims[:2] == ("layer", "head"), (var_name, var.dims)
    lazy = [k for k, v in res.data_vars.items() if v.chunks is not None]
    # on call: weights-only scores, fitted detectors, and the example analyzers' selections over the whole store
    # (top-k, sums, similarity: streamed block by block, memory flat in the store's size)
    on_call = ("circuits", "composition", "ifelse-detector", "attention-search", "head-similarity", "top-attention",
               "top-effects")  # fmt: skip
    if name in on_call:
        assert not lazy
    else:
        assert lazy, "an analyzer over activations must stay lazy until .compute()"
    computed = res.compute()
    assert all(np.isfinite(np.asarray(v.values, dtype=float)).any() for v in computed.data_vars.values()
               if v.dtype.kind == "f")  # fmt: skip
    # every attr is a plain value that zarr and the report can write
    assert all(isinstance(v, str | int | float) for v in res.attrs.values()), res.attrs


@pytest.mark.parametrize("name", sorted(analyzers()))
def test_every_analyzer_refuses_a_dataset_without_layer_dim(name: str, analyzer_inputs: Callable[..., Any]) -> None:
    """``ds.sel(layer=1)`` drops the dim: one line naming the fix, for every store an analyzer takes."""
    spec = analyzers()[name]
    datasets, kw = analyzer_inputs(name)
    for i in range(len(datasets)):  # each store of a pair on its own, then (for one store) the only one
        given = [d.sel(layer=1) if j == i else d for j, d in enumerate(datasets)]
        with pytest.raises(HeadstoreError) as e:
            spec.func(*given, **kw)
        want = f"{name}: ds has no layer dimension (selecting one layer drops it): keep it with ds.sel(layer=[1])"
        assert str(e.value) == want


def test_heads_and_positions_as_numpy(make_store: Callable[..., Path]) -> None:
    """Heads from ``np.argwhere`` (rows of two integers) and positions as 0-d integer arrays are the plain ints."""
    ds = open_store(make_store("tiny-gpt2", "ioi", fields=("default", "k", "resid_pre")))
    abc = open_store(make_store("tiny-gpt2", "ioi-abc", fields=("default", "k", "resid_pre")))
    mask = np.zeros((2, 4), bool)
    mask[0, 1] = mask[1, 2] = True  # a (layer, head) grid of a store holding layers 0 and 1
    rows = np.argwhere(mask)
    assert rows.dtype.kind == "i" and rows.shape == (2, 2)
    got = A.calibration(ds, heads=rows, n_bins=10).compute()
    want = A.calibration(ds, heads=[(0, 1), (1, 2)], n_bins=10).compute()
    xr.testing.assert_identical(got, want)
    got = A.path_patch_query(ds, abc, senders=rows[:1], receiver=rows[1], end=np.array(-1), io=np.int32(2)).compute()
    want = A.path_patch_query(ds, abc, senders=[(0, 1)], receiver=(1, 2), end=-1, io=2).compute()
    xr.testing.assert_identical(got, want)
    assert A.path_patch_query(ds, abc, senders=np.empty((0, 2), np.int64), receiver=(1, 2)).attrs["senders"] == ""
    refusals = [
        ({"heads": rows.astype(float)}, r"heads must be a \(layer, head\) pair of ints, e\.g\. \(9, 6\), got array"),
        ({"heads": rows.astype(bool)}, r"heads must be a \(layer, head\) pair of ints"),
        ({"heads": rows[0]}, r"heads is a list of \(layer, head\) pairs: write \[\(0, 1\)\], not array\(\[0, 1\]\)"),
        ({"heads": [np.array([0, 1, 2])]}, r"heads must be a \(layer, head\) pair of ints"),
    ]
    for kw, match in refusals:
        with pytest.raises(HeadstoreError, match=match):
            A.calibration(ds, **kw)
    for bad in (np.array(2.0), np.array(True), np.array([[2]])):
        with pytest.raises(HeadstoreError, match=r"end must be an int or 12 integers"):
            A.ioi(ds, end=bad)


def test_cli_params_go_through_the_one_parser(make_store: Callable[..., Path], tmp_path: Path) -> None:
    from headstore.cli import parse

    ds = open_store(make_store("tiny-gpt2", "ioi"))
    assert parse.heads("9.6, 9.9") == [(9, 6), (9, 9)] and parse.heads_or_all("all") == "all"
    specs = analyzers()
    got = parse.params(["heads=1.2,0.0", "top_k=2"], specs["calibration"].params, ds)
    assert got == {"heads": [(1, 2), (0, 0)], "top_k": 2}
    got = parse.params(["target=io_token", "dest=end_pos"], specs["logit-attribution"].params, ds)
    np.testing.assert_array_equal(got["target"].values, ds["io_token"].values)
    assert parse.params(["target= Mary"], specs["logit-attribution"].params, ds)["target"] == ds.hs.token_id(" Mary")
    with pytest.raises(HeadstoreError, match=r"--param heads: heads '1-2' is not LAYER\.HEAD"):
        parse.params(["heads=1-2"], specs["calibration"].params, ds)
    with pytest.raises(HeadstoreError, match="key one of top_k, n_bins, heads"):
        parse.params(["bins=3"], specs["calibration"].params, ds)
    proc = subprocess.run(
        [sys.executable, "-m", "headstore.cli", "analyze", "calibration", str(make_store("tiny-gpt2", "ioi")),
         "--out", str(tmp_path), "-p", "heads=7.0", "--no-progress"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "heads (7, 0): layer 7 is not in this store" in lines[0], proc.stderr
