"""The two Dockerfiles: hadolint-clean and holding to the image contracts (no Docker engine here to build)."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

from tests.chart.conftest import ROOT, run, tool

OPERATOR = ROOT / "Dockerfile"
TRAINER = ROOT / "trainer-image" / "Dockerfile"
DEV_KIT = ROOT / "testing"  # kubetune-dev: installed by `make venv` only (docs/testing.md)
# What only development may hold: the dev kit's packages, its distinctive modules (the local control plane, the
# node agent, the S3 server, tiny models, demo data, pytest plugins) and what they import that a shipped module never
# needs (pytest, moto).
DEV_ONLY_PACKAGES = {"kubetune_dev", "kubetune_cluster"}
DEV_ONLY_MODULES = {"controlplane", "agent_pod", "agent_fixtures", "pytest_plugin", "s3server", "tiny", "tiny_vision",
                    "demo_data"}
DEV_ONLY_IMPORTS = DEV_ONLY_PACKAGES | {"pytest", "moto"}


def test_hadolint_passes():
    run(tool("hadolint"), str(OPERATOR), str(TRAINER))


def _instructions(path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    return [tuple(line.split(maxsplit=1)) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.parametrize("path", [OPERATOR, TRAINER], ids=["operator", "trainer"])
def test_multi_stage_pinned_non_root(path):
    ins = _instructions(path)
    froms = [arg for op, arg in ins if op == "FROM"]
    assert len(froms) >= 2, "multi-stage"
    for base in froms:
        assert re.search(r":[\w.-]+@sha256:[0-9a-f]{64}", base), f"base not pinned by tag and digest: {base}"
    users = [arg for op, arg in ins if op == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]), "last USER must be numeric and not root"
    secret = re.compile(r"(?i)(secret|password|access_key)")
    assert not any(op in ("ARG", "ENV") and secret.search(arg) for op, arg in ins), "secret in ARG/ENV"


def test_operator_image_contract():
    ins = dict(_instructions(OPERATOR))  # the last of each instruction wins
    assert ins["ENTRYPOINT"] == '["python", "-m", "kubetune_operator"]'
    assert ins["FROM"].startswith("python:3.11") and "-slim" in ins["FROM"]
    assert '".[operator]"' in OPERATOR.read_text()


def test_trainer_image_contract():
    ins = dict(_instructions(TRAINER))
    assert ins["ENTRYPOINT"] == '["kubetune", "launch"]'
    assert ins["CMD"] == '["-m", "kubetune_trainer", "train", "--config", "/etc/kubetune/trainer.yaml"]'
    assert ins["FROM"].startswith("pytorch/pytorch:") and "-cuda" in ins["FROM"]
    assert "[trainer]" in TRAINER.read_text()


def test_dockerignore_keeps_secrets_and_local_state_out():
    patterns = (ROOT / ".dockerignore").read_text().splitlines()
    assert "**" in patterns, "an allow-list: everything is left out unless re-included"
    for needed in ("**/.env", "**/*.pem", "**/*.key"):
        assert needed in patterns


def _copied(path) -> list[Path]:
    """The build-context paths that a Dockerfile's COPY lines take (not what they take from another stage)."""
    sources = []
    for op, arg in _instructions(path):
        if op == "COPY" and "--from=" not in arg:
            assert not arg.startswith("["), f"{path.name}: COPY in the shell form, please: {arg}"
            sources += [ROOT / src for src in [w for w in arg.split() if not w.startswith("--")][:-1]]
    return sources


def _imports(file: Path) -> set[str]:
    tree = ast.parse(file.read_text(), str(file))
    names = {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
              and not node.level}
    return {name.split(".")[0] for name in names}


@pytest.mark.parametrize("path", [OPERATOR, TRAINER], ids=["operator", "trainer"])
def test_no_dev_only_code_in_the_images(path):
    """Neither image holds the test and demo kit: no COPY takes testing/ (or a folder above it), and nothing the
    COPY lines take is a dev-only package or module or imports one."""
    copied = _copied(path)
    assert copied, f"{path.name} copies nothing from the build context?"
    for src in copied:
        assert src.exists(), f"{path.name}: COPY {src.relative_to(ROOT)}: no such path"
        assert not (src.resolve().is_relative_to(DEV_KIT) or DEV_KIT.is_relative_to(src.resolve())), \
            f"{path.name} copies {src.relative_to(ROOT)}: the dev kit (testing/) must stay out of the images"
    files = [f for src in copied for f in ([src] if src.is_file() else sorted(src.rglob("*")))]
    modules = [f for f in files if f.suffix == ".py" and "__pycache__" not in f.parts]
    assert modules, f"{path.name} ships no Python?"
    for f in files:
        where = f.relative_to(ROOT)
        assert not DEV_ONLY_PACKAGES & set(where.parts), f"{path.name} ships the dev-only package in {where}"
    for f in modules:
        where = f.relative_to(ROOT)
        assert f.stem not in DEV_ONLY_MODULES, f"{path.name} ships {where}: dev-only (testing/kubetune_dev)"
        assert not DEV_ONLY_IMPORTS & _imports(f), f"{where} (shipped) imports {DEV_ONLY_IMPORTS & _imports(f)}"


def test_the_dev_kit_is_its_own_distribution():
    """testing/ is the `kubetune-dev` distribution, which `make venv` installs; the shipped project's package search
    never reaches it, and .dockerignore (an allow-list) never lets it into a build context."""
    layout = {f.stem for f in (DEV_KIT / "kubetune_dev").rglob("*.py")}
    assert DEV_ONLY_MODULES <= layout, f"not in testing/kubetune_dev: {DEV_ONLY_MODULES - layout}"
    assert tomllib.loads((DEV_KIT / "pyproject.toml").read_text())["project"]["name"] == "kubetune-dev"
    assert "-e ./testing" in (ROOT / "Makefile").read_text()
    where = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["where"]
    for folder in where:
        shipped = (ROOT / folder).resolve()
        assert not (shipped.is_relative_to(DEV_KIT) or DEV_KIT.is_relative_to(shipped)), f"packages.find: {folder}"
        assert not [p for p in shipped.iterdir() if p.name in DEV_ONLY_PACKAGES], f"a dev-only package in {folder}/"
    reincluded = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")]
    assert not [line for line in reincluded if line.lstrip("!/").startswith("testing")], ".dockerignore: testing/"


@pytest.mark.parametrize("path", [OPERATOR, TRAINER], ids=["operator", "trainer"])
def test_both_images_install_the_api_package(path):
    """kubetune_api (api/) is the spec, status and config both the operator and the trainer import."""
    assert ("COPY", "api/ api/") in _instructions(path)
    assert "!api/" in (ROOT / ".dockerignore").read_text().splitlines()


@pytest.mark.parametrize(("path", "extra"), [(OPERATOR, "operator"), (TRAINER, "trainer")], ids=["operator", "trainer"])
def test_both_images_install_the_search_package(path, extra):
    """kubetune_search (search/) is a FineTuneSweep's search, which the operator and the trainer's local `kubetune
    sweep` both run: each image copies it, setuptools finds it, and each image's extra has optuna."""
    assert ("COPY", "search/ search/") in _instructions(path)
    assert "!search/" in (ROOT / ".dockerignore").read_text().splitlines()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "search" in project["tool"]["setuptools"]["packages"]["find"]["where"]
    assert any(r.startswith("optuna") for r in project["project"]["optional-dependencies"][extra])
