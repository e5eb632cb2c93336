"""The two Dockerfiles: hadolint-clean and holding to the image contracts (no Docker engine here to build)."""

from __future__ import annotations

import re

import pytest

from tests.chart.conftest import ROOT, run, tool

OPERATOR = ROOT / "Dockerfile"
TRAINER = ROOT / "trainer-image" / "Dockerfile"


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


@pytest.mark.parametrize("path", [OPERATOR, TRAINER], ids=["operator", "trainer"])
def test_both_images_install_the_api_package(path):
    """kubetune_api (api/) is the spec, status and config both the operator and the trainer import."""
    assert ("COPY", "api/ api/") in _instructions(path)
    assert "!api/" in (ROOT / ".dockerignore").read_text().splitlines()
