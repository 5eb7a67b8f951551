"""The HTML report: rendered from a real tiny store, then opened in headless Chromium to check that the
plots actually drew (DOM has plotly's SVGs and the token strings; the screenshot is not blank)."""

from __future__ import annotations

import collections
import dataclasses
import functools
import html
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from typer.testing import CliRunner

from headstore.cli.parse import parse_heads, parse_sequences
from headstore.cli.registry import analyzers
from headstore.report.attention_viewer import attention_viewer, display_token, sequence_length, token_strings
from headstore.report.embed import _Figures, plotly_figures_in_html
from headstore.report.page import render_report, write_report
from headstore.store_schema import HeadstoreError, open_store

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of a Chromium binary; installs Debian's ``chromium`` with apt when missing (CI does it too)."""
    found = _find_chromium()
    if found:
        return found
    if shutil.which("apt-get") is None:
        pytest.skip("chromium is not installed and apt-get is unavailable: install chromium to run the browser checks")
    prefix = [] if os.geteuid() == 0 else (["sudo", "-n"] if shutil.which("sudo") else None)
    if prefix is None:
        pytest.skip("chromium is not installed and we are not root (no sudo) to apt-get install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log = []
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]):
        try:
            p = subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=900, env=env)
        except (OSError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"cannot install chromium ({' '.join(cmd)}: {e})")
        log.append(p.stdout[-500:] + p.stderr[-500:])
        if p.returncode != 0:
            pytest.skip(f"cannot install chromium ({' '.join(cmd)} exited {p.returncode}): {log[-1]}")
    found = _find_chromium()
    if not found:
        pytest.skip(f"apt-get installed chromium but no binary was found: {log[-1]}")
    return found


def _chromium(binary: str, tmp: Path, url: str, *extra: str) -> subprocess.CompletedProcess[bytes]:
    profile = tmp / "chromium-profile"
    profile.mkdir(exist_ok=True)
    cmd = [
        binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
        f"--user-data-dir={profile}", "--virtual-time-budget=15000", *extra, url,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, timeout=300, cwd=tmp)


@pytest.fixture(scope="module")
def ioi_store(make_store: Callable[..., Path]) -> Path:
    return make_store("tiny-gpt2", "ioi", n_seq=8)


@pytest.fixture(scope="module")
def report_html(ioi_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The report written through the CLI, with an explicit viewer selection."""
    from headstore.cli import app

    out = tmp_path_factory.mktemp("report") / "report.html"
    res = CliRunner().invoke(
        app, ["report", str(ioi_store), "--out", str(out), "--sequences", "0,1", "--heads", "0.1,1.2", "--no-progress"]
    )
    assert res.exit_code == 0, res.output
    assert out.is_file()
    return out


# What the report on the one-store IOI fixture must say about each analyzer: (status, text in the reason).
EXPECTED_ON_IOI = {
    "calibration": ("ran", ""),
    "circuits": ("ran", ""),
    "copy-suppression": ("ran", ""),
    "ifelse-detector": ("not applicable", "store lacks split, subset"),
    "ioi": ("ran", ""),
    "ioi-pair": ("not applicable", "takes 2 store(s), report got 1"),
    # the token after end_pos is padding: the default target 'next' is refused (the main job passes io_token)
    "logit-attribution": ("skipped", "target 'next' needs a token after dest"),
    "path-patch-query": ("not applicable", "takes 2 store(s), report got 1"),
    "projection-loss": ("ran", ""),
}


def expected_status(spec: Any, ds: Any) -> str:
    """What the report must do with an analyzer on a one-store page, from its spec alone: 'not applicable'
    (two stores, or a variable the store lacks), 'skipped' (options without defaults), else 'ran'."""
    from headstore.report.analyzer_section import required_params

    if spec.n_stores != 1 or not all(r in ds for r in spec.requires):
        return "not applicable"
    return "skipped" if required_params(spec.func, 1) else "ran"


def status_rows(page: str) -> dict[str, tuple[str, str]]:
    """The analyzer status table of a report page: name -> (status, reason), unescaped."""
    start = page.index("hs-analyzer-status")
    table = page[start : page.index("</table>", start)]
    rows = re.findall(
        r"<tr><td>(?:<a [^>]*>)?([^<]+)(?:</a>)?</td><td class='status-[a-z]+'>([^<]+)</td><td>([^<]*)</td></tr>", table
    )
    assert len(rows) == table.count("<tr>") - 1, "every row but the header parsed"
    return {name: (html.unescape(st), html.unescape(why)) for name, st, why in rows}


def test_page_is_self_contained(report_html: Path) -> None:
    page = report_html.read_text(encoding="utf-8")
    # plotly.js inlined exactly once; no external scripts, styles or images
    assert len(re.findall(r"plotly\.js v\d", page)) == 1
    assert not re.search(r"<script[^>]+src=", page)
    assert not re.search(r"<link[^>]+href=", page)
    assert not re.search(r"<img[^>]+src=\"(?!data:)", page)
    # every figure is a div with its own newPlot call
    divs = re.findall(r'<div id="(hs-fig-\d+)" class="hs-plot">', page)
    assert len(divs) == len(set(divs)) >= 3
    for fid in divs:
        assert f'Plotly.newPlot("{fid}"' in page


def test_page_content(report_html: Path, ioi_store: Path) -> None:
    from headstore.store_schema.read.info import store_info

    page = report_html.read_text(encoding="utf-8")
    info = store_info(str(ioi_store))
    prov = info["provenance"]
    assert prov["model"]["weights_sha256"] in page
    assert prov["tokenizer"]["name"] in page
    assert "ioi" in page and "fold_ln" in page and "8/8 sequences complete" in page
    # every analyzer appears in the status table, each with the status this store must give it
    rows = status_rows(page)
    ds = open_store(ioi_store)
    specs = analyzers()
    assert set(rows) == set(specs)
    assert set(EXPECTED_ON_IOI) <= set(specs)
    for name, spec in specs.items():
        want, reason = EXPECTED_ON_IOI.get(name, (expected_status(spec, ds), ""))
        got_status, got_reason = rows[name]
        assert got_status == want, f"{name}: {got_status} ({got_reason}), expected {want}: see EXPECTED_ON_IOI"
        assert reason in got_reason, (name, got_reason)
        if name != "logit-attribution":  # the one refusal by the analyzer itself; the rest follow from the spec
            assert want == expected_status(spec, ds), name
    # the attention viewer: one figure per chosen sequence, a dropdown over the chosen heads
    assert "store: sequence 0 " in page and "store: sequence 1 " in page
    assert "head 0.1" in page and "head 1.2" in page


def test_rendered_in_chromium(report_html: Path, ioi_store: Path, chromium: str, tmp_path: Path) -> None:
    url = report_html.resolve().as_uri()
    dom = _chromium(chromium, tmp_path, url, "--dump-dom")
    assert dom.returncode == 0, dom.stderr.decode(errors="replace")[-2000:]
    text = dom.stdout.decode("utf-8", errors="replace")
    n_plots = len(re.findall(r'class="hs-plot[ "]', text))
    assert n_plots >= 3
    # plotly drew every figure: each plot div became a js-plotly-plot holding its main-svg layers
    assert text.count("js-plotly-plot") >= n_plots
    assert text.count("main-svg") >= 2 * n_plots
    # the heatmaps' axes carry the token strings of the chosen sequences (as SVG tick text)
    ds = open_store(ioi_store)
    for b in (0, 1):
        toks = token_strings(ds, b, sequence_length(ds, b))
        words = [display_token(t) for t in toks if t.strip() and t.strip().isalpha()]
        assert words
        ticks = re.findall(r'class="[xy]tick"><text[^>]*>([^<]*)</text>', text)
        for w in words:
            assert w in ticks, f"token {w!r} of sequence {b} is not on an axis"
    shot = tmp_path / "shot.png"
    res = _chromium(chromium, tmp_path, url, f"--screenshot={shot}", "--window-size=1400,3000")
    assert res.returncode == 0 and shot.is_file(), res.stderr.decode(errors="replace")[-2000:]
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (3000, 1400)
    assert float(img.std()) > 10.0  # not a blank page
    colours = np.unique(img.reshape(-1, 3), axis=0)
    assert len(colours) > 200  # heatmap colour ramps, not just text on white
    # plotly's heatmaps paint the RdBu/Blues ramps: many saturated blue-ish pixels
    r, bl = img[..., 0].astype(int), img[..., 2].astype(int)
    assert int(((bl - r) > 60).sum()) > 2000


def test_plotly_figures_roundtrip(tmp_path: Path) -> None:
    import plotly.graph_objects as go

    from headstore.report.plots import save_html

    fig = go.Figure(go.Heatmap(z=[[1, 2], [3, 4]], x=["a", "</script>"]), layout={"title": {"text": "t"}})
    path = save_html(fig, tmp_path / "f.html")
    found = plotly_figures_in_html(path.read_text())
    assert len(found) == 1
    data, layout, config = found[0]
    assert data[0]["type"] == "heatmap" and data[0]["x"] == ["a", "</script>"]
    assert layout["title"]["text"] == "t"
    assert isinstance(config, dict)


def test_selection_parsing(ioi_store: Path) -> None:
    assert parse_sequences(None, 5) == [0, 1]
    assert parse_sequences(None, 1) == [0]
    assert parse_sequences("3, 0,3", 5) == [3, 0]
    with pytest.raises(HeadstoreError, match="out of range"):
        parse_sequences("5", 5)
    with pytest.raises(HeadstoreError, match="not an integer"):
        parse_sequences("a", 5)
    ds = open_store(ioi_store)  # layers 0, 1; 4 heads
    assert parse_heads("0.1,1.2", ds) == [(0, 1), (1, 2)]
    assert parse_heads("0.1, 1.2,0.1", ds) == [(0, 1), (1, 2)]  # repeats dropped
    assert parse_heads(None, ds) == [] and parse_heads(" ", ds) == []
    with pytest.raises(HeadstoreError, match=r"--heads \(3, 0\): layer 3 is not in this store"):
        parse_heads("3.0", ds)
    with pytest.raises(HeadstoreError, match=r"head 4 is out of range \(the model has heads 0\.\.3\)"):
        parse_heads("1.4", ds)
    with pytest.raises(HeadstoreError, match=r"LAYER\.HEAD"):
        parse_heads("1", ds)
    assert display_token(" Mary") == "␣Mary" and display_token("\n") == "\\n" and display_token("") == "∅"


def test_viewer_names_sequences_by_their_store_number(ioi_store: Path) -> None:
    """On a subset (or a partial store) row 0 is not sequence 0: titles carry the ``batch`` label, and the
    heatmap is that sequence's pattern."""
    ds = open_store(ioi_store)
    sub = ds.isel(batch=[5, 2])
    page = attention_viewer(sub, "store", "1", "1.2", [], _Figures())
    assert "store: sequence 2 (row 1)" in page and "sequence 5" not in page
    n = sequence_length(ds, 2)
    want = np.asarray(ds["pattern"].sel(layer=1).isel(batch=2, head=2).values)[:n, :n]
    z = json.loads(re.search(r'"z":(\[\[.*?\]\])', page).group(1))  # type: ignore[union-attr]
    np.testing.assert_allclose(np.array(z, dtype=float), want, atol=1e-5)
    whole = attention_viewer(ds, "store", "2", "1.2", [], _Figures())
    assert "store: sequence 2 " in whole and "(row" not in whole


def test_bad_selection_fails_before_analyzers(ioi_store: Path, tmp_path: Path) -> None:
    from headstore.cli import app

    res = CliRunner().invoke(app, ["report", str(ioi_store), "--out", str(tmp_path / "r.html"), "--heads", "9.0"])
    assert res.exit_code == 2
    assert "layer 9 is not in this store" in res.output
    assert not (tmp_path / "r.html").exists()


def test_two_stores_pair(make_store: Callable[..., Path], tmp_path: Path) -> None:
    """IOI + ABC twin: one-store analyzers are not applicable; pair analyzers that need parameters
    the report cannot guess are listed as skipped with the analyzer's own reason."""
    a = make_store("tiny-gpt2", "ioi", n_seq=8, fields=("default", "k", "resid_pre"))
    b = make_store("tiny-gpt2", "ioi-abc", n_seq=8, fields=("default", "k", "resid_pre"))
    out = write_report([str(a), str(b)], tmp_path / "pair.html", sequences="0", progress=False)
    page = out.read_text(encoding="utf-8")
    rows = status_rows(page)
    specs = analyzers()
    assert set(rows) == set(specs)
    for name, spec in specs.items():
        if spec.n_stores == 1:
            assert rows[name] == ("not applicable", "takes 1 store(s), report got 2"), name
    assert rows["ioi-pair"][0] == "ran"
    assert rows["path-patch-query"] == ("skipped", "needs parameters senders, receiver (no defaults)")
    assert "id='an-ioi-pair'" in page and "id='an-path-patch-query'" not in page
    # provenance of both stores, an attention viewer for each
    assert "store 1:" in page and "store 2:" in page
    assert "store 1: sequence 0" in page and "store 2: sequence 0" in page
    with pytest.raises(HeadstoreError, match="one store or two"):
        render_report([str(a), str(b), str(a)], progress=False)


def _count_analyzer_calls(monkeypatch: pytest.MonkeyPatch) -> collections.Counter[str]:
    """Every registered analyzer's function, wrapped to count its calls (signature kept for ``plan``)."""
    from headstore.analyze import registry as _registry

    calls: collections.Counter[str] = collections.Counter()
    real = _registry.analyzers()

    def counted(spec: Any) -> Any:
        @functools.wraps(spec.func)
        def func(*args: Any, **kwargs: Any) -> Any:
            calls[spec.name] += 1
            return spec.func(*args, **kwargs)

        return dataclasses.replace(spec, func=func)

    wrapped = {name: counted(spec) for name, spec in real.items()}
    monkeypatch.setattr(_registry, "analyzers", lambda: dict(wrapped))
    return calls


def _without_timestamp(page: str) -> str:
    return re.sub(r"Generated [^.<]*UTC\.", "Generated.", page)


def test_report_reuses_saved_outputs(ioi_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a results folder the report computes each analyzer once and saves it there; a second
    report (through the CLI's --results) reads the outputs back: no analyzer runs again, same page."""
    from headstore.cli import app

    calls = _count_analyzer_calls(monkeypatch)
    results = tmp_path / "results"
    computed = render_report([str(ioi_store)], progress=False, results=results)
    assert calls and all(n == 1 for n in calls.values())
    ran = sorted(p.name for p in results.iterdir())  # the analyzers that did not stop with a HeadstoreError
    assert "copy-suppression" in ran and "ioi" in ran
    for name in ran:  # saved complete, nothing half-written left behind
        assert {"result.zarr", "summary.csv", "plots.txt"} <= {p.name for p in (results / name).iterdir()}

    calls.clear()
    out = tmp_path / "reused.html"
    res = CliRunner().invoke(
        app, ["report", str(ioi_store), "--out", str(out), "--results", str(results), "--no-progress"]
    )
    assert res.exit_code == 0, res.output
    assert not set(calls) & set(ran), f"analyzers ran again: {dict(calls)}"
    reused = out.read_text(encoding="utf-8")
    status = reused[reused.index("hs-analyzer-status") : reused.index("</table>", reused.index("hs-analyzer-status"))]
    for name in ran:
        row = status[status.index(f">{name}<") :].split("</tr>")[0]
        assert "saved output reused" in row
    # the same tables and figures as the report that computed them
    assert _without_timestamp(reused).replace("saved output reused", "") == _without_timestamp(computed)


def test_run_analyzer_leaves_no_half_output(ioi_store: Path, tmp_path: Path) -> None:
    from headstore.cli.run import run_analyzer, saved_output

    spec = analyzers()["copy-suppression"]

    def broken_plot(result: Any, folder: Path) -> list[Path]:
        raise RuntimeError("crash while plotting")

    with pytest.raises(RuntimeError, match="crash while plotting"):
        run_analyzer(dataclasses.replace(spec, plot=broken_plot), [str(ioi_store)], tmp_path, {})
    assert saved_output(spec, tmp_path) is None
    assert list(tmp_path.iterdir()) == []
    summary, paths = run_analyzer(spec, [str(ioi_store)], tmp_path, {})
    saved = saved_output(spec, tmp_path)
    assert saved is not None and saved[1] == paths
    pd.testing.assert_frame_equal(saved[0], summary, check_dtype=False)


def test_main_job_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The main job on the tiny model: the census page and its tables, a report for the IOI store and one
    for the IOI/ABC pair; a rerun extracts nothing and runs no analyzer."""
    from headstore.pipeline import MainJob, run_main_job

    calls = _count_analyzer_calls(monkeypatch)
    job = MainJob(
        out=tmp_path / "job", model="tiny-gpt2", n_ioi=4, n_text=2, text_seq_len=16, n_repeat=2, repeat_seq_len=11,
        batch_size=2, device="cpu", top=2,
    )  # fmt: skip
    first = run_main_job(job)
    assert calls["ioi-pair"] == 1 and calls["circuits"] == 1
    assert calls["composition"] == 1  # computed by the census, copied into the IOI report's folder
    assert calls["logit-attribution"] == 3  # census: targets IO and S; IOI report: target io_token
    assert calls["calibration"] == 1  # on text, in the census only
    assert calls["attribution-patching"] == calls["edge-attribution"] == 1  # census; copied into ioi-vs-abc/
    assert (job.out / "ioi" / "composition" / "summary.csv").read_bytes() == (
        job.out / "census" / "weights" / "composition" / "summary.csv"
    ).read_bytes()
    findings = pd.read_csv(job.out / "census" / "findings.csv")
    kinds = set(findings["kind"])
    assert {"previous-token", "induction", "duplicate-token", "BOS sink", "copy suppression", "calibration"} <= kinds
    # the top previous-token head is the head with the highest previous-token score in head-scores' output
    hs = xr.open_zarr(job.out / "census" / "repeated" / "head-scores" / "result.zarr", consolidated=False)
    prev = hs["previous_token"].transpose("layer", "head").values
    L, h = np.unravel_index(np.nanargmax(prev), prev.shape)
    top = findings[(findings["kind"] == "previous-token") & (findings["rank"] == 1)].iloc[0]
    assert top["head"] == f"{int(hs['layer'].values[L])}.{h}" and abs(top["score"] - prev[L, h]) < 1e-6
    text_ds = open_store(job.out / "stores" / "text.zarr").hs.provenance.dataset
    assert (text_ds.options["source"], text_ds.options["name"]) == ("hf", "python-stdlib-docstrings")
    page = (job.out / "census.html").read_text(encoding="utf-8")
    assert "Induction circuit" in page and "Path patching" in page and "Calibration with heads removed" in page
    _check_atp_vs_exact(job.out, findings, page)
    saved = {p.parent.name for p in job.out.glob("*/*/summary.csv")}
    assert {"copy-suppression", "ioi", "ioi-pair"} <= saved
    calls.clear()
    second = run_main_job(job)
    assert not calls, f"analyzers ran again: {dict(calls)}"
    assert sorted(second) == sorted(first)
    for group in ("ioi", "ioi-vs-abc"):
        assert (job.out / f"report-{group}.html").is_file()
    assert job.out / "dashboard" / "index.html" in first and (job.out / "dashboard" / "heads" / "L1H2.html").is_file()
    pair = (job.out / "report-ioi-vs-abc.html").read_text(encoding="utf-8")
    assert "id='an-ioi-pair'" in pair and "saved output reused" in pair


def _check_atp_vs_exact(out: Path, findings: pd.DataFrame, page: str) -> None:
    """The census's AtP vs exact patching: the heads of largest |AtP| from the analyzer's output, the findings' rho
    equal to scipy's Spearman rho of the CSV, and AtP close to exact on the tiny model (nearly linear per head)."""
    from scipy.stats import spearmanr

    table = pd.read_csv(out / "census" / "attribution" / "atp_vs_exact.csv")
    atp = xr.open_zarr(out / "census" / "ioi-vs-abc" / "attribution-patching" / "result.zarr", consolidated=False)
    score = atp["score"].transpose("layer", "head").values
    assert len(table) == min(30, score.size) and (out / "census" / "attribution" / "atp_vs_exact.png").is_file()
    np.testing.assert_allclose(table["atp"], [score[L, h] for L, h in zip(table["layer"], table["head_index"])])
    assert (
        np.all(np.diff(np.abs(table["atp"])) <= 0)
        and np.abs(table["atp"]).min() >= np.sort(np.abs(score.ravel()))[-len(table)]
    )
    rho = float(findings.loc[findings["kind"] == "AtP vs exact patching", "score"].iloc[0])
    assert -1 <= rho <= 1 and rho == pytest.approx(float(spearmanr(table["atp"], table["exact"]).statistic), abs=1e-12)
    np.testing.assert_allclose(table["exact"], table["atp"], rtol=0.1, atol=1e-6)
    assert "Attribution patching" in page and (out / "census" / "attribution" / "eap_circuit.png").is_file()


def test_report_imports_no_torch() -> None:
    code = (
        "import sys, json, headstore.cli, headstore.report.page, headstore.cli.run, headstore.report.figures, "
        "headstore.analyze; print(json.dumps('torch' in sys.modules))"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1]) is False


DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_schema_doc_lists_every_variable() -> None:
    from headstore.store_schema.layout import FIELDS, MANIFEST, WEIGHTS

    text = (DOCS / "schema.md").read_text(encoding="utf-8")
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)` \| ([^|]+) \|", text, flags=re.M)}
    for name, f in FIELDS.items():
        assert rows.get(name, "").strip() == ", ".join(f.dims), f"docs/schema.md: {name} row missing or wrong dims"
        if f.hook:
            assert f"`{f.hook}`" in text, f"docs/schema.md: hook of {name} missing"
    for name, w in WEIGHTS.items():
        assert rows.get(name, "").strip() == ", ".join(w.dims), f"docs/schema.md: {name} row missing or wrong dims"
    assert MANIFEST in rows and "vocab" in rows


def test_analyzers_doc_covers_every_analyzer() -> None:
    headings = re.findall(r"^## (.+)$", (DOCS / "analyzers.md").read_text(encoding="utf-8"), flags=re.M)
    names = {n.strip() for h in headings for n in h.split("(")[0].split(",")}
    for name in analyzers():
        assert name in names, f"docs/analyzers.md has no section for the analyzer {name!r}"


def test_figures_wider_than_the_page_are_fitted() -> None:
    from headstore.report.embed import PAGE_WIDTH, _Figures

    figs = _Figures()
    wide = figs.div([{"type": "heatmap", "z": [[1]]}], {"width": PAGE_WIDTH + 500, "height": 400})
    narrow = figs.div([{"type": "heatmap", "z": [[1]]}], {"width": 500, "height": 400})
    (_, wide_layout, _), (_, narrow_layout, _) = plotly_figures_in_html(wide + narrow)
    assert "width" not in wide_layout and wide_layout["autosize"] is True and wide_layout["height"] == 400
    assert narrow_layout["width"] == 500


def test_titles_wider_than_their_figure_wrap(tmp_path: Path) -> None:
    import plotly.graph_objects as go

    from headstore.report.plots import TITLE_CHAR_PX, save_html

    long = "Direct logit contribution of each head to target 'io_token' (mean over sequences)"
    for width, title in [(550, long), (550, "short<br>two lines"), (1600, long)]:
        path = save_html(go.Figure(go.Heatmap(z=[[1]]), layout={"title": title, "width": width}), tmp_path / "f.html")
        ((_, layout, _),) = plotly_figures_in_html(path.read_text(encoding="utf-8"))
        lines = layout["title"]["text"].split("<br>")
        assert " ".join(lines) == " ".join(title.split("<br>")), "wrapping must keep every word"
        assert all(len(line) * TITLE_CHAR_PX <= width - 80 for line in lines)
        assert len(lines) == (2 if title != long or width == 550 else 1)
