"""``--pattern-layers`` (issue 5): pattern stored for chosen layers only; the others are never written.

Oracles: a full extraction of the same tokens (same bridge, same batches: bit-identical pattern), the
live bridge's ``hook_pattern``, and the chunk files on disk.
"""

from __future__ import annotations

import json
import shutil
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
from headstore.extract.batch import hook_names
from headstore.store_schema import HeadstoreError, Provenance, provenance, read_provenance, validate
from headstore.store_schema.read.info import array_nbytes_on_disk

KW: dict[str, Any] = {"n_seq": 10, "batch_size": 4}  # same arguments as test_compact's stores (shared)
ARGV = ["extract", "--model", "tiny-gpt2", "--data", "ioi", "--n-seq", "10", "--batch-size", "4",
        "--device", "cpu", "--no-progress"]  # fmt: skip


def live_patterns(model: Any, tokens: np.ndarray, layers: list[int]) -> np.ndarray:
    """(batch, layer, head, query_pos, key_pos) from the bridge's own hook_pattern."""
    names = [f"blocks.{L}.attn.hook_pattern" for L in layers]
    with torch.inference_mode():
        _, cache = model.bridge.run_with_cache(torch.as_tensor(tokens, dtype=torch.long), names_filter=names)
    return np.stack([cache[n].float().numpy() for n in names], axis=1)


def inner_chunk(shard: Path, layer: int, n_layers: int = 2) -> bytes | None:
    """The bytes of one layer's inner chunk in a pattern shard (None: not in the shard), from the
    shard index at the file's end (uint64 (offset, nbytes) per inner chunk, then a crc32c)."""
    data = shard.read_bytes()
    table = np.frombuffer(data[-(16 * n_layers + 4) : -4], dtype="<u8").reshape(n_layers, 2)
    offset, nbytes = (int(x) for x in table[layer])
    return None if offset == 2**64 - 1 else data[offset : offset + nbytes]


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _one_line_error(argv: list[str]) -> str:
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 2, (res.exit_code, res.stdout, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    return lines[0]


# --- the stored layer is exact, the others are NaN and absent from disk -----------------------------------


def test_chosen_layer_stored_exactly_others_nan(
    make_store: Callable[..., Path], live_model: Callable[[str], Any]
) -> None:
    path = make_store("tiny-gpt2", "ioi", pattern_layers=(1,), **KW)
    full_path = make_store("tiny-gpt2", "ioi", fields=("default",), **KW)
    ds, full = headstore.open_store(path), headstore.open_store(full_path)
    prov = provenance(ds)
    assert prov.layers == (0, 1) and prov.pattern_layers == (1,) and prov.stored_pattern_layers == (1,)
    assert provenance(full).pattern_layers == (0, 1)
    pat = ds["pattern"]
    assert pat.shape == full["pattern"].shape and pat.dtype == full["pattern"].dtype  # dims unchanged
    assert pat.chunks == full["pattern"].chunks  # one chunk per (batch chunk, layer), as before
    got = pat.values
    np.testing.assert_array_equal(got[:, 1], full["pattern"].values[:, 1])  # bit-identical
    live = live_patterns(live_model("tiny-gpt2"), ds["tokens"].values, [1])[:, 0]
    np.testing.assert_allclose(got[:, 1], live, rtol=0, atol=1e-7)
    assert np.isfinite(got[:, 1]).all() and np.isnan(got[:, 0]).all()  # "not stored", never numbers
    np.testing.assert_array_equal(ds["pattern"].sel(layer=1).values, got[:, 1])
    for name in ("z", "v", "loss", "resid_final"):  # the other fields are untouched by the option
        np.testing.assert_array_equal(ds[name].values, full[name].values, err_msg=name)
    # the layer-0 chunks were never written (absent from each batch's shard); the layer-1 chunks are
    # the full store's, byte for byte
    for b in range(3):
        shard, full_shard = (p / "pattern" / "c" / str(b) / "0" / "0" / "0" / "0" for p in (path, full_path))
        assert inner_chunk(shard, 0) is None and inner_chunk(full_shard, 0) is not None
        assert inner_chunk(shard, 1) == inner_chunk(full_shard, 1)
    part, whole = array_nbytes_on_disk(path)["pattern"], array_nbytes_on_disk(full_path)["pattern"]
    assert 0.4 < part / whole < 0.6, (part, whole)  # ~ 1 / n_layers (+ the array's zarr.json)


def test_hook_names_fetch_only_chosen_layers() -> None:
    hooks = hook_names(["pattern", "z"], [0, 1, 2], 3, False, pattern_layers=[2])
    assert hooks["pattern"] == ["blocks.2.attn.hook_pattern"]
    assert hooks["z"] == [f"blocks.{L}.attn.hook_z" for L in (0, 1, 2)]
    assert hook_names(["pattern"], [0, 1], 2, False)["pattern"] == [f"blocks.{L}.attn.hook_pattern" for L in (0, 1)]


def test_validate_skips_unwritten_layers_but_checks_written(make_store: Callable[..., Path], tmp_path: Path) -> None:
    src = make_store("tiny-gpt2", "ioi", pattern_layers=(1,), **KW)
    rep = validate(src)
    assert rep.ok and rep.problems == (), rep.problems
    path = tmp_path / "s.zarr"
    shutil.copytree(src, path)
    shard = path / "pattern" / "c" / "1" / "0" / "0" / "0" / "0"
    data = shard.read_bytes()
    body = inner_chunk(shard, 1)
    assert body is not None
    at = data.index(body) + len(body) - 1  # the last byte of layer 1's chunk: its checksum
    shard.write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :])
    (path / "pattern" / "c" / "2" / "0" / "0" / "0" / "0").unlink()
    problems = validate(path).problems
    assert len(problems) == 2, problems
    assert problems[0].startswith("pattern: chunk 1.1.0.0.0 is damaged"), problems
    assert problems[1] == "pattern: shard 2.0.0.0.0 is missing", problems


# --- analyzers: same numbers for the stored layer, NaN for the others -------------------------------------


def test_analyzers_stored_layer_equal_others_nan(make_store: Callable[..., Path]) -> None:
    ds = headstore.open_store(make_store("tiny-gpt2", "ioi", pattern_layers=(1,), **KW))
    full = headstore.open_store(make_store("tiny-gpt2", "ioi", fields=("default",), **KW))
    a, b = copy_suppression(ds).compute(), copy_suppression(full).compute()
    ia, ib = ioi(ds).compute(), ioi(full).compute()
    checked = []
    for res, ref in ((a, b), (ia, ib)):
        for name in res.data_vars:
            if "layer" not in res[name].dims:
                continue
            x, y = res[name].sel(layer=1).values, ref[name].sel(layer=1).values
            assert np.isfinite(y).all() and np.abs(y).max() > 0, name
            np.testing.assert_array_equal(x, y, err_msg=str(name))
            assert np.isnan(res[name].sel(layer=0).values).all(), name
            checked.append(str(name))
    assert sorted(checked) == sorted(
        ["per_position", "per_sequence", "score", "attn_diff", "attn_diff_mean", "attn_io_mean", "attn_s1_mean"]
    )


def test_unstored_layers_derived_when_q_k_stored(
    make_store: Callable[..., Path], live_model: Callable[[str], Any]
) -> None:
    ds = headstore.open_store(make_store("tiny-llama", "ioi", fields=("default", "q", "k"), pattern_layers=(1,), **KW))
    full = headstore.open_store(make_store("tiny-llama", "ioi", **KW))
    pat = ds["pattern"]
    assert pat.dtype == np.float32 and pat.shape == full["pattern"].shape
    assert pat.chunks == full["pattern"].chunks
    got = pat.values
    np.testing.assert_array_equal(got[:, 1], full["pattern"].values[:, 1])  # stored layer: as stored
    live = live_patterns(live_model("tiny-llama"), ds["tokens"].values, [0])[:, 0]
    np.testing.assert_allclose(got[:, 0], live, rtol=0, atol=1e-6)  # unstored layer: derived from q, k
    assert not np.array_equal(got[:, 0], got[:, 1])


# --- provenance: recorded, validated, compared on resume ---------------------------------------------------


def test_provenance_pattern_layers_parsing(make_store: Callable[..., Path]) -> None:
    d = read_provenance(make_store("tiny-gpt2", "ioi", fields=("default",), **KW)).to_dict()
    assert d["pattern_layers"] == [0, 1]
    old = {k: v for k, v in d.items() if k != "pattern_layers"}  # a store made before the option
    p_old, p_new = Provenance.from_dict(old), Provenance.from_dict(d)
    assert p_old.pattern_layers is None and p_old.stored_pattern_layers == (0, 1)
    p_old.check_same_run(p_new)  # explicit "all" resumes a store that predates the option
    assert Provenance.from_dict({**d, "pattern_layers": [1]}).pattern_layers == (1,)
    with pytest.raises(HeadstoreError, match=r"different pattern_layers \(\[1\] vs \[0, 1\]\)"):
        Provenance.from_dict({**d, "pattern_layers": [1]}).check_same_run(p_old)
    compact = {**d, "fields": [f for f in d["fields"] if f != "pattern"]}
    assert Provenance.from_dict({**compact, "pattern_layers": None}).stored_pattern_layers == ()
    for bad in ("1", [1.0], [True], [], [1, 0], [0, 0], [2], {"a": 1}):
        with pytest.raises(HeadstoreError, match="pattern_layers") as ei:
            Provenance.from_dict({**d, "pattern_layers": bad})
        assert "\n" not in str(ei.value)
    with pytest.raises(HeadstoreError, match="pattern is not among the fields"):
        Provenance.from_dict({**compact, "pattern_layers": [0]})


def test_resume_with_other_pattern_layers_refused(make_store: Callable[..., Path], tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    shutil.copytree(make_store("tiny-gpt2", "ioi", pattern_layers=(1,), **KW), path)
    before = _snapshot(path)
    for spec, theirs in (("0", "[0]"), ("all", "[0, 1]"), ("0-1", "[0, 1]")):
        line = _one_line_error([*ARGV, "--pattern-layers", spec, "--out", str(path)])
        assert f"different pattern_layers ([1] vs {theirs})" in line, line
        assert _snapshot(path) == before
    res = CliRunner().invoke(app, [*ARGV, "--pattern-layers", "1", "--out", str(path)])  # the same command resumes
    assert res.exit_code == 0 and "wrote 0 batches, 3 already done" in " ".join(res.stdout.split()), res.stdout
    assert _snapshot(path) == before


@pytest.mark.parametrize(
    ("extra", "must"),
    [
        (["--pattern-layers", "5"], "--pattern-layers names [5] but the model has layers 0..1"),
        (["--pattern-layers", "abc"], "--pattern-layers 'abc' is not 'all'"),
        (["--pattern-layers", "0-x"], "--pattern-layers '0-x' is not 'all'"),
        (["--pattern-layers", "-1"], "--pattern-layers '-1' is not 'all'"),
        (["--layers", "0", "--pattern-layers", "1"], "--pattern-layers names [1] but --layers extracts only [0]"),
        (["--fields", "compact", "--pattern-layers", "1"], "needs pattern among the --fields"),
    ],
)
def test_cli_bad_pattern_layers_one_line_nothing_written(tmp_path: Path, extra: list[str], must: str) -> None:
    out = tmp_path / "s.zarr"
    line = _one_line_error([*ARGV, *extra, "--out", str(out)])
    assert must in line, line
    assert list(tmp_path.iterdir()) == []


def test_info_shows_pattern_layers(make_store: Callable[..., Path]) -> None:
    path = make_store("tiny-gpt2", "ioi", pattern_layers=(1,), **KW)
    res = CliRunner().invoke(app, ["info", str(path)])
    assert res.exit_code == 0
    assert "pattern    layers [1] (the other layers are not stored: NaN)" in res.stdout, res.stdout
    res = CliRunner().invoke(app, ["info", "--json", str(path)])
    assert json.loads(res.stdout)["provenance"]["pattern_layers"] == [1]
    full = CliRunner().invoke(app, ["info", str(make_store("tiny-gpt2", "ioi", fields=("default",), **KW))])
    assert "pattern    layers [0, 1]\n" in full.stdout
