"""``hf:NAME[:CONFIG][:SPLIT][,OPTION...]``: a Hugging Face dataset, read with the ``datasets`` library.

``NAME`` is a dataset on the Hub (``stas/openwebtext-10k``), a data-file builder (``json``, ``csv``,
``parquet``, ``text`` with ``data_files=``), a folder of data files, or a folder written by
``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (read with ``load_from_disk``). A folder and a
data-file builder have no configs: ``hf:NAME:SPLIT``. Options, after commas: ``column=NAME`` (the text
column, default ``text``), ``shuffle=SEED``, ``streaming``, ``data_files=GLOB`` (repeatable),
``revision=REV`` and ``num_proc=N``.

Documents become windows through ``transformer_lens.utilities.tokenize_and_concatenate``, called on the
split as an ``IterableDataset`` (a non-streaming split is turned into one with ``to_iterable_dataset``).
``datasets`` feeds it 1,000 documents at a time, as it does a whole ``Dataset`` in one process, so the
windows are exactly those of ``tokenize_and_concatenate(split, tokenizer, max_length=seq_len,
num_proc=None)`` (or ``streaming=True``), read lazily: only the documents the first ``--n-seq`` windows
need are read and tokenised, and a streaming split is never held in memory. ``num_proc=N`` (not
streaming) instead calls it once on the whole split with that ``num_proc``, as TransformerLens's default
``num_proc=10`` does: ``datasets`` then packs N contiguous pieces of the split apart, so the windows
differ from the one-process ones after the first piece.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from headstore.extract.data.base import DataRequest, TokenDataset
from headstore.store_schema.errors import HeadstoreError

DEFAULT_SEQ_LEN = 128
SHUFFLE_BUFFER = 1000  # IterableDataset.shuffle's default buffer, recorded with a streaming shuffle
OPTIONS = ("column", "shuffle", "streaming", "data_files", "revision", "num_proc")
USAGE = (
    "hf:NAME[:CONFIG][:SPLIT][,column=TEXT][,shuffle=SEED][,streaming][,data_files=GLOB][,revision=REV][,num_proc=N]"
)


@dataclass(frozen=True)
class HFSource:
    """What ``hf:...`` names: where the dataset is, which split and column, how it is read."""

    name: str
    config: str | None = None
    split: str | None = None
    column: str = "text"
    shuffle: int | None = None
    streaming: bool = False
    data_files: tuple[str, ...] = ()
    revision: str | None = None
    num_proc: int | None = None

    @property
    def saved_folder(self) -> bool:
        """A folder written by ``save_to_disk`` (``load_from_disk`` reads it, ``load_dataset`` cannot)."""
        p = Path(self.name)
        return p.is_dir() and ((p / "dataset_dict.json").is_file() or (p / "state.json").is_file())

    @property
    def label(self) -> str:
        return ":".join(["hf", self.name, *([self.config] if self.config else [])])


def _no_configs(name: str) -> bool:
    """A local folder or a data-file builder: datasets without configs, whose one extra part is the split."""
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    return Path(name).is_dir() or name in _PACKAGED_DATASETS_MODULES


def parse_source(arg: str) -> HFSource:
    """``NAME[:CONFIG][:SPLIT][,OPTION...]`` -> HFSource; a one-line error for anything malformed."""
    head, *opts = arg.split(",")
    parts = head.split(":")
    name = parts[0]
    if not name:
        raise HeadstoreError(f"data 'hf' needs a dataset: --data {USAGE}")
    if len(parts) > 3:
        raise HeadstoreError(f"hf:{head} has {len(parts) - 1} ':' parts, at most two (CONFIG and SPLIT): {USAGE}")
    rest = [p or None for p in parts[1:]]
    if len(rest) == 1:
        rest = [None, rest[0]] if _no_configs(name) else [rest[0], None]
    config, split = [*rest, None, None][:2]
    kw: dict[str, Any] = {"data_files": []}
    for opt in opts:
        key, eq, value = opt.partition("=")
        if key not in OPTIONS:
            raise HeadstoreError(f"hf option {key!r} is unknown: use {', '.join(OPTIONS)} ({USAGE})")
        if (key == "streaming") != (not eq) or (eq and not value):
            form = "streaming (no value)" if key == "streaming" else f"{key}=VALUE"
            raise HeadstoreError(f"hf option {opt!r}: write it as {form}")
        if key == "data_files":
            kw["data_files"].append(value)
        elif key in ("shuffle", "num_proc"):
            try:
                kw[key] = int(value)
            except ValueError:
                raise HeadstoreError(f"hf option {key}={value!r}: it must be an integer") from None
        else:
            kw[key] = True if key == "streaming" else value
    kw["data_files"] = tuple(kw["data_files"])
    if kw.get("num_proc") is not None and (kw["num_proc"] < 1 or kw.get("streaming")):
        raise HeadstoreError("hf option num_proc=N needs N >= 1 and no streaming (a stream is packed in one process)")
    return HFSource(name, config, split, **kw)


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _load_all(src: HFSource) -> Any:
    """Every split of ``src``: a DatasetDict or IterableDatasetDict (or one Dataset for a saved folder)."""
    import datasets

    if src.saved_folder:
        if src.config or src.data_files or src.revision:
            raise HeadstoreError(
                f"{src.name} is a save_to_disk folder: it takes no CONFIG, data_files or revision (hf:FOLDER[:SPLIT])"
            )
    try:
        if src.saved_folder:
            return datasets.load_from_disk(src.name)
        return datasets.load_dataset(
            src.name, src.config, data_files=list(src.data_files) or None, revision=src.revision,
            streaming=src.streaming,
        )  # fmt: skip
    except Exception as e:  # datasets raises many types (not found, offline, no config, bad files)
        why = _first_line(e)
        if "BuilderConfig" in why or "Config name is missing" in why:
            configs = next((ln.strip() for ln in str(e).splitlines() if "available configs" in ln), "")
            raise HeadstoreError(
                f"{src.label}: {' '.join(filter(None, (why, configs)))}: name a config, hf:NAME:CONFIG[:SPLIT]"
            ) from e
        raise HeadstoreError(f"cannot load dataset {src.label}: {why}") from e


def _pick_split(src: HFSource, loaded: Any) -> tuple[str, Any]:
    import datasets

    if isinstance(loaded, datasets.Dataset | datasets.IterableDataset):
        loaded = {str(loaded.split or "train"): loaded}
    names = list(loaded)
    if src.split is not None:
        if src.split not in loaded:
            raise HeadstoreError(f"dataset {src.label} has no split {src.split!r}: its splits are {', '.join(names)}")
        return src.split, loaded[src.split]
    if "train" in loaded or len(names) == 1:
        split = "train" if "train" in loaded else names[0]
        return split, loaded[split]
    raise HeadstoreError(f"dataset {src.label} has splits {', '.join(names)}: name one, {src.label}:SPLIT")


def _check_column(src: HFSource, split: str, ds: Any) -> Any:
    """The text column is there and holds strings; returns ``ds`` with its features known."""
    if ds.features is None:  # a streaming dataset whose builder does not declare them: infer from a few rows
        ds = ds._resolve_features()
    features = dict(ds.features)
    if src.column not in features:
        raise HeadstoreError(
            f"dataset {src.label} split {split!r} has no column {src.column!r}: its columns are "
            f"{', '.join(features)}; name the text column with ,column=NAME"
        )
    dtype = getattr(features[src.column], "dtype", type(features[src.column]).__name__)
    if dtype not in ("string", "large_string"):
        raise HeadstoreError(
            f"column {src.column!r} of dataset {src.label} holds {dtype}, not text: name a string column with ,column=NAME"
        )
    return ds


def open_split(src: HFSource) -> tuple[Any, dict[str, Any]]:
    """The chosen split as an ``IterableDataset`` (shuffled when asked) and its provenance."""
    split, ds = _pick_split(src, _load_all(src))
    ds = _check_column(src, split, ds)
    prov: dict[str, Any] = {
        "source": "hf", "name": Path(src.name).name if Path(src.name).exists() else src.name,
        "config": src.config or getattr(ds.info, "config_name", None), "split": split, "column": src.column,
        "revision": src.revision, "data_files": [Path(f).name for f in src.data_files], "streaming": src.streaming,
        "shuffle_seed": src.shuffle, "fingerprint": getattr(ds, "_fingerprint", None),
        "versions": {p: importlib.metadata.version(p) for p in ("datasets", "transformer-lens")},
        "windows": f"transformer_lens.utilities.tokenize_and_concatenate(num_proc={src.num_proc})",
    }  # fmt: skip
    if src.streaming:
        import datasets

        if isinstance(ds, datasets.Dataset):  # a saved folder, streamed from its memory-mapped files
            ds = ds.to_iterable_dataset()
        if src.shuffle is not None:
            ds = ds.shuffle(seed=src.shuffle, buffer_size=SHUFFLE_BUFFER)
            prov["shuffle_buffer"] = SHUFFLE_BUFFER
    else:
        if src.shuffle is not None:
            ds = ds.shuffle(seed=src.shuffle)  # a full permutation, as Dataset.shuffle gives
        if src.num_proc is None:  # else the whole split in one call, with that num_proc
            ds = ds.to_iterable_dataset()
    return ds, prov


def iter_windows(
    ds: Any, tokenizer: Any, seq_len: int, prepend_bos: bool, column: str, num_proc: int | None = None
) -> Iterator[np.ndarray]:
    """The windows of ``tokenize_and_concatenate`` over ``ds``, one int32 row at a time: lazily over an
    IterableDataset, or in one call with ``num_proc`` over a Dataset."""
    import datasets
    from transformer_lens.utilities import tokenize_and_concatenate

    streaming = isinstance(ds, datasets.IterableDataset)
    # it adds a pad token to a tokenizer without one: keep the model's tokenizer as it is
    tokenized = tokenize_and_concatenate(
        ds, copy.deepcopy(tokenizer), streaming=streaming, max_length=seq_len, column_name=column,
        add_bos_token=prepend_bos, num_proc=None if streaming else num_proc, set_format=False,
    )  # fmt: skip
    for row in tokenized:
        yield np.asarray(row["tokens"], dtype=np.int32)


def _map_batch() -> int:
    """Documents per call of tokenize_and_concatenate's map function (IterableDataset.map's batch_size)."""
    import inspect

    import datasets

    return int(inspect.signature(datasets.IterableDataset.map).parameters["batch_size"].default)


def _count_tokens(ds: Any, column: str, tokenizer: Any, limit: int) -> tuple[int, int] | None:
    """(tokens, documents) of ``ds`` joined by EOS as the windows join them; None past ``limit`` documents."""
    texts = [row[column] for row in itertools.islice(ds, limit + 1)]
    if len(texts) > limit:
        return None
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return sum(len(x) for x in ids) + max(len(texts) - 1, 0), len(texts)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """datasets' progress bars and warnings go to stderr and would bury a one-line error."""
    import datasets
    from datasets.utils import logging as ds_logging

    bars, level = datasets.is_progress_bar_enabled(), ds_logging.get_verbosity()
    datasets.disable_progress_bars()
    ds_logging.set_verbosity_error()
    try:
        yield
    finally:
        ds_logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()


def _check_tokenizer(tokenizer: Any, prepend_bos: bool) -> None:
    if tokenizer.eos_token_id is None:
        raise HeadstoreError(
            "data 'hf' joins documents with EOS, and this tokenizer has no EOS token: use another model"
        )
    if prepend_bos and tokenizer.bos_token_id is None:
        raise HeadstoreError("the tokenizer has no BOS token to start each window: pass --no-prepend-bos")


def build_hf(arg: str, req: DataRequest, tokenizer: Any) -> TokenDataset:
    src = parse_source(arg)
    _check_tokenizer(tokenizer, req.prepend_bos)
    seq_len = req.seq_len or DEFAULT_SEQ_LEN
    with _quiet():
        ds, prov = open_split(src)
        try:
            rows = list(
                itertools.islice(
                    iter_windows(ds, tokenizer, seq_len, req.prepend_bos, src.column, src.num_proc), req.n_seq
                )
            )
        except (TypeError, ValueError) as e:  # the tokenizer on a missing (None) text, or a row datasets cannot read
            raise HeadstoreError(
                f"reading dataset {src.label} split {prov['split']!r} failed: {_first_line(e)} "
                f"(every row's {src.column!r} must be a string)"
            ) from e
        if len(rows) <= 1:  # one window may be padding after a short dataset: count what it has
            body = seq_len - 1 if req.prepend_bos else seq_len
            counted = _count_tokens(ds, src.column, tokenizer, limit=_map_batch())
            if counted is not None and counted[0] < body:
                n_tok, n_docs = counted
                raise HeadstoreError(
                    f"dataset {src.label} split {prov['split']!r} has {n_tok} tokens ({n_docs} documents joined by EOS) "
                    f"but one window of --seq-len {seq_len} needs {body}{' besides BOS' if req.prepend_bos else ''}: "
                    "use a shorter --seq-len or a larger dataset"
                )
    tokens = np.stack(rows) if rows else np.zeros((0, seq_len), np.int32)
    prov["n_windows"] = int(tokens.shape[0])
    return TokenDataset("hf", req.spec, tokens, {}, prov)
