"""``extract --dry-run`` from a model's config.json alone: the per-field sizes of the store a real extraction writes."""

from __future__ import annotations

import dataclasses
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zarr
from typer.testing import CliRunner

from headstore.cli import app
from headstore.store_schema import HeadstoreError, read_provenance

STORE_KW: dict[str, Any] = {"fields": ("all",), "n_seq": 10, "batch_size": 4}  # test_extract's: a short last batch


def _config_only(model: str, tmp_path: Path) -> Path:
    """A folder holding only the tiny model's config.json (no weights, no tokenizer)."""
    from headstore.extract.models import _tiny_folder

    folder = tmp_path / f"{model}-config"
    folder.mkdir()
    shutil.copy(_tiny_folder(model) / "config.json", folder / "config.json")
    return folder


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_config_plan_gives_the_bytes_and_files_of_the_store_written(
    model: str, tmp_path: Path, make_store: Callable[..., Path]
) -> None:
    from headstore.extract import ExtractRequest, extract

    store = make_store(model, "ioi", **STORE_KW)
    prov = read_provenance(store)
    s = prov.seq_len
    req = ExtractRequest(
        model=str(_config_only(model, tmp_path)), dry_run=True, seq_len=s, n_tokens=10 * s - 3,  # ceil: 10 sequences
        fields=("all",), batch_size=4,
    )  # fmt: skip
    plan = extract(req).plan
    assert plan is not None and plan.n_tokens == 10 * s and not list(tmp_path.glob("*.zarr"))
    assert [f.name for f in plan.fields] == [n for n in prov.fields if n != "tokens"]  # the family's fields
    for f in plan.fields:
        arr = zarr.open_array(store / f.name, mode="r")
        assert f.nbytes == math.prod(arr.shape) * arr.dtype.itemsize, f.name  # raw size: the store's shape
        files = [p for p in (store / f.name).rglob("*") if p.is_file()]
        assert f.files == len(files), f.name
        written = sum(p.stat().st_size for p in files)
        if f.name == "pattern":  # LZ4 over the causal zeros: estimated at the non-zero fraction
            assert f.total_bytes == pytest.approx(written, rel=0.15)
        else:  # uncompressed: values, a crc32c per inner chunk, the shard index, zarr.json, byte for byte
            assert f.total_bytes == written, f.name


def test_config_plan_sizes_from_the_config_shapes(tmp_path: Path) -> None:
    """A GQA Llama config with nothing else: the field sizes computed here from the config's numbers."""
    import json

    from headstore.extract.plan_config import config_only, plan_from_config
    from headstore.extract.request import ExtractRequest

    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 96, "num_hidden_layers": 3,
           "num_attention_heads": 6, "num_key_value_heads": 2, "vocab_size": 500, "max_position_embeddings": 256}  # fmt: skip
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    assert config_only(str(path)) == path and config_only(str(tmp_path)) == path
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert config_only(str(tmp_path)) is None  # a folder with weights loads the model
    auto = ExtractRequest(model=str(path), dry_run=True, seq_len=100, n_tokens=2_000, dtype="float16", batch_size=8)
    # --fields auto (the default): q + k take (6 + 2) x 16 values per layer and token, under the pattern's
    # 6 x 101 / 2 causal non-zeros; z derived on open
    assert {f.name for f in plan_from_config(auto, path).fields} == {
        "q", "k", "v", "ln1_scale", "ln2_scale", "ln_final_scale", "resid_final", "loss"
    }  # fmt: skip
    req = dataclasses.replace(auto, fields=("default",))
    plan = plan_from_config(req, path)
    n_seq, n_batches = 20, 3  # ceil(2000 / 100); ceil(20 / 8), the last one padded to 8
    by = {f.name: f for f in plan.fields}
    assert set(by) == {"pattern", "v", "z", "ln1_scale", "ln2_scale", "ln_final_scale", "resid_final", "loss"}
    per_seq = {"v": 3 * 100 * 2 * 16 * 2, "z": 3 * 100 * 6 * 16 * 2, "pattern": 3 * 6 * 100 * 100 * 2,
               "ln1_scale": 3 * 100 * 4, "resid_final": 100 * 96 * 4, "loss": 100 * 4}  # fmt: skip
    for name, b in per_seq.items():
        assert by[name].nbytes == n_seq * b, name
    # v: per batch one shard of 3 layer chunks (8 sequences each), each chunk + crc32c, + a 16-byte index entry each
    v_meta = by["v"].total_bytes - n_batches * (3 * (8 * 100 * 2 * 16 * 2 + 4) + 3 * 16 + 4)
    assert 0 < v_meta < 2_000 and by["v"].files == n_batches + 1  # + zarr.json
    assert by["pattern"].bytes_per_token == pytest.approx(3 * 6 * 100 * 2 * 101 / 200, rel=0.01)
    assert by["loss"].disk(4096) == by["loss"].files * 4096


def test_cli_plans_from_a_config_without_torch_data_or_out(
    tmp_path: Path, run_without_torch: Callable[[str], dict[str, Any]]
) -> None:
    folder = _config_only("tiny-llama", tmp_path)
    code = (
        "import contextlib, io, sys\nfrom headstore.cli import app\nbuf = io.StringIO()\n"
        f"sys.argv = ['headstore', 'extract', '--model', {str(folder)!r}, '--dry-run', '--seq-len', '64',"
        " '--n-tokens', '1000000', '--dtype', 'float16']\n"
        "with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):\n    app()\nout['text'] = buf.getvalue()"
    )
    text = run_without_torch(code)["text"]
    assert "1,000,000 tokens in 1954 batches" in text and "dry run: nothing written" in text
    fields = {line.split()[0] for line in text.splitlines()[1:] if line.startswith("  ")}
    assert fields == {"q", "k", "v", "ln1_scale", "ln2_scale", "ln_final_scale", "resid_final", "loss", "weights",
                      "other", "total"}, text  # --fields auto at 64 tokens: q, k instead of the pattern; z derived  # fmt: skip
    assert "on disk" in text and not list(Path.cwd().glob("*.zarr"))


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--dry-run", "--n-tokens", "1000"], "--n-tokens goes with --seq-len"),
        (["--dry-run", "--seq-len", "64"], "needs --seq-len and --n-tokens"),
        (["--dry-run", "--seq-len", "64", "--n-tokens", "100", "--n-seq", "3"], "without --n-seq"),
        (["--dry-run", "--seq-len", "4096", "--n-tokens", "10000"], "over the model's context"),
        (["--seq-len", "64", "--n-tokens", "100"], "needs --data and --out"),
    ],
)
def test_config_plan_bad_input_one_line(argv: list[str], says: str, tmp_path: Path) -> None:
    folder = _config_only("tiny-gpt2", tmp_path)
    res = CliRunner().invoke(app, ["extract", "--model", str(folder), *argv])
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and says in lines[0], res.output


def test_n_tokens_rounds_up_to_whole_sequences() -> None:
    from headstore.extract.request import ExtractRequest

    assert ExtractRequest(model="m", data="d", out="o", seq_len=128, n_tokens=1).n_sequences() == 1
    assert ExtractRequest(model="m", data="d", out="o", seq_len=128, n_tokens=256).n_sequences() == 2
    assert ExtractRequest(model="m", data="d", out="o", seq_len=128, n_tokens=257).n_sequences() == 3
    with pytest.raises(HeadstoreError, match="goes with --seq-len"):
        ExtractRequest(model="m", data="d", out="o", n_tokens=257)
