"""The package's shape: no import cycle, the CLI imported by nobody in the library, short functions and
modules, and each analyzer's required fields stated once (the CLI's and the main job's views derive from it)."""

from __future__ import annotations

import ast
import inspect
import typing
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "headstore"
MAX_BODY, MAX_MODULE = 60, 400


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The package module an imported name belongs to (``headstore.a.b.func`` -> ``headstore.a.b``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path) -> set[str]:
    """Package modules imported by ``module``, at module level and inside functions alike."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in map(_resolve, found) if m is not None and m != module}


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle() -> None:
    cycles = _cycles(GRAPH)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_imports_seen_inside_functions() -> None:
    # run_main_job's stages import extract inside a function: the walk must see it
    assert "headstore.extract" in GRAPH["headstore.pipeline.extract_stage"]


def test_library_never_imports_the_cli() -> None:
    bad = {m: sorted(i for i in deps if i.startswith("headstore.cli"))
           for m, deps in GRAPH.items() if not m.startswith("headstore.cli")}  # fmt: skip
    assert not {m: d for m, d in bad.items() if d}


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function's body, its docstring left out (signature and decorators are not in the body)."""
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        if isinstance(body[0].value.value, str):
            body = body[1:]
    if not body:
        return 0
    return (body[-1].end_lineno or body[-1].lineno) - body[0].lineno + 1


def _long_functions() -> dict[str, int]:
    out = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and _body_lines(node) > MAX_BODY:
                out[f"{module}.{node.name}"] = _body_lines(node)
    return out


def test_body_counter() -> None:
    src = 'def f():\n    """doc\n    more"""\n    a = 1\n    return a\n'
    node = ast.parse(src).body[0]
    assert isinstance(node, ast.FunctionDef) and _body_lines(node) == 2


def test_no_long_function() -> None:
    long = _long_functions()
    assert not long, f"function bodies over {MAX_BODY} lines: {long}"


def test_no_long_module() -> None:
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE}
    assert not long, f"modules over {MAX_MODULE} lines: {long}"


# (d) one declaration per analyzer, and the views derived from it


def _declarations() -> dict[str, typing.Any]:
    from headstore.analyze import registry

    return registry.analyzers()


def test_every_analyzer_module_declares_its_spec() -> None:
    import importlib

    specs = _declarations()
    modules = [m for m in MODULES if m.startswith("headstore.analyze._") and m not in
               ("headstore.analyze._args", "headstore.analyze._maths", "headstore.analyze._blocks",
                "headstore.analyze._apply")]  # fmt: skip
    for module in modules:
        mod = importlib.import_module(module)
        assert isinstance(getattr(mod, "SPEC", None), type(next(iter(specs.values())))), module
        assert specs[mod.SPEC.name] is mod.SPEC
        assert mod.SPEC.requires == mod.REQUIRES, module  # REQUIRES stated once, in the module
    assert {s.func.__module__ for s in specs.values()} == set(modules)


def test_spec_params_are_the_functions_keyword_only_params() -> None:
    for name, spec in _declarations().items():
        sig = inspect.signature(spec.func)
        kw = [p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
        positional = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.KEYWORD_ONLY]
        assert list(spec.params) == kw, name
        assert len(positional) == spec.n_stores, name


def test_cli_listing_and_parsers_derive_from_the_declarations(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import headstore.cli as cli
    from headstore.cli import app, parse
    from headstore.cli.registry import analyzers as cli_view

    specs, view = _declarations(), cli_view()
    assert list(view) == list(specs)
    for name, spec in specs.items():
        assert view[name].spec is spec and view[name].requires == spec.requires
        assert set(view[name].params) == set(spec.params)
        for param, tp in spec.params.items():  # one parser per declared type, the same for every analyzer
            parser = view[name].params[param]
            if tp in parse.BY_TYPE:
                assert parser is parse.BY_TYPE[tp], (name, param)
    # the CLI's console was sized when headstore.cli was first imported (maybe by another test): widen it here
    monkeypatch.setattr(cli.console, "width", 400)
    res = CliRunner().invoke(app, ["analyzers"], env={"COLUMNS": "400"})
    assert res.exit_code == 0, res.output
    for name, spec in specs.items():
        line = next(line for line in res.output.splitlines() if f" {name} " in line)
        assert ", ".join(spec.requires)[:30] in line.replace("\u2502", "")


def test_unknown_param_type_has_no_parser() -> None:
    from headstore.cli import parse
    from headstore.store_schema import HeadstoreError

    with pytest.raises(HeadstoreError, match="no --param parser"):
        parse.parser_for(complex)
    assert parse.parser_for(typing.Literal["a", "b"])("b", None) == "b"  # type: ignore[arg-type]


def test_presenters_cover_the_declarations() -> None:
    from headstore.report.presenters import PRESENTERS

    assert set(PRESENTERS) == set(_declarations())


def test_main_job_views_derive_from_the_declarations() -> None:
    from headstore.pipeline.job import DERIVED_FROM, STORES, extract_fields, weights_only
    from headstore.store_schema.layout import FIELDS, WEIGHTS, parse_fields

    specs = _declarations()
    for name, spec in specs.items():  # weights only: exactly those whose requires are weights (and vocab)
        expected = spec.n_stores == 1 and all(r in WEIGHTS or r == "vocab" for r in spec.requires)
        assert weights_only(spec) == expected, name
    assert {n for n, s in specs.items() if weights_only(s)} == {"circuits", "composition"}
    from headstore.extract.grad import parse_metric, with_grad_fields

    for store, plan in STORES.items():  # each store holds every field its analyzers declare
        metric = None if plan.grad is None else parse_metric(plan.grad)  # --grad adds its fields, as extract does
        held = set(with_grad_fields(parse_fields(",".join(extract_fields(plan))), metric))
        for name in plan.analyzers:
            need = {DERIVED_FROM.get(r, r) for r in specs[name].requires if r in FIELDS}
            assert need <= held, (store, name, need - held)


def test_registry_refuses_unknown_and_twice_declared_names() -> None:
    import dataclasses

    from headstore.analyze import registry
    from headstore.store_schema import HeadstoreError

    with pytest.raises(
        HeadstoreError,
        match="unknown analyzer 'nope': choose from attention-attribution, attention-search, attention-stats, attribution-patching, ca",
    ):
        registry.get_analyzer("nope")
    spec = registry.get_analyzer("ioi")
    registry.register_analyzer(spec)  # the same declaration again (a module imported twice): harmless
    assert registry.get_analyzer("ioi") is spec
    with pytest.raises(HeadstoreError, match="analyzer 'ioi' is declared twice"):
        registry.register_analyzer(dataclasses.replace(spec, func=lambda ds: ds))
    assert registry.get_analyzer("ioi") is spec
