"""The package boundaries of docs/architecture.md, read from the source (no import runs).

Who may import whom, of our packages and of the heavy ones; and no import cycle inside a package, counting the
imports inside functions too (a lazy import that only breaks a cycle is a cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {  # package -> its folder
    "kubetune_api": ROOT / "api" / "kubetune_api",
    "kubetune_search": ROOT / "search" / "kubetune_search",
    "kubetune_operator": ROOT / "operator" / "kubetune_operator",
    "kubetune_dashboard": ROOT / "operator" / "kubetune_dashboard",
    "kubetune_trainer": ROOT / "trainer-image" / "kubetune_trainer",
    "kubetune_dev": ROOT / "testing" / "kubetune_dev",
}
OURS = set(PACKAGES)
ML = {"torch", "transformers", "peft", "accelerate", "bitsandbytes", "liger_kernel", "flash_attn", "safetensors"}
KUBE = {"kopf", "kubernetes"}
TEST_ONLY = {"pytest", "moto", "trl", "datasets"}
RULES = {  # package -> (which of our packages it may import besides itself, which others it must not)
    "kubetune_api": (set(), ML | KUBE | TEST_ONLY | {"boto3", "numpy"}),
    "kubetune_search": ({"kubetune_api"}, ML | KUBE | TEST_ONLY | {"boto3"}),
    "kubetune_operator": ({"kubetune_api", "kubetune_search"}, ML | TEST_ONLY),
    "kubetune_dashboard": (set(), ML | KUBE | TEST_ONLY),
    "kubetune_trainer": ({"kubetune_api", "kubetune_search"}, KUBE | TEST_ONLY),
    "kubetune_dev": (OURS, set()),  # the test and demo kit drives all of them
}


def modules(package: str) -> dict[str, Path]:
    root = PACKAGES[package]
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path) -> set[str]:
    """Every module `name` imports, absolute, at any depth of the file (functions included), less those under
    `if TYPE_CHECKING:`; `from m import a` counts as m and m.a (a may be a submodule)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(package[:len(package) - child.level + 1] + ([base] if base else []))
                found.add(base)
                found.update(f"{base}.{a.name}" for a in child.names)
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return found


@pytest.mark.parametrize("package", sorted(RULES))
def test_a_package_imports_only_what_it_may(package):
    may, must_not = RULES[package]
    wrong = []
    for name, path in modules(package).items():
        for imported in imports(name, path):
            top = imported.split(".")[0]
            if (top in OURS and top != package and top not in may) or top in must_not:
                wrong.append(f"{path.relative_to(ROOT)} imports {imported}")
    assert not wrong, "\n".join(sorted(set(wrong)))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            strong(v)
    return found


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_import_cycle_inside_a_package(package):
    """A package's __init__ importing its own modules (re-exports) is not counted: those modules never need the
    package's names."""
    found = modules(package)
    graph = {name: {m for m in imports(name, path) if m in found and m != name and m.rpartition(".")[0] != name}
             for name, path in found.items()}
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_lazy_cycle():
    graph = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p.d": {"p.a"}}
    assert cycles(graph) == [["p.a", "p.b", "p.c"]]
