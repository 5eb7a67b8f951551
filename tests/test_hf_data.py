"""``--data hf:...``: Hugging Face datasets, packed into windows by TransformerLens's ``tokenize_and_concatenate``.

Every reference here is ``tokenize_and_concatenate`` called directly on the whole dataset, as a
researcher calls it online (in one process: ``num_proc=None``), never headstore's own code.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")

import headstore  # noqa: E402
from headstore.extract import ExtractRequest, extract  # noqa: E402
from headstore.extract.data import DataRequest, build_dataset  # noqa: E402
from headstore.store_schema import HeadstoreError, read_provenance  # noqa: E402

WORDS = "the cat sat on a mat When Mary and John went to store gave drink".split()
N_DOCS = 2300  # three of datasets' 1,000-document map batches, the last one short


def documents(n: int, seed: int = 0, lo: int = 1, hi: int = 12) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(rng.integers(lo, hi)))) for _ in range(n)]


def reference(dataset: Any, tok: Any, seq_len: int, column: str = "text", bos: bool = True) -> np.ndarray:
    """What a researcher's online code gives: one call on the whole dataset (a Dataset or an IterableDataset)."""
    from transformer_lens.utilities import tokenize_and_concatenate

    streaming = isinstance(dataset, datasets.IterableDataset)
    out = tokenize_and_concatenate(
        dataset, copy.deepcopy(tok), streaming=streaming, max_length=seq_len, column_name=column,
        add_bos_token=bos, num_proc=None, set_format=False,
    )  # fmt: skip
    return np.asarray([row["tokens"] for row in out], dtype=np.int64)


@pytest.fixture(scope="module")
def tok(live_model: Callable[[str], Any]) -> Any:
    return live_model("tiny-gpt2").tokenizer


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``save_to_disk`` folder: a text column, an integer column, ``N_DOCS`` documents."""
    out = tmp_path_factory.mktemp("hf") / "docs"
    datasets.Dataset.from_dict({"text": documents(N_DOCS), "n": list(range(N_DOCS))}).save_to_disk(str(out))
    return out


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """load_dataset's cache in the test's folder, not the user's."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    return tmp_path / "cache"


def build(spec: str, tok: Any, n_seq: int | None = None, seq_len: int | None = 16, bos: bool = True) -> Any:
    return build_dataset(DataRequest(spec, n_seq, seq_len, 0, bos), tok, 1024)


# --- the windows ----------------------------------------------------------------------------------


def test_store_tokens_are_tokenize_and_concatenate_windows(folder: Path, tok: Any, tmp_path: Path) -> None:
    """The key claim: a store from ``--data hf:FOLDER`` holds exactly the function's windows, across
    datasets' 1,000-document batches, and records where they came from."""
    want = reference(datasets.load_from_disk(str(folder)), tok, 48)
    assert want.shape[0] > 200  # every batch's windows
    out = tmp_path / "hf.zarr"
    extract(ExtractRequest(model="tiny-gpt2", data=f"hf:{folder}", out=str(out), seq_len=48, batch_size=64,
                           fields=("ln_final_scale",), progress=False, device="cpu"))  # fmt: skip
    got = headstore.open_store(out)["tokens"].values
    np.testing.assert_array_equal(got, want)
    d = read_provenance(out).dataset
    assert d.kind == "hf" and d.n_sequences == want.shape[0]
    o = d.options
    assert (o["name"], o["split"], o["column"], o["streaming"], o["shuffle_seed"]) == (
        "docs",
        "train",
        "text",
        False,
        None,
    )
    assert o["fingerprint"] == datasets.load_from_disk(str(folder))._fingerprint
    assert set(o["versions"]) == {"datasets", "transformer-lens"}


@pytest.mark.parametrize("bos", [True, False])
def test_n_seq_takes_the_first_windows(folder: Path, tok: Any, bos: bool) -> None:
    want = reference(datasets.load_from_disk(str(folder)), tok, 24, bos=bos)
    ds = build(f"hf:{folder}", tok, n_seq=50, seq_len=24, bos=bos)
    np.testing.assert_array_equal(ds.tokens, want[:50])
    assert (ds.tokens[:, 0] == tok.bos_token_id).all() == bos


def test_streaming_gives_the_same_windows(folder: Path, tok: Any) -> None:
    """Unshuffled, streaming reads the same documents in the same order: the same windows as the
    non-streaming call on the whole dataset."""
    want = reference(datasets.load_from_disk(str(folder)), tok, 16)
    np.testing.assert_array_equal(build(f"hf:{folder},streaming", tok).tokens, want)


def test_shuffle_seed(folder: Path, tok: Any) -> None:
    """Non-streaming ``shuffle=SEED`` is ``Dataset.shuffle(seed)``'s full permutation; streaming, it is
    ``IterableDataset.shuffle(seed)`` (a 1,000-document buffer), as the same code online gives."""
    full = datasets.load_from_disk(str(folder))
    got = build(f"hf:{folder},shuffle=7", tok).tokens
    np.testing.assert_array_equal(got, reference(full.shuffle(seed=7), tok, 16))
    assert not np.array_equal(got, reference(full, tok, 16)[: got.shape[0]])
    got = build(f"hf:{folder},shuffle=7,streaming", tok, n_seq=200).tokens
    np.testing.assert_array_equal(got, reference(full.to_iterable_dataset().shuffle(seed=7), tok, 16)[:200])


def test_num_proc_matches_that_call(tmp_path: Path, tok: Any) -> None:
    """``num_proc=N``: the one call over the whole split with N processes, whose pieces are packed apart."""
    texts = documents(N_DOCS, seed=3)
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "docs"))
    got = build(f"hf:{tmp_path / 'docs'},num_proc=2", tok).tokens
    fresh = datasets.Dataset.from_dict({"text": texts})  # in memory: no cache files shared with the store's call
    from transformer_lens.utilities import tokenize_and_concatenate

    two = tokenize_and_concatenate(fresh, copy.deepcopy(tok), max_length=16, num_proc=2, set_format=False)
    np.testing.assert_array_equal(got, np.asarray(two["tokens"]))
    one = reference(fresh, tok, 16)
    assert not (got.shape == one.shape and np.array_equal(got, one))  # the second piece starts mid-batch


def test_data_files_and_dataset_dict(tmp_path: Path, tok: Any, cache: Path) -> None:
    """Data files go through load_dataset (the Hub's path); a saved DatasetDict picks its split."""
    texts = documents(1500, seed=1)
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": t, "i": i}) + "\n" for i, t in enumerate(texts)))
    online = datasets.load_dataset("json", data_files=str(path), split="train")
    want = reference(online, tok, 16, column="body")
    np.testing.assert_array_equal(build(f"hf:json,data_files={path},column=body", tok).tokens, want)
    np.testing.assert_array_equal(build(f"hf:json:train,data_files={path},column=body,streaming", tok).tokens, want)
    assert list(cache.iterdir())  # the non-streaming load was prepared in the cache it was given
    stream = datasets.load_dataset("json", data_files=str(path), split="train", streaming=True)  # online, streaming
    got = build(f"hf:json:train,data_files={path},column=body,streaming,shuffle=3", tok).tokens
    np.testing.assert_array_equal(got, reference(stream.shuffle(seed=3), tok, 16, column="body"))
    (tmp_path / "corpus").mkdir()  # a folder of data files: load_dataset(FOLDER)
    (tmp_path / "corpus" / "part-0.jsonl").write_text(path.read_text())
    np.testing.assert_array_equal(build(f"hf:{tmp_path / 'corpus'}:train,column=body", tok).tokens, want)
    dd = datasets.DatasetDict({"train": online, "test": online.select(range(100))})
    dd.save_to_disk(str(tmp_path / "dd"))
    want = reference(dd["test"], tok, 16, column="body")
    np.testing.assert_array_equal(build(f"hf:{tmp_path / 'dd'}:test,column=body", tok).tokens, want)


def test_configs_of_a_dataset_repository(tmp_path: Path, tok: Any, cache: Path) -> None:
    """A dataset with configs (a Hub-style folder: its README names them): hf:NAME:CONFIG:SPLIT picks one;
    a missing or unknown config is one line naming the configs there are."""
    repo = tmp_path / "repo"
    for config, texts in (("small", documents(40, seed=5)), ("big", documents(90, seed=6))):
        (repo / config).mkdir(parents=True)
        (repo / config / "part.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    configs = "".join(f"- config_name: {c}\n  data_files: {c}/*.jsonl\n" for c in ("small", "big"))
    (repo / "README.md").write_text(f"---\nconfigs:\n{configs}---\n")
    want = reference(datasets.load_dataset(str(repo), "big", split="train"), tok, 16)
    np.testing.assert_array_equal(build(f"hf:{repo}:big:train", tok).tokens, want)
    for spec, must in ((f"hf:{repo}", "Config name is missing"), (f"hf:{repo}:nope:train", "'nope' not found")):
        with pytest.raises(
            HeadstoreError, match=rf"{must}.*'small', 'big'.*: name a config, hf:NAME:CONFIG\[:SPLIT\]$"
        ):
            build(spec, tok)


def test_the_models_tokenizer_is_left_as_it_is(folder: Path, tok: Any) -> None:
    """tokenize_and_concatenate adds a pad token to a tokenizer without one; headstore's is not touched."""
    bare = copy.deepcopy(tok)
    bare.pad_token = None
    n = len(bare)
    build(f"hf:{folder}", bare, n_seq=4)
    assert bare.pad_token is None and len(bare) == n


# --- bad input ------------------------------------------------------------------------------------


def test_bad_specs_are_one_line(folder: Path, tok: Any, tmp_path: Path) -> None:
    cases = {
        f"hf:{folder},column=body": "has no column 'body': its columns are text, n; name the text column with ,column=NAME",
        f"hf:{folder},column=n": "column 'n' of dataset",
        f"hf:{folder}:test": "has no split 'test': its splits are train",
        f"hf:{folder},colour=red": "hf option 'colour' is unknown",
        f"hf:{folder},shuffle=x": "hf option shuffle='x': it must be an integer",
        f"hf:{folder},streaming=1": "write it as streaming (no value)",
        f"hf:{tmp_path / 'nothing'}": "cannot load dataset",
        "hf:": "data 'hf' needs a dataset",
        f"hf:{folder},streaming,num_proc=2": "num_proc=N needs N >= 1 and no streaming",
    }
    for spec, must in cases.items():
        with pytest.raises(HeadstoreError) as e:
            build(spec, tok, n_seq=2)
        assert must in str(e.value) and "\n" not in str(e.value), (spec, str(e.value))


def test_too_short_names_its_tokens(tmp_path: Path, tok: Any) -> None:
    """tokenize_and_concatenate pads a dataset shorter than one window into one: refused, counting tokens."""
    texts = ["the cat sat", "on a mat"]
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "short"))
    n_tok = (
        len(tok(texts[0], add_special_tokens=False)["input_ids"])
        + 1
        + len(tok(texts[1], add_special_tokens=False)["input_ids"])
    )
    with pytest.raises(
        HeadstoreError,
        match=rf"has {n_tok} tokens \(2 documents joined by EOS\) but one window of --seq-len 64 needs 63 besides BOS",
    ):
        build(f"hf:{tmp_path / 'short'}", tok, seq_len=64)
    assert build(f"hf:{tmp_path / 'short'}", tok, seq_len=n_tok + 1).tokens.shape == (1, n_tok + 1)


def test_a_tokenizer_without_eos_or_bos(folder: Path, tok: Any) -> None:
    no_eos = copy.deepcopy(tok)
    no_eos.eos_token = None
    with pytest.raises(HeadstoreError, match="joins documents with EOS, and this tokenizer has no EOS token"):
        build(f"hf:{folder}", no_eos, n_seq=2)
    no_bos = copy.deepcopy(tok)
    no_bos.bos_token = None
    with pytest.raises(HeadstoreError, match="no BOS token to start each window: pass --no-prepend-bos"):
        build(f"hf:{folder}", no_bos, n_seq=2)
    assert build(f"hf:{folder}", no_bos, n_seq=2, bos=False).tokens.shape == (2, 16)


def test_a_missing_text_is_one_line(tmp_path: Path, tok: Any) -> None:
    datasets.Dataset.from_dict({"text": ["the cat sat on a mat", None]}).save_to_disk(str(tmp_path / "gap"))
    with pytest.raises(HeadstoreError, match=r"split 'train' failed: .* \(every row's 'text' must be a string\)$"):
        build(f"hf:{tmp_path / 'gap'}", tok, seq_len=4)


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("headstore")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "headstore.cli"]


def test_cli_errors_last_line_no_store(folder: Path, tmp_path: Path) -> None:
    """The real command: each refused dataset exits non-zero, its last line is the error, no store is left."""
    datasets.Dataset.from_dict({"text": ["a short one"]}).save_to_disk(str(tmp_path / "short"))
    cases = {
        "column": ([f"hf:{folder},column=body"], "has no column 'body': its columns are text, n"),
        "split": ([f"hf:{folder}:validation"], "has no split 'validation': its splits are train"),
        "short": ([f"hf:{tmp_path / 'short'}", "--seq-len", "32"], "needs 31 besides BOS"),
    }
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "cache"))  # fmt: skip
    base = ["extract", "--model", "tiny-gpt2", "--device", "cpu", "--no-progress"]
    procs = {
        name: subprocess.Popen([*_cli(), *base, "--data", *args, "--out", str(tmp_path / f"{name}.zarr")],
                               cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for name, (args, _) in cases.items()
    }  # fmt: skip
    for name, p in procs.items():
        _, err = p.communicate(timeout=300)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert p.returncode != 0 and lines and "Traceback" not in err, (name, err)
        assert lines[-1].startswith("error: ") and cases[name][1] in lines[-1], (name, err)
        assert not (tmp_path / f"{name}.zarr").exists()


# --- memory, streaming ----------------------------------------------------------------------------

MEASURE = r"""
import json, sys, tracemalloc
import pyarrow as pa
from transformers import AutoTokenizer
from headstore.extract.data.hf import iter_windows, open_split, parse_source

tok = AutoTokenizer.from_pretrained(sys.argv[1])
files = sys.argv[2:]

def windows(paths):
    spec = "parquet:train," + ",".join(f"data_files={p}" for p in paths) + ",streaming"
    ds, _ = open_split(parse_source(spec))
    return iter_windows(ds, tok, 64, True, "text")

for _ in windows(files[:1]):  # imports and first-use caches, before anything is measured
    pass
pool = pa.default_memory_pool()
out = {}
tracemalloc.start()
for name, paths, keep in (("1x", files[:2], False), ("10x", files, False), ("10x-kept", files, True)):
    tracemalloc.reset_peak()
    base, arrow0 = tracemalloc.get_traced_memory()[0], pool.max_memory()
    n, kept = 0, []
    for w in windows(paths):
        n += 1
        if keep:
            kept.append(w)
    # Python and numpy allocations (tracemalloc) plus Arrow's buffers (its pool's high-water mark)
    out[name] = {"windows": n, "peak": tracemalloc.get_traced_memory()[1] - base + pool.max_memory() - arrow0}
    del kept
print(json.dumps(out))
"""


def test_streaming_memory_is_flat_over_ten_times_the_tokens(tmp_path: Path, live_model: Callable[[str], Any]) -> None:
    """Peak memory of the window iterator alone (no model) over 2 parquet files and over 20: the same.
    Keeping the windows (what a loader that holds the data does) raises it, so the measure can fail."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from headstore.extract.models import _tiny_folder

    files = []
    for i in range(20):  # 1,000 documents a file: one map batch each; ~15k tokens a file
        files.append(tmp_path / f"part-{i:02d}.parquet")
        pq.write_table(pa.table({"text": documents(1000, seed=i, lo=3, hi=20)}), files[-1], row_group_size=250)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "cache"))  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(_tiny_folder("tiny-gpt2")), *map(str, files)],
                          capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    one, ten, kept = m["1x"], m["10x"], m["10x-kept"]
    assert ten["windows"] >= 9 * one["windows"]
    assert ten["peak"] < 1.2 * one["peak"], m
    held = ten["windows"] * 64 * 4  # the windows' int32 tokens alone
    assert kept["peak"] > ten["peak"] + 0.8 * held, m
