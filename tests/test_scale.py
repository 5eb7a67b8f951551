"""Stores at scale (issue 13): sharded layout, tokens-only stores.

Sharded stores (the default) hold one file per field and batch with every layer inside; they must
hold exactly what the older chunked layout holds, open the same way, and read only the inner chunks
a reader asks for (locally and over HTTP range requests).
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from headstore.cli import app
from headstore.cli.serve import RangeRequestHandler
from headstore.store_schema import done_mask, open_store, read_provenance, validate
from headstore.store_schema.layout import ATTRS_KEY, FIELDS

SMALL = {"n_seq": 10, "batch_size": 4}  # three batches, the last one short


def _raw(path: Path) -> dict[str, np.ndarray]:
    root = zarr.open_group(str(path), mode="r", zarr_format=3)
    return {name: np.asarray(a[...]) for name, a in root.arrays()}


def _files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def pair(make_store: Callable[..., Path]) -> tuple[Path, Path]:
    sharded = make_store("tiny-llama", "ioi", fields=("all",), **SMALL)
    chunked = make_store("tiny-llama", "ioi", fields=("all",), layout="chunked", **SMALL)
    return sharded, chunked


def test_sharded_store_equals_chunked_array_by_array(pair: tuple[Path, Path]) -> None:
    sharded, chunked = pair
    assert read_provenance(sharded).layout == "sharded" and read_provenance(chunked).layout == "chunked"
    a, b = _raw(sharded), _raw(chunked)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert np.array_equal(a[name], b[name], equal_nan=a[name].dtype.kind == "f"), name
    # open_store presents the same Dataset; its dask blocks are the stored files: a sharded field's shard (every
    # layer of a batch), a chunked field's chunk (one batch x one layer)
    da, db = open_store(sharded), open_store(chunked)
    n_layers = da.sizes["layer"]
    assert sorted(da.variables) == sorted(db.variables)
    for name in da.variables:
        assert da[name].dims == db[name].dims, name
        if "layer" in da[name].dims and name in FIELDS and da[name].chunks is not None and name != "tokens":
            i = da[name].dims.index("layer")
            assert da[name].data.chunks[i] == (n_layers,) and db[name].data.chunks[i] == (1,) * n_layers, name
            assert da[name].data.chunks[0] == db[name].data.chunks[0], name  # the batch chunks
        x, y = da[name].values, db[name].values
        assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), name
    assert validate(sharded).ok and validate(chunked).ok


def test_one_shard_per_field_and_batch(pair: tuple[Path, Path]) -> None:
    sharded, chunked = pair
    n_batches, n_layers = 3, 2
    z = [f for f in _files(sharded) if f.startswith("z/c/")]
    assert z == [f"z/c/{ib}/0/0/0/0" for ib in range(n_batches)]  # every layer of a batch in one file
    assert len([f for f in _files(chunked) if f.startswith("z/c/")]) == n_batches * n_layers
    meta = json.loads((sharded / "z" / "zarr.json").read_text())
    (codec,) = meta["codecs"]
    assert codec["name"] == "sharding_indexed"
    assert codec["configuration"]["chunk_shape"] == [4, 1, *meta["shape"][2:]]  # inner chunk: batch x one layer
    assert {c["name"] for c in codec["configuration"]["index_codecs"]} == {"bytes", "crc32c"}
    assert len(_files(sharded)) < len(_files(chunked))
    res = CliRunner().invoke(app, ["info", str(sharded)])
    assert res.exit_code == 0 and f"{len(_files(sharded))} files (sharded layout)" in " ".join(res.output.split())
    res = CliRunner().invoke(app, ["info", str(sharded), "--json"])
    assert json.loads(res.output)["n_files"] == len(_files(sharded))


def test_store_without_layout_attr_opens_and_resumes_as_chunked(pair: tuple[Path, Path], tmp_path: Path) -> None:
    """Stores made before the layout attr (chunked) open, validate and resume unchanged."""
    _, chunked = pair
    old = tmp_path / "old.zarr"
    shutil.copytree(chunked, old)
    root = zarr.open_group(str(old), mode="r+", zarr_format=3)
    attrs = dict(root.attrs[ATTRS_KEY])  # type: ignore[arg-type]
    del attrs["layout"]
    root.attrs[ATTRS_KEY] = attrs
    root["batch_done"][4:8] = 0  # type: ignore[index]
    shutil.rmtree(old / "z" / "c" / "1")
    zarr.consolidate_metadata(str(old))
    assert read_provenance(old).layout == "chunked"
    from headstore.extract import ExtractRequest, extract

    res = extract(
        ExtractRequest(model="tiny-llama", data="ioi", out=str(old), fields=("all",), progress=False, **SMALL)  # type: ignore[arg-type]
    )
    assert (res.written, res.skipped) == (1, 2)
    assert _files(old) == [f for f in _files(chunked)]
    a, b = _raw(old), _raw(chunked)
    for name in a:
        assert np.array_equal(a[name], b[name], equal_nan=a[name].dtype.kind == "f"), name


def test_tokens_only_store_completes(make_store: Callable[..., Path]) -> None:
    """--fields "" (tokens only): every batch is marked done although no array is written per batch."""
    path = make_store("tiny-gpt2", "ioi", fields=(), n_seq=10, batch_size=4)
    assert done_mask(path).all()
    ds = open_store(path)
    assert read_provenance(path).fields == ("tokens",)
    assert ds.sizes["batch"] == 10 and "io_pos" in ds and validate(path).ok


class _Counting(RangeRequestHandler):
    """Logs each request (path, Range header) and counts the body bytes sent under each top-level folder."""

    sent: ClassVar[list[tuple[str, str | None]]] = []
    body_bytes: ClassVar[dict[str, int]] = {}

    def log_message(self, format: str, *args: object) -> None:
        _Counting.sent.append((self.path, self.headers.get("Range")))

    def copyfile(self, source: Any, outputfile: Any) -> None:
        top = self.path.lstrip("/").split("/")[0]

        class Out:
            def write(self, b: bytes) -> int:
                _Counting.body_bytes[top] = _Counting.body_bytes.get(top, 0) + len(b)
                return int(outputfile.write(b))

        super().copyfile(source, Out())


@pytest.fixture()
def served(pair: tuple[Path, Path], tmp_path: Path) -> Iterator[str]:
    shutil.copytree(pair[0], tmp_path / "s.zarr")
    server = __import__("http.server").server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Counting, directory=str(tmp_path))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/s.zarr"
    finally:
        server.shutdown()
        server.server_close()


def test_http_reads_one_layer_with_range_requests(pair: tuple[Path, Path], served: str) -> None:
    """Reading one layer of one batch over HTTP fetches the shard's index and that layer's inner chunk
    (two range requests), not the shard."""
    ds = open_store(served)
    _Counting.sent.clear()
    got = ds["z"].isel(batch=slice(0, 4), layer=1).values
    np.testing.assert_array_equal(got, open_store(pair[0])["z"].isel(batch=slice(0, 4), layer=1).values)
    shard_reads = [r for p, r in _Counting.sent if p.startswith("/s.zarr/z/c/")]
    assert shard_reads and all(r is not None and r.startswith("bytes=") for r in shard_reads), _Counting.sent
    assert len(shard_reads) == 2, shard_reads  # the index, then layer 1's chunk


# --- weights once per model ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two stores (IOI, all layers; text, layer 1 only) sharing one weights store under root/."""
    from headstore.extract import ExtractRequest, extract

    root = tmp_path_factory.mktemp("shared")
    common = {"model": "tiny-gpt2", "progress": False, "device": "cpu", "weights": str(root / "w" / "tiny.zarr")}
    extract(ExtractRequest(data="ioi", out=str(root / "a.zarr"), n_seq=8, batch_size=4, **common))  # type: ignore[arg-type]
    before = {p: p.stat().st_mtime_ns for p in (root / "w").rglob("*") if p.is_file()}
    extract(
        ExtractRequest(data="text", out=str(root / "b.zarr"), n_seq=4, seq_len=16, batch_size=4, layers=(1,), **common)  # type: ignore[arg-type]
    )
    assert {p: p.stat().st_mtime_ns for p in (root / "w").rglob("*") if p.is_file()} == before, "reused, not rewritten"
    return root


def _same_dataset(a: object, b: object) -> None:
    import xarray as xr

    assert isinstance(a, xr.Dataset) and isinstance(b, xr.Dataset)
    assert sorted(a.variables) == sorted(b.variables)
    for name in a.variables:
        x, y = a[name].values, b[name].values
        assert a[name].dims == b[name].dims, name
        assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), name


def test_two_stores_share_one_weights_store(shared: Path, make_store: Callable[..., Path]) -> None:
    a, b = shared / "a.zarr", shared / "b.zarr"
    for store in (a, b):
        assert not any((store / n).exists() for n in ("W_E", "W_U", "W_EE", "vocab", "vocab_bytes")), "weights left"
    ref_a, ref_b = read_provenance(a).weights_store, read_provenance(b).weights_store
    assert ref_a is not None and ref_b is not None
    assert ref_a.path == "../w/tiny.zarr" and ref_a.sha256 == ref_b.sha256
    assert "W_EE" in ref_a.arrays and "W_EE" not in ref_b.arrays  # W_EE only with layer 0 extracted
    # open_store presents what a self-contained store holds, value for value
    _same_dataset(open_store(a), open_store(make_store("tiny-gpt2", "ioi", n_seq=8, batch_size=4)))
    _same_dataset(
        open_store(b), open_store(make_store("tiny-gpt2", "text", n_seq=4, seq_len=16, batch_size=4, layers=(1,)))
    )
    assert validate(a).ok and validate(b).ok


def test_missing_or_replaced_weights_store_is_refused_by_name(shared: Path, tmp_path: Path) -> None:
    """open_store checks the weights store's identity from its metadata: a weights store made from other weights
    (it records another sha256 about itself) is refused; one changed in place after it was made (its record kept,
    its chunks' checksums valid) opens, and ``validate``, which hashes every array, finds it."""
    from headstore.store_schema import HeadstoreError
    from headstore.store_schema.hashing import content_sha256
    from headstore.store_schema.layout import WEIGHTS_ATTRS

    copy = tmp_path / "copy"
    shutil.copytree(shared, copy)
    w = zarr.open_group(str(copy / "w" / "tiny.zarr"), mode="r+", zarr_format=3)
    w["W_U"][3, 5] = float(w["W_U"][3, 5]) + 1e-3  # type: ignore[index, arg-type]  # one changed value
    open_store(copy / "a.zarr")  # metadata only: the change is not seen on open
    problems = validate(copy / "a.zarr").problems
    assert [p for p in problems if p.startswith("weights store: ")] == list(problems) and len(problems) == 1, problems
    assert "its arrays hash to sha256" in problems[0] and "recorded at its creation" in problems[0], problems
    attrs = dict(w.attrs[WEIGHTS_ATTRS])  # type: ignore[arg-type]
    attrs["sha256"] = content_sha256({n: np.asarray(a[...]) for n, a in w.arrays()})  # as a re-made store records
    w.attrs[WEIGHTS_ATTRS] = attrs
    zarr.consolidate_metadata(str(copy / "w" / "tiny.zarr"), zarr_format=3)
    for store in ("a.zarr", "b.zarr"):
        with pytest.raises(HeadstoreError, match=r"weights store .*tiny\.zarr holds different weights") as ei:
            open_store(copy / store)
        assert "\n" not in str(ei.value)
    assert any(p.startswith("weights store: ") for p in validate(copy / "a.zarr").problems)
    shutil.rmtree(copy / "w")
    with pytest.raises(HeadstoreError, match=r"weights store \.\./w/tiny\.zarr .* which is missing"):
        open_store(copy / "a.zarr")
    res = CliRunner().invoke(app, ["analyze", "copy-suppression", str(copy / "a.zarr"), "--out", str(tmp_path / "o")])
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and "which is missing" in lines[0], res.stderr


def test_weights_store_of_other_shapes_is_refused_from_its_metadata(shared: Path, tmp_path: Path) -> None:
    """A weights store recording the right sha256 but holding W_U of another vocabulary size (its metadata says
    so) is refused on open, naming the array and the size."""
    from headstore.store_schema import HeadstoreError

    copy = tmp_path / "copy"
    shutil.copytree(shared, copy)
    w = zarr.open_group(str(copy / "w" / "tiny.zarr"), mode="r+", zarr_format=3)
    d_model, d_vocab = w["W_U"].shape  # type: ignore[misc]
    del w["W_U"]
    w.create_array("W_U", shape=(d_model, d_vocab - 1), dtype="float32", dimension_names=("d_model", "d_vocab"))
    zarr.consolidate_metadata(str(copy / "w" / "tiny.zarr"), zarr_format=3)
    with pytest.raises(HeadstoreError, match=rf"holds W_U with d_vocab {d_vocab - 1} \(not {d_vocab}\)") as ei:
        open_store(copy / "a.zarr")
    assert "\n" not in str(ei.value)


def test_validate_checks_a_weights_store(shared: Path, tmp_path: Path) -> None:
    """`headstore validate` on a weights store reads every chunk back and checks the hash recorded at its creation,
    the one the stores made with it were given; a changed value and a flipped byte are each a problem."""
    w = shared / "w" / "tiny.zarr"
    ref = read_provenance(shared / "a.zarr").weights_store
    assert ref is not None
    rep = validate(w)
    assert rep.ok and rep.problems == () and rep.weights_sha256 == ref.sha256
    res = CliRunner().invoke(app, ["validate", str(w)])
    assert res.exit_code == 0 and "a weights store" in res.stdout and "0 problems" in res.stdout, res.stdout

    changed = tmp_path / "changed.zarr"
    shutil.copytree(w, changed)
    g = zarr.open_group(str(changed), mode="r+", zarr_format=3)
    g["W_U"][3, 5] = float(g["W_U"][3, 5]) + 1e-3  # type: ignore[index, arg-type]  # valid chunks, other values
    rep = validate(changed)
    assert not rep.ok and len(rep.problems) == 1 and "recorded at its creation" in rep.problems[0]
    assert rep.problems[0].startswith("its arrays hash to sha256 ")
    res = CliRunner().invoke(app, ["validate", str(changed)])
    assert res.exit_code == 1 and "recorded at its creation" in res.stderr

    flipped = tmp_path / "flipped.zarr"
    shutil.copytree(w, flipped)
    f = max((p for p in (flipped / "W_E" / "c").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(f.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside an inner chunk: its crc32c no longer matches
    f.write_bytes(bytes(data))
    rep = validate(flipped)
    assert not rep.ok and any(p.startswith("W_E: ") and "damaged" in p for p in rep.problems), rep.problems


def _flip_byte(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside the chunk's bytes: its crc32c no longer matches
    f.write_bytes(bytes(data))


def test_flipped_byte_in_a_weights_store_is_refused_naming_store_array_chunk(shared: Path, tmp_path: Path) -> None:
    """Opening reads metadata only; reading W_E turns zarr's bare ``ValueError: Stored and computed checksum do not
    match`` into one line naming the weights store, the array and the chunk (W_E is one chunk: ``c/0/0``), saying to
    run ``headstore validate``."""
    from headstore.store_schema import HeadstoreError

    copy = tmp_path / "copy"
    shutil.copytree(shared, copy)
    _flip_byte(copy / "w" / "tiny.zarr" / "W_E" / "c" / "0" / "0")
    for store in ("a.zarr", "b.zarr"):
        ds = open_store(copy / store)
        ds["W_U"].values  # noqa: B018  (intact arrays read)
        with pytest.raises(HeadstoreError) as ei:
            ds["W_E"].values  # noqa: B018
        msg = str(ei.value)
        assert "\n" not in msg and msg.startswith(f"{copy / 'w' / 'tiny.zarr'}: array 'W_E' has a damaged chunk"), msg
        # zarr-python's words, or zarrs' where it read the whole chunk (store_schema/read/codec_pipeline.py)
        checksum = r"\(chunk 0\.0\): (ValueError: Stored and computed checksum do not match|RuntimeError: the checksum is invalid)"
        assert re.search(checksum, msg), msg
        assert f"run `headstore validate {copy / 'w' / 'tiny.zarr'}`" in msg, msg
        assert isinstance(ei.value.__cause__, (ValueError, RuntimeError))
    assert any("W_E" in p and "damaged" in p for p in validate(copy / "a.zarr").problems)


def test_flipped_byte_in_an_activation_chunk_read_lazily_names_store_array_chunk(
    pair: tuple[Path, Path], tmp_path: Path
) -> None:
    """Through dask (opening works; reading the chunk fails): the store, ``z`` and the chunk's grid index, which
    in a chunked store is the file's key (``z/c/1/0/0/0/0``: batch 1, layer 0)."""
    from headstore.store_schema import HeadstoreError

    copy = tmp_path / "copy.zarr"
    shutil.copytree(pair[1], copy)
    _flip_byte(copy / "z" / "c" / "1" / "0" / "0" / "0" / "0")
    ds = open_store(copy)
    ds["z"].isel(batch=0).compute()  # batch 0's chunks are intact
    with pytest.raises(HeadstoreError) as ei:
        ds["z"].isel(layer=[0]).compute()
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith(f"{copy}: array 'z' has a damaged chunk (chunk 1.0.0.0.0)"), msg
    assert re.search("checksum (do not match|is invalid)", msg) and f"run `headstore validate {copy}`" in msg, msg


def test_pack_writes_a_self_contained_copy(shared: Path, tmp_path: Path, make_store: Callable[..., Path]) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(shared, copy)
    before = open_store(copy / "a.zarr").load()
    res = CliRunner().invoke(app, ["pack", str(copy / "a.zarr"), str(tmp_path / "packed.zarr")])
    assert res.exit_code == 0, res.output
    shutil.rmtree(copy / "w")  # the packed copy needs no weights store
    packed = tmp_path / "packed.zarr"
    assert read_provenance(packed).weights_store is None
    _same_dataset(open_store(packed), before)
    # array by array what extract writes without --weights (W_EE included)
    own = _raw(make_store("tiny-gpt2", "ioi", n_seq=8, batch_size=4))
    got = _raw(packed)
    assert sorted(got) == sorted(own)
    for name in got:
        assert np.array_equal(got[name], own[name], equal_nan=got[name].dtype.kind == "f"), name
    assert validate(packed).ok


def test_weights_store_of_another_model_is_refused(shared: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["extract", "--model", "tiny-llama", "--data", "ioi", "--n-seq", "4", "--batch-size",
                                   "4", "--out", str(tmp_path / "l.zarr"), "--weights", str(shared / "w" / "tiny.zarr"),
                                   "--no-progress"])  # fmt: skip
    assert res.exit_code == 2 and "holds another model's weights" in res.stderr, res.output
    assert not (tmp_path / "l.zarr").exists()


def test_store_and_weights_store_over_http(shared: Path) -> None:
    """The relative reference resolves against the store's URL."""
    from headstore.cli.serve import make_server

    server = make_server(str(shared), port=0, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        remote = open_store(f"http://127.0.0.1:{server.server_address[1]}/a.zarr")
        _same_dataset(remote, open_store(shared / "a.zarr"))
    finally:
        server.shutdown()
        server.server_close()


def test_store_and_weights_store_over_http_open_reads_metadata_only(shared: Path) -> None:
    """Two groups (the store and its weights store), two metadata requests: each root ``zarr.json`` once; and
    nothing of the weights store's arrays: less than 5% of its bytes cross the network on open."""
    server = __import__("http.server").server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Counting, directory=str(shared))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Counting.sent.clear()
    _Counting.body_bytes.clear()
    try:
        open_store(f"http://127.0.0.1:{server.server_address[1]}/a.zarr")
    finally:
        server.shutdown()
        server.server_close()
    metadata = sorted(path for path, _ in _Counting.sent if path.endswith("zarr.json"))
    assert metadata == ["/a.zarr/zarr.json", "/w/tiny.zarr/zarr.json"], _Counting.sent
    on_disk = sum(p.stat().st_size for p in (shared / "w").rglob("*") if p.is_file())
    sent = _Counting.body_bytes.get("w", 0)
    assert 0 < sent < 0.05 * on_disk, (sent, on_disk, _Counting.sent)


# --- bfloat16 models -----------------------------------------------------------------------------

LIVE_HOOKS = {  # field -> TransformerLens hook of layer L, written out here (not taken from the extractor)
    "pattern": "blocks.{L}.attn.hook_pattern",
    "v": "blocks.{L}.attn.hook_v",
    "z": "blocks.{L}.attn.hook_z",
    "ln1_scale": "blocks.{L}.ln1.hook_scale",
    "resid_final": "blocks.1.hook_resid_post",
}


@pytest.mark.parametrize("store_dtype", ["float16", "float32"])
def test_bfloat16_model_stored_as_its_live_cache(store_dtype: str, tmp_path: Path) -> None:
    """tiny-llama cast to bfloat16 on the CPU: float16 storage holds every bf16 value exactly (they fit),
    float32 storage too; both equal the live bf16 bridge's cache, batch by batch."""
    import torch

    from headstore.extract import ExtractRequest, extract
    from headstore.extract.models import load_model

    out = tmp_path / "bf16.zarr"
    extract(ExtractRequest(model="tiny-llama", data="ioi", out=str(out), n_seq=8, batch_size=4, device="cpu",
                           model_dtype="bfloat16", dtype=store_dtype, progress=False, fields=("default",)))  # fmt: skip
    ds = open_store(out)
    assert read_provenance(out).model.dtype == "bfloat16"
    live = load_model("tiny-llama", "cpu", "bfloat16")
    assert live.bridge.W_U.dtype == torch.bfloat16
    # No `result` stored: extraction ran the model's own o_proj, not the bridge's per-head sum (bf16 rounds them apart)
    live.bridge.set_use_attn_result(False)
    tokens = ds["tokens"].values
    for b0 in (0, 4):  # the extractor's batches
        with torch.inference_mode():
            _, cache = live.bridge.run_with_cache(torch.as_tensor(tokens[b0 : b0 + 4], dtype=torch.long))
        for name, hook in LIVE_HOOKS.items():
            got = ds[name].isel(batch=slice(b0, b0 + 4)).values
            ref = [cache[hook.format(L=L)] for L in (0, 1)] if "{L}" in hook else [cache[hook]]
            want = torch.stack(ref, 1) if "{L}" in hook else ref[0]
            want = want[..., 0] if name.endswith("_scale") else want
            assert got.dtype == (
                np.float16 if store_dtype == "float16" and name in ("pattern", "v", "z") else np.float32
            )
            np.testing.assert_array_equal(got, want.to(torch.from_numpy(got[:0]).dtype).numpy(), err_msg=name)
            if name in ("pattern", "v", "z"):
                assert want.dtype == torch.bfloat16, name  # the model really ran in bfloat16


@pytest.fixture(scope="module")
def loud_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-gpt2 with layer 1's value weights x 1e6: v and z exceed float16's range, not bfloat16's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from headstore.extract.models import _tiny_folder

    src = _tiny_folder("tiny-gpt2")
    folder = tmp_path_factory.mktemp("loud") / "loud-gpt2"
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    d = hf.config.n_embd
    with torch.no_grad():
        hf.transformer.h[1].attn.c_attn.weight[:, 2 * d :] *= 1e6
    hf.save_pretrained(folder)
    AutoTokenizer.from_pretrained(src).save_pretrained(folder)
    return folder


def test_float16_overflow_is_refused_naming_field_layer_and_magnitude(loud_model: Path, tmp_path: Path) -> None:
    argv = ["extract", "--model", str(loud_model), "--data", "ioi", "--n-seq", "4", "--batch-size", "4",
            "--device", "cpu", "--model-dtype", "bfloat16", "--no-progress"]  # fmt: skip
    res = CliRunner().invoke(app, [*argv, "--dtype", "float16", "--out", str(tmp_path / "f16.zarr")])
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert "v at layer 1 reaches" in lines[0] and "beyond float16's 65504" in lines[0] and "--dtype float32" in lines[0]
    big = float(lines[0].split("reaches ")[1].split(",")[0])
    assert big > 65504
    res = CliRunner().invoke(app, [*argv, "--dtype", "float32", "--out", str(tmp_path / "f32.zarr")])
    assert res.exit_code == 0, res.output
    v = open_store(tmp_path / "f32.zarr")["v"].sel(layer=1).values
    assert np.isfinite(v).all() and np.abs(v).max() == pytest.approx(big, rel=1e-3)


# --- a plan before the run; a full disk -----------------------------------------------------------


def _disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.mark.parametrize(
    "kw",
    [
        {"model": "tiny-gpt2", "data": "ioi", "n_seq": 10, "batch_size": 4},  # a short last batch
        {
            "model": "tiny-llama",
            "data": "text",
            "n_seq": 8,
            "seq_len": 32,
            "batch_size": 4,
            "fields": ("all",),
            "dtype": "float16",
            "layout": "chunked",
            "pattern_layers": (1,),
        },
    ],
    ids=["gpt2-ioi", "llama-text-all-f16-chunked"],
)
def test_dry_run_plan_matches_the_store_written(kw: dict[str, object], tmp_path: Path) -> None:
    from headstore.extract import ExtractRequest, extract
    from headstore.store_schema.read.info import array_nbytes_on_disk

    out = tmp_path / "s.zarr"
    dry = extract(ExtractRequest(out=str(out), device="cpu", progress=False, dry_run=True, **kw))  # type: ignore[arg-type]
    assert not out.exists() and not list(tmp_path.iterdir()), "a dry run writes nothing"
    plan = dry.plan
    assert plan is not None and plan.measured and plan.seconds_per_batch["forward"] > 0
    extract(ExtractRequest(out=str(out), device="cpu", progress=False, **kw))  # type: ignore[arg-type]
    disk = array_nbytes_on_disk(out)
    n_tok = plan.n_tokens
    assert n_tok == open_store(out).sizes["batch"] * open_store(out).sizes["pos"]
    for f in plan.fields:
        assert f.bytes_per_token == pytest.approx(disk[f.name] / n_tok, rel=0.10), f.name
    assert plan.total_bytes == pytest.approx(_disk_bytes(out), rel=0.10)
    assert plan.n_files == pytest.approx(len(_files(out)), rel=0.10)
    # the CLI prints it, per field, and writes nothing
    argv = ["extract", "--out", str(tmp_path / "cli.zarr"), "--device", "cpu", "--no-progress", "--dry-run"]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", ",".join(map(str, v)) if isinstance(v, tuple) else str(v)]
    res = CliRunner().invoke(app, argv)
    text = " ".join(res.output.split())
    assert res.exit_code == 0 and "dry run: nothing written" in text and "B/token" in text and "files" in text
    assert "time: about" in text and not (tmp_path / "cli.zarr").exists()


@pytest.fixture()
def small_disk(tmpfs: Callable[[str], Path]) -> Path:
    """A 3 MB tmpfs mounted for the test (skipped where mounting is not allowed)."""
    return tmpfs("3m")


@pytest.mark.parametrize("direct_min", [None, 1], ids=["zarr_writes", "o_direct_writes"])
def test_full_disk_refused_up_front_then_mid_run_then_resumes(
    small_disk: Path, make_store: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, direct_min: int | None
) -> None:
    import shutil as sh

    import headstore.store_schema.write.direct as direct
    from headstore.extract import ExtractRequest, extract

    direct_bytes: list[int] = []
    if direct_min is not None:  # every file past the page cache (this store's are all under 1 MiB)
        monkeypatch.setattr(direct, "DIRECT_MIN_BYTES", direct_min)
        real = direct._write_direct
        monkeypatch.setattr(
            direct, "_write_direct", lambda tmp, data: direct_bytes.append(real(tmp, data)) or direct_bytes[-1]
        )

    kw = {"model": "tiny-gpt2", "data": "ioi", "n_seq": 24, "batch_size": 4}
    out = small_disk / "s.zarr"
    plan = extract(ExtractRequest(out=str(out), device="cpu", progress=False, dry_run=True, **kw)).plan  # type: ignore[arg-type]
    assert plan is not None
    # leave room for the weights and metadata and about half the batches
    fields = sum(f.total_bytes for f in plan.fields)
    room = plan.weights_bytes + plan.other_bytes + fields // 2 + plan.n_files * 4096
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (sh.disk_usage(small_disk).free - room))
    argv = ["extract", "--out", str(out), "--device", "cpu", "--no-progress"]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", ",".join(map(str, v)) if isinstance(v, tuple) else str(v)]

    res = CliRunner().invoke(app, argv)  # the plan does not fit: refused before anything is written
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and "not enough space at" in lines[0] and "--ignore-space" in lines[0]
    assert not out.exists()

    res = CliRunner().invoke(app, [*argv, "--ignore-space"])  # starts, fills the disk mid-run
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    n_done = int(lines[0].split(" after ")[1].split(" of ")[0])
    assert lines[0] == (
        f"error: disk full at {out} after {n_done} of 6 batches: free space and rerun the same command to resume"
    )
    assert 0 < n_done < 6 and done_mask(out).sum() == 4 * n_done
    assert (sum(direct_bytes) > 0) == (direct_min is not None)  # test_direct.py fills a disk inside one

    filler.unlink()  # space freed: the same command resumes and finishes
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 0, res.output
    assert f"{6 - n_done} batches, {n_done} already done" in " ".join(res.output.split())
    assert not list(out.rglob("*.partial"))
    a, b = _raw(out), _raw(make_store("tiny-gpt2", "ioi", n_seq=24, batch_size=4))
    assert sorted(a) == sorted(b)
    for name in a:
        assert np.array_equal(a[name], b[name], equal_nan=a[name].dtype.kind == "f"), name
    assert validate(out).ok


# --- bounded memory ------------------------------------------------------------------------------

# Peak RSS of the analyzing process: VmHWM (the high-water mark of this process's own memory), which is
# resource.getrusage's maxrss except that maxrss keeps, across exec, the peak of the forked parent
# (pytest, hundreds of MB), so a child's maxrss can never show less than that.
PEAK = r"""
import json, resource, sys, time
import headstore
from headstore import analyze
ds = headstore.open_store(sys.argv[1])
t = time.perf_counter()
getattr(analyze, sys.argv[2])(ds).compute()
hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")]
peak = int(hwm[0].split()[1]) if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_mb": peak / 1024, "s": time.perf_counter() - t}))
"""


def _peak_mb(store: Path, analyzer: str) -> float:
    import os
    import subprocess
    import sys

    # glibc's dynamic mmap threshold keeps freed multi-MB blocks in the heap, which makes the peak RSS
    # drift with the number of chunks processed; a fixed threshold measures what is live.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", PEAK, str(store), analyzer], capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"])


@pytest.mark.parametrize(
    ("analyzer", "data", "sizes"),
    [("copy_suppression", "text", (32, 320)), ("ioi", "ioi", (100, 1000))],
)
def test_analyzer_peak_memory_does_not_grow_with_the_store(
    analyzer: str, data: str, sizes: tuple[int, int], make_store: Callable[..., Path]
) -> None:
    """The same analyzer on stores 10x apart: the larger store's peak RSS stays within a fixed margin of
    the smaller one's (a streaming analyzer holds a few blocks, not the store)."""
    from headstore.store_schema.read.info import array_nbytes_on_disk

    kw = {"seq_len": 128} if data == "text" else {}
    small, big = (make_store("tiny-gpt2", data, n_seq=n, batch_size=8, **kw) for n in sizes)
    grown = (sum(array_nbytes_on_disk(big).values()) - sum(array_nbytes_on_disk(small).values())) / 1e6
    peaks = [_peak_mb(s, analyzer) for s in (small, big)]
    assert peaks[1] - peaks[0] < 25, (peaks, f"store grew by {grown:.0f} MB")


def test_extraction_shows_no_zarr_consolidation_warning(tmp_path: Path) -> None:
    """headstore consolidates v3 metadata on purpose; zarr's warning about it is not shown to users."""
    import warnings

    from headstore.extract import ExtractRequest, extract

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        extract(ExtractRequest(model="tiny-gpt2", data="ioi", out=str(tmp_path / "s.zarr"), n_seq=4, batch_size=4,
                               progress=False, device="cpu"))  # fmt: skip
    assert validate(str(tmp_path / "s.zarr")).ok  # the store is consolidated and complete all the same
    assert not [w for w in seen if "Consolidated metadata" in str(w.message)], [str(w.message) for w in seen]


# --- an error mid-run is the last line of the output, with the progress bar on ---------------------


def _cli_as_on_a_terminal(argv: list[str]) -> tuple[int, str]:
    """``headstore ARGV`` in a fresh process, stdout and stderr merged in one stream as a terminal shows them."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "headstore.cli", *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(root)}, timeout=600,
    )  # fmt: skip
    return proc.returncode, proc.stdout


def _ends_with_error_line(out: str, bar: str) -> str:
    """The error, checked to start a line of its own (nothing glued before it, no carriage return inside it) and to
    be the last non-empty line (no progress bar redrawn after it); ``bar`` (the bar's label) was shown before it."""
    assert bar in out, out  # the progress bar was on
    lines = [ln for ln in out.split("\n") if ln.strip()]
    last = lines[-1]
    assert last.startswith("error: ") and "\r" not in last and bar not in last, out
    assert out.count("error: ") == 1, out
    return last


def test_float16_overflow_mid_run_is_the_last_line_with_the_bar_on(loud_model: Path, tmp_path: Path) -> None:
    code, out = _cli_as_on_a_terminal(
        ["extract", "--model", str(loud_model), "--data", "ioi", "--n-seq", "8", "--batch-size", "4", "--device",
         "cpu", "--model-dtype", "bfloat16", "--dtype", "float16", "--out", str(tmp_path / "o16.zarr")]
    )  # fmt: skip
    assert code == 2, out
    last = _ends_with_error_line(out, "extract o16.zarr")
    assert last.startswith("error: v at layer 1 reaches ") and "beyond float16's 65504" in last, out


def test_full_disk_mid_run_is_the_last_line_with_the_bar_on(small_disk: Path) -> None:
    import shutil as sh

    from headstore.extract import ExtractRequest, extract

    kw = {"model": "tiny-gpt2", "data": "ioi", "n_seq": 24, "batch_size": 4}
    out = small_disk / "s.zarr"
    plan = extract(ExtractRequest(out=str(out), device="cpu", progress=False, dry_run=True, **kw)).plan  # type: ignore[arg-type]
    assert plan is not None
    room = plan.weights_bytes + plan.other_bytes + sum(f.total_bytes for f in plan.fields) // 2 + plan.n_files * 4096
    (small_disk / "filler").write_bytes(b"\0" * (sh.disk_usage(small_disk).free - room))
    argv = ["extract", "--out", str(out), "--device", "cpu", "--ignore-space"]
    code, text = _cli_as_on_a_terminal(
        [*argv, *(x for k, v in kw.items() for x in (f"--{k.replace('_', '-')}", str(v)))]
    )
    assert code == 2, text
    last = _ends_with_error_line(text, "extract s.zarr")
    n_done = int(last.split(" after ")[1].split(" of ")[0])
    assert 0 < n_done < 6 and done_mask(out).sum() == 4 * n_done
    assert (
        last
        == f"error: disk full at {out} after {n_done} of 6 batches: free space and rerun the same command to resume"
    )
