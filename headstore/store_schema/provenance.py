"""Provenance: what a store was made from, as a frozen dataclass stored in the root attrs."""

from __future__ import annotations

import copy
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from headstore.store_schema.errors import HeadstoreError
from headstore.store_schema.layout import FIELDS, LAYOUTS, OLDEST_SCHEMA_VERSION, SCHEMA_VERSION, STORAGE_DTYPES
from headstore.store_schema.provenance_parts import DatasetInfo, ModelInfo, TokenizerInfo, WeightsRef

MODEL_CONFIG_KEYS = (
    "n_layers", "n_heads", "n_key_value_heads", "d_model", "d_head", "d_vocab", "n_ctx",
    "normalization_type", "eps", "positional_embedding_type",
)  # fmt: skip
PROCESSING_KEYS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")
NORMALIZATION_TYPES = ("LN", "RMS")
QK_NORMS = ("", "per_head", "full")
ROTARY_STYLES = ("half", "interleaved")


@dataclass(frozen=True)
class ModelConfig:
    """The model's shape as the analyzers need it (``ds.hs.config``), typed and checked when a store is opened.

    The fields after ``architecture`` are the model's own non-linearities (``headstore.extract.families``); a
    store made before they were recorded reads as a GPT-2/Llama-shaped model: no soft-caps, scale
    ``1/sqrt(d_head)``, no sliding window, no q/k norm, sequential pre-norm blocks, full ``rotate_half`` rotary.
    """

    n_layers: int
    n_heads: int
    n_key_value_heads: int
    d_model: int
    d_head: int
    d_vocab: int
    n_ctx: int
    normalization_type: str  # "LN" (centre, then divide by the scale) or "RMS" (divide only)
    eps: float
    positional_embedding_type: str  # "standard", "rotary", ...
    architecture: str = ""
    final_logit_softcap: float = 0.0  # > 0: logits = c * tanh(logits / c) (Gemma-2)
    attn_logit_softcap: float = 0.0  # > 0: scores = c * tanh(scores / c) before the mask (Gemma-2)
    attn_scale: float = 0.0  # scores = q . k * attn_scale; 0 = 1 / sqrt(d_head) (Gemma-2: query_pre_attn_scalar)
    sliding_window: int = 0  # > 0: a query sees the last sliding_window keys, itself included ...
    sliding_window_layers: tuple[int, ...] = ()  # ... in these layers (Mistral: all; Gemma-2: every other)
    qk_norm: str = ""  # "per_head": RMSNorm of each head's q, k over d_head (Qwen3); "full": over all heads (OLMo-2)
    parallel_residual: bool = False  # attention and MLP read the same residual (GPT-NeoX, GPT-J)
    rotary_dim: int = 0  # rotated dims of each head (partial rotary: GPT-NeoX, GPT-J, Phi-3); 0 = d_head
    rotary_style: str = "half"  # "half": rotate_half (Llama, GPT-NeoX); "interleaved": pairs (GPT-J)
    pre_norm: bool = True  # a norm (ln1, ln2) before attention and the MLP; False: OLMo-2
    post_norm: bool = False  # a norm on the attention and MLP outputs before the residual add (Gemma-2, OLMo-2)

    @property
    def group_size(self) -> int:
        """Query heads per kv head: head ``h`` reads kv head ``h // group_size``."""
        return self.n_heads // self.n_key_value_heads

    @property
    def score_scale(self) -> float:
        """The attention score multiplier: ``attn_scale``, or ``1 / sqrt(d_head)`` when not recorded."""
        return self.attn_scale or self.d_head**-0.5

    @property
    def d_rot(self) -> int:
        """Rotated dims per head on rotary models (``rotary_dim``, or all of ``d_head``)."""
        return self.rotary_dim or self.d_head

    def window(self, layer: int) -> int:
        """The sliding window of model layer ``layer`` (0: full causal attention)."""
        return self.sliding_window if layer in self.sliding_window_layers else 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            optional = f.default is not MISSING
            if f.name not in d:
                if optional:
                    continue
                raise HeadstoreError(f"store attr model.config lacks {f.name}: the store is damaged; re-extract it")
            value, want = d[f.name], f.type
            if want == "int":
                ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if optional else value > 0)
            elif want == "float":
                ok = isinstance(value, int | float) and not isinstance(value, bool) and value >= 0
                value = float(value) if ok else value
            elif want == "bool":
                ok = isinstance(value, bool)
            elif want == "tuple[int, ...]":
                ok = isinstance(value, list | tuple) and all(
                    isinstance(x, int) and not isinstance(x, bool) for x in value
                )
                value = tuple(value) if ok else value
            else:
                ok = isinstance(value, str)
            if not ok:
                kind = {"int": "non-negative int" if optional else "positive int", "tuple[int, ...]": "list of ints"}
                raise HeadstoreError(
                    f"store attr model.config.{f.name} must be a {kind.get(str(want), want)}, "
                    f"got {value!r}: the store is damaged; re-extract it"
                )
            kwargs[f.name] = value
        cfg = cls(**kwargs)
        if cfg.normalization_type not in NORMALIZATION_TYPES:
            raise HeadstoreError(
                f"store attr model.config.normalization_type {cfg.normalization_type!r} is not one of {NORMALIZATION_TYPES}"
            )
        if cfg.n_heads % cfg.n_key_value_heads:
            raise HeadstoreError(
                f"store attr model.config: n_heads {cfg.n_heads} is not a multiple of n_key_value_heads "
                f"{cfg.n_key_value_heads}: the store is damaged"
            )
        for name, value, allowed in (
            ("qk_norm", cfg.qk_norm, QK_NORMS),
            ("rotary_style", cfg.rotary_style, ROTARY_STYLES),
        ):
            if value not in allowed:
                raise HeadstoreError(f"store attr model.config.{name} {value!r} is not one of {allowed}")
        return cfg


# attrs a store may lack (made before they existed, or not used by its run): the defaults apply
OPTIONAL_ATTRS = ("versions", "created", "pattern_layers", "layout", "weights_store", "grad", "grad_ig", "corrupt",
                  "derived")  # fmt: skip


@dataclass(frozen=True)
class Provenance:
    """Everything needed to tell two stores apart, or to refuse mixing them."""

    schema_version: int
    model: ModelInfo
    tokenizer: TokenizerInfo
    dataset: DatasetInfo
    prepend_bos: bool
    seq_len: int
    storage_dtype: str
    fields: tuple[str, ...]
    layers: tuple[int, ...]
    batch_size: int
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    # model layers whose ``pattern`` chunks are written (``--pattern-layers``); None = every extracted
    # layer (and what stores made before the option read as). The others are never written: NaN.
    pattern_layers: tuple[int, ...] | None = None
    # files: "sharded" (one shard per field and batch, all layers) or "chunked" (one file per field,
    # batch and layer: every store made before the attr existed). Not part of ``identity``: a resume
    # writes the way the store was created.
    layout: str = "chunked"
    # the shared weights store this store takes W_E, W_EE, W_U, ... from (``extract --weights``); None:
    # self-contained. Not part of ``identity`` (the weights themselves are, via model.weights_sha256).
    weights_store: WeightsRef | None = None
    # the metric whose gradients the store holds (``extract --grad``, e.g. "logit-diff:io_token,s_token@end_pos");
    # None: no gradients (and what stores made before the option read as).
    grad: str | None = None
    # EAP-IG (``extract --grad-ig STEPS --corrupt DATA``): the number of points on the straight path from the corrupt
    # to the clean input embeddings that the gradients are averaged over, and the corrupt dataset the path starts
    # from; None: gradients at the clean input only (and what stores made before the option read as).
    grad_ig: int | None = None
    corrupt: DatasetInfo | None = None
    # what open_store derives from ``fields`` (``layout.derived_fields``: pattern, z, result), recorded at
    # creation so ``info`` tells stored from derived; None: a store made before the attr (same rules apply).
    derived: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of the store's attrs (key order as the fields')."""
        d: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if hasattr(value, "to_dict"):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            d[f.name] = value
        return copy.deepcopy(d)

    @property
    def stored_pattern_layers(self) -> tuple[int, ...]:
        """Model layers whose pattern is on disk: () without a stored pattern, all layers by default."""
        if "pattern" not in self.fields:
            return ()
        return self.layers if self.pattern_layers is None else self.pattern_layers

    @classmethod
    def from_dict(cls, d: Any) -> Provenance:
        """Parse and check store attrs; every problem is a one-line HeadstoreError."""
        if not isinstance(d, dict):
            raise HeadstoreError("store attrs 'headstore' must be a JSON object: is this a headstore store?")
        version = d.get("schema_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise HeadstoreError("store attrs lack an integer schema_version: is this a headstore store?")
        if version > SCHEMA_VERSION:
            raise HeadstoreError(
                f"store has schema version {version} but this headstore reads up to {SCHEMA_VERSION}: upgrade headstore"
            )
        if version < OLDEST_SCHEMA_VERSION:
            raise HeadstoreError(
                f"store has schema version {version}, older than {OLDEST_SCHEMA_VERSION}: re-extract it"
            )
        names = {f.name for f in fields(cls)}
        missing = sorted(n for n in names - set(d) if n not in OPTIONAL_ATTRS)
        if missing:
            raise HeadstoreError(f"store attrs lack {', '.join(missing)}: the store is damaged; re-extract it")
        kwargs = {k: d[k] for k in names if k in d}
        _expect(kwargs, "model", dict)
        _expect(kwargs, "tokenizer", dict)
        _expect(kwargs, "dataset", dict)
        config = kwargs["model"].get("config")
        if not isinstance(config, dict) or any(k not in config for k in MODEL_CONFIG_KEYS):
            raise HeadstoreError(f"store attr model.config must hold {', '.join(MODEL_CONFIG_KEYS)}")
        kwargs["model"] = ModelInfo.from_dict(kwargs["model"])
        kwargs["tokenizer"] = TokenizerInfo.from_dict(kwargs["tokenizer"])
        kwargs["dataset"] = DatasetInfo.from_dict(kwargs["dataset"])
        _expect(kwargs, "prepend_bos", bool)
        _expect(kwargs, "storage_dtype", str)
        for key in ("seq_len", "batch_size"):
            _expect(kwargs, key, int)
            if kwargs[key] <= 0:
                raise HeadstoreError(f"store attr {key} must be a positive integer, got {kwargs[key]}")
        if kwargs.setdefault("layout", "chunked") not in LAYOUTS:
            raise HeadstoreError(f"store attr layout must be one of {LAYOUTS}, got {_short(kwargs['layout'])}")
        ref = kwargs.get("weights_store")
        kwargs["weights_store"] = None if ref is None else WeightsRef.from_dict(ref)
        if not isinstance(kwargs.setdefault("grad", None), str | None):
            raise HeadstoreError(f"store attr grad must be null or a metric string, got {_short(kwargs['grad'])}")
        _grad_ig(kwargs)
        if kwargs["storage_dtype"] not in STORAGE_DTYPES:
            raise HeadstoreError(f"store attr storage_dtype must be one of {STORAGE_DTYPES}")
        _expect(kwargs, "fields", list)
        _expect(kwargs, "layers", list)
        unknown = [f for f in kwargs["fields"] if not isinstance(f, str) or f not in FIELDS]
        if unknown:
            raise HeadstoreError(f"store attrs name unknown fields {unknown}: the store is damaged")
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in kwargs["layers"]):
            raise HeadstoreError("store attr layers must be a list of integers")
        ModelConfig.from_dict(config)  # types and values checked once, here
        kwargs["fields"] = tuple(kwargs["fields"])
        kwargs["derived"] = _derived(kwargs.get("derived"))
        kwargs["layers"] = tuple(kwargs["layers"])
        kwargs["pattern_layers"] = _pattern_layers(kwargs.get("pattern_layers"), kwargs["layers"], kwargs["fields"])
        return cls(**kwargs)

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.model.config)

    @property
    def model_config(self) -> ModelConfig:
        """``config`` as a typed, checked :class:`ModelConfig`."""
        return ModelConfig.from_dict(self.model.config)

    def identity(self) -> dict[str, Any]:
        """What must match for two runs to write into the same store."""
        return {
            "schema_version": self.schema_version,
            "model.name": self.model.name,
            "model.weights_sha256": self.model.weights_sha256,
            "model.processing": self.model.processing,
            "model.dtype": self.model.dtype or "float32",
            "tokenizer": self.tokenizer.to_dict(),
            "dataset": self.dataset.to_dict(),
            "prepend_bos": self.prepend_bos,
            "seq_len": self.seq_len,
            "storage_dtype": self.storage_dtype,
            "fields": list(self.fields),
            "layers": list(self.layers),
            "pattern_layers": list(self.stored_pattern_layers),
            "batch_size": self.batch_size,
            "grad": self.grad,
            "grad_ig": self.grad_ig,
            "corrupt": None if self.corrupt is None else self.corrupt.to_dict(),
        }

    def check_same_run(self, other: Provenance) -> None:
        """Refuse resuming/appending with anything different, naming the first difference."""
        mine, theirs = self.identity(), other.identity()
        # the weights hash follows from model and layers, and the fields --fields auto resolves from seq_len and
        # --pattern-layers: name what the user changed first
        for key in sorted(mine, key=lambda k: (k == "model.weights_sha256", k == "fields")):
            if mine[key] != theirs[key]:
                raise HeadstoreError(
                    f"the store was made with a different {key} ({_short(mine[key])} vs {_short(theirs[key])}): "
                    "write to a new --out, or rerun the exact command that made it"
                )

    def check_same_model(self, other: Provenance) -> None:
        """Refuse pairing stores (e.g. IOI/ABC) of different models, processing or layers, or of prompt sets of
        different shapes, naming the first difference with a hint that fits it. The weights hash covers the
        extracted layers' weights, so it is compared after what changes it (model, processing, dtype, layers):
        a hash difference alone means other weights under the same name."""
        mine, theirs = self.identity(), other.identity()
        for key, hint in PAIRING_HINTS.items():
            if mine[key] != theirs[key]:
                raise HeadstoreError(
                    f"the two stores differ in {key} ({_short(mine[key])} vs {_short(theirs[key])}): {hint}"
                )


# What check_same_model compares, in order, and what to do about each difference.
PAIRING_HINTS = {
    "model.name": "pair stores of the same model",
    "model.processing": "extract both with the same headstore version (the model's weight processing differs)",
    "model.dtype": "extract both with the same --model-dtype",
    "layers": "extract both with the same --layers",
    "model.weights_sha256": "same model name and layers but other weights: pair stores of the same checkpoint",
    "seq_len": "the prompt sets differ in length: pair stores made from prompt sets of the same shape "
    "(e.g. --data ioi and ioi-abc with the same --seed, --n-seq and --seq-len)",
}


def _pattern_layers(value: Any, layers: tuple[int, ...], fields: tuple[str, ...]) -> tuple[int, ...] | None:
    """Check attr ``pattern_layers``: None, or a non-empty sorted list of extracted layers (pattern stored)."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        raise HeadstoreError("store attr pattern_layers must be null or a list of integers")
    if "pattern" not in fields:
        raise HeadstoreError("store attr pattern_layers is set but pattern is not among the fields: store damaged")
    if not value or value != sorted(set(value)) or not set(value) <= set(layers):
        raise HeadstoreError(
            f"store attr pattern_layers {_short(value)} must be a sorted, non-empty subset of layers {list(layers)}"
        )
    return tuple(value)


def _grad_ig(kwargs: dict[str, Any]) -> None:
    """Check attrs ``grad_ig`` (null, or a positive int with a metric) and ``corrupt`` (null, or a dataset, exactly
    when ``grad_ig`` is set); ``corrupt`` parsed to a DatasetInfo."""
    steps, corrupt = kwargs.setdefault("grad_ig", None), kwargs.setdefault("corrupt", None)
    if steps is not None and not (isinstance(steps, int) and not isinstance(steps, bool) and steps > 0):
        raise HeadstoreError(f"store attr grad_ig must be null or a positive integer, got {_short(steps)}")
    if (steps is None) != (corrupt is None) or (steps is not None and kwargs["grad"] is None):
        raise HeadstoreError("store attrs grad_ig and corrupt come together, with grad: the store is damaged")
    kwargs["corrupt"] = None if corrupt is None else DatasetInfo.from_dict(corrupt)


def _derived(value: Any) -> tuple[str, ...] | None:
    """Check attr ``derived``: None, or a list of field names."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(x, str) and x in FIELDS for x in value):
        raise HeadstoreError(f"store attr derived must be null or a list of field names, got {_short(value)}")
    return tuple(value)


def _expect(d: dict[str, Any], key: str, typ: type) -> None:
    value = d[key]
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise HeadstoreError(f"store attr {key} must be a {typ.__name__}, got {type(value).__name__}")


def _short(x: Any) -> str:
    s = repr(x)
    return s if len(s) <= 60 else s[:57] + "..."
