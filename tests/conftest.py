"""Shared fixtures: tiny stores extracted once per session, and the live bridge that made them."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

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
