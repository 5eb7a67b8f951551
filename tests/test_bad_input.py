"""Bad input never crashes with a traceback: malformed attrs and nonsense CLI options are one-line errors
that change nothing at --out."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from headstore.cli import app
from headstore.store_schema import HeadstoreError, Provenance, read_provenance
from headstore.store_schema.layout import SCHEMA_VERSION

ROOT = Path(__file__).resolve().parents[1]
BASE = ["extract", "--model", "tiny-gpt2", "--data", "ioi", "--n-seq", "8", "--batch-size", "4", "--device", "cpu"]
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def good_attrs(make_store: Callable[..., Path]) -> dict[str, Any]:
    return read_provenance(make_store("tiny-gpt2", "ioi")).to_dict()


# --- Provenance.from_dict -------------------------------------------------------------------------

json_leaf = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True) | st.text(max_size=8)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
KEYS = [
    "schema_version", "model", "tokenizer", "dataset", "prepend_bos", "seq_len", "storage_dtype",
    "fields", "layers", "batch_size", "versions", "created", "pattern_layers",
]  # fmt: skip


@SETTINGS
@given(d=json_value | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), json_value, max_size=12))
def test_from_dict_random_input_is_headstore_error(d: Any) -> None:
    with pytest.raises(HeadstoreError) as ei:
        Provenance.from_dict(d)
    assert "\n" not in str(ei.value)


@SETTINGS
@given(data=st.data())
def test_from_dict_mutated_valid_attrs(good_attrs: dict[str, Any], data: st.DataObject) -> None:
    """Drop keys and swap values (top level and inside model/config) of real attrs: valid or HeadstoreError."""
    d = json.loads(json.dumps(good_attrs))
    for key in data.draw(st.lists(st.sampled_from(KEYS), max_size=3, unique=True), label="drop"):
        d.pop(key, None)
    for key in data.draw(st.lists(st.sampled_from(KEYS), max_size=3, unique=True), label="swap"):
        d[key] = data.draw(json_value, label=key)
    if data.draw(st.booleans(), label="break model"):
        target = d.get("model")
        if isinstance(target, dict):
            sub = target.get("config") if data.draw(st.booleans()) else target
            if isinstance(sub, dict) and sub:
                k = data.draw(st.sampled_from(sorted(sub)))
                if data.draw(st.booleans()):
                    del sub[k]
                else:
                    sub[k] = data.draw(json_value)
    try:
        prov = Provenance.from_dict(d)
    except HeadstoreError as e:
        assert "\n" not in str(e)
        return
    # accepted: it must round-trip and have sane types
    assert Provenance.from_dict(prov.to_dict()) == prov
    assert isinstance(prov.seq_len, int) and prov.seq_len > 0


def test_from_dict_accepts_real_attrs(good_attrs: dict[str, Any]) -> None:
    prov = Provenance.from_dict(good_attrs)
    assert prov.schema_version == SCHEMA_VERSION
    assert Provenance.from_dict(prov.to_dict()) == prov


def test_typed_parts_write_the_attrs_json_key_for_key(good_attrs: dict[str, Any]) -> None:
    """The parts are typed (no dict read by string keys), and ``to_dict`` writes back the JSON the store holds,
    in the same key order; a store made before ``model.dtype`` was recorded keeps it absent."""
    from headstore.store_schema.provenance_parts import DatasetInfo, ModelInfo, TokenizerInfo

    prov = Provenance.from_dict(good_attrs)
    assert isinstance(prov.model, ModelInfo) and prov.model.name == good_attrs["model"]["name"] == "tiny-gpt2"
    assert (
        isinstance(prov.tokenizer, TokenizerInfo) and prov.tokenizer.vocab_size == good_attrs["tokenizer"]["vocab_size"]
    )
    assert isinstance(prov.dataset, DatasetInfo) and prov.dataset.kind == "ioi" and prov.dataset.n_sequences == 12
    assert json.dumps(prov.to_dict()) == json.dumps(good_attrs)
    old = {**good_attrs, "model": {k: v for k, v in good_attrs["model"].items() if k != "dtype"}}
    again = Provenance.from_dict(old)
    assert again.model.dtype is None and again.identity()["model.dtype"] == "float32"
    assert json.dumps(again.to_dict()) == json.dumps(old)


@pytest.mark.parametrize(
    ("part", "patch", "msg"),
    [
        (
            "model",
            {"weights_sha256": 7},
            r"^store attr model\.weights_sha256 must be a str, got 7: the store is damaged",
        ),
        ("model", {"dtype": None}, r"^store attr model\.dtype must be a str"),
        ("tokenizer", {"bos_token_id": "1"}, r"^store attr tokenizer\.bos_token_id must be a int\|None"),
        ("dataset", {"n_sequences": True}, r"^store attr dataset\.n_sequences must be a int"),
        ("dataset", {"options": []}, r"^store attr dataset\.options must be a dict"),
        (
            "weights_store",
            {"path": "w.zarr", "sha256": "0" * 64, "arrays": "W_U"},
            r"^store attr weights_store must be",
        ),
    ],
)
def test_typed_parts_refuse_wrong_types(good_attrs: dict[str, Any], part: str, patch: dict[str, Any], msg: str) -> None:
    d = json.loads(json.dumps(good_attrs))
    d[part] = patch if part == "weights_store" else {**d[part], **patch}
    with pytest.raises(HeadstoreError, match=msg) as e:
        Provenance.from_dict(d)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("patch", "msg"),
    [
        ({"schema_version": "1"}, "integer schema_version"),
        ({"schema_version": True}, "integer schema_version"),
        ({"schema_version": 0}, "older than"),
        ({"seq_len": -3}, "positive integer"),
        ({"seq_len": 2.5}, "must be a int"),
        ({"fields": ["z", "nope"]}, "unknown fields"),
        ({"fields": [["z"]]}, "unknown fields"),
        ({"fields": [{"a": 1}]}, "unknown fields"),
        ({"layers": [0, "1"]}, "list of integers"),
        ({"storage_dtype": "float64"}, "storage_dtype"),
        ({"model": {"name": "x"}}, "model.config"),
    ],
)
def test_from_dict_specific_problems(good_attrs: dict[str, Any], patch: dict[str, Any], msg: str) -> None:
    with pytest.raises(HeadstoreError, match=msg):
        Provenance.from_dict({**good_attrs, **patch})


# --- CLI -------------------------------------------------------------------------------------------


def snapshot(where: Path) -> dict[str, tuple[int, str]]:
    """Every file under the parent of --out (so stray temp folders beside it count too)."""
    return {
        str(p.relative_to(where)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(where.rglob("*"))
        if p.is_file()
    } | {str(p.relative_to(where)) + "/": (0, "") for p in where.rglob("*") if p.is_dir()}


def assert_one_line_error(stderr: str, exit_code: int, must: str) -> None:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert exit_code != 0
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert lines[0].startswith("error:"), stderr
    assert must.lower() in lines[0].lower(), lines[0]


def _prepare(kind: str, where: Path) -> Path:
    out = where / "out.zarr"
    if kind == "file":
        out.write_text("not a store")
    elif kind == "empty-dir":
        out.mkdir()
    elif kind == "zarr-v2":
        zarr.open_group(str(out), mode="w", zarr_format=2).create_array("x", shape=(3,), dtype="i4")
    elif kind == "zarr-v3-foreign":
        g = zarr.open_group(str(out), mode="w", zarr_format=3)
        g.attrs["other"] = 1
        g.create_array("x", shape=(3,), dtype="i4")
    elif kind == "random-dir":
        out.mkdir()
        (out / "notes.txt").write_text("hello")
    return out


CASES: list[tuple[list[str], str, str]] = [
    # (extra args replacing the defaults, kind of --out, text the error must contain)
    (["--model", "no-such-model"], "none", "unknown model"),
    (["--fields", "default,bogus"], "none", "unknown field 'bogus'"),
    (["--fields", ""], "none", ""),  # empty field list means tokens only: allowed; see the test
    (["--seq-len", "129"], "none", "over the model's context of 128"),
    (["--seq-len", "1"], "none", "too short"),
    (["--n-seq", "0"], "none", "--n-seq must be positive"),
    (["--n-seq", "-5"], "none", "--n-seq must be positive"),
    (["--batch-size", "-4"], "none", "--batch-size must be positive"),
    (["--batch-size", "0"], "none", "--batch-size must be positive"),
    (["--shard", "2/2"], "none", "--shard"),
    (["--shard", "1/0"], "none", "--shard"),
    (["--shard", "a/b"], "none", "--shard"),
    (["--shard", "0"], "none", "--shard"),
    (["--layers", "7"], "none", "--layers names [7]"),
    (["--layers", "-1"], "none", "--layers"),
    (["--layers", "1-x"], "none", "--layers"),
    (["--layers", "0-1-2"], "none", "--layers"),
    (["--dtype", "float64"], "none", "--dtype"),
    (["--dtype", "bfloat16"], "none", "--dtype"),
    (["--data", "nonsense"], "none", "unknown data"),
    (["--data", "tokens:missing.npy"], "none", "does not exist"),
    (["--device", "cuda:7"] if not __import__("torch").cuda.is_available() else ["--device", "tpu"], "none", "device"),
    ([], "file", "is a file"),
    ([], "empty-dir", "empty folder"),
    ([], "zarr-v2", "not a Zarr v3 store"),
    ([], "zarr-v3-foreign", "not a headstore store"),
    ([], "random-dir", "not a Zarr v3 store"),
]


def _argv(extra: list[str], out: Path) -> list[str]:
    opts = dict(zip(BASE[1::2], BASE[2::2], strict=True))
    opts.update(zip(extra[::2], extra[1::2], strict=True))
    return ["extract", *[x for kv in opts.items() for x in kv], "--out", str(out), "--no-progress"]


@pytest.mark.parametrize(("extra", "kind", "must"), [c for c in CASES if c[2]], ids=lambda x: str(x)[:30])
def test_cli_bad_input_one_line_and_nothing_written(tmp_path: Path, extra: list[str], kind: str, must: str) -> None:
    work = tmp_path / "w"
    work.mkdir()
    out = _prepare(kind, work)
    before = snapshot(work)
    old = Path.cwd()
    os.chdir(work)  # relative paths such as tokens:missing.npy resolve here
    try:
        res = CliRunner().invoke(app, _argv(extra, out))
    finally:
        os.chdir(old)
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert_one_line_error(res.stderr, res.exit_code, must)
    assert res.exit_code == 2
    assert snapshot(work) == before


@pytest.mark.parametrize("empty", ["tokens", "text"])
def test_cli_empty_dataset(tmp_path: Path, empty: str) -> None:
    if empty == "tokens":
        src = tmp_path / "empty.npy"
        np.save(src, np.zeros((0, 8), dtype=np.int64))
    else:
        src = tmp_path / "empty.txt"
        src.write_text("")
    out = tmp_path / "out.zarr"
    before = snapshot(tmp_path)
    res = CliRunner().invoke(app, _argv(["--data", f"{empty}:{src}"], out))
    assert_one_line_error(res.stderr, res.exit_code, "gave no sequences")
    assert snapshot(tmp_path) == before


def test_cli_bad_token_files(tmp_path: Path) -> None:
    cases = {
        "pickled.npy": np.array([{"a": 1}], dtype=object),
        "floats.npy": np.zeros((2, 8), dtype=np.float32),
        "oned.npy": np.zeros(8, dtype=np.int64),
        "huge.npy": np.full((2, 8), 10**9, dtype=np.int64),
    }
    for name, arr in cases.items():
        np.save(tmp_path / name, arr, allow_pickle=True)
    (tmp_path / "garbage.npy").write_bytes(b"\x93NUMPY garbage")
    for name in [*cases, "garbage.npy"]:
        out = tmp_path / f"out-{name}.zarr"
        before = snapshot(tmp_path)
        res = CliRunner().invoke(app, _argv(["--data", f"tokens:{tmp_path / name}"], out))
        assert_one_line_error(res.stderr, res.exit_code, str(tmp_path / name))
        assert snapshot(tmp_path) == before, name


def test_cli_tokens_only_field_list_is_allowed(tmp_path: Path) -> None:
    """``--fields ''`` is not an error: tokens (always stored) only."""
    out = tmp_path / "t.zarr"
    res = CliRunner().invoke(app, _argv(["--fields", ""], out))
    assert res.exit_code == 0, res.output
    assert read_provenance(out).fields == ("tokens",)


@pytest.mark.parametrize(
    ("args", "must"),
    [
        (["--batch-size", "abc"], "--batch-size"),
        (["--no-such-option", "1"], "no-such-option"),
        (["--dtype", "float64"], "--dtype"),
    ],
)
def test_cli_subprocess_exit_codes(tmp_path: Path, args: list[str], must: str) -> None:
    """The real entry point: parse errors from typer too must be one line, exit 2, nothing written."""
    out = tmp_path / "o.zarr"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    res = subprocess.run(
        [sys.executable, "-m", "headstore.cli", *_argv(args, out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    stderr = "\n".join(ln for ln in res.stderr.splitlines() if "Warning" not in ln and "warnings.warn" not in ln)
    assert res.returncode == 2, res.stderr
    assert_one_line_error(stderr, res.returncode, must)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


# --- ExtractRequest takes Python values; the CLI turns its strings into them -------------------------

FIELD_SPECS = ["default", "all", "compact", "", "default,q,k", "default,-pattern,q,k", "-pattern, q ,default,k",
               "all,-result,-resid_pre", "compact,pattern", "default,-loss,-z", "tokens,pattern"]  # fmt: skip


@pytest.mark.parametrize("spec", FIELD_SPECS)
def test_fields_option_selects_what_the_string_parser_selects(spec: str) -> None:
    from headstore.cli.extract_args import fields_option
    from headstore.extract import ExtractRequest
    from headstore.store_schema import parse_fields

    names, drop = fields_option(spec)
    assert all(isinstance(x, str) and "," not in x and not x.startswith("-") for x in (*names, *drop))
    req = ExtractRequest(model="tiny-gpt2", data="ioi", out="x.zarr", fields=names, drop=drop)
    assert req.selected_fields() == parse_fields(spec)


def test_layers_and_shard_options_become_ints() -> None:
    from headstore.cli.extract_args import layers_option, shard_option

    assert layers_option("all") == "all" and layers_option("") == "all"
    assert layers_option("2-4,0,3") == (0, 2, 3, 4)
    assert layers_option("1", "--pattern-layers") == (1,)
    assert shard_option("1/3") == (1, 3)
    with pytest.raises(HeadstoreError, match=r"^--pattern-layers '4-2' is not 'all'"):
        layers_option("4-2", "--pattern-layers")


@pytest.mark.parametrize(
    ("kw", "must"),
    [
        ({"fields": "default,q"}, r"^fields='default,q', drop=\(\): give tuples of names"),
        ({"drop": "pattern"}, r"give tuples of names"),
        ({"fields": ("default", "bogus")}, r"unknown field 'bogus'"),
        ({"drop": ("tokens",)}, r"tokens is always stored"),
        ({"fields": ("q",), "drop": ("pattern",)}, r"dropping pattern, which no other item selects"),
        ({"layers": "1"}, r"^--layers '1': give 'all' or a tuple of layer indices"),
        ({"layers": (0, -1)}, r"^--layers \(0, -1\): give 'all' or a tuple"),
        ({"layers": ()}, r"^--layers \(\): give 'all' or a tuple"),
        ({"pattern_layers": [1]}, r"^--pattern-layers \[1\]: give 'all' or a tuple"),
        ({"shard": "0/1"}, r"^--shard '0/1' must be a pair \(index, count\)"),
        ({"shard": (2, 2)}, r"^--shard \(2, 2\) needs 0 <= index < count$"),
        ({"shard": (0, True)}, r"must be a pair"),
        ({"batch_size": 0}, r"^--batch-size must be positive, got 0$"),
        ({"dtype": "bfloat16"}, r"^--dtype 'bfloat16': choose float32 or float16$"),
        ({"layout": "flat"}, r"^--layout 'flat': choose sharded or chunked$"),
    ],
)
def test_extract_request_refuses_wrong_types_and_values(kw: dict[str, Any], must: str) -> None:
    from headstore.extract import ExtractRequest

    with pytest.raises(HeadstoreError, match=must) as e:
        ExtractRequest(model="tiny-gpt2", data="ioi", out="x.zarr", **kw)
    assert "\n" not in str(e.value)
