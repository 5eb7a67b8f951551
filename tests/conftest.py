"""Shared fixtures: tiny stores extracted once per session, and the live bridge that made them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY_MODELS = ("tiny-gpt2", "tiny-llama")


@pytest.fixture(scope="session")
def model_cache() -> dict[str, object]:
    return {}


@pytest.fixture(scope="session")
def live_model(model_cache: dict[str, object]) -> Callable[[str], object]:
    """``live_model(name)`` -> LoadedModel (bridge in compatibility mode), cached per session."""
    from headstore.extract.models import load_model

    def get(name: str) -> object:
        if name not in model_cache:
            model_cache[name] = load_model(name, "cpu")
        return model_cache[name]

    return get


@pytest.fixture(scope="session")
def make_store(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``make_store(model, data, fields=..., n_seq=..., ...)`` -> path of a store, built once per arguments."""
    from headstore.extract import ExtractRequest, extract

    built: dict[tuple[object, ...], Path] = {}

    def make(model: str, data: str = "ioi", **kw: object) -> Path:
        key = (model, data, *sorted(kw.items()))
        if key not in built:
            out = tmp_path_factory.mktemp("stores") / f"{model}-{data.replace(':', '_')}.zarr"
            kw.setdefault("n_seq", 12)
            kw.setdefault("batch_size", 4)
            extract(ExtractRequest(model=model, data=data, out=str(out), progress=False, device="cpu", **kw))  # type: ignore[arg-type]
            built[key] = out
        return built[key]

    return make


@pytest.fixture(scope="session")
def analyzer_inputs(make_store: Callable[..., Path]) -> Callable[..., tuple[list[Any], dict[str, Any]]]:
    """``analyzer_inputs(name, base="default", **store_kw)`` -> (datasets, params) that analyzer ``name`` runs on:
    tiny-gpt2 IOI / ABC stores of fields ``(base, "k", "resid_pre")`` (a store with gradients, a code-ifelse
    store for the analyzers that need one), ``store_kw`` (seq_len, n_seq...) passed to the IOI stores."""
    import headstore.analyze as A
    from headstore.store_schema import open_store

    def inputs(name: str, base: str = "default", **store_kw: Any) -> tuple[list[Any], dict[str, Any]]:
        kw: dict[str, Any] = {"fields": (base, "k", "resid_pre"), **store_kw}
        if name == "ifelse-detector":
            return [open_store(make_store("tiny-gpt2", "code-ifelse", n_seq=24, fields=(base,)))], {}
        ioi, abc = (
            open_store(make_store("tiny-gpt2", "ioi", **kw)),
            open_store(make_store("tiny-gpt2", "ioi-abc", **kw)),
        )
        if name in ("attribution-patching", "edge-attribution"):  # a clean store with gradients (extract --grad)
            grad = "logit-diff:io_token,s_token@end_pos"
            return [open_store(make_store("tiny-gpt2", "ioi", grad=grad, fields=(base,), **store_kw)), abc], {}
        if name == "path-patch-query":
            return [ioi, abc], {"senders": [(0, 1)], "receiver": (1, 2)}
        if name == "attention-attribution":
            return [ioi], {"head": (1, 2)}
        if name == "logit-attribution":
            return [ioi], {"target": ioi["io_token"]}
        if name == "calibration":
            return [ioi], {"heads": [(1, 2), (0, 0)]}
        if name == "attention-search":
            return [ioi], {"query": A.Relation.ANY, "key": A.Relation.PREVIOUS}
        return ([ioi, abc] if name == "ioi-pair" else [ioi]), {}

    return inputs


@pytest.fixture(scope="session")
def run_without_torch() -> Callable[[str], dict[str, Any]]:
    """``run_without_torch(code)`` runs ``code`` in a fresh interpreter; ``code`` fills a dict ``out``
    with JSON values. Asserts the run never imported torch, and returns ``out``."""
    root = Path(__file__).resolve().parents[1]

    def run(code: str) -> dict[str, Any]:
        tail = "\nimport sys as _s, json as _j\nout['torch'] = 'torch' in _s.modules\nprint(_j.dumps(out))\n"
        proc = subprocess.run(
            [sys.executable, "-c", "out = {}\n" + code + tail], capture_output=True, text=True, timeout=300,
            cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        assert out.pop("torch") is False, "torch was imported"
        return out

    return run


# Prompts of several lengths (one fills the row: no padding there), tokenised with BOS in front and right-padded.
PADDED_PROMPTS = (
    "When Mary and John went to the store, John gave a drink to",
    "Then, Alice and Bob went to the park.",
    "x = a if b else c",
    "After Tom and Sarah went to the school, Sarah gave a ring to Tom because",
    "def f(a, b):\n    return a + b",
    "for i in range(10):",
)
PAD_TOKEN = "~"  # not in the prompts


@pytest.fixture(scope="session")
def pad_not_bos_store(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, str]]:
    """``pad_not_bos_store(tiny)`` -> ``(store, model)``: ``PADDED_PROMPTS`` extracted with ``--data jsonl:FILE``
    (right-padded, with a ``length`` column) by a copy of the tiny model ``tiny`` whose tokenizer pads with a token
    that is not BOS (as SmolLM2 does: bos 1, pad 2). ``model`` is the copy's folder, for ``live_model``. Built once
    per model."""
    import shutil

    from transformers import AutoTokenizer

    from headstore.extract import ExtractRequest, extract
    from headstore.extract.models import _tiny_folder

    built: dict[str, tuple[Path, str]] = {}

    def make(tiny: str) -> tuple[Path, str]:
        if tiny not in built:
            root = tmp_path_factory.mktemp(f"pad-not-bos-{tiny}")
            folder = root / tiny
            shutil.copytree(_tiny_folder(tiny), folder)
            tok = AutoTokenizer.from_pretrained(folder)
            tok.pad_token = PAD_TOKEN
            tok.save_pretrained(folder)
            prompts = root / "prompts.jsonl"
            prompts.write_text("".join(json.dumps({"text": t}) + "\n" for t in PADDED_PROMPTS))
            out = root / "store.zarr"
            extract(
                ExtractRequest(model=str(folder), data=f"jsonl:{prompts}", out=str(out), progress=False, device="cpu",
                               batch_size=4)
            )  # fmt: skip
            built[tiny] = (out, str(folder))
        return built[tiny]

    return make


@pytest.fixture()
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """``tmpfs("3m")`` mounts a tmpfs of that size under ``tmp_path`` (skips the test where mounting is not
    allowed); unmounted at the end of the test."""
    mounts: list[Path] = []

    def mount(size: str) -> Path:
        mnt = tmp_path / f"disk{len(mounts)}"
        mnt.mkdir()
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()[:100]}")
        mounts.append(mnt)
        return mnt

    try:
        yield mount
    finally:
        for mnt in mounts:
            subprocess.run(["umount", "-l", str(mnt)], check=False)
