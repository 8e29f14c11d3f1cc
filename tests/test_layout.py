"""The engine's folders show its design: four wings over ``engine/config.py``, each importing only
the wings below it (config < learn < fhe < serve < study < cli), no import circle, no Streamlit.
The dashboard is a package on top: its pages (``dashboard/views/``) import the dashboard's
modules, which import the engine; the engine never imports the dashboard.

Run as a script (``python tests/test_layout.py``) it prints the tree with line counts and the
import check."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ROOT / "engine"
DASHBOARD = ROOT / "dashboard"
VIEWS = DASHBOARD / "views"
RANK = {"config": 0, "learn": 1, "fhe": 2, "serve": 3, "study": 4, "cli": 5, "__main__": 5}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module this file imports, anywhere in it (lazy imports count), as absolute names."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import module`
    return out


def engine_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in sorted(ENGINE.rglob("*.py"))}
    graph = {}
    for name, path in files.items():
        graph[name] = {m for m in imports_of(path) if m in files and m != name and not name.startswith(m + ".")
                       and m.count(".") >= 1}
    return graph


def wing(module: str) -> str:
    return module.split(".")[1]


def upward_imports(graph) -> list[str]:
    return [f"{a} -> {b}" for a, deps in graph.items() for b in sorted(deps) if RANK[wing(b)] > RANK[wing(a)]]


def circles(graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def streamlit_users() -> list[str]:
    return [module_name(p) for p in sorted(ENGINE.rglob("*.py"))
            if any(m == "streamlit" or m.startswith("streamlit.") for m in imports_of(p))]


def dashboard_graph() -> dict[str, set[str]]:
    """The dashboard's modules (not its pages) and which of them each imports."""
    files = {module_name(p): p for p in sorted(DASHBOARD.rglob("*.py")) if VIEWS not in p.parents}
    return {name: {m for m in imports_of(path) if m in files and m != name and m != "dashboard"}
                for name, path in files.items()}


def importers_of(prefix: str, paths) -> list[str]:
    return [module_name(p) for p in paths
            if any(m == prefix or m.startswith(prefix + ".") for m in imports_of(p))]


def test_the_engine_never_imports_the_dashboard():
    assert importers_of("dashboard", ENGINE.rglob("*.py")) == []


def test_the_dashboard_has_no_import_circle_and_no_module_imports_a_page():
    graph = dashboard_graph()
    assert set(graph) >= {"dashboard.page", "dashboard.service", "dashboard.sessions", "dashboard.keysets"}
    assert circles(graph) == []
    assert importers_of("dashboard.views", [p for p in DASHBOARD.rglob("*.py") if VIEWS not in p.parents]) == []


def test_every_page_goes_through_the_dashboard_package():
    """Each page imports the dashboard's modules (never a module at the project's root); the app's
    entry point reaches the dashboard through its service module only (light: see app.py)."""
    pages = sorted(VIEWS.glob("*.py"))
    assert len(pages) == 8
    roots = {p.stem for p in ROOT.glob("*.py")}
    for p in pages:
        imported = imports_of(p)
        assert any(m.startswith("dashboard.") for m in imported), p.name
        assert not {m.split(".")[0] for m in imported} & roots, p.name
    assert {m for m in imports_of(ROOT / "app.py") if m.startswith("dashboard")} == {"dashboard", "dashboard.service"}
    assert not (ROOT / "pages").exists()  # Streamlit would list it by itself (see app.py)


BENCH_CHECK = """
import runpy, sys
from pathlib import Path
bench = Path(sys.argv[1])
for script in sorted(bench.glob("*.py")):
    if script.name in ("__init__.py", "hello_app.py"):  # the package marker; a Streamlit page
        continue
    sys.path[0] = str(bench)  # as `python bench/<script>.py` runs it, from another folder
    runpy.run_path(str(script), run_name="imported")  # its imports, not its main()
    print("ok", script.name)
"""


def test_every_bench_script_imports_the_installed_project_with_no_path_edits(tmp_path):
    """The bench scripts reach the engine (and each other, as ``bench.<script>``) through the
    installed project (``pip install -e .``), run as scripts from any folder."""
    import subprocess

    scripts = sorted(p for p in (ROOT / "bench").glob("*.py") if p.name not in ("__init__.py", "hello_app.py"))
    for p in scripts:
        assert "sys.path.insert" not in p.read_text() and "sys.path.append" not in p.read_text(), p.name
    r = subprocess.run([sys.executable, "-c", BENCH_CHECK, str(ROOT / "bench")], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("ok ") == len(scripts)


def test_no_wing_imports_a_wing_above_it():
    assert upward_imports(engine_graph()) == []


def test_no_import_circle():
    assert circles(engine_graph()) == []


def test_no_engine_module_imports_streamlit():
    assert streamlit_users() == []


def test_every_wing_is_a_package_that_says_what_it_is_for():
    for w in ("learn", "fhe", "serve", "study", "cli"):
        doc = ast.get_docstring(ast.parse((ENGINE / w / "__init__.py").read_text()))
        assert doc and len(doc.splitlines()) == 1, w


def test_the_import_check_can_fail():
    """The checks see a circle and an upward import when there is one."""
    graph = {"engine.learn.a": {"engine.serve.b"}, "engine.serve.b": {"engine.learn.a"}}
    assert circles(graph) == [["engine.learn.a", "engine.serve.b"]]
    assert upward_imports(graph) == ["engine.learn.a -> engine.serve.b"]


if __name__ == "__main__":
    for p in sorted(ENGINE.rglob("*.py")):
        print(f"{len(p.read_text().splitlines()):5d} {p.relative_to(ROOT)}")
    graph = engine_graph()
    print(f"\n{len(graph)} modules, {sum(map(len, graph.values()))} imports between them")
    print("circles:", circles(graph) or "none")
    print("imports of a wing above:", upward_imports(graph) or "none")
    print("engine modules importing streamlit:", streamlit_users() or "none")
    print("engine modules importing the dashboard:", importers_of("dashboard", ENGINE.rglob("*.py")) or "none")
    print("dashboard circles:", circles(dashboard_graph()) or "none")
