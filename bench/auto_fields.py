"""``--fields auto`` (the default) against ``--fields default`` on SmolLM2 with float16 storage, by context length,
on stores of a few layers of the same text windows: bytes per token on disk of every field (per-layer fields scaled
to all 30 layers), the time to read pattern and z (stored) or derive them (auto: pattern from q and k where they
are smaller, z = pattern @ v), and the time of copy-suppression, projection-loss and head-scores on each.

    python bench/auto_fields.py [--quick] [--layers 20] [--seq-lens 128,512,1024,2048]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

MODEL = "smollm2-135m"
N_SEQ = {128: 8, 512: 2, 1024: 1, 2048: 1}  # sequences per store: small enough for a shared 2-core box
GOAL = 61_000  # bytes per token (issue 27)
ANALYZERS = ("copy-suppression", "projection-loss", "head-scores")


def load_once() -> None:
    """Every extract call below loads SmolLM2 again: keep the first one (the bridge is left as extract found it)."""
    import functools

    import headstore.extract.run as run_module

    run_module.load_model = functools.lru_cache(maxsize=2)(run_module.load_model)  # type: ignore[assignment]


def disk_bytes(path: Path) -> tuple[float, tuple[str, ...]]:
    """Activation bytes per token on disk of every field, per-layer fields scaled from the store's layers to all
    of the model's (their bytes are per layer alike), and the fields stored."""
    from headstore.store_schema import FIELDS, read_provenance
    from headstore.store_schema.read.info import array_nbytes_on_disk

    prov = read_provenance(path)
    n_tok = prov.dataset.n_sequences * prov.seq_len
    scale = prov.config["n_layers"] / len(prov.layers)
    sizes = array_nbytes_on_disk(path)
    per_tok = sum(sizes[f] * (scale if FIELDS[f].per_layer else 1) for f in prov.fields) / n_tok
    return per_tok, prov.fields


def layer_store(fields: str, seq_len: int, layers: tuple[int, ...]) -> Path:
    """A float16 store of ``layers`` over N_SEQ[seq_len] text windows (cached under the bench cache)."""
    from headstore.extract import ExtractRequest, extract

    n = N_SEQ[seq_len]
    tag = "-".join(map(str, layers))
    out = C.CACHE / f"auto-{MODEL}-text-n{n}-L{seq_len}-layers{tag}-{fields}-float16.zarr"
    out.parent.mkdir(parents=True, exist_ok=True)
    extract(ExtractRequest(model=MODEL, data="text", out=str(out), fields=(fields,), dtype="float16", n_seq=n,
                           batch_size=n, seq_len=seq_len, layers=layers, device="cpu", progress=False))  # fmt: skip
    return out


def once(fn: Any) -> float:
    """The faster of two runs (the first also warms the page cache)."""
    return C.timeit(fn, repeat=2, warmup=0, stat=min)


def times(path: Path, skip: tuple[str, ...]) -> dict[str, float]:
    """Seconds to compute pattern, z and each analyzer on the store at ``path`` (the faster of two runs each)."""
    import headstore
    from headstore.analyze.registry import get_analyzer

    out = {
        "pattern": once(lambda: headstore.open_store(path)["pattern"].compute()),
        "z": once(lambda: headstore.open_store(path)["z"].compute()),
    }
    for name in ANALYZERS:
        if name not in skip:
            out[name] = once(lambda name=name: get_analyzer(name).func(headstore.open_store(path)).compute())
    return out


def run(seq_lens: list[int], layers: tuple[int, ...], skip_at: dict[int, tuple[str, ...]]) -> list[list[Any]]:
    rows = []
    for seq_len in seq_lens:
        stores = {f: layer_store(f, seq_len, layers) for f in ("default", "auto")}
        (full_b, _), (auto_b, auto_fields) = disk_bytes(stores["default"]), disk_bytes(stores["auto"])
        t = {f: times(p, skip_at.get(seq_len, ())) for f, p in stores.items()}
        row: list[Any] = [seq_len, N_SEQ[seq_len], f"{full_b / 1e3:.1f}", f"{auto_b / 1e3:.1f}",
                          f"{full_b / auto_b:.1f}x", "q, k" if "q" in auto_fields else "pattern"]  # fmt: skip
        for key in ("pattern", "z", *ANALYZERS):
            a, f = t["auto"].get(key), t["default"].get(key)
            row.append("-" if a is None or f is None else f"{a:.2f} / {f:.2f}")
        rows.append(row)
        print(C.table(HEADER, [row]), flush=True)
        if auto_b > GOAL:
            print(f"auto store takes {auto_b:.0f} B/token at {seq_len}: over the {GOAL} goal", flush=True)
    return rows


HEADER = ["seq_len", "n_seq", "default KB/token", "auto KB/token", "ratio", "auto stores",
          "pattern s (auto / default)", "z s", *(f"{a} s" for a in ANALYZERS)]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="128 and 512 only")
    ap.add_argument("--seq-lens", default="128,512,1024,2048")
    ap.add_argument("--layers", default="20", help="layers of the timed stores (bytes per token: all layers)")
    ap.add_argument("--write", action="store_true", help="replace this bench's section of docs/benchmarks.md")
    ap.add_argument("--all-analyzers", action="store_true", help="also the vocabulary-sized ones past 512 tokens")
    args = ap.parse_args()
    seq_lens = [128, 512] if args.quick else [int(s) for s in args.seq_lens.split(",")]
    layers = tuple(int(x) for x in args.layers.split(","))
    load_once()
    # copy-suppression and projection-loss unembed every position of every head (d_model x d_vocab each, the same
    # work on either store): minutes per layer past 512 tokens on a shared CPU, so left out there by default
    heavy = ("copy-suppression", "projection-loss")
    rows = run(seq_lens, layers, {} if args.all_analyzers else {1024: heavy, 2048: heavy})
    body = (
        f"## (k) Auto fields (issue 27): bytes per token and derive times, {MODEL} float16\n\n"
        f"Machine: {C.machine()}\n\n"
        "KB per token: every field on disk (1000 B), the per-layer ones scaled from the stores' layer(s) to all 30; "
        "goal: at most 61 KB at every context. Times: the faster of two runs each, on stores of layer(s) "
        f"{', '.join(map(str, layers))} only, auto / default: `pattern` and `z` are derived on the auto store "
        "(read on the default one); each analyzer reads its fields through the same open_store.\n\n"
        + C.table(HEADER, rows)
        + "\n"
    )
    print(body)
    if args.write:
        C.write_section("auto-fields", body)


if __name__ == "__main__":
    main()
