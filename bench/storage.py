"""(c) Storage: bytes per token per field and for the default set, compression ratio, and read times
of "one head across all tokens" and "all heads for a few sequences", float32 vs float16 stores.
Then compact mode (``--fields compact``: q and k stored, pattern derived on open) against the default
set at a longer context: bytes per token of pattern vs q + k, and read times derived vs stored.

Then the measurement behind the layout's choices: each codec on the real chunks of pattern, z and v
(ratio, encode and decode speed), and the chunk layout of pattern (one chunk per batch chunk x layer,
as stored, vs zarr shards of the same size holding one inner chunk per head).

Then the file layout (section c3): the same store contents written chunked (one file per field,
batch and layer) and sharded (one file per field and batch, every layer inside): files, bytes per
token and the read times of (c), locally and over HTTP range requests (``headstore serve``).

    python bench/storage.py [--quick] [--compact-only] [--layouts-only]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C


def read_times(ds: Any) -> dict[str, float]:
    """Median seconds of the two access patterns on pattern, z and v."""
    L, h = ds.sizes["layer"] // 2, 0
    reads = {
        "pattern, one head, all tokens": lambda: ds["pattern"].isel(layer=L, head=h).values,
        "z, one head, all tokens": lambda: ds["z"].isel(layer=L, head=h).values,
        "pattern, all heads, 2 sequences": lambda: ds["pattern"].isel(batch=slice(0, 2)).values,
        "z, all heads, 2 sequences": lambda: ds["z"].isel(batch=slice(0, 2)).values,
        "v, all heads, 2 sequences": lambda: ds["v"].isel(batch=slice(0, 2)).values,
    }
    return {k: C.timeit(f, repeat=3) for k, f in reads.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--compact-only", action="store_true", help="only the compact-mode section")
    ap.add_argument("--layouts-only", action="store_true", help="only the file-layout section")
    ap.add_argument("--choices-only", action="store_true", help="only the codec-choice section (c1)")
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()
    if args.layouts_only:
        layouts(args)
        return
    if args.choices_only:
        choices(args)
        return
    if not args.compact_only:
        storage(args)
        choices(args)
        layouts(args)
    compact(args)


def layouts(args: argparse.Namespace) -> None:
    """Chunked vs sharded files for the same contents: file count, bytes/token, read times."""
    import threading

    import numpy as np
    import zarr

    from headstore import open_store
    from headstore.cli.serve import make_server
    from headstore.store_schema.read.info import array_nbytes_on_disk, count_files

    n_seq, seq_len, bs = (8 if args.quick else 16), 128, 8
    paths = {lay: C.store(args.model, "text", n_seq, bs, seq_len=seq_len, layout=lay) for lay in ("chunked", "sharded")}
    a, b = (zarr.open_group(str(p), mode="r", zarr_format=3) for p in paths.values())
    for name, arr in a.arrays():  # same contents, array by array
        x, y = np.asarray(arr[...]), np.asarray(b[name][...])  # type: ignore[index]
        assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), name
    server = make_server(str(C.CACHE), port=0, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    rows, info = [], {}
    try:
        for lay, path in paths.items():
            ds, remote = open_store(path), open_store(f"{url}/{path.name}")
            L = ds.sizes["layer"] // 2
            n_tok = ds.sizes["batch"] * ds.sizes["pos"]
            disk = array_nbytes_on_disk(path)
            fields = list(ds.attrs["headstore"]["fields"])
            info[lay] = (count_files(path), sum(disk[f] for f in fields) / n_tok, sum(disk.values()) / n_tok)
            reads = {
                "pattern, one head, all tokens": lambda d, L=L: d["pattern"].isel(layer=L, head=0).values,
                "z, one layer, all heads, all tokens": lambda d, L=L: d["z"].isel(layer=L).values,
                "pattern, all heads and layers, 2 sequences": lambda d: d["pattern"].isel(batch=slice(0, 2)).values,
                "z, all heads and layers, 2 sequences": lambda d: d["z"].isel(batch=slice(0, 2)).values,
            }
            for r, f in reads.items():
                rows.append([lay, r, _best(partial(f, ds), repeat=3) * 1e3, _best(partial(f, remote), repeat=3) * 1e3])
    finally:
        server.shutdown()
        server.server_close()
    by = {(r[0], r[1]): r[2:] for r in rows}
    read_rows = [[r, *by[("chunked", r)], *by[("sharded", r)]] for r in dict.fromkeys(x[1] for x in rows)]
    cfg = open_store(paths["sharded"]).attrs["headstore"]["model"]["config"]
    n_fields_layer = sum(1 for f in open_store(paths["sharded"]).attrs["headstore"]["fields"] if f in
                         ("pattern", "v", "z", "ln1_scale", "ln2_scale", "q", "k", "result", "resid_pre"))  # fmt: skip
    n_other = len(open_store(paths["sharded"]).attrs["headstore"]["fields"]) - 1 - n_fields_layer  # - tokens
    batches = 1e6 / (seq_len * bs)
    per_chunked = (n_fields_layer * cfg["n_layers"] + n_other + 1) * batches
    per_sharded = (n_fields_layer + n_other + 1) * batches
    cmd = "python bench/storage.py --layouts-only" + (" --quick" if args.quick else "")
    body = f"""## (c3) File layout: chunked vs sharded, same contents

Command: `{cmd}` (also runs with the full script) — machine: {C.machine()}.
Model `{args.model}` ({cfg["n_layers"]} layers), data `text`, {n_seq} sequences x {seq_len} tokens, batch {bs}, default
fields, float32; the two stores hold the same arrays (checked array by array). `chunked`: one file per
(field, batch, layer), the layout before issue 13; `sharded` (the default): one shard file per (field, batch)
with the same inner chunks.

{C.table(["layout", "files", "activation B/token", "whole store B/token (incl. weights)"],
          [[lay, *info[lay]] for lay in info])}

Read times (fastest of 3 after a warm-up, warm page cache, threaded dask; ms), locally and over HTTP
from `headstore serve` on loopback (range requests):

{C.table(["read", "chunked local", "chunked HTTP", "sharded local", "sharded HTTP"], read_rows)}

At 10^6 tokens (batches of {bs} x {seq_len}) the default fields make about {per_chunked:,.0f} files chunked and
{per_sharded:,.0f} sharded ({n_fields_layer} per-layer fields, {n_other} others, the manifest), plus ~30 metadata
and weight files. A sharded read costs one more small read per chunk (the shard's index: 16 bytes
per inner chunk + 4) and fetches only the inner chunks of the selection.
"""
    C.write_section("storage-layouts", body)


def storage(args: argparse.Namespace) -> None:
    n_seq = 8 if args.quick else 16
    seq_len, bs = 128, 8

    import zarr

    from headstore import open_store
    from headstore.store_schema.read.info import array_nbytes_on_disk

    per_dtype = {}
    for dtype in ("float32", "float16"):
        path = C.store(args.model, "text", n_seq, bs, dtype=dtype, seq_len=seq_len)
        ds = open_store(path)
        fields = list(ds.attrs["headstore"]["fields"])
        n_tok = ds.sizes["batch"] * ds.sizes["pos"]
        disk = array_nbytes_on_disk(path)
        root = zarr.open_group(str(path), mode="r", zarr_format=3)
        raw = {name: int(root[name].nbytes) for name in fields}  # type: ignore[union-attr]
        times = read_times(ds)
        per_dtype[dtype] = (fields, n_tok, disk, raw, times)
        act = sum(disk[f] for f in fields)
        print(dtype, f"{act / n_tok:.0f} B/token on disk (activations), raw {sum(raw.values()) / n_tok:.0f}")

    f32, f16 = per_dtype["float32"], per_dtype["float16"]
    fields, n_tok = f32[0], f32[1]
    rows = []
    for name in fields:
        rows.append([name, f32[3][name] / n_tok, f32[2][name] / n_tok, f32[3][name] / f32[2][name],
                     f16[2][name] / n_tok, f16[3][name] / f16[2][name]])  # fmt: skip
    tot32, tot16 = sum(f32[2][f] for f in fields), sum(f16[2][f] for f in fields)
    raw32, raw16 = sum(f32[3].values()), sum(f16[3].values())
    rows.append(
        ["**default set (activations)**", raw32 / n_tok, tot32 / n_tok, raw32 / tot32, tot16 / n_tok, raw16 / tot16]
    )
    whole32, whole16 = sum(f32[2].values()), sum(f16[2].values())
    read_rows = [[k, f32[4][k] * 1e3, f16[4][k] * 1e3] for k in f32[4]]
    cmd = "python bench/storage.py" + (" --quick" if args.quick else "")
    body = f"""## (c) Storage size and read times

Command: `{cmd}` — machine: {C.machine()}.
Model `{args.model}`, data `text`, {n_seq} sequences x {seq_len} tokens = {n_tok} tokens, batch (chunk) {bs},
default fields, the store's codecs (LZ4 for pattern, none for other floats, Zstd-1 for integers; crc32c on
every chunk; section (c1) shows why). "raw" = uncompressed in-memory bytes of the stored dtype.

{
        C.table(
            [
                "field",
                "raw B/token (f32)",
                "disk B/token (f32)",
                "compression (f32)",
                "disk B/token (f16)",
                "compression (f16)",
            ],
            rows,
        )
    }

Whole store including weights ({n_tok} tokens): float32 {whole32 / 1e6:.1f} MB, float16 {whole16 / 1e6:.1f} MB
(weights are float32 in both: W_E, W_EE, W_U alone are ~3 x 49152 x 576 x 4 B ≈ 340 MB of raw
float32, so on a store this small they dominate; bytes per token above count activations only).

Read times (median of 3, warm page cache, threaded dask; ms):

{C.table(["read", "float32 ms", "float16 ms"], read_rows)}

"One head across all tokens" reads every batch chunk of that layer (chunks hold all heads of one
layer for `batch_size` sequences), so it costs about 1/n_layers of the field; "all heads for a few
sequences" reads one batch chunk per layer.
"""
    C.write_section("storage", body)


def _best(fn: Any, repeat: int = 5) -> float:
    """Fastest wall seconds of ``fn()`` over ``repeat`` runs after one warm-up."""
    return C.timeit(fn, repeat=repeat, stat=min)


def choices(args: argparse.Namespace) -> None:
    """Codecs and pattern chunk layout, measured on the float32 store's own chunks."""
    import tempfile

    import numcodecs
    import numpy as np
    import zarr
    from numcodecs import Blosc, Zstd
    from zarr.codecs import BloscCodec, Crc32cCodec

    numcodecs.blosc.use_threads = False  # zarr calls codecs from worker threads: single-threaded there too
    n_seq, seq_len, bs = (8 if args.quick else 16), 128, 8
    root = zarr.open_group(str(C.store(args.model, "text", n_seq, bs, seq_len=seq_len)), mode="r")
    mid = root["z"].shape[1] // 2  # type: ignore[union-attr]  # a middle layer (layer 0's v repeats with its tokens)
    chunk = {name: np.ascontiguousarray(root[name][:bs, mid]) for name in ("pattern", "z", "v")}  # type: ignore[index]
    cands = {"Zstd level 1": Zstd(1), "LZ4 level 1 (Blosc, no shuffle; stored)": Blosc("lz4", 1, Blosc.NOSHUFFLE),
             "LZ4 level 5 (Blosc, no shuffle)": Blosc("lz4", 5, Blosc.NOSHUFFLE),
             "Zstd-1 + byte shuffle (Blosc)": Blosc("zstd", 1, Blosc.SHUFFLE)}  # fmt: skip
    chunk["pattern, float16"] = chunk["pattern"].astype(np.float16)
    rows = []
    for name, x in chunk.items():
        for cname, codec in cands.items():
            enc = codec.encode(x)
            t_enc = _best(lambda c=codec, x=x: c.encode(x), repeat=3)
            t_dec = _best(lambda c=codec, e=enc: c.decode(e), repeat=3)
            rows.append([name, cname, x.nbytes / len(enc), x.nbytes / t_enc / 1e6, x.nbytes / t_dec / 1e6])
    pattern = np.asarray(root["pattern"][:])  # type: ignore[index]
    shape, n_heads = pattern.shape, pattern.shape[2]
    outer = (bs, 1, *shape[2:])
    layouts = {
        "chunk = batch chunk x layer (stored)": {"chunks": outer, "compressors": [BloscCodec(cname="lz4", clevel=1, shuffle="noshuffle"), Crc32cCodec()]},
        "shard = batch chunk x layer, inner chunk per head": {
            "chunks": (bs, 1, 1, *shape[3:]), "shards": outer,
            "compressors": [BloscCodec(cname="lz4", clevel=1, shuffle="noshuffle"), Crc32cCodec()]},
    }  # fmt: skip
    L = shape[1] // 2
    lay_rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, kw in layouts.items():
            arr = zarr.create_array(f"{tmp}/{len(lay_rows)}.zarr", shape=shape, dtype=pattern.dtype, **kw)  # type: ignore[arg-type]
            c0, w0 = time.process_time(), time.perf_counter()
            arr[:] = pattern
            cpu, wall = time.process_time() - c0, time.perf_counter() - w0
            one_head = _best(lambda a=arr: a[:, L, 0], repeat=3)
            two_seq = _best(lambda a=arr: a[:2], repeat=3)
            disk = sum(f.stat().st_size for f in Path(f"{tmp}/{len(lay_rows)}.zarr").rglob("*") if f.is_file())
            n_files = sum(1 for f in Path(f"{tmp}/{len(lay_rows)}.zarr").rglob("*") if f.is_file())
            lay_rows.append([label, disk / pattern.nbytes, n_files, cpu, wall, one_head * 1e3, two_seq * 1e3])
    cmd = "python bench/storage.py" + (" --quick" if args.quick else "")
    cmd += " --choices-only" if args.choices_only else ""
    body = f"""## (c1) Why these codecs and this chunk layout

Command: `{cmd}` (runs with (c) without `--choices-only`) — machine: {C.machine()}.
Codecs on one real chunk of each field (`{args.model}`, float32, {bs} sequences x {seq_len} tokens, layer {mid}),
single-threaded numcodecs, fastest of 3 (MB/s of uncompressed data):

{C.table(["field", "codec", "ratio", "encode MB/s", "decode MB/s"], rows)}

Choice: `pattern` is LZ4 at level 1: its causal zeros give nearly Zstd's ratio at several times the speed both
ways, and level 5 gains under 1 % of size for half level 1's encoding speed (the writer's CPU is taken from
the next batch's forward pass, (b));
`z`, `v` and the other floats are stored uncompressed: no codec gains more than ~10 % on them, and at
these speeds Zstd would take a large share of the extraction's CPU (the extraction runs the writes beside
the next forward pass on the same cores; (b) measures what is left). Integers (tokens) and strings (vocab)
stay Zstd-1. Every chunk carries a crc32c checksum.

Chunk layout of `pattern` ({shape[0]} sequences, {shape[1]} layers, {n_heads} heads, written from memory in
one call; reads straight from zarr, fastest of 3, warm page cache):

{C.table(["layout", "disk ÷ raw", "files", "write CPU s", "write wall s", "one head, all tokens (ms)", "all heads, 2 sequences (ms)"], lay_rows)}

Choice: one chunk per (batch chunk, layer). Per-head inner chunks read one head in {lay_rows[1][5]:.1f} ms
(vs {lay_rows[0][5]:.1f} ms), all heads of 2 sequences in {lay_rows[1][6]:.0f} ms (vs {lay_rows[0][6]:.0f} ms), and cost
{lay_rows[1][3] / lay_rows[0][3]:.1f}x the write CPU ({n_heads}x the codec calls, plus a shard index per chunk). Every
analyzer reads all heads of a layer, a one-head read already costs only 1/n_layers of the field, and the
extractor writes one whole chunk per (batch chunk, layer), so concurrent shard writers never share one.
"""
    C.write_section("storage-choices", body)


def compact(args: argparse.Namespace) -> None:
    """Default store (pattern stored) vs compact store (q, k stored, pattern derived) on the same tokens."""
    import numpy as np

    from headstore import open_store
    from headstore.store_schema.read.info import array_nbytes_on_disk

    n_seq, bs, seq_len = (2, 2, 256) if args.quick else (4, 2, 512)
    spec = {"full": (("default",), "float32"), "compact": (("compact",), "float32"), "compact16": (("compact",), "float16")}
    paths = {k: C.store(args.model, "text", n_seq, bs, fields=f, dtype=dt, seq_len=seq_len) for k, (f, dt) in spec.items()}
    ds = {k: open_store(p) for k, p in paths.items()}
    disk = {k: array_nbytes_on_disk(p) for k, p in paths.items()}
    n_tok = ds["full"].sizes["batch"] * ds["full"].sizes["pos"]
    assert (ds["full"]["tokens"].values == ds["compact"]["tokens"].values).all()

    def raw(k: str, name: str) -> int:
        return int(ds[k][name].dtype.itemsize * ds[k][name].size)

    def acts(k: str) -> int:
        return sum(disk[k][f] for f in ds[k].attrs["headstore"]["fields"])

    pat_disk, qk_disk = disk["full"]["pattern"], disk["compact"]["q"] + disk["compact"]["k"]
    size_rows = [
        ["`pattern` (default set, f32)", raw("full", "pattern") // n_tok, pat_disk // n_tok],
        ["`q` + `k` (compact, f32)", (raw("compact", "q") + raw("compact", "k")) // n_tok, qk_disk // n_tok],
        ["`q` + `k` (compact, f16)", (raw("compact16", "q") + raw("compact16", "k")) // n_tok,
         (disk["compact16"]["q"] + disk["compact16"]["k"]) // n_tok],
        ["all activations, default set (f32)", "", acts("full") // n_tok],
        ["all activations, compact set (f32)", "", acts("compact") // n_tok],
        ["all activations, compact set (f16)", "", acts("compact16") // n_tok],
    ]  # fmt: skip
    cfg = ds["full"].attrs["headstore"]["model"]["config"]
    n_h, n_kv, d_head = cfg["n_heads"], cfg["n_key_value_heads"], cfg["d_head"]
    even = (n_h + n_kv) * d_head / n_h  # raw break-even seq_len: n_h * seq_len == (n_h + n_kv) * d_head
    L, h = ds["full"].sizes["layer"] // 2, 0
    reads = {
        "pattern, one head, all tokens": lambda d: d["pattern"].isel(layer=L, head=h).values,
        "pattern, one layer, all heads, all tokens": lambda d: d["pattern"].isel(layer=L).values,
        "pattern, all heads, 1 sequence": lambda d: d["pattern"].isel(batch=slice(0, 1)).values,
    }
    times = {r: [_best(partial(f, ds[k])) for k in spec] for r, f in reads.items()}
    errs = [0.0, 0.0]  # max |derived - stored|, one layer at a time (a whole pattern is ~1 GB here)
    for li in range(ds["full"].sizes["layer"]):
        stored = ds["full"]["pattern"].isel(layer=li).values
        for i, k in enumerate(("compact", "compact16")):
            errs[i] = max(errs[i], float(np.abs(ds[k]["pattern"].isel(layer=li).values - stored).max()))
    for r, t in times.items():
        print(r, [f"{x * 1e3:.0f} ms" for x in t])
    codecs = "; ".join(
        f"{name}: {' + '.join(c['name'] for c in json.loads((paths[k] / name / 'zarr.json').read_text())['codecs'][1:])}"
        for k, name in (("full", "pattern"), ("compact", "q"), ("compact", "k"))
    )
    print("pattern B/token", pat_disk / n_tok, "q+k", qk_disk / n_tok, "activations", acts("full") / acts("compact"))
    print("max |derived - stored|", errs)
    cmd = "python bench/storage.py --compact-only" + (" --quick" if args.quick else "")
    body = f"""## (c2) Compact mode: pattern derived from q, k vs stored

Command: `{cmd}` — machine: {C.machine()}.
Model `{args.model}` ({cfg["n_layers"]} layers, {n_h} heads, {n_kv} kv heads, d_head {d_head}), data `text`, {n_seq} sequences x {seq_len} tokens = {n_tok} tokens, batch (chunk) {bs}.
Stores: `--fields default` (pattern stored), `--fields compact` (= `default,-pattern,q,k`: pattern derived by
`open_store` as `softmax(q . k / sqrt(d_head))`, causal, GQA-mapped), float32 and float16. Bytes per token
with the store's codecs ({codecs}); "raw" = uncompressed bytes of the stored dtype:

{C.table(["stored", "raw B/token", "disk B/token"], size_rows)}

At {seq_len} tokens `pattern` takes {pat_disk / qk_disk:.1f}x the disk of `q` + `k`, and the whole activation
set shrinks {acts("full") / acts("compact"):.2f}x (float32). Per token, `pattern` holds `n_layers * n_heads * seq_len`
values (about half of them causal zeros, which the compressor removes) and grows with the context; `q` + `k` hold
`n_layers * (n_heads + n_kv_heads) * d_head`, whatever the context: the raw sizes cross at
`seq_len = (n_heads + n_kv_heads) * d_head / n_heads` = {even:.0f} here, about twice that on disk.

Read times (fastest of 5 after a warm-up, warm page cache, threaded dask; the fastest rather than the median
because the shared machine's load swings; ms), layer {L}:

{C.table(["read", "stored (default, f32)", "derived (compact, f32)", "derived (compact, f16)"],
          [[r, *(round(x * 1e3) for x in t)] for r, t in times.items()])}

A derived read computes whole (batch chunk, layer) blocks, all heads: one head costs the same as
its layer's heads. Max |derived - stored| over every position, layer and head: {errs[0]:.2g} (float32
compact store), {errs[1]:.2g} (float16 compact store: q and k rounded to float16, derivation in float32).
"""
    C.write_section("storage-compact", body)


if __name__ == "__main__":
    main()
