"""What a selection of a store means: ``ds.hs.logits`` reads positions as the analyzers do (against the live
model), ``open_store``'s ``batch`` and ``head`` coordinates survive subsets and travel into every analyzer's
result, a Dataset cut along ``head`` is refused in one line, and two stores pair only sequence for sequence."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import xarray as xr

import headstore.analyze as A
from headstore.analyze import Relation
from headstore.cli.registry import analyzers
from headstore.store_schema import HeadstoreError, open_store

FIELDS = ("default", "k", "resid_pre")
METRIC = "logit-diff:io_token,s_token@end_pos"


def test_logits_read_positions_as_the_analyzers_do(
    make_store: Callable[..., Path], live_model: Callable[[str], Any]
) -> None:
    """Against the Hugging Face model's own logits on the store's tokens: ``pos=-1`` is each sequence's last real
    token (its ``length`` column), a per-sequence column is pointwise, a subset is matched by ``batch`` label."""
    ds = open_store(make_store("tiny-llama", "ioi"))
    tokens = torch.as_tensor(ds["tokens"].values, dtype=torch.long)
    with torch.no_grad():  # not inference_mode: its tensors would be cached in the session's shared model
        hf = live_model("tiny-llama").bridge.original_model(tokens).logits.numpy()  # type: ignore[attr-defined]
    length, end = ds["length"].values.astype(int), ds["end_pos"].values.astype(int)
    rows = np.arange(ds.sizes["batch"])
    padded = np.flatnonzero(length < ds.sizes["pos"])
    assert padded.size, "the test needs a padded sequence"
    b = int(padded[0])
    close = {"atol": 1e-4, "rtol": 1e-4}
    np.testing.assert_allclose(ds.hs.logits(batch=b, pos=-1).values, hf[b, length[b] - 1], **close)
    assert not np.allclose(hf[b, length[b] - 1], hf[b, -1], **close)  # the padded slot reads otherwise
    assert int(ds.hs.logits(batch=b, pos=-1).argmax("d_vocab")) == int(hf[b, length[b] - 1].argmax())  # quickstart
    np.testing.assert_allclose(ds.hs.logits(pos=-2).values, hf[rows, length - 2], **close)
    assert ds["end_pos"].chunks is not None  # a dask-backed column, loaded first
    for pos in (ds["end_pos"], ds["end_pos"].values, list(end)):
        got = ds.hs.logits(pos=pos)
        assert got.dims == ("batch", "d_vocab")
        np.testing.assert_allclose(got.values, hf[rows, end], **close)
    pick = [5, 2]
    for got in (ds.hs.logits(batch=pick, pos=ds["end_pos"]), ds.isel(batch=pick).hs.logits(pos=ds["end_pos"])):
        assert got["batch"].values.tolist() == pick
        np.testing.assert_allclose(got.values, hf[pick, end[pick]], **close)
    np.testing.assert_allclose(ds.isel(batch=pick).hs.logits(pos=-1).values, hf[pick, length[pick] - 1], **close)
    np.testing.assert_allclose(ds.hs.logits(batch=3, pos=ds["end_pos"]).values, hf[3, end[3]], **close)
    with pytest.raises(HeadstoreError, match=rf"pos is outside sequence \d+: position {ds.sizes['pos']} of"):
        ds.hs.logits(pos=ds.sizes["pos"])
    with pytest.raises(HeadstoreError, match=r"pos is labelled with sequences \[5, 2\], which do not cover"):
        ds.hs.logits(pos=ds["end_pos"].isel(batch=pick))
    with pytest.raises(HeadstoreError, match="pos must be an int or 12 integers"):
        ds.hs.logits(pos=end[:3])


def _inputs(name: str, make_store: Callable[..., Path]) -> tuple[list[xr.Dataset], dict[str, Any]]:
    if name == "ifelse-detector":
        return [open_store(make_store("tiny-gpt2", "code-ifelse", n_seq=24))], {}
    ioi = open_store(make_store("tiny-gpt2", "ioi", fields=FIELDS))
    abc = open_store(make_store("tiny-gpt2", "ioi-abc", fields=FIELDS))
    if name in ("attribution-patching", "edge-attribution"):  # the clean store holds the gradients
        return [open_store(make_store("tiny-gpt2", "ioi", fields=FIELDS, grad=METRIC)), abc], {}
    kw: dict[str, dict[str, Any]] = {
        "path-patch-query": {"senders": [(0, 1)], "receiver": (1, 2)},
        "logit-attribution": {"target": ioi["io_token"]},
        "calibration": {"heads": [(1, 2), (0, 0)]},
        "attention-search": {"query": Relation.ANY, "key": Relation.PREVIOUS},
        "attention-attribution": {"head": (1, 2)},
    }
    return ([ioi, abc] if name in ("ioi-pair", "path-patch-query") else [ioi]), kw.get(name, {})


@pytest.mark.parametrize("name", sorted(analyzers()))
def test_every_analyzer_keeps_sequence_labels_and_refuses_a_head_cut(
    name: str, make_store: Callable[..., Path]
) -> None:
    """On ``ds.isel(batch=rows)`` every per-sequence result is labelled with ``rows`` and holds the whole store's
    values of those rows (by position: independent of the labels); ``ds.isel(head=...)`` is refused in one line."""
    spec = analyzers()[name]
    datasets, kw = _inputs(name, make_store)
    n = datasets[0].sizes["batch"]
    assert {"batch", "layer", "head"} <= set(datasets[0].indexes)  # coordinates, not xarray's default 0..n-1
    assert datasets[0]["head"].values.tolist() == list(range(datasets[0].hs.config.n_heads))
    rows = np.arange(n)[::-1][: n - 1]  # reversed, one left out: labels differ from positions
    # (logit-attribution's target is the whole store's io_token column: matched to the subset by label)
    sub = spec.func(*(d.isel(batch=rows) for d in datasets), **kw).compute()
    per_sequence = [v for v in sub.data_vars if "batch" in sub[v].dims]
    no_batch = ("calibration", "circuits", "composition", "attention-search", "head-similarity", "top-attention",
                "top-effects", "edge-attribution")  # fmt: skip
    assert per_sequence or name in no_batch, name
    if per_sequence:
        assert sub["batch"].values.tolist() == rows.tolist()
    if name == "ifelse-detector":  # the detector is refitted on the subset: its labels, not its values, compare
        np.testing.assert_array_equal(sub["split"].values, np.asarray(datasets[0]["split"].values)[rows])
    else:
        whole = spec.func(*datasets, **kw).compute()
        for v in per_sequence:
            want = whole[v].transpose(*sub[v].dims).values
            got = sub[v].values
            want = np.take(want, rows, axis=sub[v].dims.index("batch"))
            if got.dtype.kind == "f":  # a subset changes BLAS's blocking of the products, so their summation order
                scale = float(np.nanmax(np.abs(want), initial=0.0))
                if v == "reconstruction_error":  # rounding noise itself: it varies at the ulp of what it checks
                    scale = max(float(np.nanmax(np.abs(whole[w].values))) for w in per_sequence
                                if whole[w].dtype.kind == "f")  # fmt: skip
                np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * scale, err_msg=v)
            else:
                np.testing.assert_array_equal(got, want, err_msg=v)
    n_heads = datasets[0].hs.config.n_heads
    for heads, held in (([2, 3], "[2, 3]"), ([1, 0, 2, 3], "[1, 0, 2, 3]"), (1, "[1]")):  # a cut, a reorder, one
        with pytest.raises(HeadstoreError) as e:
            spec.func(*(d.isel(head=heads) for d in datasets), **kw)
        assert str(e.value).startswith(
            f"{name} reads all {n_heads} heads of the model and this Dataset holds heads {held}:"
        )
        assert "not with ds.isel(head=...)" in str(e.value) and "\n" not in str(e.value)


def test_head_labels_survive_in_results(make_store: Callable[..., Path]) -> None:
    """The per-head results carry the ``head`` coordinate: selecting heads of a result picks them by label."""
    ds = open_store(make_store("tiny-gpt2", "ioi", fields=FIELDS))
    hs = A.head_scores(ds).compute()
    got = hs["induction_per_sequence"].sel(head=[3, 1])
    assert got["head"].values.tolist() == [3, 1]
    np.testing.assert_array_equal(got.values, hs["induction_per_sequence"].values[:, [3, 1]])
    assert A.copy_suppression(ds)["score"]["head"].values.tolist() == [0, 1, 2, 3]


def test_two_stores_pair_sequence_for_sequence(make_store: Callable[..., Path]) -> None:
    """Subsets (or partial stores) holding different sequences are refused by name; aligned, they pair and equal
    the whole pair's result on the common sequences."""
    ioi = open_store(make_store("tiny-gpt2", "ioi", fields=FIELDS))
    abc = open_store(make_store("tiny-gpt2", "ioi-abc", fields=FIELDS))
    a, b = ioi.isel(batch=[0, 1, 4, 5]), abc.isel(batch=[0, 1, 6, 5])
    calls: list[Callable[[xr.Dataset, xr.Dataset], xr.Dataset]] = [
        lambda x, y: A.ioi_pair(x, y),
        lambda x, y: A.path_patch_query(x, y, senders=[(0, 1)], receiver=(1, 2)),
    ]
    for f in calls:
        with pytest.raises(
            HeadstoreError, match=r"two stores hold different sequences \(\[0, 1, 4, 5\] vs \[0, 1, 6, 5\]"
        ):
            f(a, b)
        x, y = xr.align(a, b, join="inner")
        got = f(x, y).compute()
        assert got["batch"].values.tolist() == [0, 1, 5]
        whole = f(ioi, abc).compute()
        for v in got.data_vars:
            if "batch" in got[v].dims:
                want = whole[v].isel(batch=[0, 1, 5]).transpose(*got[v].dims).values
                if want.dtype.kind == "f":  # a subset changes BLAS's blocking of the products (1 ulp)
                    atol = 1e-6 * float(np.nanmax(np.abs(want), initial=0.0))
                    np.testing.assert_allclose(got[v].values, want, rtol=1e-6, atol=atol, err_msg=v)
                else:
                    np.testing.assert_array_equal(got[v].values, want, err_msg=v)
