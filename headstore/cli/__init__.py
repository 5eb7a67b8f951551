"""``headstore`` command line: a thin layer over extract, open_store/validate and the analyzers."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from headstore.analyze.registry import get_analyzer
from headstore.cli import report_cmds
from headstore.cli.malloc import restart_tuned
from headstore.store_schema import HeadstoreError, Provenance

console = Console()
err = Console(stderr=True)


def _close_progress_bars() -> None:
    """Close every open tqdm bar (it ends its line), so that what is printed next starts a line of its own."""
    std = sys.modules.get("tqdm.std")  # tqdm not imported: no bar to close
    if std is not None:
        for bar in list(std.tqdm._instances):
            bar.close()


def _fail(e: BaseException) -> typer.Exit:
    """Print ``e`` as the last line of the output, on a line of its own, and exit with status 2."""
    _close_progress_bars()
    err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
    return typer.Exit(code=2)


class _Commands(TyperGroup):
    """The one error handler: a command's ``HeadstoreError`` becomes one line on stderr (``_fail``)."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except HeadstoreError as e:
            raise _fail(e) from None


app = typer.Typer(
    cls=_Commands,
    add_completion=False,
    no_args_is_help=True,
    help="Precomputed activation store for attention heads.",
)


@app.command()
def extract(
    model: Annotated[str, typer.Option(help="smollm2-135m, tiny-gpt2, tiny-llama, a HF id or a model folder")],
    data: Annotated[
        str | None,
        typer.Option(
            help="ioi, ioi-abc, text[:PATHS], code-ifelse[:PATHS], repeated-random, tokens:FILE.npy[,COLUMNS], jsonl:FILE, csv:FILE, parquet:FILE (your own prompts), hf:NAME[:CONFIG][:SPLIT][,column=C][,shuffle=SEED][,streaming] (a Hugging Face dataset)"
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="store folder to create (or resume)")] = None,
    fields: Annotated[
        str,
        typer.Option(
            help="comma list: presets auto (default,-z, and q,k instead of pattern where smaller at seq_len; "
            "z and pattern derived on open), default, all, compact (= default,-pattern,q,k), field names "
            "(q, k, z, result...), -NAME drops one"
        ),
    ] = "auto",
    layers: Annotated[str, typer.Option(help="all, 0,3,5 or 2-5")] = "all",
    pattern_layers: Annotated[
        str, typer.Option(help="extracted layers whose pattern is stored (others read as NaN): all, 0,3,5 or 2-5")
    ] = "all",
    seq_len: Annotated[int | None, typer.Option(help="tokens per sequence (default: per dataset)")] = None,
    batch_size: Annotated[int, typer.Option(help="sequences per forward pass (= chunk along batch)")] = 8,
    n_seq: Annotated[int | None, typer.Option(help="number of sequences")] = None,
    n_tokens: Annotated[int | None, typer.Option(help="instead of --n-seq: ceil(N / seq_len) sequences")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1")] = "auto",
    dtype: Annotated[
        str,
        typer.Option(
            help="storage dtype of activations: float32 or float16 (a value beyond float16's range is refused, never stored as inf)"
        ),
    ] = "float32",
    model_dtype: Annotated[
        str,
        typer.Option(
            help="dtype the model runs in: float32, bfloat16 (as GPU jobs run; store as --dtype float16 or float32) or float16"
        ),
    ] = "float32",
    seed: Annotated[int, typer.Option(help="seed of generated datasets")] = 0,
    prepend_bos: Annotated[bool, typer.Option(help="prepend BOS to each sequence")] = True,
    shard: Annotated[str, typer.Option(help="i/N: fill the i-th of N disjoint batch ranges")] = "0/1",
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    layout: Annotated[
        str,
        typer.Option(
            help="files of a new store: sharded (one file per field and batch, all layers) or chunked (one per layer too)"
        ),
    ] = "sharded",
    weights: Annotated[
        str | None,
        typer.Option(
            help="shared weights store to create or reuse (W_E, W_EE, W_U, ... once per model); the store references it"
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            help="print the plan (bytes per field, files, disk, weights, time from one timed batch) and write nothing; "
            "--model a config.json (or a folder with only one): planned from its shapes, no weights or data"
        ),
    ] = False,
    ignore_space: Annotated[
        bool, typer.Option(help="start even when the target has less free space than the plan")
    ] = False,
    grad: Annotated[
        str | None,
        typer.Option(
            help="store gradients of a metric (+ resid_pre): loss, logit:TOK@POS or logit-diff:TOK_A,TOK_B@POS, "
            "TOK an id or a column (io_token), POS an int or a column (end_pos)"
        ),
    ] = None,
    grad_ig: Annotated[
        int | None,
        typer.Option(
            help="EAP-IG: average the --grad gradients over STEPS points from the --corrupt to the clean input"
        ),
    ] = None,
    corrupt: Annotated[
        str | None, typer.Option(help="EAP-IG's corrupt twin of --data, of the same shape (e.g. ioi-abc for ioi)")
    ] = None,
) -> None:
    """Run the model once over the data and write every per-head field into a Zarr store."""
    from headstore.cli.extract_args import fields_option, layers_option, shard_option
    from headstore.extract.plan_config import config_only, plan_from_config
    from headstore.extract.request import ExtractRequest

    names, drop = fields_option(fields)
    req = ExtractRequest(
        model=model, data=data or "", out="" if out is None else str(out), fields=names, drop=drop,
        layers=layers_option(layers), pattern_layers=layers_option(pattern_layers, "--pattern-layers"),
        seq_len=seq_len, batch_size=batch_size, n_seq=n_seq, device=device, dtype=dtype, model_dtype=model_dtype,
        seed=seed, prepend_bos=prepend_bos, shard=shard_option(shard), progress=progress, layout=layout,
        weights=weights, dry_run=dry_run, ignore_space=ignore_space, grad=grad, n_tokens=n_tokens,
        grad_ig=grad_ig, corrupt=corrupt,
    )  # fmt: skip
    config = config_only(model) if dry_run else None
    if config is not None:  # planned from the config alone, torch never imported (extract() would do the same)
        _print_plan(plan_from_config(req, config))
        return
    from headstore.extract import extract as run_extract

    res = run_extract(req)
    if dry_run and res.plan is not None:
        _print_plan(res.plan)
        return
    console.print(
        f"{res.path}: {res.n_sequences} sequences; wrote {res.written} batches, "
        f"{res.skipped} already done, {res.seconds:.1f} s (set-up {res.setup_seconds:.1f} s, "
        f"{res.n_tokens_written / max(res.fill_seconds, 1e-9):.0f} tokens/s while filling)"
    )


def _print_plan(plan: Any) -> None:
    """A dry run's plan, line by line (``extract.plan.Plan.lines``)."""
    for line in plan.lines():
        console.print(line, highlight=False, soft_wrap=True)
    console.print("dry run: nothing written", highlight=False)


@app.command()
def info(store: str, as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """Schema, model, dataset, fields, sizes on disk, bytes per token, completeness."""
    from headstore.store_schema.read.info import store_info

    data = store_info(store)
    if as_json:
        console.print_json(json.dumps(data))
        return
    prov = Provenance.from_dict(data["provenance"])
    _print_provenance(store, prov)
    console.print(f"complete   {data['n_complete']}/{data['n_sequences']} sequences; done ranges {data['done_ranges']}")
    t = Table("array", "MB on disk", "bytes/token")
    for name, (nbytes, per_tok) in data["sizes"].items():
        t.add_row(name, f"{nbytes / 1e6:.2f}", f"{per_tok:.1f}")
    console.print(t)
    files = "" if data["n_files"] is None else f", {data['n_files']} files ({prov.layout} layout)"
    console.print(
        f"total {data['total_bytes'] / 1e6:.2f} MB, {data['bytes_per_token']:.0f} bytes/token{files}", soft_wrap=True
    )


def _print_provenance(store: str, prov: Provenance) -> None:
    """``headstore info``'s lines on what the store was made from."""
    console.print(f"[bold]{store}[/bold]  schema v{prov.schema_version}")
    m = prov.model
    console.print(
        f"model      {m.name}  ({m.config.get('architecture', '')}, runs in {m.dtype or 'float32'}, "
        f"processing {m.processing})"
    )
    console.print(f"weights    sha256 {m.weights_sha256[:16]}...")
    if prov.weights_store is not None:
        ref = prov.weights_store
        console.print(
            f"           {', '.join(ref.arrays)} from weights store {ref.path} (sha256 {ref.sha256[:16]}...)",
            soft_wrap=True,
        )
    console.print(f"tokenizer  {prov.tokenizer.name}  vocab {prov.tokenizer.vocab_size}")
    d = prov.dataset
    console.print(f"dataset    {d.kind} ({d.spec})  {d.n_sequences} sequences x {prov.seq_len} tokens")
    layers = list(prov.layers)
    console.print(f"layers     {layers}  dtype {prov.storage_dtype}  batch {prov.batch_size}")
    derived = "" if prov.derived is None else f"; derived on open: {', '.join(prov.derived) or '(none)'}"
    console.print(f"fields     stored: {', '.join(prov.fields)}{derived}", soft_wrap=True)
    if "pattern" in prov.fields:
        pl = None if prov.pattern_layers is None else list(prov.pattern_layers)
        rest = "" if pl in (None, layers) else " (the other layers are not stored: NaN)"
        console.print(f"pattern    layers {layers if pl is None else pl}{rest}")
    if prov.grad is not None:
        ig = "" if prov.corrupt is None else f"; EAP-IG, {prov.grad_ig} steps from {prov.corrupt.spec}"
        console.print(f"gradients  of {prov.grad} (grad_z, grad_q, grad_k, grad_v, grad_mlp_in, grad_resid_final{ig})")


@app.command()
def validate(store: str) -> None:
    """Check schema, shapes, dtypes, completeness and every chunk's checksum (a weights store: chunks and hash)."""
    from headstore.store_schema import validate as run_validate

    rep = run_validate(store)
    for p in rep.problems:
        err.print(f"[red]problem:[/red] {p}", highlight=False)
    if rep.weights_sha256 is not None:
        console.print(
            f"{store}: a weights store (sha256 {rep.weights_sha256[:12]}...), every chunk and its hash checked, "
            f"{len(rep.problems)} problems; the stores made with it check its hash again when opened",
            soft_wrap=True,
        )
    else:
        console.print(f"{store}: {rep.n_complete}/{rep.n_sequences} sequences complete, {len(rep.problems)} problems")
    if not rep.ok:
        raise typer.Exit(code=1)


@app.command()
def analyze(
    name: Annotated[str, typer.Argument(help="analyzer name (headstore analyzers lists them)")],
    stores: Annotated[list[str], typer.Argument(help="store path(s) or URL(s)")],
    out: Annotated[Path, typer.Option(help="output folder")] = Path("headstore-out"),
    param: Annotated[list[str] | None, typer.Option("--param", "-p", help="analyzer option key=value")] = None,
    scheduler: Annotated[str | None, typer.Option(help="address of a dask.distributed scheduler")] = None,
    partial: Annotated[bool, typer.Option(help="analyse only the completed part of an incomplete store")] = False,
    top: Annotated[int, typer.Option(help="rows of the summary to print")] = 10,
    progress: Annotated[bool, typer.Option(help="show a progress bar for computations over 1 s")] = True,
) -> None:
    """Run one analyzer on a store: writes result.zarr, summary.csv, PNG and HTML plots under OUT/NAME."""
    from headstore.cli.registry import analyzers
    from headstore.cli.run import run_analyzer

    get_analyzer(name)  # an unknown name: one line listing the analyzers
    summary, paths = run_analyzer(
        analyzers()[name],
        stores,
        out,
        param_strings=param or [],
        scheduler=scheduler,
        partial=partial,
        progress=progress,
    )
    t = Table(*[str(c) for c in summary.columns], title=f"{name}: top {min(top, len(summary))}")
    for row in summary.head(top).itertuples(index=False):
        t.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row])
    console.print(t)
    for p in paths:
        console.print(f"wrote {p}")


@app.command("run")
def run_main(
    out: Annotated[Path, typer.Option(help="output folder for stores, analyses and reports")] = Path("headstore-out"),
    model: Annotated[str, typer.Option(help="model to run")] = "smollm2-135m",
    n_ioi: Annotated[int, typer.Option(help="IOI prompts (and as many ABC twins)")] = 32,
    n_text: Annotated[int, typer.Option(help="text windows of 128 tokens (calibration)")] = 32,
    text_data: Annotated[
        str | None,
        typer.Option(help="the text store's --data, e.g. hf:stas/openwebtext-10k (default: the stdlib's docstrings)"),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda")] = "auto",
) -> None:
    """The main job: a head census of the model, the seeds' experiments on heads chosen from the data, reports."""
    from headstore.pipeline import MainJob, run_main_job

    run_main_job(MainJob(out=out, model=model, n_ioi=n_ioi, n_text=n_text, text_data=text_data, device=device))
    console.print(f"done: everything is under {out}/")


@app.command("analyzers")
def list_analyzers() -> None:
    """List the analyzers and what each needs in the store."""
    from headstore.cli.registry import analyzers

    t = Table("name", "needs", "options", "about")
    for spec in analyzers().values():
        t.add_row(spec.name, ", ".join(spec.requires), ", ".join(spec.params), spec.doc)
    console.print(t)


app.command()(report_cmds.report)
app.command()(report_cmds.dashboard)


@app.command()
def pack(
    store: Annotated[Path, typer.Argument(help="a local store (it may reference a shared weights store)")],
    out: Annotated[Path, typer.Argument(help="the self-contained copy to write")],
) -> None:
    """Write a self-contained copy of a store: the weights it takes from a shared weights store copied in."""
    from headstore.store_schema.write.weights import pack as run_pack

    path = run_pack(store, out)
    console.print(f"wrote {path} (self-contained)")


@app.command()
def serve(
    folder: Annotated[
        Path, typer.Argument(help="folder to serve (stores inside it are read as http://HOST:PORT/NAME.zarr)")
    ] = Path("."),
    port: Annotated[int, typer.Option(help="port")] = 8000,
    host: Annotated[str, typer.Option(help="address to bind (0.0.0.0: every interface)")] = "127.0.0.1",
) -> None:
    """Serve a folder of stores over HTTP with byte ranges (what sharded stores are read with)."""
    from headstore.cli.serve import make_server

    if not folder.is_dir():
        raise HeadstoreError(f"{folder} is not a folder: give a folder of stores to serve")
    server = make_server(str(folder), host, port)
    console.print(f"serving {folder} at http://{host}:{server.server_address[1]}/ (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main() -> None:
    if sys.argv[1:2] == ["extract"] and "--dry-run" not in sys.argv:  # a job process: malloc settings (malloc.py)
        restart_tuned(["-m", "headstore.cli", *sys.argv[1:]])
    try:  # typer >= 0.2x vendors click as typer._click
        from typer._click.exceptions import ClickException, NoArgsIsHelpError
    except ImportError:  # pragma: no cover
        from click.exceptions import ClickException, NoArgsIsHelpError  # type: ignore[assignment]

    try:
        rv = app(standalone_mode=False)  # a command's HeadstoreError: _Commands.invoke
    except NoArgsIsHelpError as e:  # bare `headstore` / `headstore CMD`: show help
        print(e.ctx.get_help() if e.ctx else "")
        sys.exit(e.exit_code)
    except ClickException as e:  # bad option/value: one line, not a usage box
        msg = " ".join(e.format_message().split())
        err.print(f"error: {msg} (see --help)", highlight=False, soft_wrap=True, markup=False)
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
