"""`make venv`'s bytecode step (kubetune_dev.bytecode) names modules that exist: a renamed one would fail the
step on every fresh clone."""

from __future__ import annotations

import importlib.util
from itertools import chain
from pathlib import Path

from kubetune_dev.bytecode import GROUPS


def test_every_module_it_imports_is_installed_or_ours():
    for name in chain(*GROUPS):
        top, *rest = name.split(".")
        spec = importlib.util.find_spec(top)  # the top package only: finding a submodule would import its parents
        assert spec, f"{top} is not installed"
        base = Path(spec.submodule_search_locations[0] if spec.submodule_search_locations else spec.origin)
        path = base.joinpath(*rest)
        assert not rest or path.with_suffix(".py").is_file() or (path / "__init__.py").is_file(), name
