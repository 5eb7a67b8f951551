"""Issue 28: top_attention, top_effects, attention_search and head_similarity against brute-force numpy over the
live bridge's patterns and outputs, on a tiny random model of each family; their one-line refusals; the
dashboard site, opened in headless Chromium."""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import xarray as xr

import headstore
from headstore.analyze import Relation, attention_search, head_similarity, top_attention, top_effects
from headstore.extract import ExtractRequest, extract
from headstore.extract.tiny import TINY_FAMILIES, build_family, build_tokenizer
from headstore.store_schema import HeadstoreError

K = 6
FAMILIES = TINY_FAMILIES  # about 10 s each (one small store and one forward)


@dataclass
class Live:
    """One family: its store (6 IOI prompts, right-padded, batch chunks of 4 and 2) and the live bridge's cache on
    the store's tokens, with what the oracles need (writing weights, post-attention norm gains)."""

    family: str
    ds: xr.Dataset
    cache: dict[str, np.ndarray]
    w_o: np.ndarray  # (layer, head, d_head, d_model), the bridge's
    post_gain: np.ndarray | None  # (layer, d_model) on post-norm models


@pytest.fixture(scope="session")
def live_family(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Live]:
    from unittest import mock

    from transformers.utils import logging as hf_logging

    import headstore.extract.run as extract_run
    from headstore.extract.models import load_model

    hf_logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("dashboard-families")
    built: dict[str, Live] = {}

    def get(family: str) -> Live:
        if family in built:
            return built[family]
        if not (root / "tok").exists():
            build_tokenizer(root / "tok")
        build_family(family, root / family, root / "tok")
        model = load_model(str(root / family), "cpu")
        out = root / f"{family}.zarr"
        with mock.patch.object(extract_run, "load_model", lambda *a, **kw: model):
            extract(ExtractRequest(model=str(root / family), data="ioi", out=str(out), n_seq=6, batch_size=4,
                                   device="cpu", progress=False, seed=3))  # fmt: skip
        ds = headstore.open_store(out)
        bridge = model.bridge
        with torch.inference_mode():
            _, cache = bridge.run_with_cache(torch.as_tensor(ds["tokens"].values).long())
        keep = ("hook_pattern", "hook_z", "hook_v", "ln_final.hook_scale", "ln1_post.hook_scale")
        arrays = {k: v.float().numpy() for k, v in cache.items() if k.endswith(keep)}
        gain = None
        if ds.hs.config.post_norm:
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(root / family, dtype=torch.float32)  # untouched by the bridge
            w = np.stack([m.post_attention_layernorm.weight.detach().float().numpy() for m in hf.model.layers])
            gain = 1.0 + w if family.startswith("gemma") else w
        built[family] = Live(family, ds, arrays, bridge.W_O.detach().float().numpy(), gain)
        return built[family]

    return get


def _real(live: Live) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """tokens (b, pos), lengths (b,), BOS id."""
    ds = live.ds
    return ds["tokens"].values, ds["length"].values, int(ds.hs.provenance.tokenizer.bos_token_id)


def _check_top(got_vals: np.ndarray, got_at: list[tuple[int, ...]], entries: list[tuple[float, tuple[int, ...]]],
               value_of: Callable[[tuple[int, ...]], float], atol: float) -> None:  # fmt: skip
    """``entries`` (value, place) sorted by the tie rule; the analyzer's top values equal the brute-force ones,
    each reported place holds its value in the live run, and every place whose value is clear of its neighbours
    (beyond float noise between the store and the live run) is the brute-force one."""
    want = [v for v, _ in entries[: len(got_vals)]]
    np.testing.assert_allclose(got_vals, want, rtol=0, atol=atol)
    values = [v for v, _ in entries]
    for r, at in enumerate(got_at):
        assert abs(value_of(at) - got_vals[r]) <= atol
        near = [abs(values[j] - values[r]) for j in (r - 1, r + 1) if 0 <= j < len(values)]
        if all(d > 4 * atol for d in near):
            assert at == entries[r][1], (r, at, entries[r])


def _tie_sorted(values: np.ndarray, places: np.ndarray) -> list[tuple[float, tuple[int, ...]]]:
    """Brute-force order: larger value first, then the earlier place (lexicographic)."""
    order = sorted(range(len(values)), key=lambda i: (-values[i], *places[i]))
    return [(float(values[i]), tuple(int(x) for x in places[i])) for i in order]


@pytest.mark.parametrize("family", FAMILIES)
def test_top_attention_equals_brute_force(family: str, live_family: Callable[[str], Live]) -> None:
    live = live_family(family)
    tokens, length, bos = _real(live)
    for exclude_self in (False, True):
        res = top_attention(live.ds, k=K, exclude_self=exclude_self)
        for i, L in enumerate(live.ds.hs.layers):
            pat = live.cache[f"blocks.{L}.attn.hook_pattern"]  # b, h, q, k
            for h in range(live.ds.sizes["head"]):
                vals, places = [], []
                for b in range(tokens.shape[0]):
                    for q in range(length[b]):
                        for k in range(q + 1):
                            if tokens[b, k] != bos and not (exclude_self and k == q):
                                vals.append(pat[b, h, q, k])
                                places.append((b, q, k))
                got = res.isel(layer=i, head=h)
                at = list(zip(got["sequence"].values, got["query_pos"].values, got["key_pos"].values))
                _check_top(got["weight"].values, at, _tie_sorted(np.array(vals), np.array(places)),
                           lambda p, h=h, a=pat: float(a[p[0], h, p[1], p[2]]), 2e-6)  # fmt: skip
                assert [tokens[b, k] for b, _, k in at] == got["key_token"].values.tolist()
                assert list(got["key_str"].values) == [live.ds.hs.vocab[t] for t in got["key_token"].values]


def test_top_attention_breaks_ties_by_store_order(live_family: Callable[[str], Live]) -> None:
    """On the store's own weights (exact equality: IOI prompts share prefixes, so their weights tie), the order is
    value, then sequence, query, key."""
    live = live_family("gpt2")
    length = live.ds["length"].values
    pat = live.ds["pattern"].values
    res = top_attention(live.ds, k=K, exclude_bos=False, heads=[(1, 2), (0, 0)])
    assert np.isnan(res["weight"].sel(layer=0, head=1)).all()  # not asked for
    for L, h in [(1, 2), (0, 0)]:
        entries = [(pat[b, L, h, q, k], (b, q, k)) for b in range(6) for q in range(length[b]) for k in range(q + 1)]
        want = sorted(entries, key=lambda e: (-e[0], *e[1]))[:K]
        got = res.sel(layer=L, head=h)
        assert list(zip(got["sequence"].values, got["query_pos"].values, got["key_pos"].values)) == [p for _, p in want]
    ties = [v for v, _ in sorted(entries, key=lambda e: -e[0])[:K]]
    assert len(set(ties)) < K, "the check needs tied weights"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("by", ["next", "attended"])
def test_top_effects_equal_brute_force(family: str, by: str, live_family: Callable[[str], Live]) -> None:
    live = live_family(family)
    ds = live.ds
    tokens, length, bos = _real(live)
    w_u = ds["W_U"].values
    if ds.hs.config.normalization_type == "LN":
        w_u = w_u - w_u.mean(0)
    scale = live.cache["ln_final.hook_scale"][..., 0]  # b, q
    res = top_effects(ds, k=K, by=by)
    group = ds.sizes["head"] // ds.sizes["kv_head"]
    for i, L in enumerate(ds.hs.layers):
        w_o = live.w_o[L] * (1.0 if live.post_gain is None else live.post_gain[L])
        inv = 1.0 / scale
        if live.post_gain is not None:
            inv = inv / live.cache[f"blocks.{L}.ln1_post.hook_scale"][..., 0]
        if by == "next":
            writes = np.einsum("bqhd,hdm->bhqm", live.cache[f"blocks.{L}.attn.hook_z"], w_o)
            nxt = np.roll(tokens, -1, 1)
            effect = np.einsum("bhqm,mbq->bhq", writes, w_u[:, nxt]) * inv[:, None]
            valid = np.arange(tokens.shape[1])[None] + 1 < length[:, None]
        else:
            v = np.repeat(live.cache[f"blocks.{L}.attn.hook_v"], group, axis=2)  # b, k, h, d
            coef = np.einsum("bkhd,hdm,mbk->bhk", v, w_o, w_u[:, tokens])
            keep = (tokens != bos) & (np.arange(tokens.shape[1])[None] < length[:, None])
            a = live.cache[f"blocks.{L}.attn.hook_pattern"] * keep[:, None, None, :]
            effect = np.einsum("bhqk,bhk->bhq", a, coef) * inv[:, None]
            valid = np.arange(tokens.shape[1])[None] < length[:, None]
        b_idx, q_idx = np.nonzero(valid)
        places = np.stack([b_idx, q_idx], 1)
        atol = 1e-4 * float(np.abs(effect).max())
        for h in range(ds.sizes["head"]):
            e = effect[b_idx, h, q_idx]
            for o, sign in enumerate((1.0, -1.0)):
                got = res.isel(layer=i, head=h, order=o)
                at = list(zip(got["sequence"].values, got["pos"].values))
                _check_top(got["effect"].values * sign, at, _tie_sorted(sign * e, places),
                           lambda p, s=sign, h=h, e=effect: s * float(e[p[0], h, p[1]]), atol)  # fmt: skip
            if by == "next":
                got = res.isel(layer=i, head=h, order=0)
                assert got["target"].values.tolist() == [tokens[b, p + 1] for b, p in zip(got["sequence"], got["pos"])]


def _search_brute(live: Live, query: Any, key: Any) -> tuple[np.ndarray, int, int]:
    """(mass (layer, head), queries, pairs) by loops over the live patterns, predicates on the token strings."""
    tokens, length, _ = _real(live)
    vocab = live.ds.hs.vocab

    def match(pred: Any, b: int, p: int) -> bool:
        s = vocab[tokens[b, p]]
        if pred is Relation.ANY:
            return True
        if isinstance(pred, re.Pattern):
            return pred.search(s) is not None
        return s == pred if isinstance(pred, str) else int(tokens[b, p]) == pred

    layers = live.ds.hs.layers
    total = np.zeros((len(layers), live.ds.sizes["head"]))
    n_q = n_pairs = 0
    for b in range(tokens.shape[0]):
        for q in range(length[b]):
            if not match(query, b, q):
                continue
            if key is Relation.PREVIOUS:
                keys = [q - 1] if q >= 1 else []
            elif key is Relation.EARLIER_COPY:
                keys = [k for k in range(q) if tokens[b, k] == tokens[b, q]]
            else:
                keys = [k for k in range(q + 1) if match(key, b, k)]
            if keys:
                n_q, n_pairs = n_q + 1, n_pairs + len(keys)
                for i, L in enumerate(layers):
                    total[i] += live.cache[f"blocks.{L}.attn.hook_pattern"][b, :, q, keys].sum(0)
    return total / max(n_q, 1), n_q, n_pairs


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_search_equals_brute_force(family: str, live_family: Callable[[str], Live]) -> None:
    live = live_family(family)
    ds = live.ds
    to = ds.hs.token_id(" to")
    cases = [
        (" to", " and"), (to, Relation.EARLIER_COPY), (Relation.ANY, Relation.PREVIOUS),
        (Relation.ANY, Relation.EARLIER_COPY), (re.compile(r"^ [A-Z]"), re.compile(r"^ [A-Z]")), (" gave", Relation.ANY),
    ]  # fmt: skip
    for query, key in cases:
        res = attention_search(ds, query=query, key=key)
        mass, n_q, n_pairs = _search_brute(live, query, key)
        assert (int(res["n_queries"]), int(res["n_pairs"])) == (n_q, n_pairs), (query, key)
        np.testing.assert_allclose(res["mass"].values, mass, rtol=1e-5, atol=1e-6, err_msg=f"{query!r} {key!r}")
        flat = res["mass"].values.ravel()
        assert flat[np.argsort(res["rank"].values.ravel())].tolist() == sorted(flat, reverse=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_head_similarity_equals_brute_force(family: str, live_family: Callable[[str], Live]) -> None:
    live = live_family(family)
    tokens, length, _ = _real(live)
    layers = live.ds.hs.layers
    pats = np.stack([live.cache[f"blocks.{L}.attn.hook_pattern"] for L in layers], 1)  # b, l, h, q, k
    cols = [
        pats[b, :, :, q, k].ravel() for b in range(tokens.shape[0]) for q in range(1, length[b]) for k in range(q + 1)
    ]
    want = np.corrcoef(np.array(cols).T)
    res = head_similarity(live.ds)
    n = len(layers) * live.ds.sizes["head"]
    np.testing.assert_allclose(res["similarity"].values.reshape(n, n), want, rtol=0, atol=1e-5)
    order = res["order_layer"].values * live.ds.sizes["head"] + res["order_head"].values
    assert sorted(order.tolist()) == list(range(n))
    # heads in one cluster sit next to each other in the order
    clusters = res["cluster"].values.ravel()[order - order.min()] if min(layers) == 0 else None
    if clusters is not None:
        runs = [c for i, c in enumerate(clusters) if i == 0 or c != clusters[i - 1]]
        assert len(runs) == len(set(runs))


# ------------------------------------------------------------------------------------------------ bad input


def test_refusals_name_the_problem(live_family: Callable[[str], Live], make_store: Callable[..., Path]) -> None:
    ds = live_family("gpt2").ds
    absent = int(np.setdiff1d(np.arange(ds.hs.config.d_vocab), ds["tokens"].values)[5])
    cases: list[tuple[Callable[[], Any], str]] = [
        (lambda: attention_search(ds, query=absent, key=Relation.ANY), "matches no token of this store"),
        (lambda: attention_search(ds, query=" to", key=ds.hs.vocab[absent]), "matches no token of this store"),
        (lambda: attention_search(ds, query=re.compile("^@@@$"), key=Relation.ANY), "matches no token of the vocab"),
        (lambda: attention_search(ds, query=Relation.PREVIOUS, key=" to"), "give it as key"),
        (lambda: top_attention(ds, heads=[(0, 9)]), "head 9 is out of range"),
        (lambda: top_effects(ds, heads=[(5, 0)]), "layer 5 is not in this store"),
        (lambda: head_similarity(ds, threshold=2.0), "threshold"),
        (lambda: top_effects(ds, by="sideways"), "by must be"),  # type: ignore[arg-type]
        (lambda: top_attention(ds, k=0), "positive integer"),
    ]
    no_pattern = headstore.open_store(make_store("tiny-gpt2", "ioi", n_seq=4, fields=("default",), drop=("pattern",)))
    cases += [(lambda f=f: f(no_pattern), "needs pattern") for f in (  # type: ignore[misc]
        top_attention, head_similarity, lambda d: attention_search(d, query=" to", key=Relation.ANY),
        lambda d: top_effects(d, by="attended"))]  # fmt: skip
    for call, text in cases:
        with pytest.raises(HeadstoreError) as ei:
            call()
        assert "\n" not in str(ei.value) and text in str(ei.value), str(ei.value)


def test_compact_store_derives_the_pattern(make_store: Callable[..., Path]) -> None:
    full = headstore.open_store(make_store("tiny-llama", "ioi", n_seq=4))
    compact = headstore.open_store(make_store("tiny-llama", "ioi", n_seq=4, fields=("compact",)))
    a, b = top_attention(full, k=4), top_attention(compact, k=4)
    np.testing.assert_allclose(a["weight"].values, b["weight"].values, atol=2e-6)
    np.testing.assert_allclose(
        head_similarity(full)["similarity"].values, head_similarity(compact)["similarity"].values, atol=1e-5
    )


# ------------------------------------------------------------------------------------------------ the dashboard


def _dom(url: str, tmp: Path) -> str:
    """The DOM of ``url`` after headless Chromium loaded it (skips where no Chromium is installed)."""
    import shutil
    import subprocess

    binary = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    if binary is None:
        pytest.skip("chromium is not installed: the browser check needs it (scripts/test.sh installs it)")
    (tmp / "profile").mkdir(exist_ok=True)
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           f"--user-data-dir={tmp / 'profile'}", "--virtual-time-budget=5000", "--dump-dom", url]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, timeout=120)
    assert res.returncode == 0, res.stderr.decode(errors="replace")[-2000:]
    return res.stdout.decode("utf-8")


@pytest.fixture(scope="module")
def site(make_store: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(store, site folder): ``headstore dashboard STORE OUT --k 5`` through the CLI."""
    from typer.testing import CliRunner

    from headstore.cli import app

    store = make_store("tiny-gpt2", "ioi", n_seq=6)
    out = tmp_path_factory.mktemp("site") / "site"
    res = CliRunner().invoke(app, ["dashboard", str(store), str(out), "--k", "5"])
    assert res.exit_code == 0, res.output
    return store, out


def test_dashboard_in_chromium(site: tuple[Path, Path], tmp_path: Path) -> None:
    """Open the index (served by ``headstore serve``'s server, and from file://), follow head 1.2's link, and check
    its page shows that head's top examples with the right tokens highlighted: brute force over the store."""
    import threading
    from urllib.parse import urljoin

    from headstore.cli.serve import make_server

    store, out = site
    server = make_server(str(out), port=0, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        index_url = f"http://127.0.0.1:{server.server_address[1]}/index.html"
        index = _dom(index_url, tmp_path)
    finally:
        server.shutdown()
        server.server_close()
    links = dict(re.findall(r'<a class="hs-head" href="([^"]+)"[^>]*>(\d+\.\d+)</a>', index))
    ds = headstore.open_store(store)
    assert sorted(links.values()) == sorted(f"{L}.{h}" for L, h in ds.hs.heads)
    href = next(h for h, name in links.items() if name == "1.2")
    page = _dom(urljoin((out / "index.html").resolve().as_uri(), href), tmp_path)
    assert "Head 1.2" in page
    pat, tokens, length = ds["pattern"].values[:, 1, 2], ds["tokens"].values, ds["length"].values
    bos = ds.hs.provenance.tokenizer.bos_token_id
    entries = [(pat[b, q, k], b, q, k) for b in range(len(length)) for q in range(length[b]) for k in range(q + 1)
               if tokens[b, k] != bos]  # fmt: skip
    want = sorted(entries, key=lambda e: (-e[0], e[1], e[2], e[3]))[:5]
    attention = page[page.index("Top attention") : page.index("Top direct effects")]
    shown = re.findall(r'<div class="hs-ex">(.*?)</div>', attention, flags=re.S)
    assert len(shown) == 5
    vocab = ds.hs.vocab
    for (w, b, q, k), ex in zip(want, shown):
        assert f"sequence {b}, query {q} → key {k}" in ex
        key = re.search(r'<span class="hs-tok hs-key[^"]*" data-pos="(\d+)" data-weight="([0-9.]+)"[^>]*>([^<]*)<', ex)
        assert key is not None and int(key.group(1)) == k
        assert abs(float(key.group(2)) - w) < 1e-4
        assert html.unescape(key.group(3)) == vocab[tokens[b, k]].replace("\n", "↵")
        weights = {int(p): float(x) for p, x in re.findall(r'data-pos="(\d+)" data-weight="([0-9.]+)"', ex)}
        for p, x in weights.items():  # every highlighted key carries the query's weight on it
            assert abs(x - pat[b, q, p]) < 1e-4


def test_dashboard_pages_stay_small(site: tuple[Path, Path]) -> None:
    _, out = site
    pages = list((out / "heads").glob("*.html"))
    assert len(pages) == 8
    assert max(p.stat().st_size for p in pages) < 40_000
    assert "<script" not in (out / "index.html").read_text() + pages[0].read_text()


def test_a_subset_reports_its_sequence_labels(live_family: Callable[[str], Live]) -> None:
    """On ``ds.isel(batch=rows)`` the examples name sequences by their store labels, ties in the subset's order."""
    ds = live_family("gpt2").ds
    rows = [5, 3, 1]
    sub = top_attention(ds.isel(batch=rows), k=K, exclude_bos=False, heads=[(0, 1)]).sel(layer=0, head=1)
    pat, length = ds["pattern"].values[:, 0, 1], ds["length"].values
    entries = [(pat[b, q, k], i, q, k) for i, b in enumerate(rows) for q in range(length[b]) for k in range(q + 1)]
    want = sorted(entries, key=lambda e: (-e[0], e[1], e[2], e[3]))[:K]
    got = list(zip(sub["sequence"].values, sub["query_pos"].values, sub["key_pos"].values))
    assert got == [(rows[i], q, k) for _, i, q, k in want]


def test_layers_without_a_stored_pattern_are_not_measured(make_store: Callable[..., Path]) -> None:
    """``--pattern-layers 1``: layer 0's heads have no examples, NaN mass (rank -1) and NaN similarity, never a
    rank among the measured heads; layer 1 is as on a full store."""
    ds = headstore.open_store(make_store("tiny-gpt2", "ioi", n_seq=4, pattern_layers=(1,)))
    full = headstore.open_store(make_store("tiny-gpt2", "ioi", n_seq=4))
    top = top_attention(ds, k=3)
    assert np.isnan(top["weight"].sel(layer=0)).all() and (top["sequence"].sel(layer=0) == -1).all()
    xr.testing.assert_equal(top.sel(layer=1), top_attention(full, k=3).sel(layer=1))
    hits = attention_search(ds, query=Relation.ANY, key=Relation.PREVIOUS)
    assert (hits["rank"].sel(layer=0) == -1).all() and sorted(hits["rank"].sel(layer=1).values) == [0, 1, 2, 3]
    sim = head_similarity(ds)
    assert np.isnan(sim["similarity"].sel(layer_a=0)).all() and (sim["cluster"].sel(layer=0) == -1).all()


@pytest.mark.parametrize("family", ["gpt2", "qwen3"])
def test_dashboard_circuits_equal_the_circuit_rows(family: str, live_family: Callable[[str], Live]) -> None:
    """The OV / QK entries of a head page are the top of ``C_OV[src, :]`` / ``C_QK[query, :]`` over the vocabulary,
    as the circuits analyzer's row functions compute them (checked against a one-token forward in test_families),
    for the key / query tokens of the head's top examples (qwen3: through its q/k norms)."""
    from headstore.analyze._circuits import _ov_row, _qk_row
    from headstore.report.dashboard import N_CIRCUIT_TOP, collect

    ds = live_family(family).ds
    data = collect(ds, "test", k=3)
    vocab = ds.hs.vocab
    for (i, h), circ in data.circuits.items():
        ex = data.top.isel(layer=i, head=h)
        for kind, ids, row in (("ov", ex["key_token"].values, _ov_row), ("qk", ex["query_token"].values, _qk_row)):
            want = []
            for t in dict.fromkeys(int(x) for x in ids if x >= 0):
                scores = row(ds, t)[i, h]
                top = np.argsort(-scores, kind="stable")[:N_CIRCUIT_TOP]
                want += [(vocab[t], vocab[c], scores[c]) for c in top]
            got = circ[kind]
            assert [(a, b) for a, b, _ in got] == [(a, b) for a, b, _ in want], (kind, i, h)
            np.testing.assert_allclose([v for *_, v in got], [v for *_, v in want], rtol=1e-4, atol=1e-5)


def test_dashboard_scores_and_streams_equal_the_whole_store_computations(make_store: Callable[..., Path]) -> None:
    """The dashboard's census scores (computed a few layers at a time) are head_scores' and copy_suppression's
    means bitwise; the streamed analyzers give the same results one block at a time as a wave of blocks at once."""
    import dask

    from headstore.analyze import copy_suppression, head_scores
    from headstore.pipeline.census import KINDS
    from headstore.report.dashboard import collect

    ds = headstore.open_store(make_store("tiny-gpt2", "ioi", n_seq=6, batch_size=2))
    data = collect(ds, "tiny", k=3)
    want = head_scores(ds).compute()
    for kind in KINDS:
        np.testing.assert_array_equal(data.scores[kind].values, want[kind].values, err_msg=kind)
    np.testing.assert_array_equal(data.scores["copy_suppression"].values, copy_suppression(ds)["score"].values)
    with dask.config.set(num_workers=1):
        one = top_attention(ds, k=3), top_effects(ds, k=3), head_similarity(ds)
    for a, b in zip(one, (data.top, data.effects, data.similarity)):
        xr.testing.assert_identical(a, b)
