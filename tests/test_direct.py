"""Files written past the page cache (store_schema/write/direct.py) are the bytes zarr's own LocalStore writes."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

import headstore.store_schema.write.direct as direct
from headstore.extract import ExtractRequest, extract

pytestmark = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this system")


def _spy(monkeypatch: pytest.MonkeyPatch, refuse: str = "") -> list[int]:
    """Record os.open's flags in direct.py; ``refuse``: fail O_DIRECT with EINVAL at "open" or "write"."""
    flags: list[int] = []
    real_open, real_write = os.open, os.write
    direct_fds: set[int] = set()

    def spy_open(path: Any, flag: int, *args: Any) -> int:
        flags.append(flag)
        if refuse == "open" and flag & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")  # what some file systems say
        fd = real_open(path, flag, *args)
        if flag & os.O_DIRECT:
            direct_fds.add(fd)
        return fd

    def spy_write(fd: int, data: Any) -> int:
        if refuse == "write" and fd in direct_fds:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(direct.os, "open", spy_open)
    monkeypatch.setattr(direct.os, "write", spy_write)
    return flags


@pytest.mark.parametrize("refuse", ["", "open", "write"], ids=["o_direct", "refused_at_open", "refused_at_write"])
@pytest.mark.parametrize("n", [1 << 20, 3 * 65536 + 4096 * 3 + 123, 4096 * 5])
def test_put_direct_writes_every_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, n: int, refuse: str) -> None:
    monkeypatch.setattr(direct, "STAGE_BYTES", 65536)  # several staged writes per file
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    flags = _spy(monkeypatch, refuse)
    target = tmp_path / "c" / "0" / "0"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"old bytes, longer than nothing" * 1000)  # replaced whole, never merged
    direct.put_direct(target, memoryview(data))
    assert target.read_bytes() == data.tobytes()
    assert any(f & os.O_DIRECT for f in flags)  # the direct path was tried
    assert [p.name for p in target.parent.iterdir()] == ["0"]  # no temporary left beside it
    if not refuse:  # this test's folder takes O_DIRECT (else the extraction test below proves nothing)
        monkeypatch.undo()
        assert direct._write_direct(tmp_path / "probe", memoryview(data)) == n - n % 4096


def test_out_of_space_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A short write (a full disk) raises ENOSPC, and neither the file nor its temporary is left."""
    real_write = os.write
    monkeypatch.setattr(direct.os, "write", lambda fd, data: real_write(fd, memoryview(data)[:4096]))
    target = tmp_path / "c" / "0"
    with pytest.raises(OSError) as err:
        direct.put_direct(target, memoryview(np.zeros(1 << 20, np.uint8)))
    assert err.value.errno == errno.ENOSPC
    assert not target.exists() and list(tmp_path.rglob("*")) == [tmp_path / "c"]


def test_full_disk_inside_an_o_direct_write(tmpfs: Callable[[str], Path]) -> None:
    one_mb_disk = tmpfs("1m")  # this kernel's tmpfs takes O_DIRECT (checked below)
    probe = one_mb_disk / "probe"
    if direct._write_direct(probe, memoryview(np.ones(8192, np.uint8))) == 0:
        pytest.skip("this tmpfs refuses O_DIRECT")
    probe.unlink()
    target = one_mb_disk / "c" / "0"
    with pytest.raises(OSError) as err:
        direct.put_direct(target, memoryview(np.ones(2 << 20, np.uint8)))
    assert err.value.errno == errno.ENOSPC
    assert list(one_mb_disk.rglob("*")) == [one_mb_disk / "c"]  # no file, no temporary


def test_extraction_through_o_direct_equals_zarrs_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same extraction with every file written by O_DIRECT and with none: the same files, byte for byte."""

    def run(name: str, min_bytes: int) -> Path:
        monkeypatch.setattr(direct, "DIRECT_MIN_BYTES", min_bytes)
        out = tmp_path / name
        extract(ExtractRequest(model="tiny-gpt2", data="text", out=str(out), n_seq=12, seq_len=32, batch_size=4,
                               progress=False))  # fmt: skip
        return out

    written: list[int] = []
    real = direct._write_direct
    monkeypatch.setattr(direct, "_write_direct", lambda tmp, data: written.append(real(tmp, data)) or written[-1])
    a = run("direct.zarr", 1)
    assert sum(n > 0 for n in written) >= 3 * 3  # 3 batches x the activation fields at least, past the cache
    n_direct = len(written)
    b = run("plain.zarr", 1 << 62)
    assert len(written) == n_direct  # none the second time

    def batch_files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file() and "/c/" in str(p)}

    fa, fb = batch_files(a), batch_files(b)
    assert fa.keys() == fb.keys() and len(fa) > 0
    assert all(fa[k] == fb[k] for k in fa)
    ga, gb = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    np.testing.assert_array_equal(ga["pattern"][:], gb["pattern"][:])
