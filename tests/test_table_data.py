"""``--data jsonl:/csv:/parquet:FILE`` (the researcher's own prompts) and ``tokens:FILE.npy,COLUMNS``.

The key test writes the IOI prompts of ``--data ioi`` the way a researcher would (word and
character offsets, names as strings) and gets the same tokens, columns and ``ioi`` results.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import headstore
from headstore.extract import ExtractRequest, extract
from headstore.extract.data import DataRequest, TokenDataset, build_dataset
from headstore.extract.data.ioi_data import single_token_names
from headstore.extract.data.ioi_prompts import sample_prompts
from headstore.store_schema import HeadstoreError, read_provenance

# One small field: a tokens-only store (--fields '') is never marked complete today, so open_store refuses it.
SMALL = ("ln_final_scale",)
IOI_COLUMNS = ("io_pos", "s1_pos", "s2_pos", "end_pos", "length", "io_token", "s_token")


def ioi_analyzer() -> Callable[..., Any]:
    import headstore.analyze as A

    try:
        return A.ioi  # type: ignore[no-any-return]
    except AttributeError:  # the layout before headstore.analyze re-exported its analyzers
        from headstore.analyze.ioi import ioi

        return ioi


@pytest.fixture(scope="module")
def tok(live_model: Callable[[str], Any]) -> Any:
    return live_model("tiny-gpt2").tokenizer  # tiny-llama has the same tokenizer


def researcher_rows(tokenizer: Any, n: int, seed: int, how: str = "mixed") -> list[dict[str, Any]]:
    """IOI prompts as a researcher writes them: text, where the names are, the names as strings.

    ``how``: ``mixed`` (IO and S2 as word indices, S1 as the character of the space before the
    name), ``word`` (all word indices) or ``char`` (all character offsets of the name's first letter).
    """
    rows = []
    for p in sample_prompts(n, single_token_names(tokenizer), seed):
        text = p.text()
        words = text.split()
        s_words = [i for i, w in enumerate(words) if w == p.s]
        io_char = re.search(rf"\b{p.io}\b", text).start()  # type: ignore[union-attr]
        s_chars = [m.start() for m in re.finditer(rf"\b{p.s}\b", text)]
        row: dict[str, Any] = {"text": text}
        if how == "word":
            row |= {"io_pos_word": words.index(p.io), "s1_pos_word": s_words[0], "s2_pos_word": s_words[1]}
        elif how == "char":
            row |= {"io_pos_char": io_char, "s1_pos_char": s_chars[0], "s2_pos_char": s_chars[1]}
        else:
            row |= {"io_pos_word": words.index(p.io), "s1_pos_char": s_chars[0] - 1, "s2_pos_word": s_words[1]}
        row |= {"io_token_str": " " + p.io, "s_token_str": " " + p.s, "template": p.template}
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def build(spec: str, tokenizer: Any, n_seq: int | None = None, seq_len: int | None = None) -> TokenDataset:
    return build_dataset(DataRequest(spec, n_seq, seq_len, 0, True), tokenizer, 128)


def run_extract(out: Path, data: str, model: str = "tiny-gpt2", **kw: Any) -> Path:
    kw.setdefault("batch_size", 4)
    extract(ExtractRequest(model=model, data=data, out=str(out), progress=False, device="cpu", **kw))
    return out


# --- the key test: own IOI prompts == --data ioi -------------------------------------------------


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_own_ioi_prompts_equal_ioi_data(tmp_path: Path, make_store: Callable[..., Path], tok: Any, model: str) -> None:
    ref = headstore.open_store(make_store(model, "ioi"))  # conftest's default: n_seq 12, seed 0, batch 4
    src = write_jsonl(tmp_path / "prompts.jsonl", researcher_rows(tok, 12, 0))
    out = run_extract(tmp_path / "mine.zarr", f"jsonl:{src}", model)
    mine = headstore.open_store(out)
    np.testing.assert_array_equal(mine["tokens"].values, ref["tokens"].values)
    for c in (*IOI_COLUMNS, "template"):
        np.testing.assert_array_equal(mine[c].values, ref[c].values, err_msg=c)
    # the file's own columns are stored too
    assert {"io_pos_word", "s1_pos_char", "s2_pos_word", "io_token_str", "s_token_str"} <= set(mine.data_vars)
    assert str(mine["io_token_str"].values[0]).startswith(" ")
    ioi = ioi_analyzer()
    a, b = ioi(mine).compute(), ioi(ref).compute()
    np.testing.assert_allclose(a["logit_diff"].values, b["logit_diff"].values, rtol=1e-6)
    np.testing.assert_allclose(a["attn_diff"].values, b["attn_diff"].values, rtol=1e-6)
    d = read_provenance(out).dataset
    assert d.kind == "jsonl" and d.options["file"] == "prompts.jsonl" and d.n_sequences == 12


def test_csv_and_parquet_store_what_jsonl_stores(tmp_path: Path, tok: Any) -> None:
    rows = researcher_rows(tok, 6, 3)
    for r, n in zip(rows, range(len(rows)), strict=True):
        r["prompt_id"] = f"p{n:02d}"  # a string column
        r["group"] = n % 2  # an integer column
    write_jsonl(tmp_path / "p.jsonl", rows)
    pd.DataFrame(rows).to_csv(tmp_path / "p.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "p.parquet")
    stores = {fmt: headstore.open_store(run_extract(tmp_path / f"{fmt}.zarr", f"{fmt}:{tmp_path / f'p.{fmt}'}", fields=SMALL))
              for fmt in ("jsonl", "csv", "parquet")}  # fmt: skip
    want = stores["jsonl"]
    cols = {v for v in want.data_vars if want[v].dims == ("batch",)} - {"batch_done"}
    assert cols >= {*IOI_COLUMNS, "template", "prompt_id", "group", "io_pos_word", "s1_pos_char", "io_token_str"}
    for fmt in ("csv", "parquet"):
        got = stores[fmt]
        assert {v for v in got.data_vars if got[v].dims == ("batch",)} - {"batch_done"} == cols, fmt
        np.testing.assert_array_equal(got["tokens"].values, want["tokens"].values)
        for c in sorted(cols):
            np.testing.assert_array_equal(got[c].values, want[c].values, err_msg=f"{fmt} {c}")
            assert got[c].dtype.kind == want[c].dtype.kind, (fmt, c)
    assert want["prompt_id"].values.tolist() == [f"p{n:02d}" for n in range(6)]


def test_char_and_word_offsets_agree(tmp_path: Path, tok: Any) -> None:
    by = {how: build(f"jsonl:{write_jsonl(tmp_path / f'{how}.jsonl', researcher_rows(tok, 10, 5, how))}", tok)
          for how in ("word", "char", "mixed")}  # fmt: skip
    for how in ("char", "mixed"):
        for c in IOI_COLUMNS:
            np.testing.assert_array_equal(by[how].columns[c], by["word"].columns[c], err_msg=f"{how} {c}")
    # a byte-level BPE token " Mary" spans the space before the name: the space and the 'M' resolve alike
    text = "When Mary and John went to the store, John gave a drink to"
    src = write_jsonl(tmp_path / "one.jsonl", [{"text": text, "a_char": 4, "b_char": 5, "c_char": 8, "w_word": 1}])
    cols = build(f"jsonl:{src}", tok).columns
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode([ids[1]]) == " Mary"
    assert int(cols["a"][0]) == int(cols["b"][0]) == int(cols["c"][0]) == int(cols["w"][0]) == 2  # BOS counted
    no_bos = build_dataset(DataRequest(f"jsonl:{src}", None, None, 0, False), tok, 128).columns
    assert int(no_bos["a"][0]) == 1 and int(no_bos["length"][0]) == len(ids)


def test_text_rows_padding_seq_len_and_n_seq(tmp_path: Path, tok: Any) -> None:
    texts = ["When Mary and John went to the store", "John gave a drink to", "Then, Alice and Bob went to the park."]
    src = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    ds = build(f"jsonl:{src}", tok)
    lens = [len(tok.encode(t, add_special_tokens=False)) + 1 for t in texts]
    assert ds.tokens.shape == (3, max(lens))
    assert ds.columns["length"].tolist() == lens and ds.columns["end_pos"].tolist() == [n - 1 for n in lens]
    assert set(ds.columns) == {"length", "end_pos"}
    for i, t in enumerate(texts):
        assert ds.tokens[i, 0] == tok.bos_token_id
        assert ds.tokens[i, 1 : lens[i]].tolist() == tok.encode(t, add_special_tokens=False)
        assert (ds.tokens[i, lens[i] :] == tok.pad_token_id).all()
    wide = build(f"jsonl:{src}", tok, seq_len=20)
    assert wide.tokens.shape == (3, 20)
    np.testing.assert_array_equal(wide.tokens[:, : max(lens)], ds.tokens)
    first = build(f"jsonl:{src}", tok, n_seq=2)
    assert first.tokens.shape[0] == 2 and first.columns["length"].tolist() == lens[:2]
    assert (
        ds.describe().sha256
        != build(f"jsonl:{write_jsonl(tmp_path / 'u.jsonl', [{'text': texts[0]}])}", tok).describe().sha256
    )


def test_tokens_column_used_as_is_and_file_end_pos_kept(tmp_path: Path, tok: Any) -> None:
    seqs = [[5, 6, 7, 8], [9, 10]]
    rows = [{"tokens": s, "end_pos": 1, "label": "x"} for s in seqs]
    for fmt in ("jsonl", "csv", "parquet"):
        path = tmp_path / f"k.{fmt}"
        if fmt == "jsonl":
            write_jsonl(path, rows)
        elif fmt == "csv":
            pd.DataFrame([{**r, "tokens": json.dumps(r["tokens"])} for r in rows]).to_csv(path, index=False)
        else:
            pd.DataFrame(rows).to_parquet(path)
        ds = build(f"{fmt}:{path}", tok)
        assert ds.tokens.tolist() == [[5, 6, 7, 8], [9, 10, tok.pad_token_id, tok.pad_token_id]], fmt  # no BOS
        assert ds.columns["length"].tolist() == [4, 2] and ds.columns["end_pos"].tolist() == [1, 1], fmt
        assert ds.columns["label"].tolist() == ["x", "x"]


# --- refusals: one line, naming row and column -----------------------------------------------------

TEXT = "When Mary and John went to the store, John gave a drink to"
REFUSALS: list[tuple[str, list[dict[str, Any]], dict[str, Any], str]] = [
    # (case, rows, build kwargs, regex the message must match)
    ("two-token str", [{"text": TEXT, "io_token_str": " Mary"}, {"text": TEXT, "io_token_str": " Mary John"}], {},
     r"row 1 of bad\.jsonl: io_token_str ' Mary John' is 2 tokens \[' Mary', ' John'\], not one"),
    ("float column", [{"text": TEXT, "score": 0.5}], {}, r"column 'score' of bad\.jsonl holds floats"),
    ("list column", [{"text": TEXT, "ids": [1, 2]}], {}, r"column 'ids' of bad\.jsonl holds list"),
    ("bool column", [{"text": TEXT, "ok": True}], {}, r"column 'ok' of bad\.jsonl holds booleans"),
    ("null", [{"text": TEXT, "n": 1}, {"text": TEXT}], {}, r"column 'n' of bad\.jsonl has no value in row 1"),
    ("too long", [{"text": "a b"}, {"text": TEXT}], {"seq_len": 8},
     r"row 1 of bad\.jsonl has 15 tokens but --seq-len is 8: raise --seq-len"),
    ("char outside", [{"text": TEXT, "x_char": len(TEXT)}], {}, r"row 0 of bad\.jsonl: x_char = 58 is outside the text"),
    ("word outside", [{"text": TEXT, "x_word": 13}], {}, r"x_word = 13 but the text has 13 words \(0\.\.12\)"),
    ("char as string", [{"text": TEXT, "x_char": "4"}], {}, r"'x_char' of bad\.jsonl must hold integers"),
    ("str as int", [{"text": TEXT, "t_str": 4}], {}, r"'t_str' of bad\.jsonl must hold strings"),
    ("clash", [{"text": TEXT, "io_pos": 2, "io_pos_word": 1}], {}, r"'io_pos_word' .* gives 'io_pos', a column of the file too"),
    ("two suffixes", [{"text": TEXT, "io_pos_char": 4, "io_pos_word": 1}], {}, r"'io_pos_char' and 'io_pos_word' .* both give 'io_pos'"),
    ("store array", [{"text": TEXT, "pattern": 1}], {}, r"'pattern' of bad\.jsonl has the name of a store array"),
    ("dim name", [{"text": TEXT, "batch": 1}], {}, r"'batch' of bad\.jsonl has the name of a store array"),
    ("store array via suffix", [{"text": TEXT, "tokens_str": " Mary"}], {}, r"gives 'tokens', the name of a store array"),
    ("bad name", [{"text": TEXT, "a/b": 1}], {}, r"column name 'a/b' of bad\.jsonl is not a plain name"),
    ("text and tokens", [{"text": TEXT, "tokens": [1, 2]}], {}, r"'text' .* or 'tokens' .* not both"),
    ("no text", [{"prompt": TEXT}], {}, r"needs a 'text' .* or 'tokens'"),
    ("missing text", [{"text": TEXT}, {"other": 1}], {}, r"row 1 of bad\.jsonl has no text"),
    ("empty text", [{"text": ""}], {"prepend_bos": False}, r"row 0 of bad\.jsonl has no tokens"),
    ("char with tokens", [{"tokens": [1, 2], "x_char": 0}], {}, r"'x_char' .* points into a text, and there is none"),
    ("bad token id", [{"tokens": [1, 10**6]}], {}, r"row 0 of bad\.jsonl: token id 1000000 is outside"),
    ("wrong length", [{"text": TEXT, "length": 3}], {}, r"row 0 of bad\.jsonl: column 'length' is 3 but the row has 15"),
    ("end_pos outside", [{"text": TEXT, "end_pos": 15}], {}, r"row 0 of bad\.jsonl: end_pos 15 is outside the row's 15"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "rows", "kw", "msg"), REFUSALS, ids=[c[0] for c in REFUSALS])
def test_refusals_are_one_line(
    tmp_path: Path, tok: Any, case: str, rows: list[dict[str, Any]], kw: dict[str, Any], msg: str
) -> None:
    src = write_jsonl(tmp_path / "bad.jsonl", rows)
    req = DataRequest(f"jsonl:{src}", None, kw.get("seq_len"), 0, kw.get("prepend_bos", True))
    with pytest.raises(HeadstoreError, match=msg) as ei:
        build_dataset(req, tok, 128)
    assert "\n" not in str(ei.value)


def test_unreadable_files_and_slow_tokenizer(tmp_path: Path, tok: Any) -> None:
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{"text": "b", \n')
    with pytest.raises(HeadstoreError, match=r"broken\.jsonl is not a readable jsonl file: line 2 is not JSON"):
        build(f"jsonl:{tmp_path / 'broken.jsonl'}", tok)
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(HeadstoreError, match=r"broken\.parquet is not a readable parquet file") as ei:
        build(f"parquet:{tmp_path / 'broken.parquet'}", tok)
    assert "\n" not in str(ei.value)
    with pytest.raises(HeadstoreError, match="does not exist"):
        build(f"csv:{tmp_path / 'missing.csv'}", tok)
    with pytest.raises(HeadstoreError, match=r"needs a file: --data csv:prompts\.csv"):
        build("csv", tok)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(HeadstoreError, match="gave no sequences"):
        build(f"jsonl:{tmp_path / 'empty.jsonl'}", tok)

    class Slow:  # a tokenizer without an offset mapping
        is_fast = False

        def __getattr__(self, name: str) -> Any:
            return getattr(tok, name)

        def __call__(self, *a: Any, **k: Any) -> Any:
            return tok(*a, **k)

    src = write_jsonl(tmp_path / "c.jsonl", [{"text": TEXT, "x_char": 4, "t_str": " Mary"}])
    with pytest.raises(HeadstoreError, match=r"'x_char' of c\.jsonl needs the tokenizer's offset mapping"):
        build(f"jsonl:{src}", Slow())
    src = write_jsonl(tmp_path / "s.jsonl", [{"text": TEXT, "t_str": " Mary"}])  # _str needs no offsets
    assert int(build(f"jsonl:{src}", Slow()).columns["t"][0]) == tok.encode(" Mary", add_special_tokens=False)[0]


def test_csv_names_like_na_stay_strings(tmp_path: Path, tok: Any) -> None:
    (tmp_path / "n.csv").write_text('text,who,n\n"When Mary and John went",NA,1\n"John gave a drink to",None,2\n')
    ds = build(f"csv:{tmp_path / 'n.csv'}", tok)
    assert ds.columns["who"].tolist() == ["NA", "None"] and ds.columns["n"].tolist() == [1, 2]
    (tmp_path / "gap.csv").write_text('text,n\n"When Mary",1\n"John gave",\n')
    with pytest.raises(HeadstoreError, match=r"column 'n' of gap\.csv has no value in row 1"):
        build(f"csv:{tmp_path / 'gap.csv'}", tok)


# --- resume / provenance -------------------------------------------------------------------------


def test_rerun_resumes_and_an_edited_file_is_refused(tmp_path: Path, tok: Any) -> None:
    rows = researcher_rows(tok, 4, 1)
    src = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "p.zarr"
    run_extract(out, f"jsonl:{src}", fields=SMALL)
    again = extract(ExtractRequest(model="tiny-gpt2", data=f"jsonl:{src}", out=str(out), fields=SMALL, batch_size=4,
                                   progress=False, device="cpu"))  # fmt: skip
    assert again.written == 0 and again.skipped == 1
    rows[2]["template"] = "edited"  # a column only: the tokens are the same
    write_jsonl(src, rows)
    with pytest.raises(HeadstoreError, match="different dataset"):
        run_extract(out, f"jsonl:{src}", fields=SMALL)


# --- tokens:FILE.npy,COLUMNS -----------------------------------------------------------------------


def test_tokens_npy_with_a_csv_sidecar(tmp_path: Path, tok: Any) -> None:
    ref = build("ioi", tok, n_seq=6)
    np.save(tmp_path / "toks.npy", ref.tokens.astype(np.int64))
    side = pd.DataFrame({
        "io_pos": ref.columns["io_pos"], "end_pos": ref.columns["end_pos"],
        "label": [f"row{i}" for i in range(6)],
        "io_token_str": [tok.decode([int(t)]) for t in ref.columns["io_token"]],
    })  # fmt: skip
    side.to_csv(tmp_path / "cols.csv", index=False)
    out = run_extract(tmp_path / "t.zarr", f"tokens:{tmp_path / 'toks.npy'},{tmp_path / 'cols.csv'}", fields=SMALL)
    ds = headstore.open_store(out)
    np.testing.assert_array_equal(ds["tokens"].values, ref.tokens)
    for c in ("io_pos", "end_pos", "io_token"):
        np.testing.assert_array_equal(ds[c].values, ref.columns[c], err_msg=c)
    assert ds["label"].values.tolist() == [f"row{i}" for i in range(6)]
    assert "length" not in ds  # the array is used as is: no columns but the file's
    opts = read_provenance(out).dataset.options
    assert opts["columns_file"] == "cols.csv" and "io_token" in opts["columns"]
    assert build(f"tokens:{tmp_path / 'toks.npy'},{tmp_path / 'cols.csv'}", tok, n_seq=2).columns["label"].tolist() == [
        "row0",
        "row1",
    ]
    # a plain tokens: file still stores no columns
    assert build(f"tokens:{tmp_path / 'toks.npy'}", tok).columns == {}

    side.iloc[:5].to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(HeadstoreError, match=r"short\.csv has 5 rows but the token array has 6 sequences"):
        build(f"tokens:{tmp_path / 'toks.npy'},{tmp_path / 'short.csv'}", tok)
    side.assign(x_word=1).to_parquet(tmp_path / "w.parquet")
    with pytest.raises(HeadstoreError, match=r"'x_word' of w\.parquet points into a text"):
        build(f"tokens:{tmp_path / 'toks.npy'},{tmp_path / 'w.parquet'}", tok)
    side.assign(tokens=1).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(HeadstoreError, match=r"'tokens' of t\.csv has the name of a store array"):
        build(f"tokens:{tmp_path / 'toks.npy'},{tmp_path / 't.csv'}", tok)


# --- the real command line -------------------------------------------------------------------------


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("headstore")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "headstore.cli"]


BASE = ["extract", "--model", "tiny-gpt2", "--batch-size", "4", "--device", "cpu", "--no-progress"]


def _bad_cli_cases(where: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (extract arguments, what the one error line must say)."""
    np.save(where / "toks.npy", np.ones((3, 5), np.int64))
    pd.DataFrame({"n": [1, 2]}).to_csv(where / "two.csv", index=False)
    rows: dict[str, list[dict[str, Any]]] = {
        "two-tokens": [{"text": TEXT, "io_token_str": " Mary"}, {"text": TEXT, "io_token_str": " Mary John"}],
        "float": [{"text": TEXT, "score": 1.5}],
        "too-long": [{"text": TEXT}],
    }
    data = {name: f"jsonl:{write_jsonl(where / f'{name}.jsonl', r)}" for name, r in rows.items()}
    return {
        "two-tokens": (["--data", data["two-tokens"]], "row 1 of two-tokens.jsonl: io_token_str ' Mary John' is 2 tokens"),
        "float": (["--data", data["float"]], "column 'score' of float.jsonl holds floats"),
        "too-long": (["--data", data["too-long"], "--seq-len", "8"], "has 15 tokens but --seq-len is 8: raise --seq-len"),
        "sidecar-rows": (["--data", f"tokens:{where / 'toks.npy'},{where / 'two.csv'}"], "two.csv has 2 rows but the token array has 3"),
    }  # fmt: skip


def _one_error_line(stderr: str, must: str) -> None:
    lines = [ln for ln in stderr.splitlines() if ln.strip() and "Warning" not in ln and "warnings.warn" not in ln]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert must in lines[0], lines[0]
    assert "Traceback" not in stderr


def test_cli_refuses_bad_files_in_one_line(tmp_path: Path) -> None:
    """Through typer's runner (in process): exit 2, one line on stderr, no store and no temporary folder."""
    from typer.testing import CliRunner

    from headstore.cli import app

    for name, (args, must) in _bad_cli_cases(tmp_path).items():
        res = CliRunner().invoke(app, [*BASE, *args, "--out", str(tmp_path / f"{name}.zarr")])
        assert res.exit_code == 2, (name, res.output)
        _one_error_line(res.stderr, must)
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == []


def test_cli_subprocess_own_prompts(tmp_path: Path, tok: Any) -> None:
    """The real ``headstore extract`` (two processes side by side): a refused file exits 2 with one line
    and leaves nothing; a good one (char offsets) stores what the Python API stores for word offsets."""
    good = write_jsonl(tmp_path / "good.jsonl", researcher_rows(tok, 4, 2, "char"))
    word = write_jsonl(tmp_path / "word.jsonl", researcher_rows(tok, 4, 2, "word"))
    bad_args, must = _bad_cli_cases(tmp_path)["two-tokens"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    runs = {
        "bad": [*bad_args, "--out", str(tmp_path / "bad.zarr")],
        "good": ["--data", f"jsonl:{good}", "--fields", ",".join(SMALL), "--out", str(tmp_path / "good.zarr")],
    }
    procs = {
        name: subprocess.Popen([*_cli(), *BASE, *args], cwd=tmp_path, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for name, args in runs.items()
    }  # fmt: skip
    out = {name: (*p.communicate(timeout=300), p.returncode) for name, p in procs.items()}
    _, err, code = out["bad"]
    assert code == 2, err
    _one_error_line(err, must)
    _, err, code = out["good"]
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["good.zarr"]  # nothing of the refused run
    got = headstore.open_store(tmp_path / "good.zarr")
    want = headstore.open_store(run_extract(tmp_path / "word.zarr", f"jsonl:{word}", fields=SMALL))
    np.testing.assert_array_equal(got["tokens"].values, want["tokens"].values)
    for c in IOI_COLUMNS:
        np.testing.assert_array_equal(got[c].values, want[c].values, err_msg=c)
