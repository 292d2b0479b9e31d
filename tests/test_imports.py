"""No import cycle among diffbias modules at module level: every module can be imported first, on its own.

An import inside a function runs when the function is called, after every module has loaded, so it may close
a loop (config imports data inside check_datasets); only imports that run while a module loads count.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def module_names(src: Path, package: str) -> dict[str, Path]:
    names = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def module_level_imports(name: str, path: Path, known: set[str], package: str) -> set[str]:
    """The package's modules that ``name`` imports while it loads: import statements outside function bodies
    (class bodies, ``if`` and ``try`` blocks run at import time and count). ``from X import Y`` is an edge to
    the module ``X.Y`` when there is one, else to ``X``; relative imports are resolved against ``name``."""
    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    edges: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue  # runs when called, not when the module loads
            if isinstance(child, ast.Import):
                edges.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = here[: len(here) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                for alias in child.names:
                    sub = f"{target}.{alias.name}"
                    edges.add(sub if sub in known else target)
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return {e for e in edges if e in known and e != name and (e == package or e.startswith(package + "."))}


def import_cycles(src: Path, package: str) -> list[list[str]]:
    """Every cycle a depth-first search meets in the module-level import graph (empty: none)."""
    modules = module_names(src, package)
    graph = {name: module_level_imports(name, path, set(modules), package) for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def search(node: str, path: list[str]) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                search(nxt, path)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            search(node, [])
    return cycles


def test_no_module_level_import_cycle_in_diffbias():
    modules = module_names(SRC, "diffbias")
    assert {"diffbias.config", "diffbias.data", "diffbias.io", "diffbias.metrics.flops"} <= set(modules)
    assert import_cycles(SRC, "diffbias") == []


def test_io_finds_the_repository_without_the_config():
    """io runs git in the repository; it takes the root from diffbias.paths, a leaf, not from config (which
    imports data, which imports io)."""
    modules = module_names(SRC, "diffbias")
    known = set(modules)
    assert module_level_imports("diffbias.paths", modules["diffbias.paths"], known, "diffbias") == set()
    assert "diffbias.config" not in module_level_imports("diffbias.io", modules["diffbias.io"], known, "diffbias")


def write_package(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(textwrap.dedent(text))


@pytest.mark.parametrize("closing_import", [
    "from . import a",                      # relative
    "import pkg.a",                         # absolute
    "from .a import VALUE",                 # a name from the module
    "try:\n    from pkg import a\nexcept ImportError:\n    a = None",  # inside try: still at load time
])
def test_the_search_finds_a_module_level_cycle(tmp_path, closing_import):
    write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from .sub import b\nVALUE = 1\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/b.py": "from .. import c\n",
        "pkg/c.py": closing_import + "\n",
    })
    assert import_cycles(tmp_path, "pkg") == [["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]]


def test_an_import_inside_a_function_closes_no_cycle(tmp_path):
    write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from . import b\n",
        "pkg/b.py": "def late():\n    from . import a\n    return a\n\nclass K:\n    def m(self):\n        import pkg.a\n",
    })
    assert import_cycles(tmp_path, "pkg") == []
