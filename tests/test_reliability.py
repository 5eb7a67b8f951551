"""Crash-safe resume, integrity checks, provenance refusals and read-only/no-pickle safety.

The crash tests run the real CLI in a subprocess and SIGKILL it at chosen points through the
test-only entry point ``tests/crash_cli.py`` (the CLI with a hook installed at the write path's checkpoints,
``headstore/store_schema/write/checkpoint.py``; it reads ``HEADSTORE_TEST_KILL_AT``).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from headstore.cli import app
from headstore.store_schema import HeadstoreError, Provenance, done_mask, open_store, read_provenance, validate
from headstore.store_schema.layout import ATTRS_KEY, MANIFEST, SCHEMA_VERSION

ROOT = Path(__file__).resolve().parents[1]
N_SEQ, BS = 24, 4
# --fields default: z and pattern stored (the kill points and damaged chunks below are in z's and pattern's files)
ARGS = ["--model", "tiny-gpt2", "--data", "ioi", "--n-seq", str(N_SEQ), "--batch-size", str(BS), "--device", "cpu",
        "--fields", "default"]  # fmt: skip


def run_cli(out: Path, kill_at: str | None = None, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("HEADSTORE_TEST_KILL_AT", None)
    if kill_at:
        env["HEADSTORE_TEST_KILL_AT"] = kill_at
    cmd = [
        sys.executable,
        str(ROOT / "tests" / "crash_cli.py"),
        "extract",
        *ARGS,
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def assert_killed(res: subprocess.CompletedProcess[str]) -> None:
    assert res.returncode == -signal.SIGKILL, (res.returncode, res.stderr[-2000:])


def arrays_of(path: Path) -> dict[str, np.ndarray]:
    root = zarr.open_group(str(path), mode="r")
    return {name: np.asarray(a[...]) for name, a in root.arrays()}


def assert_same_arrays(got: Path, want: Path) -> None:
    a, b = arrays_of(got), arrays_of(want)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        equal_nan = a[name].dtype.kind == "f"
        assert np.array_equal(a[name], b[name], equal_nan=equal_nan), f"{name} differs"


def tree_state(path: Path) -> dict[str, tuple[int, str]]:
    """Every file under path -> (mtime_ns, sha256): to prove a refused command changed nothing."""
    if path.is_file():
        return {path.name: (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())}
    return {
        str(p.relative_to(path)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def batches_done(path: Path) -> list[int]:
    done = done_mask(path)
    return [i // BS for i in range(0, N_SEQ, BS) if done[i : i + BS].all()]


@pytest.fixture(scope="module")
def reference(make_store: Callable[..., Path]) -> Path:
    return make_store("tiny-gpt2", "ioi", n_seq=N_SEQ, batch_size=BS, fields=("default",))


# --- 1. crash-safe resume ------------------------------------------------------------------------


def test_kill_at_many_points_then_resume_equals_uninterrupted(tmp_path: Path, reference: Path) -> None:
    out = tmp_path / "s.zarr"

    # Killed during creation, before the rename: nothing at --out, only the creation folder beside it.
    assert_killed(run_cli(out, "create:before_rename"))
    assert not out.exists()
    assert len(list(tmp_path.glob(".s.zarr.tmp-*"))) == 1

    # Killed after some fields of batch 1 (z written, the rest and the manifest not). Creating the
    # store again removed the dead process's creation folder.
    assert_killed(run_cli(out, "batch:1:after_field:z"))
    assert batches_done(out) == [0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]
    with pytest.raises(HeadstoreError, match=r"incomplete \(4 of 24 sequences written\)") as ei:
        open_store(out)
    assert "\n" not in str(ei.value)
    ds = open_store(out, partial=True)
    assert ds.sizes["batch"] == 4
    ref = open_store(reference)
    np.testing.assert_array_equal(ds["z"].values, ref["z"].isel(batch=slice(0, 4)).values)
    np.testing.assert_array_equal(ds["tokens"].values, ref["tokens"].isel(batch=slice(0, 4)).values)

    # Resumed, then killed in the middle of writing a chunk of pattern for batch 3 (torn chunk).
    assert_killed(run_cli(out, "batch:3:torn_field:pattern"))
    assert batches_done(out) == [0, 1, 2]
    assert list(out.glob("pattern/c/3/**/*.partial")), "the hook should have left a torn write behind"
    ds = open_store(out, partial=True)
    assert ds.sizes["batch"] == 12
    np.testing.assert_array_equal(ds["pattern"].values, ref["pattern"].isel(batch=slice(0, 12)).values)
    rep = validate(out)  # checks completed batches only: the torn chunk belongs to an unfinished one
    assert rep.problems == () and rep.n_complete == 12 and not rep.ok

    # Killed while writing the manifest chunk of batch 4 (torn manifest: batch 4 must count as not done).
    assert_killed(run_cli(out, "batch:4:torn_field:batch_done"))
    assert batches_done(out) == [0, 1, 2, 3]

    # Killed just after batch 4 is marked done: batch 4 must not be redone.
    assert_killed(run_cli(out, "batch:4:after_field:batch_done"))
    assert batches_done(out) == [0, 1, 2, 3, 4]

    res = run_cli(out)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "wrote 1 batches, 5 already done" in res.stdout  # nothing lost, nothing written twice
    assert not list(out.rglob("*.partial")), "rewriting a batch removes its torn writes"
    assert_same_arrays(out, reference)
    assert validate(out).ok
    full = open_store(out)
    assert full.sizes["batch"] == N_SEQ
    np.testing.assert_array_equal(full["loss"].values, ref["loss"].values)  # NaN positions included

    # A second rerun of a finished store writes nothing.
    res = run_cli(out)
    assert res.returncode == 0 and "wrote 0 batches, 6 already done" in res.stdout


@pytest.mark.parametrize("layout", ["sharded", "chunked"])
def test_every_file_reaches_disk_before_it_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str) -> None:
    """A power cut must not leave a store, or a batch marked done, whose data was still in the page cache: each
    file the creation writes is fdatasync'ed, and each folder fsync'ed, before the store is renamed into place;
    each file of a batch, and its folders, while the batch's manifest chunk does not exist yet. Only the manifest's
    own chunks (lost: the batch is redone) are left to the kernel. Then the store validates."""
    from headstore.extract import ExtractRequest, extract

    out = tmp_path / f"{layout}.zarr"
    synced: dict[str, set[tuple[str, ...]]] = {"file": set(), "folder": set()}
    real_fdatasync, real_fsync = os.fdatasync, os.fsync

    def record(kind: str, fd: int) -> None:
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if path == tmp_path:
            rel: tuple[str, ...] = ("..",)  # the folder the store was renamed into
        else:
            top, *rest = path.relative_to(tmp_path).parts
            assert top == out.name or top.startswith(f".{out.name}.tmp-"), path  # the store, or its creation folder
            rel = tuple(rest)
            if top == out.name and len(rel) >= 3 and rel[1] == "c":  # a batch's chunk: not marked done yet
                assert not (out / MANIFEST / "c" / rel[2]).exists(), f"{path} synced after its batch was marked done"
        synced[kind].add(rel)

    monkeypatch.setattr(os, "fdatasync", lambda fd: (record("file", fd), real_fdatasync(fd))[1])
    monkeypatch.setattr(os, "fsync", lambda fd: (record("folder", fd), real_fsync(fd))[1])
    extract(ExtractRequest(model="tiny-gpt2", data="ioi", out=str(out), n_seq=N_SEQ, batch_size=BS, device="cpu",
                           layout=layout, progress=False))  # fmt: skip
    files = {p.relative_to(out).parts for p in out.rglob("*") if p.is_file()}
    written_later = {f for f in files if f[0] == MANIFEST and f[1] == "c"}
    assert len(written_later) == N_SEQ // BS and len(files) > 30
    assert synced["file"] == files - written_later
    folders = {f[:i] for f in files - written_later for i in range(len(f))}  # () is the store itself
    assert synced["folder"] == folders | {("..",)}
    assert batches_done(out) == list(range(N_SEQ // BS))
    validate(out)


def test_open_store_refuses_incomplete_with_one_line(tmp_path: Path, reference: Path) -> None:
    out = tmp_path / "inc.zarr"
    shutil.copytree(reference, out)
    root = zarr.open_group(str(out), mode="r+")
    root[MANIFEST][8:12] = 0
    with pytest.raises(HeadstoreError) as ei:
        open_store(out)
    msg = str(ei.value)
    assert "incomplete (20 of 24" in msg and "\n" not in msg
    ds = open_store(out, partial=True)
    assert ds.sizes["batch"] == 20
    ref = open_store(reference)
    keep = [i for i in range(N_SEQ) if not 8 <= i < 12]
    np.testing.assert_array_equal(ds["v"].values, ref["v"].isel(batch=keep).values)
    np.testing.assert_array_equal(ds["io_pos"].values, ref["io_pos"].isel(batch=keep).values)


# --- 2. integrity --------------------------------------------------------------------------------


def inner_chunk_span(shard: Path, index: tuple[int, ...], n_inner: tuple[int, ...]) -> tuple[int, int]:
    """(offset, nbytes) of an inner chunk in a shard file, read from the shard index at its end
    (``n_inner`` inner chunks per shard along each dim; uint64 pairs, then a crc32c)."""
    data = shard.read_bytes()
    n = int(np.prod(n_inner))
    table = np.frombuffer(data[-(16 * n + 4) : -4], dtype="<u8").reshape(*n_inner, 2)
    offset, nbytes = table[index]
    return int(offset), int(nbytes)


def _damaged_copy(reference: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy with one byte flipped in z's chunk of batch 2, layer 1 (inside batch 2's shard)."""
    out = tmp_path / "dmg.zarr"
    shutil.copytree(reference, out)
    shard = out / "z" / "c" / "2" / "0" / "0" / "0" / "0"
    offset, nbytes = inner_chunk_span(shard, (0, 1, 0, 0, 0), (1, 2, 1, 1, 1))
    data = bytearray(shard.read_bytes())
    data[offset + nbytes // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    return out, shard


def test_validate_names_flipped_byte_and_deleted_shard(tmp_path: Path, reference: Path) -> None:
    assert read_provenance(reference).layout == "sharded"  # the default for new stores
    out, _ = _damaged_copy(reference, tmp_path)
    (out / "pattern" / "c" / "1" / "0" / "0" / "0" / "0").unlink()  # batch 1's pattern, every layer
    rep = validate(out)
    assert not rep.ok
    assert "z: chunk 2.1.0.0.0 is damaged (ValueError)" in rep.problems
    assert "pattern: shard 1.0.0.0.0 is missing" in rep.problems
    assert len(rep.problems) == 2

    res = CliRunner().invoke(app, ["validate", str(out)])
    assert res.exit_code == 1
    assert "z: chunk 2.1.0.0.0 is damaged" in res.output
    assert "pattern: shard 1.0.0.0.0 is missing" in res.output

    res = CliRunner().invoke(app, ["validate", str(reference)])
    assert res.exit_code == 0, res.output


def test_validate_finds_torn_shards_of_completed_batches(tmp_path: Path, reference: Path) -> None:
    """A shard cut short (a crash below zarr's atomic rename, a bad copy) loses its index: validate
    says so, whether the cut leaves most of it, less than the index, or nothing."""
    out = tmp_path / "torn.zarr"
    shutil.copytree(reference, out)
    for ib, keep in ((0, 0.5), (1, 0.0), (2, None)):
        shard = out / "v" / "c" / str(ib) / "0" / "0" / "0" / "0"
        data = shard.read_bytes()
        shard.write_bytes(data[: int(len(data) * keep)] if keep is not None else data[:10])
    rep = validate(out)
    assert sorted(p.split(" is ")[0] for p in rep.problems) == [f"v: shard {ib}.0.0.0.0" for ib in range(3)]
    assert all("torn or corrupt index" in p for p in rep.problems)


def test_validate_chunked_layout_names_chunks(tmp_path: Path, make_store: Callable[..., Path]) -> None:
    """Stores of the older layout (one file per layer) still validate chunk by chunk."""
    src = make_store("tiny-gpt2", "ioi", n_seq=8, batch_size=4, layout="chunked", fields=("default",))
    out = tmp_path / "old.zarr"
    shutil.copytree(src, out)
    chunk = out / "z" / "c" / "1" / "1" / "0" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    (out / "pattern" / "c" / "0" / "0" / "0" / "0" / "0").unlink()
    rep = validate(out)
    assert sorted(rep.problems) == ["pattern: chunk 0.0.0.0.0 is missing", "z: chunk 1.1.0.0.0 is damaged (ValueError)"]


def test_reading_a_damaged_chunk_fails_naming_the_array(tmp_path: Path, reference: Path) -> None:
    out, _ = _damaged_copy(reference, tmp_path)
    ds = open_store(out)  # lazy: opening works
    ds["pattern"].compute()  # undamaged arrays still read
    with pytest.raises(HeadstoreError, match=r"\bz\b.*damaged"):
        ds["z"].compute()
    with pytest.raises(HeadstoreError, match=r"\bz\b.*damaged"):
        ds["result"].compute()  # derived from z


def test_missing_chunk_reads_as_nan_not_data(tmp_path: Path, reference: Path) -> None:
    out = tmp_path / "gone.zarr"
    shutil.copytree(reference, out)
    (out / "v" / "c" / "0" / "0" / "0" / "0" / "0").unlink()  # batch 0's shard of v
    v = open_store(out)["v"].values
    assert np.isnan(v[0:4]).all()
    assert not np.isnan(v[4:]).any()


# --- 3. provenance -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "what"),
    [
        (["--model", "tiny-llama"], "model.name"),
        (["--seed", "1"], "dataset"),
        (["--n-seq", "20"], "dataset"),
        (["--fields", "default,q"], "fields"),
        (["--dtype", "float16"], "storage_dtype"),
        (["--layers", "0"], "layers"),
        (["--batch-size", "2"], "batch_size"),
    ],
)
def test_resume_with_different_run_is_refused(tmp_path: Path, reference: Path, extra: list[str], what: str) -> None:
    out = tmp_path / "s.zarr"
    shutil.copytree(reference, out)
    before = tree_state(out)
    args = dict(zip(ARGS[::2], ARGS[1::2], strict=True))
    args.update(dict(zip(extra[::2], extra[1::2], strict=True)))
    argv = ["extract", *[x for kv in args.items() for x in kv], "--out", str(out), "--no-progress"]
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert f"different {what}" in lines[0]
    assert tree_state(out) == before


def test_future_schema_version_is_refused_naming_both(tmp_path: Path, reference: Path) -> None:
    out = tmp_path / "v99.zarr"
    shutil.copytree(reference, out)
    for meta in (out / "zarr.json",):
        text = meta.read_text()
        assert f'"schema_version": {SCHEMA_VERSION}' in text
        meta.write_text(text.replace(f'"schema_version": {SCHEMA_VERSION}', '"schema_version": 99'))
    for call in (read_provenance, open_store, validate):
        with pytest.raises(HeadstoreError, match=rf"schema version 99.*up to {SCHEMA_VERSION}"):
            call(out)
    res = CliRunner().invoke(app, ["info", str(out)])
    assert res.exit_code == 2 and "schema version 99" in res.stderr and f"up to {SCHEMA_VERSION}" in res.stderr


def test_pairing_stores_of_different_models_is_refused(make_store: Callable[..., Path], reference: Path) -> None:
    other = make_store("tiny-llama", "ioi", n_seq=12, batch_size=4)
    a, b = read_provenance(reference), read_provenance(other)
    a.check_same_model(a)
    with pytest.raises(HeadstoreError, match=r"differ in model\.name \('tiny-gpt2' vs 'tiny-llama'\)"):
        a.check_same_model(b)
    d = a.to_dict()
    d["model"] = {**d["model"], "weights_sha256": "0" * 64}
    with pytest.raises(HeadstoreError, match=r"model\.weights_sha256"):
        a.check_same_model(Provenance.from_dict(d))


def test_pairing_refusal_names_the_cause_with_its_hint(reference: Path) -> None:
    """The weights hash follows from model, processing, dtype and layers: those are named before it, and each
    difference gets the fix that fits it (a prompt-set shape is not a model difference)."""
    a = read_provenance(reference)
    d = a.to_dict()
    other_weights = {**d["model"], "weights_sha256": "0" * 64}
    cases = [
        ({"layers": [1], "pattern_layers": [1], "model": other_weights}, r"layers \(\[0, 1\] vs \[1\]\): extract both with the same --layers$"),
        ({"model": {**other_weights, "dtype": "bfloat16"}}, r"model\.dtype .*: extract both with the same --model-dtype$"),
        ({"model": {**other_weights, "processing": {"fold_ln": False}}}, r"model\.processing .*: extract both with the same headstore version"),
        ({"model": other_weights}, r"model\.weights_sha256 .*: same model name and layers but other weights"),
        ({"seq_len": d["seq_len"] + 7}, rf"seq_len \({d['seq_len']} vs {d['seq_len'] + 7}\): the prompt sets differ in length: pair stores made from prompt sets of the same shape"),
    ]  # fmt: skip
    for patch, match in cases:
        with pytest.raises(HeadstoreError, match=match) as e:
            a.check_same_model(Provenance.from_dict({**d, **patch}))
        assert "\n" not in str(e.value)
        if "seq_len" in patch:
            assert "same model" not in str(e.value)


# --- 5. safety -----------------------------------------------------------------------------------

UNSAFE = [
    (re.compile(r"\bpickle\.loads?\s*\("), "pickle.load"),
    (re.compile(r"\b(?:c?[Pp]ickle|dill|joblib)\b.*\bload"), "unpickling load"),
    (re.compile(r"\btorch\.load\s*\("), "torch.load"),
    (re.compile(r"allow_pickle\s*=\s*True"), "np.load(allow_pickle=True)"),
]


def test_no_module_unpickles() -> None:
    hits = []
    for py in sorted((ROOT / "headstore").rglob("*.py")):
        for i, line in enumerate(py.read_text(encoding="utf-8").splitlines(), 1):
            for pat, what in UNSAFE:
                if pat.search(line):
                    hits.append(f"{py.relative_to(ROOT)}:{i}: {what}: {line.strip()}")
    assert hits == []
    # the grep itself finds what it is meant to find
    assert all(
        pat.search(s)
        for (pat, _), s in zip(
            UNSAFE,
            ["pickle.loads(b)", "import pickle; pickle.load(f)", "torch.load(p)", "np.load(p, allow_pickle = True)"],
            strict=True,
        )
    )


def test_every_read_path_opens_zarr_read_only() -> None:
    mods = ("write/create", "write/writer", "paths", "read/reader", "read/guard")
    src = "".join((ROOT / "headstore" / "store_schema" / f"{m}.py").read_text() for m in mods)
    calls = re.findall(r"zarr\.open_group\((.*?)\)\n", src, flags=re.S)
    modes = [re.search(r"mode=\"([^\"]+)\"", c) for c in calls]
    assert all(m for m in modes), calls
    # only the creator ("w-") and the batch writer ("r+") may write; everything else is "r"
    assert sorted(m.group(1) for m in modes if m) == ["r", "r+", "w-"]
    # xarray reads the group open_store opened read-only ("r" above), without a mode of its own
    opened = re.search(r"xr\.open_dataset\((ZarrStore\(root.*?)\)\n", src)
    assert opened and "mode=" not in opened.group(1)


def test_open_store_is_read_only(tmp_path: Path, reference: Path) -> None:
    out = tmp_path / "ro.zarr"
    shutil.copytree(reference, out)
    before = tree_state(out)
    ds = open_store(out)
    # writing into the in-memory view never reaches the files
    ds["z"].values  # noqa: B018
    ds.attrs[ATTRS_KEY]["seq_len"] = 1
    ds["tokens"][0, 0] = 7  # touches only a loaded copy
    # the zarr group behind the readers refuses writes
    from headstore.store_schema.read.reader import open_group

    root = open_group(out)
    assert root.read_only
    with pytest.raises(Exception, match=r"(?i)read.only|read-only|mode"):
        root["tokens"][0, 0] = 7
    with pytest.raises(Exception, match=r"(?i)read.only|read-only|mode"):
        root.attrs["x"] = 1
    assert tree_state(out) == before
    assert read_provenance(out).seq_len != 1
