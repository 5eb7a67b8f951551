"""The typed parts of a store's provenance: the model, its tokenizer, the dataset and the shared weights store.

Frozen dataclasses with ``to_dict`` / ``from_dict`` as zarr's metadata classes have: ``to_dict`` writes the JSON
object the store's attrs hold, key for key and in the same order, and ``from_dict`` checks one (every problem a
one-line ``HeadstoreError`` naming the attr).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from headstore.store_schema.errors import HeadstoreError

_DAMAGED = "the store is damaged; re-extract it"


def _short(x: Any) -> str:
    s = repr(x)
    return s if len(s) <= 60 else s[:57] + "..."


def _get(d: dict[str, Any], where: str, key: str, kind: str) -> Any:
    """``d[key]`` checked to be of ``kind``: str, int, int|None, dict, list[str] (a tuple returned)."""
    if key not in d:
        raise HeadstoreError(f"store attr {where} lacks {key}: {_DAMAGED}")
    value = d[key]
    is_int = isinstance(value, int) and not isinstance(value, bool)
    ok = {
        "str": isinstance(value, str),
        "int": is_int,
        "int|None": is_int or value is None,
        "dict": isinstance(value, dict),
        "list[str]": isinstance(value, list | tuple) and all(isinstance(x, str) for x in value),
    }[kind]
    if not ok:
        raise HeadstoreError(f"store attr {where}.{key} must be a {kind}, got {_short(value)}: {_DAMAGED}")
    return tuple(value) if kind == "list[str]" else value


def _object(d: Any, where: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise HeadstoreError(f"store attr {where} must be a JSON object, got {_short(d)}: {_DAMAGED}")
    return d


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """The model a store was made with. ``config``: the model's shape and non-linearities as recorded (typed as
    ``Provenance.model_config``); ``dtype``: what it ran in (None: a store made before it was recorded, float32)."""

    name: str
    source: dict[str, Any]
    config: dict[str, Any]
    processing: dict[str, Any]
    dtype: str | None = None
    weights_sha256: str

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "source": self.source, "config": self.config}
        d["processing"] = self.processing
        if self.dtype is not None:
            d["dtype"] = self.dtype
        d["weights_sha256"] = self.weights_sha256
        return d

    @classmethod
    def from_dict(cls, d: Any) -> ModelInfo:
        d = _object(d, "model")
        dtype = _get(d, "model", "dtype", "str") if "dtype" in d else None
        return cls(
            name=_get(d, "model", "name", "str"), source=_get(d, "model", "source", "dict"),
            config=_get(d, "model", "config", "dict"), processing=_get(d, "model", "processing", "dict"),
            dtype=dtype, weights_sha256=_get(d, "model", "weights_sha256", "str"),
        )  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class TokenizerInfo:
    """The tokenizer: its name, special ids, vocabulary size and a hash of its vocabulary."""

    name: str
    bos_token_id: int | None
    pad_token_id: int | None
    vocab_size: int
    vocab_sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "bos_token_id": self.bos_token_id, "pad_token_id": self.pad_token_id,
            "vocab_size": self.vocab_size, "vocab_sha256": self.vocab_sha256,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, d: Any) -> TokenizerInfo:
        d = _object(d, "tokenizer")
        return cls(
            name=_get(d, "tokenizer", "name", "str"), bos_token_id=_get(d, "tokenizer", "bos_token_id", "int|None"),
            pad_token_id=_get(d, "tokenizer", "pad_token_id", "int|None"),
            vocab_size=_get(d, "tokenizer", "vocab_size", "int"), vocab_sha256=_get(d, "tokenizer", "vocab_sha256", "str"),
        )  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class DatasetInfo:
    """The dataset: its kind (``ioi``, ``text``, ...), the ``--data`` spec, the builder's options, the number of
    sequences and a hash of its tokens and columns."""

    kind: str
    spec: str
    options: dict[str, Any]
    n_sequences: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "spec": self.spec, "options": self.options, "n_sequences": self.n_sequences,
            "sha256": self.sha256,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, d: Any) -> DatasetInfo:
        d = _object(d, "dataset")
        return cls(
            kind=_get(d, "dataset", "kind", "str"), spec=_get(d, "dataset", "spec", "str"),
            options=_get(d, "dataset", "options", "dict"), n_sequences=_get(d, "dataset", "n_sequences", "int"),
            sha256=_get(d, "dataset", "sha256", "str"),
        )  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class WeightsRef:
    """The shared weights store a store takes W_E, W_EE, W_U, ... from (``extract --weights``): its path
    (relative to the store, or a URL), the sha256 of its arrays, and the names of the arrays taken."""

    path: str
    sha256: str
    arrays: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "arrays": list(self.arrays)}

    @classmethod
    def from_dict(cls, d: Any) -> WeightsRef:
        ok = (
            isinstance(d, dict)
            and isinstance(d.get("path"), str)
            and isinstance(d.get("sha256"), str)
            and len(d["sha256"]) == 64
            and isinstance(d.get("arrays"), list)
            and all(isinstance(x, str) for x in d["arrays"])
        )
        if not ok:
            raise HeadstoreError(f"store attr weights_store must be null or {{path, sha256, arrays}}, got {_short(d)}")
        return cls(path=d["path"], sha256=d["sha256"], arrays=tuple(d["arrays"]))
