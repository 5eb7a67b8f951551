"""Compact stores (issue 5): pattern not stored, q and k stored, pattern derived on open.

Oracles: the live bridge's ``hook_pattern`` on the same tokens, and the pattern stored by a normal
extraction of the same tokens; analyzers must give the same numbers on both kinds of store.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import headstore
from headstore.analyze import copy_suppression, ioi
from headstore.cli import app
from headstore.cli.registry import analyzers
from headstore.store_schema import FIELDS, HeadstoreError, parse_fields, provenance
from headstore.store_schema.attention import derived_pattern
from headstore.store_schema.layout import GRAD_FIELDS, IG_FIELDS

MODELS = ("tiny-gpt2", "tiny-llama")
KW: dict[str, Any] = {"n_seq": 10, "batch_size": 4}  # same arguments as test_extract's default store (shared)


def live_patterns(model: Any, tokens: np.ndarray, layers: list[int]) -> np.ndarray:
    """(batch, layer, head, query_pos, key_pos) from the bridge's own hook_pattern."""
    names = [f"blocks.{L}.attn.hook_pattern" for L in layers]
    with torch.inference_mode():
        _, cache = model.bridge.run_with_cache(torch.as_tensor(tokens, dtype=torch.long), names_filter=names)
    return np.stack([cache[n].float().numpy() for n in names], axis=1)


# --- the field spec ---------------------------------------------------------------------------------


def test_parse_fields_drop_and_compact_preset() -> None:
    default = {n for n, f in FIELDS.items() if f.default}
    want = tuple(n for n in FIELDS if n in (default - {"pattern"}) | {"q", "k"})
    assert "pattern" not in want and {"q", "k", "tokens", "v", "z"} <= set(want)
    assert parse_fields("default,-pattern,q,k") == want
    assert parse_fields("compact") == want
    assert parse_fields("-pattern, q ,default,k") == want  # removals apply after additions, in any place
    assert parse_fields("all,-result,-resid_pre") == tuple(
        n for n in FIELDS if n not in ("result", "resid_pre", *GRAD_FIELDS, *IG_FIELDS)
    )
    assert parse_fields("compact,pattern") == tuple(n for n in FIELDS if n in set(want) | {"pattern"})
    assert parse_fields("default,-loss,-z") == tuple(n for n in FIELDS if n in default - {"loss", "z"})


@pytest.mark.parametrize(
    ("spec", "must"),
    [
        ("default,-nosuch", "cannot drop unknown field 'nosuch'"),
        ("-nosuch", "unknown field 'nosuch'"),
        ("default,-", "unknown field ''"),
        ("default,-tokens", "tokens is always stored"),
        ("default,-q", "-q drops q, which no other item selects"),
        ("-pattern,q,k", "-pattern drops pattern"),
        ("compact,--pattern", "unknown field '-pattern'"),
        ("compactt", "unknown field 'compactt'"),
    ],
)
def test_parse_fields_nonsense_is_one_line_error(spec: str, must: str) -> None:
    with pytest.raises(HeadstoreError) as ei:
        parse_fields(spec)
    assert must in str(ei.value) and "\n" not in str(ei.value)


def test_cli_bad_drop_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    argv = ["extract", "--model", "tiny-gpt2", "--data", "ioi", "--n-seq", "4", "--batch-size", "4",
            "--device", "cpu", "--fields", "default,-nosuch", "--out", str(out), "--no-progress"]  # fmt: skip
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "nosuch" in lines[0], res.stderr
    assert list(tmp_path.iterdir()) == []


# --- derived pattern == live pattern == stored pattern ------------------------------------------------


@pytest.mark.parametrize("model_name", MODELS)
def test_derived_pattern_equals_live_and_stored(
    model_name: str, make_store: Callable[..., Path], live_model: Callable[[str], Any]
) -> None:
    path = make_store(model_name, "ioi", fields=("compact",), **KW)
    ds = headstore.open_store(path)
    prov = provenance(ds)
    assert "pattern" not in prov.fields and {"q", "k"} <= set(prov.fields)
    assert not (path / "pattern").exists()  # really not on disk
    pat = ds["pattern"]
    cfg = prov.config
    n, P, H = ds.sizes["batch"], ds.sizes["pos"], cfg["n_heads"]
    assert pat.dims == FIELDS["pattern"].dims and pat.dtype == np.float32
    assert pat.shape == (n, len(prov.layers), H, P, P)
    assert pat.chunks == ((4, 4, 2), (1,) * len(prov.layers), (H,), (P,), (P,))  # one per (batch chunk, layer)
    assert list(pat["layer"].values) == list(prov.layers)
    if model_name == "tiny-llama":
        assert cfg["n_key_value_heads"] < H and ds.sizes["kv_head"] == cfg["n_key_value_heads"]  # GQA exercised

    tokens = ds["tokens"].values
    # right-padded IOI prompts: padding is there, and the derived pattern matches at every position anyway
    # (extract passes no attention mask, so pad tokens are ordinary causal inputs in the live model too)
    assert (ds["length"].values < P).any()
    derived = pat.values
    live = live_patterns(live_model(model_name), tokens, list(prov.layers))
    np.testing.assert_allclose(derived, live, rtol=0, atol=1e-6)
    assert np.abs(derived - live).max() < 1e-6
    assert np.isfinite(derived).all()
    np.testing.assert_allclose(derived.sum(-1), 1.0, atol=1e-5)
    assert (np.triu(np.ones((P, P), bool), 1) <= (derived == 0)).all()  # exactly zero above the diagonal

    full = headstore.open_store(make_store(model_name, "ioi", **KW))
    assert "pattern" in provenance(full).fields
    np.testing.assert_array_equal(full["tokens"].values, tokens)
    np.testing.assert_allclose(derived, full["pattern"].values, rtol=0, atol=1e-6)
    # and z == derived pattern @ v (kv head h // group), the model's own value mixing
    kv = np.arange(H) // (H // cfg["n_key_value_heads"])
    z = np.einsum("blhqk,blkhd->blqhd", derived, ds["v"].values[:, :, :, kv])
    np.testing.assert_allclose(ds["z"].values, z, rtol=1e-5, atol=1e-6)


def test_derived_pattern_in_memory_and_one_head_read(make_store: Callable[..., Path]) -> None:
    ds = headstore.open_store(make_store("tiny-llama", "ioi", fields=("compact",), **KW))
    loaded = derived_pattern(ds["q"].load(), ds["k"].load())  # numpy-backed input: computed at once
    assert loaded.chunks is None
    np.testing.assert_array_equal(loaded.values, ds["pattern"].values)
    one = ds["pattern"].sel(layer=1).isel(head=3, batch=slice(2, 7)).values
    np.testing.assert_array_equal(one, loaded.values[2:7, 1, 3])


def test_float16_compact_store_within_tolerance(
    make_store: Callable[..., Path], live_model: Callable[[str], Any]
) -> None:
    """q, k rounded to float16 (relative 2**-11), derivation in float32: pattern within 1e-4 of the live one.

    The error is the float16 rounding of the scores (about 2**-10 * |q| |k| / sqrt(d_head)) passed through
    the softmax; on these tiny models it measures ~8e-6. bench/storage.py --compact-only reports it for SmolLM2.
    """
    for model_name in MODELS:
        ds = headstore.open_store(make_store(model_name, "ioi", fields=("compact",), dtype="float16", **KW))
        assert ds["q"].dtype == np.float16 and ds["k"].dtype == np.float16
        assert ds["pattern"].dtype == np.float32  # derived in float32 after the upcast
        live = live_patterns(live_model(model_name), ds["tokens"].values, list(provenance(ds).layers))
        np.testing.assert_allclose(ds["pattern"].values, live, rtol=0, atol=1e-4, err_msg=model_name)


# --- analyzers run unchanged ------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", MODELS)
def test_analyzers_same_on_compact_and_full(model_name: str, make_store: Callable[..., Path]) -> None:
    compact = headstore.open_store(make_store(model_name, "ioi", fields=("compact",), **KW))
    full = headstore.open_store(make_store(model_name, "ioi", **KW))
    a, b = copy_suppression(compact).compute(), copy_suppression(full).compute()
    for name in ("per_position", "per_sequence", "score"):
        assert np.abs(b[name].values).max() > 0
        np.testing.assert_allclose(a[name].values, b[name].values, rtol=1e-5, atol=1e-7, err_msg=name)
    ia, ib = ioi(compact).compute(), ioi(full).compute()
    assert set(ia.data_vars) == set(ib.data_vars)
    for name in ia.data_vars:
        np.testing.assert_allclose(ia[name].values, ib[name].values, rtol=1e-5, atol=1e-7, err_msg=str(name))


def test_open_and_analyze_compact_store_without_torch(
    make_store: Callable[..., Path], run_without_torch: Callable[[str], dict]
) -> None:
    path = make_store("tiny-llama", "ioi", fields=("compact",), **KW)
    out = run_without_torch(
        "import headstore\n"
        "from headstore.analyze import copy_suppression\n"
        f"ds = headstore.open_store({str(path)!r})\n"
        "out['sum'] = float(ds['pattern'].sum()); res = copy_suppression(ds).compute()\n"
    )
    # every query row sums to 1: batch * layers * heads * positions
    ds = headstore.open_store(path)
    assert out["sum"] == pytest.approx(
        ds.sizes["batch"] * ds.sizes["layer"] * ds.sizes["head"] * ds.sizes["pos"], rel=1e-5
    )


# --- the extraction-time check ------------------------------------------------------------------------


def test_extract_refuses_compact_when_pattern_is_not_derivable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, live_model: Callable[[str], Any]
) -> None:
    """Simulate a model whose scores are not q . k / sqrt(d_head) (e.g. another scale): nothing is written."""
    import headstore.extract.compact as compact
    from headstore.extract import ExtractRequest, extract

    real = compact.pattern_block
    monkeypatch.setattr(compact, "pattern_block", lambda q, k, *a: real(q * np.float32(1.25), k, *a))
    out = tmp_path / "s.zarr"
    req = ExtractRequest(model="tiny-llama", data="ioi", out=str(out), fields=("compact",), n_seq=4, batch_size=4,
                         device="cpu", progress=False)  # fmt: skip
    with pytest.raises(HeadstoreError, match="pattern cannot be derived") as ei:
        extract(req)
    assert "\n" not in str(ei.value)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(compact, "pattern_block", real)
    toks = np.random.default_rng(0).integers(1, 500, (2, 16))
    assert compact.check_pattern_derivable(live_model("tiny-llama"), toks, [0, 1]) < 1e-6


# --- fields auto, the default: q, k for pattern where smaller, z derived on open -------------------------


def test_auto_resolves_by_bytes_per_token_at_seq_len() -> None:
    """SmolLM2-135M: 9 heads, 3 kv heads, d_head 64: q + k = 768 values per token and layer, the pattern's causal
    non-zeros 9 * (seq_len + 1) / 2."""
    from headstore.extract.auto import auto_fields
    from headstore.store_schema.layout import PRESETS, derived_fields
    from headstore.store_schema.provenance import ModelConfig

    cfg = ModelConfig(30, 9, 3, 576, 64, 49152, 8192, "RMS", 1e-5, "rotary")
    auto = PRESETS["auto"]
    assert "z" not in auto and "pattern" in auto and set(auto) == set(PRESETS["default"]) - {"z"}

    def resolve(items: tuple[str, ...], seq_len: int, drop: tuple[str, ...] = (), **kw: Any) -> set[str]:
        fields = parse_fields(",".join([*items, *(f"-{d}" for d in drop)]))
        return set(auto_fields(items, drop, fields, cfg, seq_len, kw.get("all_layers", True), kw.get("cannot", ())))

    swapped = set(auto) - {"pattern"} | {"q", "k"}
    assert resolve(("auto",), 128) == set(auto)  # 9 * 129 / 2 = 580.5 < 768: the pattern is smaller
    assert resolve(("auto",), 169) == set(auto)  # 765 < 768
    assert resolve(("auto",), 170) == swapped  # 769.5 > 768
    assert resolve(("auto",), 2048) == swapped
    assert resolve(("auto", "pattern"), 2048) == set(auto)  # pattern asked for by name: kept, no q, k
    assert resolve(("auto", "z"), 2048) == swapped | {"z"}  # --fields auto,z (or default) stores z
    assert resolve(("default",), 2048) == set(PRESETS["default"])  # default keeps its meaning
    assert resolve(("auto",), 2048, all_layers=False) == set(auto) | {"z"}  # --pattern-layers: z not derivable
    assert resolve(("auto",), 2048, cannot=("q",)) == set(auto)  # a family without q: pattern stays
    assert resolve(("auto",), 2048, drop=("v",)) == swapped - {"v"} | {"z"}  # no v: z cannot be derived
    assert derived_fields(tuple(swapped)) == ("pattern", "z", "result")
    assert derived_fields(tuple(auto)) == ("z", "result")
    assert derived_fields(PRESETS["default"]) == ("result",)


AUTO_KW: dict[str, Any] = {"seq_len": 64, "n_seq": 4}  # tiny-gpt2: q + k = 128 values < pattern 4 * 65 / 2 = 130


@pytest.mark.parametrize("name", sorted(analyzers()))
def test_every_analyzer_same_on_auto_and_full(name: str, analyzer_inputs: Callable[..., Any]) -> None:
    """Every registered analyzer on an auto store (q, k, v stored; pattern and z derived) and on a full store
    (pattern and z stored) of the same model and prompts: the same results, float32 storage's tolerance."""
    auto, kw = analyzer_inputs(name, "auto", **AUTO_KW)
    full, kw_full = analyzer_inputs(name, "default", **AUTO_KW)
    for ds in auto:  # z derived everywhere; pattern too at seq_len 64 (code-ifelse sequences are shorter)
        derived = provenance(ds).derived or ()
        assert "z" in derived and "z" not in provenance(ds).fields
        assert "pattern" in derived or name == "ifelse-detector"
    if name in ("logit-attribution",):
        kw, kw_full = {"target": auto[0]["io_token"]}, {"target": full[0]["io_token"]}
    a, b = analyzers()[name].func(*auto, **kw).compute(), analyzers()[name].func(*full, **kw_full).compute()
    # attention-attribution adds score_stored where the store holds q and k: every full-store output is there
    assert set(b.data_vars) <= set(a.data_vars) and set(a.data_vars) - set(b.data_vars) <= {"score_stored"}
    assert a.attrs == b.attrs
    for var in b.data_vars:
        x, y = a[var].values, b[var].values
        assert a[var].dims == b[var].dims, var
        # differences of O(1) float32 values (a residual; loss - loss_original): round-off of their terms
        if var in ("reconstruction_error", "mean_increase"):
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-6, err_msg=f"{name}.{var}")
        elif y.dtype.kind == "f":
            scale = float(np.nanmax(np.abs(y))) if np.isfinite(y).any() else 1.0
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5 * max(scale, 1e-30), err_msg=f"{name}.{var}")
        else:
            np.testing.assert_array_equal(x, y, err_msg=f"{name}.{var}")


def test_cli_default_is_auto_and_info_shows_stored_and_derived(tmp_path: Path) -> None:
    """No --fields: tiny-llama at 48 tokens stores q, k (96 values per token and layer < 4 * 49 / 2), no pattern or z."""
    out = tmp_path / "a.zarr"
    argv = ["extract", "--model", "tiny-llama", "--data", "text", "--seq-len", "48", "--n-seq", "4", "--batch-size",
            "4", "--device", "cpu", "--out", str(out), "--no-progress"]  # fmt: skip
    assert CliRunner().invoke(app, argv).exit_code == 0
    prov = provenance(headstore.open_store(out))
    assert {"q", "k", "v"} <= set(prov.fields) and not {"pattern", "z"} & set(prov.fields)
    assert prov.derived == ("pattern", "z", "result")
    assert not (out / "pattern").exists() and not (out / "z").exists()
    res = CliRunner().invoke(app, ["info", str(out)])
    assert res.exit_code == 0
    line = next(ln for ln in res.output.splitlines() if ln.startswith("fields"))
    assert line.endswith("; derived on open: pattern, z, result") and "stored: tokens, v, q, k" in line, line


def test_auto_stores_z_when_the_model_does_not_give_pattern_at_v(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model whose z is not pattern @ v (simulated): auto stores z, with a notice; -z asked for is refused."""
    import headstore.extract.compact as compact
    from headstore.extract import ExtractRequest, extract

    real = compact.z_block
    monkeypatch.setattr(compact, "z_block", lambda p, v: real(p, v) * np.float32(1.01))
    kw: dict[str, Any] = {"model": "tiny-llama", "data": "ioi", "n_seq": 4, "batch_size": 4, "device": "cpu"}
    extract(ExtractRequest(out=str(tmp_path / "a.zarr"), progress=False, **kw))
    assert "storing z: model 'tiny-llama': pattern @ v differs" in capsys.readouterr().err
    prov = provenance(headstore.open_store(tmp_path / "a.zarr"))
    assert "z" in prov.fields and prov.derived == ("result",)
    with pytest.raises(HeadstoreError, match="z cannot be derived") as ei:
        extract(ExtractRequest(out=str(tmp_path / "b.zarr"), fields=("default",), drop=("z",), progress=False, **kw))
    assert "\n" not in str(ei.value) and not (tmp_path / "b.zarr").exists()
