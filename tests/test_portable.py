"""Every array of a store opens in another Zarr v3 implementation (Google's tensorstore), and reads there exactly
as zarr-python reads it; strings are stored as UTF-8 bytes and int64 offsets (core data types), presented by
``open_store`` as the string variables they were, and stores of schema version 1 (zarr-python's ``string``
type) still open."""

from __future__ import annotations

import itertools
import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from numpy.dtypes import StringDType

import headstore
from headstore.store_schema import HeadstoreError, read_provenance, validate
from headstore.store_schema.arrays import codecs
from headstore.store_schema.layout import ATTRS_KEY, SCHEMA_VERSION
from headstore.store_schema.strings import STRING_ATTR, decode, encode
from headstore.store_schema.write.create import consolidate, write_columns
from headstore.store_schema.write.weights import ensure_weights_store, pack

ts = pytest.importorskip("tensorstore")


@pytest.fixture(scope="module")
def stores(make_store: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An IOI store (a string column; conftest's default, shared with other tests), a text store made with
    ``--weights`` and that shared weights store (vocab)."""
    weights = tmp_path_factory.mktemp("portable") / "w.zarr"
    text = make_store("tiny-gpt2", "text", n_seq=4, seq_len=16, batch_size=2, weights=str(weights))
    return {"ioi": make_store("tiny-gpt2", "ioi"), "text": text, "weights": weights}


def _array_paths(store: Path) -> list[str]:
    """Every array of ``store``, found by walking its ``zarr.json`` files (not through any zarr library)."""
    out = []
    for meta in sorted(store.rglob("zarr.json")):
        if json.loads(meta.read_text())["node_type"] == "array":
            out.append(str(meta.parent.relative_to(store)))
    return out


def test_tensorstore_reads_every_array_exactly_as_zarr_python(stores: dict[str, Path]) -> None:
    seen: set[str] = set()
    sharded = 0
    for kind, store in stores.items():
        paths = _array_paths(store)
        assert len(paths) >= 6, kind
        for name in paths:
            spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(store / name)}}
            got = ts.open(spec, read=True).result().read().result()
            want = np.asarray(zarr.open_array(str(store / name), mode="r")[...])
            assert got.dtype == want.dtype and got.shape == want.shape, (kind, name)
            assert got.tobytes() == want.tobytes(), (kind, name)  # bit for bit (NaN payloads included)
            meta = json.loads((store / name / "zarr.json").read_text())
            sharded += meta["codecs"][0]["name"] == "sharding_indexed"
            seen.add(name)
    assert sharded >= 5  # per-layer fields of the sharded stores, tokens, per-layer weights
    assert {"vocab_bytes", "vocab_offsets", "template_bytes", "template_offsets", "W_E", "pattern"} <= seen
    assert "vocab" not in seen and "template" not in seen


def test_open_store_presents_the_strings_as_before(stores: dict[str, Path], live_model: Any) -> None:
    """vocab equals the tokenizer's own decoding of each id; str_tokens and the template column likewise, as
    numpy StringDType variables with the dims they had (``d_vocab``, ``batch``)."""
    from headstore.extract.data import build_dataset
    from headstore.extract.data.base import DataRequest

    tok = live_model("tiny-gpt2").tokenizer
    for kind in ("ioi", "text"):  # vocab in the store itself; vocab from the weights store
        ds = headstore.open_store(stores[kind])
        d_vocab = ds.sizes["d_vocab"]
        want = [tok.decode([i]) for i in range(min(len(tok), d_vocab))] + [""] * max(0, d_vocab - len(tok))
        assert ds["vocab"].dims == ("d_vocab",) and ds["vocab"].dtype == np.dtypes.StringDType()
        assert ds["vocab"].values.tolist() == want, kind
        ids = ds["tokens"].values[1].tolist()
        assert ds.hs.str_tokens(1) == [tok.decode([i]) for i in ids], kind
    ds = headstore.open_store(stores["ioi"])
    prompts = build_dataset(DataRequest("ioi", 12, None, 0, True), tok, 128)
    assert ds["template"].dims == ("batch",) and ds["template"].dtype == np.dtypes.StringDType()
    assert ds["template"].values.tolist() == prompts.columns["template"].tolist()
    assert all(validate(stores[k]).ok for k in ("ioi", "text"))


def _to_schema_1(store: Path) -> None:
    """Rewrite ``store`` as headstore wrote it at schema version 1: each string array in zarr-python's
    ``string`` type under its own name (decoded here without headstore), ``schema_version`` 1."""
    root = zarr.open_group(str(store), mode="r+", zarr_format=3)
    for name, arr in list(root.arrays()):
        spec = arr.attrs.get(STRING_ATTR)
        if not isinstance(spec, dict):
            continue
        raw, ends = bytes(np.asarray(root[spec["bytes"]][...])), np.asarray(arr[...]).tolist()  # type: ignore[index]
        values = np.array([raw[a:b].decode("utf-8") for a, b in itertools.pairwise(ends)], dtype=StringDType())
        for gone in (spec["bytes"], name):
            shutil.rmtree(store / gone)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zarr: the string type is not in the v3 spec
            root = zarr.open_group(str(store), mode="r+", zarr_format=3, use_consolidated=False)
            new = root.create_array(spec["name"], shape=values.shape, chunks=values.shape, dtype=str,
                                    dimension_names=tuple(spec["dims"]), compressors=codecs(spec["name"], values.dtype))  # fmt: skip
            new[:] = values
    attrs = root.attrs.asdict()
    if ATTRS_KEY in attrs:
        root.attrs[ATTRS_KEY] = {**attrs[ATTRS_KEY], "schema_version": 1}
    consolidate(str(store))


def test_schema_1_stores_still_open(stores: dict[str, Path], tmp_path: Path) -> None:
    """A schema-1 store (and weights store) opens to the same Dataset; the weights store's hash covers the strings,
    not how they are stored, so a schema-1 weights store still verifies for the stores made with it."""
    for kind in ("ioi", "text"):
        shutil.copytree(stores[kind], tmp_path / kind)
    shutil.copytree(stores["weights"], tmp_path / "w.zarr")
    ref = read_provenance(stores["text"]).weights_store
    assert ref is not None and Path(ref.path).name == "w.zarr"
    (tmp_path / "text" / "zarr.json").write_text(
        (tmp_path / "text" / "zarr.json").read_text().replace(ref.path, "../w.zarr")
    )
    for old in (tmp_path / "ioi", tmp_path / "text", tmp_path / "w.zarr"):
        _to_schema_1(old)
        assert not list(old.glob("*_offsets"))
    assert (tmp_path / "ioi" / "template").is_dir() and (tmp_path / "w.zarr" / "vocab").is_dir()
    for kind in ("ioi", "text"):
        new, old = headstore.open_store(stores[kind]), headstore.open_store(tmp_path / kind)
        assert read_provenance(tmp_path / kind).schema_version == 1
        assert sorted(old.variables) == sorted(new.variables)
        for name in ("vocab", "template", "tokens"):
            if name in new:
                assert old[name].dims == new[name].dims and old[name].dtype == new[name].dtype, name
                assert old[name].values.tolist() == new[name].values.tolist(), name
        assert old.hs.str_tokens(0) == new.hs.str_tokens(0)
        assert validate(tmp_path / kind).ok
    assert validate(tmp_path / "w.zarr").ok
    # headstore pack upgrades: a self-contained copy in the new form, every array readable by tensorstore
    for kind in ("ioi", "text"):
        packed = pack(tmp_path / kind, tmp_path / f"{kind}-packed.zarr")
        assert read_provenance(packed).schema_version == SCHEMA_VERSION and not (packed / "template").exists()
        for name in _array_paths(packed):
            ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(packed / name)}}).result()
        got, want = headstore.open_store(packed), headstore.open_store(stores[kind])
        assert got["vocab"].values.tolist() == want["vocab"].values.tolist(), kind
        if kind == "ioi":
            assert got["template"].values.tolist() == want["template"].values.tolist()
    # a new store is written in the new form only: an old weights store is not reused for it
    with pytest.raises(HeadstoreError, match=r"written by an older headstore .* choose a new folder"):
        ensure_weights_store(tmp_path / "w.zarr", {"b_U": np.zeros(3, np.float32)}, dict, {})


def test_strings_round_trip_and_a_clashing_column_is_refused() -> None:
    values = np.asarray(["", "a", " Mary", "é\u2019x", "\U0001f600", "nul\x00in", "Ġ"], dtype=str)
    data, offsets = encode(values)
    assert data.dtype == np.uint8 and offsets.dtype == np.int64 and offsets.shape == (values.size + 1,)
    assert bytes(data) == "".join(values.tolist()).encode("utf-8")
    assert np.diff(offsets).tolist() == [len(s.encode("utf-8")) for s in values.tolist()]
    assert decode(data, offsets).tolist() == values.tolist()
    root = zarr.open_group(zarr.storage.MemoryStore(), mode="w", zarr_format=3)
    with pytest.raises(HeadstoreError, match=r"'a' is stored as a_bytes and a_offsets, and 'a_bytes' is another"):
        write_columns(root, {"a": np.asarray(["x", "y"]), "a_bytes": np.asarray([1, 2])}, 2)


def test_a_damaged_string_chunk_is_named(stores: dict[str, Path], tmp_path: Path) -> None:
    """A flipped byte in ``template_bytes``: validate names the chunk; reading ``template`` is one line naming the
    store and the stored array, as for any array."""
    copy = tmp_path / "ioi.zarr"
    shutil.copytree(stores["ioi"], copy)
    chunk = copy / "template_bytes" / "c" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    assert validate(copy).problems == ("template_bytes: chunk 0 is damaged (ValueError)",)
    ds = headstore.open_store(copy)
    with pytest.raises(HeadstoreError, match=r"array 'template_bytes' has a damaged chunk \(chunk 0\)") as ei:
        ds["template"].load()
    assert "\n" not in str(ei.value)
    assert ds["tokens"].values.shape == (12, ds.sizes["pos"])  # the rest reads
