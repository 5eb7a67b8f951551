"""What one ``extract`` call is asked to do, as Python values: tuples and ints, never command-line strings.

``ExtractRequest(model="tiny-gpt2", data="ioi", out="a.zarr", fields=("default", "q"), layers=(0, 1),
shard=(0, 2))``. The command line turns its options into these values (``headstore.cli.extract_args``);
a wrong type or value is refused here in one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from headstore.store_schema import FIELDS, HeadstoreError
from headstore.store_schema.layout import LAYOUTS, PRESETS, STORAGE_DTYPES

Layers = tuple[int, ...] | Literal["all"]


@dataclass(frozen=True)
class ExtractRequest:
    """One extraction. ``fields``: field names and presets (``auto``, the default: ``default`` less z, with q, k
    for pattern where smaller at the run's seq_len; ``default``, ``all``, ``compact``), with ``drop``
    removed after every addition (``tokens`` is always stored; ``()`` stores tokens only); a field named here
    that the model's family cannot represent is refused, one that came from a preset is left out.
    ``layers`` / ``pattern_layers``: layer indices or ``"all"`` (pattern_layers: among ``layers``).
    ``shard``: ``(index, count)``: fill the index-th of count disjoint batch ranges."""

    model: str
    data: str = ""  # needed unless a dry run plans from a model's config alone (extract.plan_config)
    out: str = ""  # as data
    fields: tuple[str, ...] = ("auto",)
    drop: tuple[str, ...] = ()
    layers: Layers = "all"
    pattern_layers: Layers = "all"
    seq_len: int | None = None
    batch_size: int = 8
    n_seq: int | None = None
    device: str = "auto"
    dtype: str = "float32"
    model_dtype: str = "float32"  # what the model runs in: float32, bfloat16 (as GPU jobs run) or float16
    seed: int = 0
    prepend_bos: bool = True
    shard: tuple[int, int] = (0, 1)
    progress: bool = True
    layout: str = "sharded"
    weights: str | None = None  # a shared weights store to create or reuse (W_E, W_EE, W_U, ...)
    dry_run: bool = False  # plan only (bytes, files, time from one timed batch): nothing written
    ignore_space: bool = False  # start even when the target has less free space than the plan
    grad: str | None = None  # a metric whose gradients to store (headstore.extract.grad), e.g. "loss"
    n_tokens: int | None = None  # instead of n_seq: ceil(n_tokens / seq_len) sequences
    grad_ig: int | None = None  # EAP-IG: average the gradients over this many points from corrupt to clean ...
    corrupt: str | None = None  # ... inputs, the corrupt ones from this paired --data spec (headstore.extract.grad_ig)

    def __post_init__(self) -> None:
        self.selected_fields()  # refuses unknown names before anything loads
        if self.dtype not in STORAGE_DTYPES:
            raise HeadstoreError(f"--dtype {self.dtype!r}: choose float32 or float16")
        if not _is_int(self.batch_size) or self.batch_size <= 0:
            raise HeadstoreError(f"--batch-size must be positive, got {self.batch_size!r}")
        if self.layout not in LAYOUTS:
            raise HeadstoreError(f"--layout {self.layout!r}: choose {' or '.join(LAYOUTS)}")
        _check_shard(self.shard)
        _check_layers("layers", self.layers)
        _check_layers("pattern_layers", self.pattern_layers)
        self.n_sequences()
        if self.grad is not None:  # bad syntax refused before anything loads
            from headstore.extract.grad import parse_metric

            parse_metric(self.grad)
        _check_grad_ig(self.grad, self.grad_ig, self.corrupt)

    def n_sequences(self) -> int | None:
        """``n_seq``, or ``ceil(n_tokens / seq_len)`` with ``n_tokens``; None: the dataset's own count."""
        if self.n_tokens is None:
            return self.n_seq
        if not _is_int(self.n_tokens) or self.n_tokens <= 0:
            raise HeadstoreError(f"--n-tokens must be positive, got {self.n_tokens!r}")
        if self.n_seq is not None or self.seq_len is None:
            raise HeadstoreError("--n-tokens goes with --seq-len and without --n-seq: give --seq-len, drop --n-seq")
        return -(-self.n_tokens // self.seq_len)

    def missing_inputs(self) -> str | None:
        """What a run (or a dry run from a model with weights) lacks: ``--data`` or ``--out``; None: neither."""
        lacking = [name for name, v in (("--data", self.data), ("--out", self.out)) if not v]
        return " and ".join(lacking) or None

    def selected_fields(self) -> tuple[str, ...]:
        """The field names ``fields`` and ``drop`` select, in schema order, ``tokens`` always among them."""
        choices = f"choose from {', '.join(FIELDS)}, a preset ({', '.join(PRESETS)}) or drop=(NAME, ...)"
        if isinstance(self.fields, str) or isinstance(self.drop, str):
            raise HeadstoreError(
                f"fields={self.fields!r}, drop={self.drop!r}: give tuples of names, e.g. ('default', 'q')"
            )
        wanted: set[str] = set()
        for item in self.fields:
            if item not in PRESETS and item not in FIELDS:
                raise HeadstoreError(f"--fields: unknown field {item!r}: {choices}")
            wanted.update(PRESETS.get(item, (item,)))
        for name in self.drop:
            if name not in FIELDS:
                raise HeadstoreError(f"--fields: cannot drop unknown field {name!r}: {choices}")
            if name == "tokens":
                raise HeadstoreError("--fields: tokens is always stored and cannot be dropped")
            if name not in wanted:
                raise HeadstoreError(f"--fields: dropping {name}, which no other item selects")
        wanted.difference_update(self.drop)
        wanted.add("tokens")
        return tuple(name for name in FIELDS if name in wanted)

    def named_fields(self) -> frozenset[str]:
        """The fields asked for by name (not through a preset)."""
        return frozenset(self.fields) - set(PRESETS)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_grad_ig(grad: str | None, steps: object, corrupt: object) -> None:
    """``--grad-ig STEPS`` needs ``--grad`` and ``--corrupt DATA``, and ``--corrupt`` needs ``--grad-ig``."""
    if steps is None:
        if corrupt is not None:
            raise HeadstoreError(f"--corrupt {corrupt!r} is the start of EAP-IG's path: give --grad-ig STEPS with it")
        return
    if not _is_int(steps) or steps <= 0:  # type: ignore[operator]
        raise HeadstoreError(f"--grad-ig must be a positive number of steps, got {steps!r}")
    if grad is None:
        raise HeadstoreError("--grad-ig averages the gradients of a metric: give --grad METRIC with it")
    if not isinstance(corrupt, str) or not corrupt:
        raise HeadstoreError(
            "--grad-ig needs --corrupt DATA, the corrupt twin of --data the path starts from (e.g. --data ioi "
            "--corrupt ioi-abc)"
        )


def _check_shard(shard: object) -> None:
    if not (isinstance(shard, tuple) and len(shard) == 2 and all(_is_int(x) for x in shard)):
        raise HeadstoreError(f"--shard {shard!r} must be a pair (index, count), e.g. (0, 2)")
    i, n = shard
    if n < 1 or not 0 <= i < n:
        raise HeadstoreError(f"--shard {shard!r} needs 0 <= index < count")


def _check_layers(name: str, layers: object) -> None:
    if layers == "all":
        return
    if not (isinstance(layers, tuple) and layers and all(_is_int(x) and x >= 0 for x in layers)):
        raise HeadstoreError(
            f"--{name.replace('_', '-')} {layers!r}: give 'all' or a tuple of layer indices, e.g. (0, 3)"
        )


def resolve_layers(name: str, layers: Layers, n_layers: int) -> tuple[int, ...]:
    """``layers`` as sorted distinct indices, each checked against the model's ``n_layers``."""
    if layers == "all":
        return tuple(range(n_layers))
    bad = sorted({x for x in layers if not 0 <= x < n_layers})
    if bad:
        raise HeadstoreError(f"--{name.replace('_', '-')} names {bad} but the model has layers 0..{n_layers - 1}")
    return tuple(sorted(set(layers)))
