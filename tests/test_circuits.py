"""circuits: ranks from the store's weights equal those of full circuit matrices built from the live bridge."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from headstore.analyze import circuits
from headstore.analyze._circuits import _ov_rank as ov_rank
from headstore.cli.registry import analyzers
from headstore.store_schema import HeadstoreError, open_store

SPEC = analyzers()["circuits"]


def _full_circuits(bridge: Any, L: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """Materialised (d_vocab, d_vocab) C_OV[src, out] and C_QK[q, k] from the bridge and its ln modules."""
    with torch.no_grad():
        E = bridge.W_E
        x = bridge.blocks[L].ln1(E[None])[0]
        W_V, W_K = bridge.W_V[L], bridge.W_K[L]
        g = h // (bridge.W_Q.shape[1] // W_V.shape[0])
        y = x @ W_V[g] @ bridge.W_O[L, h]
        c_ov = bridge.ln_final(y[None])[0] @ bridge.W_U
        c_qk = (x @ bridge.W_Q[L, h]) @ (x @ W_K[g]).T
    return c_ov.double().numpy(), c_qk.double().numpy()


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_ranks_match_materialised_matrices(model: str, make_store: Callable[..., Any], live_model: Any) -> None:
    ds = open_store(make_store(model, "code-ifelse", n_seq=16, seq_len=16))
    res = circuits(ds, top_k=5).compute()
    bridge = live_model(model).bridge
    vocab = np.array(ds["vocab"].values.tolist(), dtype=str)
    out, src, q, k = (int(np.flatnonzero(vocab == t)[0]) for t in (" else", " if", ")", " if"))
    assert [ds.hs.token_id(t) for t in (" else", " if", ")", " if")] == [out, src, q, k]
    assert res.attrs["analyzer"] == "circuits"
    assert res["ov_rank"].dims == ("layer", "head")
    by_id = circuits(ds, out_token=out, src_token=src, query_token=q, key_token=k, top_k=5).compute()
    for name in ("ov_rank", "ov_rev_rank", "qk_rank", "qk_rev_rank", "ov_top_id", "qk_value"):
        np.testing.assert_array_equal(by_id[name].values, res[name].values)
    b_U = bridge.b_U.detach().double().numpy()
    V = len(vocab)
    for L in range(ds.sizes["layer"]):
        for h in range(ds.sizes["head"]):
            c_ov, c_qk = _full_circuits(bridge, L, h)
            at = {"layer": int(ds["layer"][L]), "head": h}
            col = c_ov[:, out]
            assert int(res["ov_rank"].sel(at)) == int((col > col[src]).sum())
            row = c_ov[src] - b_U
            assert int(res["ov_rev_rank"].sel(at)) == int((row > row[out]).sum())
            qrow = c_qk[q]
            assert int(res["qk_rank"].sel(at)) == int((qrow > qrow[k]).sum())
            kcol = c_qk[:, k]
            assert int(res["qk_rev_rank"].sel(at)) == int((kcol > kcol[q]).sum())
            np.testing.assert_allclose(float(res["ov_value"].sel(at)), col[src], rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(float(res["qk_value"].sel(at)), qrow[k], rtol=1e-4, atol=1e-5)
            # top-k lists: the ids of the largest entries, their token strings and values
            top = res["ov_top_id"].sel(at).values
            np.testing.assert_array_equal(top, np.argsort(-col, kind="stable")[:5])
            assert list(res["ov_top_token"].sel(at).values) == list(vocab[top])
            np.testing.assert_allclose(
                res["qk_rev_top_value"].sel(at).values, np.sort(kcol)[::-1][:5], rtol=1e-4, atol=1e-5
            )
            assert float(res["ov_percentile"].sel(at)) == pytest.approx(1 - int((col > col[src]).sum()) / V)


def test_effective_embedding_and_errors(make_store: Callable[..., Any]) -> None:
    ds = open_store(make_store("tiny-gpt2", "code-ifelse", n_seq=16, seq_len=16))
    a = ov_rank(ds, " else", " if", embedding="W_E")
    b = ov_rank(ds, " else", " if", embedding="W_EE")
    assert not np.allclose(a["ov_value"], b["ov_value"])  # W_EE is really used
    with pytest.raises(HeadstoreError, match="not one token"):
        ds.hs.token_id(" definitely-not-a-token")
    with pytest.raises(HeadstoreError, match="not one token"):
        circuits(ds, out_token=" definitely-not-a-token")
    with pytest.raises(HeadstoreError, match="token id in"):
        circuits(ds, src_token=ds.sizes["d_vocab"])
    with pytest.raises(TypeError):
        circuits(ds, " else")  # options are keyword-only
    with pytest.raises(HeadstoreError, match="W_E or W_EE"):
        ov_rank(ds, " else", " if", embedding="W_X")
    res = circuits(ds, top_k=3)
    table = SPEC.summary(res)
    assert len(table) == ds.sizes["layer"] * ds.sizes["head"]
    assert {"ov_percentile", "qk_rev_rank"} <= set(table.columns)


def test_plot(make_store: Callable[..., Any], tmp_path: Any) -> None:
    ds = open_store(make_store("tiny-gpt2", "code-ifelse", n_seq=16, seq_len=16))
    paths = SPEC.plot(circuits(ds, top_k=3), tmp_path)
    assert all(p.exists() and p.stat().st_size > 0 for p in paths)
