"""The report's provenance section: what ``headstore info`` says about a store (model, tokenizer,
dataset, fields, completeness, sizes on disk) as HTML key/value tables."""

from __future__ import annotations

import html
from typing import Any


def _value(v: Any) -> str:
    if isinstance(v, dict):
        return _kv(v)
    if isinstance(v, list | tuple):
        return html.escape(", ".join(str(x) for x in v))
    return html.escape(str(v))


def _kv(d: dict[str, Any]) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_value(v)}</td></tr>" for k, v in d.items())
    return f"<table class='hs-kv'>{rows}</table>"


def _mb(n: float) -> str:
    return f"{n / 1e6:.3f} MB"


def provenance_section(path: str, info: dict[str, Any]) -> str:
    prov = info["provenance"]
    m = prov.get("model", {})
    complete = f"{info['n_complete']}/{info['n_sequences']} sequences complete; done ranges {info['done_ranges']}"
    headline = {
        "store": path,
        "model": m.get("name", ""),
        "architecture": m.get("config", {}).get("architecture", ""),
        "processing": m.get("processing", {}),
        "weights sha256": m.get("weights_sha256", ""),
        "tokenizer": prov.get("tokenizer", {}),
        "dataset": prov.get("dataset", {}),
        "fields": prov.get("fields", []),
        "layers": prov.get("layers", []),
        "seq_len": prov.get("seq_len", ""),
        "storage dtype": prov.get("storage_dtype", ""),
        "batch size": prov.get("batch_size", ""),
        "prepend BOS": prov.get("prepend_bos", ""),
        "completeness": complete,
        "total size": f"{_mb(info['total_bytes'])} ({info['bytes_per_token']:.0f} bytes/token)"
        if info["sizes"]
        else "(remote store)",
        "schema version": prov.get("schema_version", ""),
        "created": prov.get("created", ""),
    }
    sizes = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{_mb(v[0])}</td><td>{v[1]:.1f}</td></tr>" for k, v in info["sizes"].items()
    )
    return (
        _kv(headline)
        + "<details><summary>model config, library versions</summary>"
        + _kv({"config": m.get("config", {}), "source": m.get("source", {}), "versions": prov.get("versions", {})})
        + "</details>"
        + (
            "<details><summary>sizes on disk per array</summary><table class='hs-table'>"
            f"<tr><th>array</th><th>on disk</th><th>bytes/token</th></tr>{sizes}</table></details>"
            if sizes
            else ""
        )
    )
