"""store_schema's rooms: the contract imports nothing of write/ or read/, no import cycle inside the package, no
private name imported across its files; the shard index read back from a shard zarr wrote; chunk labels."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import Crc32cCodec

from headstore.store_schema.read.guard import chunk_label
from headstore.store_schema.shard_index import EMPTY, decode_index, index_nbytes

PKG = Path(__file__).resolve().parents[1] / "headstore" / "store_schema"
CONTRACT = ("layout", "provenance", "errors", "selection", "attention", "arrays", "paths", "hashing", "shard_index")


def _module(p: Path) -> str:
    parts = p.relative_to(PKG.parents[1]).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(p: Path) -> list[tuple[str, tuple[str, ...]]]:
    """(module, names) of every ``from headstore... import`` in ``p``, at module level or inside functions."""
    out = []
    for node in ast.walk(ast.parse(p.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("headstore"):
            out.append((node.module, tuple(a.name for a in node.names)))
    return out


FILES = {_module(p): p for p in sorted(PKG.rglob("*.py"))}


@pytest.mark.parametrize("name", CONTRACT)
def test_contract_imports_nothing_of_write_or_read(name: str) -> None:
    got = [
        m
        for m, _ in _imports(PKG / f"{name}.py")
        if m.startswith(("headstore.store_schema.write", "headstore.store_schema.read"))
    ]
    assert got == []


def test_no_import_cycle_and_no_private_name_across_files() -> None:
    edges: dict[str, set[str]] = {m: set() for m in FILES}
    private = []
    for m, p in FILES.items():
        for mod, names in _imports(p):
            targets = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in FILES] or [mod]
            edges[m] |= {t for t in targets if t in FILES and t != "headstore.store_schema"}
            private += [f"{m}: {mod}.{n}" for n in names if n.startswith("_") and mod != m]
    assert private == []
    state: dict[str, int] = {}

    def visit(u: str, path: tuple[str, ...]) -> None:
        state[u] = 1
        for v in sorted(edges[u]):
            assert state.get(v) != 1, f"cycle: {' -> '.join((*path, v))}"
            if v not in state:
                visit(v, (*path, v))
        state[u] = 2

    for m in sorted(FILES):
        if m not in state:
            visit(m, (m,))
    # the walk sees function-level imports: read/weights.py's own are among them
    assert "headstore.store_schema.read.guard" in edges["headstore.store_schema.read.weights"]


def test_shard_index_reads_what_zarr_wrote(tmp_path: Path) -> None:
    """A 2x3-chunk shard with one inner chunk never written: offsets and sizes as zarr laid them out."""
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    a = g.create_array("x", shape=(4, 6), chunks=(2, 2), shards=(4, 6), dtype="float32", fill_value=np.nan,
                       compressors=[Crc32cCodec()])  # fmt: skip
    value = np.arange(24, dtype=np.float32).reshape(4, 6)
    value[2:4, 4:6] = np.nan  # chunk (1, 2): all fill, left out of the shard
    a.with_config({"write_empty_chunks": False})[...] = value
    data = (tmp_path / "s.zarr" / "x" / "c" / "0" / "0").read_bytes()
    index = decode_index(data, (2, 3))
    assert index is not None and index.shape == (2, 3, 2)
    assert tuple(index[1, 2]) == (int(EMPTY), int(EMPTY))
    stored = [tuple(int(v) for v in index[i, j]) for i in range(2) for j in range(3) if (i, j) != (1, 2)]
    assert all(n == 2 * 2 * 4 + 4 for _, n in stored)  # raw float32 chunk + its crc32c
    assert sorted(o for o, _ in stored) == [k * 20 for k in range(5)]
    assert len(data) == 5 * 20 + index_nbytes(6)
    for i, j in [(0, 0), (1, 1)]:
        o, n = (int(v) for v in index[i, j])
        got = np.frombuffer(data[o : o + n - 4], dtype="<f4").reshape(2, 2)
        assert np.array_equal(got, value[2 * i : 2 * i + 2, 2 * j : 2 * j + 2])
    torn = data[: len(data) // 2]
    assert decode_index(torn, (2, 3)) is None
    flipped = bytearray(data)
    flipped[-10] ^= 1
    assert decode_index(bytes(flipped), (2, 3)) is None


def test_chunk_label_names_the_chunks_a_read_touches(tmp_path: Path) -> None:
    a = zarr.create_array(str(tmp_path / "a.zarr"), shape=(10, 3, 8), chunks=(4, 1, 8), dtype="float32")
    assert chunk_label(a, (slice(4, 8), slice(1, 2), slice(0, 8))) == "1.1.0"
    assert chunk_label(a, (slice(0, 10), 2)) == "0-2.2.0"
    assert chunk_label(a, Ellipsis) == "0-2.0-2.0"
    assert chunk_label(a, slice(8, 10)) == "2.0-2.0"
