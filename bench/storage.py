"""(c) Storage: bytes per token per field and for the default set, compression ratio, and read times
of "one head across all tokens" and "all heads for a few sequences", float32 vs float16 stores.

    python bench/storage.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
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
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()
    n_seq = 8 if args.quick else 16
    seq_len, bs = 128, 8

    import zarr

    from headstore import open_store
    from headstore.store_schema.io import array_nbytes_on_disk

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
default fields, Zstd level 1 + crc32c. "raw" = uncompressed in-memory bytes of the stored dtype.

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


if __name__ == "__main__":
    main()
