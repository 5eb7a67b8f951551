"""The store layout as data: every variable, its dims, dtype and where it comes from.

``docs/store-spec.md`` is the prose version of this module; keep the two in step.
"""

from __future__ import annotations

from dataclasses import dataclass

# 2: string arrays (vocab, string columns) stored as UTF-8 bytes + int64 offsets, core Zarr v3 data types
# (headstore.store_schema.strings); 1: in zarr-python's ``string`` type, still read (OLDEST_SCHEMA_VERSION).
SCHEMA_VERSION = 2
OLDEST_SCHEMA_VERSION = 1
ATTRS_KEY = "headstore"
STORAGE_DTYPES = ("float32", "float16")
# How activation arrays are cut into files (attr ``layout``; stores made before it read as "chunked"):
# "sharded": one zarr shard file per (field, batch) holding every layer, inner chunks as "chunked";
# "chunked": one file per (field, batch, layer).
LAYOUTS = ("sharded", "chunked")

DIMS = (
    "batch", "pos", "layer", "head", "kv_head", "d_head", "d_model",
    "query_pos", "key_pos", "d_vocab", "n_ctx", "d_rot", "ig_step",
)  # fmt: skip


@dataclass(frozen=True)
class Field:
    """One activation variable.

    ``dims`` in storage order; ``dtype`` is ``"storage"`` where the user picks float32/float16;
    ``hook`` is the TransformerLens hook it is read from (``{L}`` = layer), empty when computed.
    """

    name: str
    dims: tuple[str, ...]
    dtype: str
    hook: str
    doc: str
    default: bool = True

    @property
    def per_layer(self) -> bool:
        return "layer" in self.dims


_MEAN = "with --grad-ig: its mean over the IG steps"
_PER_SCALE = "with --grad-ig: the mean over the IG steps of it / ln1_scale at the step"
FIELDS: dict[str, Field] = {
    f.name: f
    for f in (
        Field("tokens", ("batch", "pos"), "int32", "", "input token ids"),
        Field(
            "pattern",
            ("batch", "layer", "head", "query_pos", "key_pos"),
            "storage",
            "blocks.{L}.attn.hook_pattern",
            "attention probabilities",
        ),
        Field("v", ("batch", "layer", "pos", "kv_head", "d_head"), "storage", "blocks.{L}.attn.hook_v", "values"),
        Field("z", ("batch", "layer", "pos", "head", "d_head"), "storage", "blocks.{L}.attn.hook_z", "pattern @ v"),
        Field(
            "result",
            ("batch", "layer", "pos", "head", "d_model"),
            "storage",
            "blocks.{L}.attn.hook_result",
            "per-head output z @ W_O (derived from z when not stored)",
            default=False,
        ),
        Field(
            "q",
            ("batch", "layer", "pos", "head", "d_head"),
            "storage",
            "blocks.{L}.attn.hook_{rot_}q",
            "queries (post-rotary on rotary models)",
            default=False,
        ),
        Field(
            "k",
            ("batch", "layer", "pos", "kv_head", "d_head"),
            "storage",
            "blocks.{L}.attn.hook_{rot_}k",
            "keys (post-rotary on rotary models)",
            default=False,
        ),
        Field("ln1_scale", ("batch", "layer", "pos"), "float32", "blocks.{L}.ln1.hook_scale", "ln1 scale"),
        Field("ln2_scale", ("batch", "layer", "pos"), "float32", "blocks.{L}.ln2.hook_scale", "ln2 scale"),
        Field(
            "ln1_post_scale",
            ("batch", "layer", "pos"),
            "float32",
            "blocks.{L}.ln1_post.hook_scale",
            "scale of the norm on the attention output (post-norm models only: Gemma-2, OLMo-2)",
        ),
        Field("ln_final_scale", ("batch", "pos"), "float32", "ln_final.hook_scale", "ln_final scale"),
        Field(
            "resid_final",
            ("batch", "pos", "d_model"),
            "float32",
            "blocks.{last}.hook_resid_post",
            "residual stream entering ln_final",
        ),
        Field(
            "resid_pre",
            ("batch", "layer", "pos", "d_model"),
            "float32",
            "blocks.{L}.hook_resid_pre",
            "residual stream entering block L",
            default=False,
        ),
        Field("loss", ("batch", "pos"), "float32", "", "next-token cross-entropy (NaN at the last position)"),
        # extract --grad METRIC: dM/d(activation) of each sequence's metric M (headstore.extract.grad)
        *(
            Field(name, dims, "storage", "", f"dM/d {hook} (extract --grad METRIC); {ig}", default=False)
            for name, dims, hook, ig in (
                ("grad_z", ("batch", "layer", "pos", "head", "d_head"), "blocks.{L}.attn.hook_z", _MEAN),
                (
                    "grad_q",
                    ("batch", "layer", "pos", "head", "d_head"),
                    "blocks.{L}.attn.hook_q (pre-rotary)",
                    _PER_SCALE,
                ),
                (
                    "grad_k",
                    ("batch", "layer", "pos", "kv_head", "d_head"),
                    "blocks.{L}.attn.hook_k (pre-rotary)",
                    _PER_SCALE,
                ),
                ("grad_v", ("batch", "layer", "pos", "kv_head", "d_head"), "blocks.{L}.attn.hook_v", _PER_SCALE),
                ("grad_mlp_in", ("batch", "layer", "pos", "d_model"), "blocks.{L}.hook_mlp_in", _MEAN),
                ("grad_resid_final", ("batch", "pos", "d_model"), "blocks.{last}.hook_resid_post", _MEAN),
            )
        ),
    )
}
# extract --grad METRIC --grad-ig STEPS --corrupt DATA (EAP-IG, headstore.extract.grad_ig): what the q/k/v receivers'
# path-averaged input gradients need beyond the averaged head-space gradients, per IG step k
FIELDS.update(
    {
        "ig_resid_hat": Field(
            "ig_resid_hat", ("batch", "layer", "ig_step", "pos", "d_model"), "storage", "",
            "ln1's normalised input c(resid_pre_k) / ln1_scale_k at IG step k (extract --grad-ig)", default=False,
        ),
        **{
            f"ig_coef_{w}": Field(
                f"ig_coef_{w}", ("batch", "layer", "ig_step", "pos", heads), "storage", "",
                f"(ln1 output_k @ W_{w.upper()}) . dM/d{w}_k / (d_model ln1_scale_k) at IG step k (extract --grad-ig)",
                default=False,
            )
            for w, heads in (("q", "head"), ("k", "kv_head"), ("v", "kv_head"))
        },
    }
)  # fmt: skip
GRAD_FIELDS = tuple(name for name in FIELDS if name.startswith("grad_"))  # stored only with extract --grad
IG_FIELDS = tuple(name for name in FIELDS if name.startswith("ig_"))  # stored only with extract --grad-ig

DEFAULT_FIELDS = tuple(name for name, f in FIELDS.items() if f.default)
MANIFEST = "batch_done"


@dataclass(frozen=True)
class Weight:
    """One weight variable (float32, written once at creation)."""

    name: str
    dims: tuple[str, ...]
    doc: str


WEIGHTS: dict[str, Weight] = {
    w.name: w
    for w in (
        Weight("W_E", ("d_vocab", "d_model"), "token embedding"),
        Weight("W_EE", ("d_vocab", "d_model"), "effective embedding: W_E through layer-0 self-attention and MLP0"),
        Weight("W_pos", ("n_ctx", "d_model"), "positional embedding (absent on rotary models)"),
        Weight("W_Q", ("layer", "head", "d_model", "d_head"), "query weights"),
        Weight("W_K", ("layer", "kv_head", "d_model", "d_head"), "key weights"),
        Weight("W_V", ("layer", "kv_head", "d_model", "d_head"), "value weights"),
        Weight("W_O", ("layer", "head", "d_head", "d_model"), "output weights"),
        Weight("b_Q", ("layer", "head", "d_head"), "query bias (zeros if bias-free)"),
        Weight("b_K", ("layer", "kv_head", "d_head"), "key bias (zeros if bias-free)"),
        Weight("b_V", ("layer", "kv_head", "d_head"), "value bias (zeros if bias-free)"),
        Weight("b_O", ("layer", "d_model"), "output bias (zeros if bias-free)"),
        Weight("W_U", ("d_model", "d_vocab"), "unembedding"),
        Weight("b_U", ("d_vocab",), "unembedding bias"),
        Weight("rotary_cos", ("pos", "d_rot"), "rotary cos table of the rotated dims (rotary models only)"),
        Weight("rotary_sin", ("pos", "d_rot"), "rotary sin table of the rotated dims (rotary models only)"),
        Weight("q_norm_w", ("layer", "head", "d_head"), "gain of the q norm (models with q/k norm only)"),
        Weight("k_norm_w", ("layer", "kv_head", "d_head"), "gain of the k norm (models with q/k norm only)"),
        Weight("ln1_post_w", ("layer", "d_model"), "gain of the norm on the attention output (post-norm models only)"),
    )
}


PRESETS: dict[str, tuple[str, ...]] = {
    "default": DEFAULT_FIELDS,
    "all": tuple(n for n in FIELDS if n not in (*GRAD_FIELDS, *IG_FIELDS)),  # gradients come with --grad METRIC
    # pattern (batch, layer, head, query_pos, key_pos) grows with seq_len**2: store q and k instead and
    # let open_store derive pattern from them (store_schema.attention.derived_pattern).
    "compact": (*(n for n in DEFAULT_FIELDS if n != "pattern"), "q", "k"),
    # the default of extract: ``default`` less z (open_store derives z = pattern @ v), and with q, k instead of
    # pattern where they take fewer bytes per token at the run's seq_len (``auto_stores_qk``; the swap is made
    # by extract, which knows seq_len: this tuple is the pattern form).
    "auto": tuple(n for n in DEFAULT_FIELDS if n != "z"),
}


def auto_stores_qk(n_heads: int, n_kv_heads: int, d_head: int, seq_len: int) -> bool:
    """True when q and k take fewer bytes per token and layer than the pattern does on disk:
    ``(n_heads + n_kv_heads) * d_head < n_heads * (seq_len + 1) / 2`` (the pattern's causal non-zeros, what its
    compressor leaves, as extract's plan counts them; a tie keeps the pattern)."""
    return 2 * (n_heads + n_kv_heads) * d_head < n_heads * (seq_len + 1)


def derived_fields(stored: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """What ``open_store`` derives from ``stored``, in schema order: ``pattern`` from q, k; ``z`` as pattern @ v
    (stored or derived pattern); ``result`` as z @ W_O (W_O is always stored)."""
    have = set(stored)
    out = []
    if "pattern" not in have and {"q", "k"} <= have:
        out.append("pattern")
    if "z" not in have and "v" in have and ("pattern" in have or "pattern" in out):
        out.append("z")
    if "result" not in have and ("z" in have or "z" in out):
        out.append("result")
    return tuple(n for n in FIELDS if n in out)


def parse_fields(spec: str) -> tuple[str, ...]:
    """A comma list of presets, field names and ``-name`` removals -> field names in schema order.

    ``"default,q,k"`` adds q and k to the default set; ``"default,-pattern,q,k"`` (= ``"compact"``)
    also drops ``pattern``. Removals apply after every addition, so their place in the list does not
    matter; removing a field that nothing selected, or ``tokens``, is refused. Presets: ``default``,
    ``all``, ``compact``, ``auto`` (here its pattern form: extract swaps pattern for q, k where smaller).
    ``tokens`` is always kept.
    """
    from headstore.store_schema.errors import HeadstoreError

    choices = f"choose from {', '.join(FIELDS)}, a preset ({', '.join(PRESETS)}) or -NAME to drop a field"
    wanted: set[str] = set()
    dropped: list[str] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item.startswith("-"):
            name = item[1:].strip()
            if name not in FIELDS:
                raise HeadstoreError(f"--fields {spec!r}: cannot drop unknown field {name!r}: {choices}")
            if name == "tokens":
                raise HeadstoreError(f"--fields {spec!r}: tokens is always stored and cannot be dropped")
            dropped.append(name)
        elif item in PRESETS:
            wanted.update(PRESETS[item])
        elif item in FIELDS:
            wanted.add(item)
        else:
            raise HeadstoreError(f"--fields {spec!r}: unknown field {item!r}: {choices}")
    for name in dropped:
        if name not in wanted:
            raise HeadstoreError(f"--fields {spec!r}: -{name} drops {name}, which no other item selects")
    wanted.difference_update(dropped)
    wanted.add("tokens")
    return tuple(name for name in FIELDS if name in wanted)


# A weights store (``extract --weights DIR``): the model-wide arrays activation stores take from it, and the
# root attr that marks a group as one (``headstore.store_schema.read.weights``).
SHARED = ("W_E", "W_EE", "W_U", "b_U", "W_pos", "vocab")
WEIGHTS_ATTRS = "headstore_weights"
