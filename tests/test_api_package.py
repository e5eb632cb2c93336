"""kubetune_api stands alone: the operator, the trainer and the CRD generator import it, and it imports none of
them, nor torch, kopf or kubernetes."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
API = ROOT / "api" / "kubetune_api"
HEAVY = ("torch", "kopf", "kubernetes", "transformers", "accelerate", "peft", "boto3")
DEPENDENCIES = {"pydantic", "yaml"}  # what it may import besides the standard library and itself


def our_packages() -> set[str]:
    """The top-level packages of this repository: those setuptools finds, and the test and tool folders."""
    where = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["where"]
    found = {p.parent.name for folder in where for p in (ROOT / folder).glob("*/__init__.py")}
    return found | {"tests", "hack", "bench", "examples"}


def test_importing_it_loads_neither_torch_nor_kopf_nor_our_other_packages():
    code = "import json, sys; import kubetune_api, kubetune_api.crd; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    loaded = {name.split(".")[0] for name in json.loads(done.stdout)}
    assert "kubetune_api" in loaded
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
    assert not loaded & (our_packages() - {"kubetune_api"}), sorted(loaded & our_packages())


def test_it_imports_nothing_of_ours_but_itself():
    ours = our_packages() - {"kubetune_api"}
    assert {"kubetune_trainer", "kubetune_operator"} <= ours
    for path in sorted(API.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module or ""]
            else:
                continue  # a relative import: kubetune_api itself
            for module in modules:
                top = module.split(".")[0]
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                assert top not in ours, f"{where} imports {module}"
                assert top in sys.stdlib_module_names or top in DEPENDENCIES, f"{where} imports {module}"
