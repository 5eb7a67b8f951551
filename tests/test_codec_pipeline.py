"""open_store reads its fields through zarrs' codec pipeline where it serves, with the values zarr-python reads;
a researcher's own zarr arrays keep their pipeline; without zarrs, zarr-python's pipeline reads everything."""

from __future__ import annotations

import collections
import functools
import http.server
import shutil
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.core.codec_pipeline import BatchedCodecPipeline

from headstore.cli.serve import RangeRequestHandler
from headstore.store_schema import open_store
from headstore.store_schema.read.codec_pipeline import prefer

zp = pytest.importorskip("zarrs.pipeline")

FIELDS = ("default", "q", "k", "result", "resid_pre")
BULK = ("pattern", "v", "z", "q", "k", "result", "resid_pre", "ln1_scale", "loss")  # tokens: one shard, read in parts


@pytest.fixture()
def reads(monkeypatch: pytest.MonkeyPatch) -> collections.Counter[str]:
    """Counts ``read`` calls per pipeline class: "zarrs" for zarrs' pipeline, "zarr" for zarr-python's (which
    zarrs' pipeline also calls when it hands a read over)."""
    calls: collections.Counter[str] = collections.Counter()

    def counting(cls: type, key: str) -> None:
        orig = cls.read

        async def read(self: object, *a: object, **k: object) -> object:
            calls[key] += 1
            return await orig(self, *a, **k)

        monkeypatch.setattr(cls, "read", read)

    counting(zp.ZarrsCodecPipeline, "zarrs")
    counting(BatchedCodecPipeline, "zarr")
    return calls


def direct(path: str | Path, name: str) -> np.ndarray:
    """The array as zarr-python reads it with its default pipeline, outside headstore."""
    assert zarr.config.get("codec_pipeline.path") == "zarr.core.codec_pipeline.BatchedCodecPipeline"
    return np.asarray(zarr.open_group(str(path), mode="r")[name][...])


def assert_fields_read_by_zarrs(store: str | Path, local: Path, reads: collections.Counter[str]) -> None:
    ds = open_store(store)
    with prefer("zarr"):
        slow = open_store(store)
    assert ds.hs.config.n_heads == slow.hs.config.n_heads
    stored = set(zarr.open_group(str(local), mode="r").array_keys())
    bulk = [n for n in ds.data_vars if n in stored and "batch" in ds[n].dims and ds[n].ndim >= 2 and n != "tokens"]
    assert set(BULK) & set(ds.data_vars) <= set(bulk)
    for name in bulk:
        reads.clear()
        got = ds[name].values  # dask computes here, long after open_store returned
        if zarr.open_array(str(local), path=name, mode="r").shards is not None:  # zarrs reads whole shards
            assert reads["zarrs"] > 0 and reads["zarr"] == 0, (name, dict(reads))
        else:  # and zarr-python plain chunks (faster there)
            assert reads["zarrs"] == 0 and reads["zarr"] > 0, (name, dict(reads))
        reads.clear()
        want = slow[name].values
        assert reads["zarrs"] == 0 and reads["zarr"] > 0, (name, dict(reads))
        assert got.dtype == want.dtype == direct(local, name).dtype, name
        assert np.array_equal(got, want, equal_nan=True), name
        assert np.array_equal(got, direct(local, name), equal_nan=True), name
    for name in ds.data_vars:  # everything else (weights, columns, strings) reads the same too
        a, b = ds[name].values, slow[name].values
        assert a.dtype == b.dtype and (
            np.array_equal(a, b, equal_nan=True) if a.dtype.kind in "fiub" else (a == b).all()
        )


@pytest.mark.parametrize("layout", ["sharded", "chunked"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_every_field_reads_the_same_through_both_pipelines(
    make_store: Callable[..., Path], reads: collections.Counter[str], layout: str, dtype: str
) -> None:
    path = make_store("tiny-gpt2", "ioi", fields=FIELDS, layout=layout, dtype=dtype)
    assert_fields_read_by_zarrs(path, path, reads)


def test_gradient_fields_read_the_same_through_both_pipelines(
    make_store: Callable[..., Path], reads: collections.Counter[str]
) -> None:
    """A store with gradients (grad_z, grad_q/k/v, grad_mlp_in, grad_resid_final) reads the same way."""
    path = make_store("tiny-gpt2", "ioi", fields=FIELDS, grad="logit-diff:io_token,s_token@end_pos", dtype="float32")
    assert "grad_z" in zarr.open_group(str(path), mode="r")
    assert_fields_read_by_zarrs(path, path, reads)


@pytest.fixture()
def http_store(make_store: Callable[..., Path], tmp_path: Path) -> Iterator[tuple[str, Path]]:
    local = make_store("tiny-gpt2", "ioi", fields=FIELDS, layout="sharded", dtype="float32")
    shutil.copytree(local, tmp_path / "store.zarr")

    class Quiet(RangeRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/store.zarr", local
    finally:
        server.shutdown()
        server.server_close()


def test_http_store_reads_the_same_through_both_pipelines(
    http_store: tuple[str, Path], reads: collections.Counter[str]
) -> None:
    url, local = http_store
    assert_fields_read_by_zarrs(url, local, reads)


def test_storage_options_zarrs_cannot_take_fall_back(
    http_store: tuple[str, Path], reads: collections.Counter[str]
) -> None:
    """zarrs' HTTP client refuses fsspec's client options (ValueError): those fields read with zarr-python."""
    url, local = http_store
    ds = open_store(url, storage_options={"headers": {"X-Test": "1"}})
    reads.clear()
    got = ds["pattern"].values
    assert reads["zarrs"] == 0 and reads["zarr"] > 0
    assert np.array_equal(got, direct(local, "pattern"))


def test_researchers_own_arrays_keep_their_pipeline(make_store: Callable[..., Path], tmp_path: Path) -> None:
    path = make_store("tiny-gpt2", "ioi", fields=FIELDS, layout="sharded", dtype="float32")
    before = zarr.config.get("codec_pipeline.path")
    mine = zarr.create_array(str(tmp_path / "mine.zarr"), shape=(6,), chunks=(3,), dtype="f4")
    ds = open_store(path)
    ds["pattern"].sum().compute()
    after = zarr.open_array(str(tmp_path / "mine.zarr"), mode="r+")
    assert zarr.config.get("codec_pipeline.path") == before == "zarr.core.codec_pipeline.BatchedCodecPipeline"
    for arr in (mine, after):
        assert type(arr._async_array.codec_pipeline) is BatchedCodecPipeline
    after[:] = np.arange(6)
    assert np.array_equal(zarr.open_array(str(tmp_path / "mine.zarr"), mode="r")[:], np.arange(6))


def test_a_researchers_zarrs_configuration_is_left_alone(make_store: Callable[..., Path], tmp_path: Path) -> None:
    path = make_store("tiny-gpt2", "ioi", fields=FIELDS, layout="sharded", dtype="float32")
    with zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline", "codec_pipeline.strict": True}):
        open_store(path)["z"].sum().compute()
        assert zarr.config.get("codec_pipeline.path") == "zarrs.ZarrsCodecPipeline"
        assert zarr.config.get("codec_pipeline.strict") is True


def test_without_zarrs_zarr_python_reads_everything(
    make_store: Callable[..., Path], reads: collections.Counter[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = make_store("tiny-gpt2", "ioi", fields=FIELDS, layout="sharded", dtype="float16")
    monkeypatch.setitem(sys.modules, "zarrs", None)  # `import zarrs` raises ImportError
    with pytest.raises(ImportError):
        import zarrs  # noqa: F401
    ds = open_store(path)
    for name in ("pattern", "z", "tokens"):
        reads.clear()
        got = ds[name].values
        assert reads["zarrs"] == 0 and reads["zarr"] > 0, name
        assert np.array_equal(got, direct(path, name), equal_nan=True), name


def test_partial_reads_keep_zarr_pythons_checksums(
    make_store: Callable[..., Path], reads: collections.Counter[str]
) -> None:
    """A read of part of a shard goes to zarr-python, which checks each inner chunk's crc32c (zarrs would not)."""
    path = make_store("tiny-gpt2", "ioi", fields=FIELDS, layout="sharded", dtype="float32")
    ds = open_store(path)
    reads.clear()
    got = ds["z"].isel(layer=1, head=2).values
    assert reads["zarrs"] == 0 and reads["zarr"] > 0
    assert np.array_equal(got, direct(path, "z")[:, 1, :, 2])


def test_shards_over_the_block_limit_keep_inner_chunks(
    make_store: Callable[..., Path], reads: collections.Counter[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shard larger than SHARD_BLOCK_MAX (long sequences) is not one dask block: blocks stay the stored inner
    chunks (one layer each), read by zarr-python, with the same values."""
    from headstore.store_schema.read import codec_pipeline

    path = make_store("tiny-gpt2", "ioi", fields=FIELDS, layout="sharded", dtype="float32")
    whole = open_store(path)["pattern"]
    stored = zarr.open_array(str(path), path="pattern", mode="r")
    assert stored.shards is not None and whole.chunks is not None
    assert [c[0] for c in whole.chunks] == list(stored.shards)  # one block per shard by default (batch: the same)
    monkeypatch.setattr(codec_pipeline, "SHARD_BLOCK_MAX", stored.nbytes // 1000)
    pat = open_store(path)["pattern"]
    assert pat.chunks is not None and [c[0] for c in pat.chunks] == list(stored.chunks)
    reads.clear()
    got = pat.values
    assert reads["zarrs"] == 0 and reads["zarr"] > 0
    assert np.array_equal(got, direct(path, "pattern"))


def test_environment_asks_for_zarr_python(
    make_store: Callable[..., Path], reads: collections.Counter[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = make_store("tiny-gpt2", "ioi", fields=FIELDS, layout="sharded", dtype="float32")
    monkeypatch.setenv("HEADSTORE_CODEC_PIPELINE", "zarr")
    ds = open_store(path)
    reads.clear()
    ds["z"].values  # noqa: B018
    assert reads["zarrs"] == 0 and reads["zarr"] > 0
    monkeypatch.setenv("HEADSTORE_CODEC_PIPELINE", "rust")
    with pytest.raises(ValueError, match="HEADSTORE_CODEC_PIPELINE"):
        open_store(path)


def test_a_flipped_byte_fails_both_paths(
    make_store: Callable[..., Path], reads: collections.Counter[str], tmp_path: Path
) -> None:
    """One byte flipped inside layer 1's inner chunk of z's first shard: the whole-shard read (zarrs) and the
    read of that layer alone (zarr-python) both fail naming the array."""
    from headstore.store_schema import HeadstoreError

    src = make_store("tiny-gpt2", "ioi", fields=FIELDS, layout="sharded", dtype="float32")
    out = tmp_path / "dmg.zarr"
    shutil.copytree(src, out)
    shard = out / "z" / "c" / "0" / "0" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    n_inner = 2  # tiny-gpt2: 2 layers, one inner chunk each; index = (offset, nbytes) uint64 pairs + crc32c
    index = np.frombuffer(bytes(data[-(16 * n_inner + 4) : -4]), dtype="<u8").reshape(n_inner, 2)
    offset, nbytes = (int(x) for x in index[1])
    data[offset + nbytes // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    ds = open_store(out)
    reads.clear()
    with pytest.raises(HeadstoreError, match=r"'z' has a damaged chunk"):
        ds["z"].isel(batch=slice(0, 4)).values  # noqa: B018
    assert reads["zarrs"] > 0 and reads["zarr"] == 0
    reads.clear()
    with pytest.raises(HeadstoreError, match=r"'z' has a damaged chunk"):
        ds["z"].isel(batch=slice(0, 4), layer=1).values  # noqa: B018
    assert reads["zarrs"] == 0 and reads["zarr"] > 0
    assert np.array_equal(ds["z"].isel(layer=0).values, direct(src, "z")[:, 0])  # the other layer reads
