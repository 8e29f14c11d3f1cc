"""The engine's folders show its design: four wings over ``engine/config.py``, each importing only
the wings below it (config < learn < fhe < serve < study < cli), no import circle, no Streamlit.

Run as a script (``python tests/test_layout.py``) it prints the tree with line counts and the
import check."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ROOT / "engine"
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
