"""The shape of the code: no import cycles (lazy imports count), no internal tracker numbers."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def import_graph(package: Path) -> dict[str, set[str]]:
    mods = {}
    for f in package.rglob("*.py"):
        rel = f.relative_to(package.parent).with_suffix("")
        mods[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = f
    edges = {m: set() for m in mods}
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != m and not (mods[m].name == "__init__.py" and t.startswith(m + ".")):
                    edges[m].add(t)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while (w := stack.pop()) != v:
                on.discard(w)
                comp.append(w)
            on.discard(v)
            if comp:
                found.append(sorted([v, *comp]))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_of_fedcl_has_no_cycle():
    assert cycles(import_graph(ROOT / "fedcl")) == []


def test_the_cycle_finder_finds_a_lazy_cycle(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import pkg.b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.a import x\n")
    assert cycles(import_graph(pkg)) == [["pkg.a", "pkg.b"]]


def test_no_internal_tracker_numbers_in_what_users_read():
    pattern = re.compile(r"\bissues? ?#?\d+", re.IGNORECASE)
    hits = []
    for folder in ("fedcl", "tests", "simulations", "docs"):
        for f in (ROOT / folder).rglob("*"):
            if f.suffix in {".py", ".md", ".yaml", ".sh", ".txt"} and f.name != Path(__file__).name:
                hits += [f"{f.relative_to(ROOT)}:{n}" for n, line in enumerate(f.read_text().splitlines(), 1)
                         if pattern.search(line)]
    readme = (ROOT / "README.md").read_text().splitlines()
    hits += [f"README.md:{n}" for n, line in enumerate(readme, 1) if pattern.search(line)]
    assert hits == []
