"""No circle of imports inside mera: the module graph, built from the source with ``ast`` (imports
at module level and inside functions alike: a lazy import is still a dependency), has no strongly
connected component of more than one module."""

import ast
import textwrap
from pathlib import Path

import mera

ROOT = Path(mera.__file__).parent


def _module_name(path: Path, root: Path, package: str) -> str:
    parts = [package, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_graph(root: Path, package: str) -> dict[str, set[str]]:
    """module -> the modules of ``package`` (folder ``root``) it imports.

    ``import a.b.c`` is an edge to ``a.b.c``; ``from a.b import c`` to ``a.b.c`` when that is a
    module, else to ``a.b`` (a name defined there, or re-exported by its ``__init__``). Relative
    imports are resolved against the importing module's package."""
    files = {_module_name(p, root, package): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        is_pkg = path.name == "__init__.py"
        here = name if is_pkg else name.rpartition(".")[0]  # the package a relative import starts from
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = here.split(".")
                    base_parts = base_parts[:len(base_parts) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    targets.append(sub if sub in files else base)
            for t in targets:
                while t and t not in files:  # import a.b.c.d where d is a name: its module
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph[name].add(t)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative),
    each sorted, in sorted order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return sorted(out)


def one_cycle(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    """A shortest path from the component's first module back to itself (breadth first, inside it)."""
    inside, start = set(comp), comp[0]
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & inside):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [*reversed(path), start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp


def test_mera_has_no_import_circle():
    graph = module_graph(ROOT, "mera")
    found = circles(graph)
    lines = [f"{' <-> '.join(c)}\n    e.g. {' -> '.join(one_cycle(graph, c))}" for c in found]
    assert not found, f"{len(found)} import circle(s) in mera:\n" + "\n".join(lines)


def test_the_runner_circles_are_gone():
    """The two circles that mera.runner had (rundir / profile / gallery / run_config, and loop /
    launch / workers) stay broken, whatever the rest of mera does."""
    found = circles(module_graph(ROOT, "mera"))
    assert not [c for c in found if any(m.startswith("mera.runner.") for m in c)], found


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))


def test_the_checker_finds_a_circle_through_a_lazy_relative_import(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg.b import helper\n",
        "pkg/b.py": "def helper():\n    from . import c\n    return c\n",
        "pkg/c.py": "import pkg.a\n",
        "pkg/d.py": "import pkg.a\n",  # imports into the circle, not part of it
        "pkg/sub/__init__.py": "",
        "pkg/sub/e.py": "from .. import d\nfrom ..sub import f\n",
        "pkg/sub/f.py": "from ..sub.e import something\n",
    })
    graph = module_graph(tmp_path / "pkg", "pkg")
    assert graph["pkg.b"] == {"pkg.c"} and graph["pkg.sub.e"] == {"pkg.d", "pkg.sub.f"}
    assert circles(graph) == [["pkg.a", "pkg.b", "pkg.c"], ["pkg.sub.e", "pkg.sub.f"]]
    assert one_cycle(graph, ["pkg.a", "pkg.b", "pkg.c"]) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]


def test_a_name_reexported_by_a_package_is_no_circle(tmp_path):
    """``from pkg import x`` is an import of the module pkg.x when there is one, else of pkg's
    ``__init__``: a module taking a sibling module through the package is not a circle with the
    ``__init__`` that re-exports it."""
    _write(tmp_path, {
        "pkg/__init__.py": "from pkg.a import A\n",
        "pkg/a.py": "from pkg import b\nA = 1\n",
        "pkg/b.py": "",
    })
    graph = module_graph(tmp_path / "pkg", "pkg")
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.b"}, "pkg.b": set()}
    assert circles(graph) == []
    (tmp_path / "pkg/b.py").write_text("from pkg import A\n")  # now b needs the __init__, which needs a, which needs b
    assert circles(module_graph(tmp_path / "pkg", "pkg")) == [["pkg", "pkg.a", "pkg.b"]]
