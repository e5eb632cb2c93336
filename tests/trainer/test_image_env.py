"""The trainer image's locked Python environment (trainer-image/constraints.txt) works together.

There is no container engine here, so the image's environment is rebuilt as a fresh venv: the kubetune wheel
from the files the Dockerfile copies, its `trainer` extra installed with the image's constraints, then a tiny
model made and fine-tuned in it with `kubetune run` (local paths: no hub, no S3).

torch is the constraints' version, the trainer image base's. The PyTorch CPU wheel index is not reachable from
this project's machines, so it is PyPI's torch of that version: on Linux that is the CUDA build, which runs on
CPU alike (its CUDA wheels are torch's exact pins, left out of the constraints). The venv uses the tests'
interpreter (the image has Python 3.12), so that uv's cache, filled by `make venv` with the same pins, serves
every wheel: nothing is downloaded again, and the venv's files are hard links into that cache.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
CONSTRAINTS = ROOT / "trainer-image" / "constraints.txt"
DOCKERFILE = ROOT / "trainer-image" / "Dockerfile"
TORCH_RUNTIME = re.compile(r"(cuda-|nvidia-|triton$)")  # torch's own CUDA wheels, which torch pins itself

# Run in the fresh venv, in one process (importing torch and transformers takes most of the time): a tiny base
# model and a dataset, then the installed `kubetune` command's `run` on a FineTuneJob manifest of local paths.
# The tiny model and the data come from kubetune_dev (testing/, never in the image), put on the path after the wheel.
TRAIN = """
import sys
from importlib.metadata import entry_points
from pathlib import Path

sys.path.append(sys.argv[2])
import kubetune_trainer
import yaml
from kubetune_dev import demo_data
from kubetune_dev.tiny import make_tiny_base

assert "site-packages" in kubetune_trainer.__file__, kubetune_trainer.__file__  # the wheel, not the sources
root = Path(sys.argv[1])
texts = demo_data.generic_texts(100) + demo_data.chat_texts(demo_data.support_records(50))
make_tiny_base(root / "base", texts, vocab_size=512, hidden_size=32, layers=1, heads=2)
data = demo_data.write_support_dataset(root / "data", train=32, validation=8, test=8)
spec = {"baseModel": {"uri": str(root / "base")}, "dataset": {s: str(p) for s, p in data.items()},
        "hyperparameters": {"maxSteps": 4, "batchSize": 4, "maxSeqLength": 128}, "output": {"uri": str(root / "out")}}
manifest = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "locked"}, "spec": spec}
(root / "finetunejob.yaml").write_text(yaml.safe_dump(manifest))
(kubetune,) = entry_points(group="console_scripts", name="kubetune")
sys.argv = ["kubetune", "run", str(root / "finetunejob.yaml"), "--work-dir", str(root / "work"), "--metrics-port", "-1"]
kubetune.load()()
"""


def pins() -> dict[str, str]:
    lines = CONSTRAINTS.read_text().splitlines()
    found = (re.match(r"([A-Za-z0-9._-]+)==([^\s;]+)", line) for line in lines)
    return {canonicalize_name(m[1]): m[2] for m in found if m}


def test_torch_is_the_base_images():
    base = re.search(r"^FROM pytorch/pytorch:([0-9.]+)-cuda[0-9.]+-", DOCKERFILE.read_text(), re.M)
    assert base, "the trainer image's runtime base is pytorch/pytorch:<torch>-cuda<version>-..."
    assert pins()["torch"] == base[1], "run `make constraints` after changing the base image"


def test_the_image_build_sees_the_constraints():
    """.dockerignore is an allow-list: what the Dockerfile copies must be on it."""
    assert "COPY trainer-image/constraints.txt" in DOCKERFILE.read_text()
    assert "!trainer-image/constraints.txt" in (ROOT / ".dockerignore").read_text().splitlines()


def test_every_requirement_is_pinned_within_its_bounds():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    locked = pins()
    extras = project["optional-dependencies"]
    for line in project["dependencies"] + extras["trainer"] + extras["peers"]:  # peers: the test-only references
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name in locked, f"{name} is not in {CONSTRAINTS.name}: run `make constraints`"
        assert req.specifier.contains(locked[name], prereleases=True), f"{name}=={locked[name]} outside {req}"


def link_bytecode(site: Path, ours: Path) -> int:
    """Give the venv at `site` the bytecode the image's `pip install` compiles at install time (the Dockerfile's
    pip writes .pyc files; uv does not unless asked, and compiling every file of torch would cost more than the
    run). Where one of its sources is the very file (a hard link into uv's cache) that the tests' venv `ours`
    compiled, the venv gets a hard link to that .pyc; any other source compiles at import, as before. Python
    checks every .pyc against its source's mtime and size. Returns the number linked."""
    tag, linked = f".{sys.implementation.cache_tag}.pyc", 0
    for cache, _, names in os.walk(ours):
        if not cache.endswith("__pycache__"):
            continue
        there = site / Path(cache).parent.relative_to(ours)
        for name in names:
            if not name.endswith(tag):
                continue
            source, theirs = there / f"{name[:-len(tag)]}.py", Path(cache).parent / f"{name[:-len(tag)]}.py"
            try:
                if not os.path.samefile(source, theirs):
                    continue
                (there / "__pycache__").mkdir(exist_ok=True)
                os.link(Path(cache) / name, there / "__pycache__" / name)
            except (FileNotFoundError, FileExistsError):  # exists: the venv's interpreter wrote it (a .pth import)
                continue
            linked += 1
    return linked


@pytest.fixture
def venv(tmp_path):
    """A place for a fresh venv, removed afterwards: its files are hard links into uv's cache, or copies (GiBs)
    where the cache is on another file system."""
    yield tmp_path / "venv"
    shutil.rmtree(tmp_path / "venv", ignore_errors=True)


@pytest.mark.slow
def test_the_locked_versions_train_together(tmp_path, venv):
    uv = shutil.which("uv", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    assert uv, "uv not found: run `make venv`"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", KUBETUNE_TERMINATION_LOG=os.devnull,
               COLUMNS="200")  # rich wraps its lines at 80 columns without a terminal

    def sh(*cmd, timeout=300) -> subprocess.CompletedProcess:
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"{' '.join(map(str, cmd))}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done

    # What the Dockerfile's build stage copies.
    src = tmp_path / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.py[cod]")
    src.mkdir()
    shutil.copy(ROOT / "pyproject.toml", src)
    shutil.copytree(ROOT / "api", src / "api", ignore=skip)
    shutil.copytree(ROOT / "search", src / "search", ignore=skip)
    shutil.copytree(ROOT / "operator", src / "operator", ignore=skip)
    shutil.copytree(ROOT / "trainer-image" / "kubetune_trainer", src / "trainer-image" / "kubetune_trainer",
                    ignore=skip)
    python = venv / "bin" / "python"
    sh(uv, "venv", "--quiet", "--python", sys.executable, venv)
    sh(uv, "pip", "install", "--quiet", "--python", python, "--constraint", CONSTRAINTS, f"{src}[trainer]")
    sh(uv, "pip", "check", "--python", python)
    listed = json.loads(sh(uv, "pip", "list", "--python", python, "--format", "json").stdout)
    installed = {canonicalize_name(p["name"]): p["version"] for p in listed}
    locked = pins()
    unpinned = {n for n in installed if n not in locked and n != "kubetune" and not TORCH_RUNTIME.match(n)}
    assert not unpinned, f"installed but not in {CONSTRAINTS.name}: {sorted(unpinned)}"
    assert not {n: v for n, v in installed.items() if n in locked and v != locked[n]}

    site = Path(sh(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    link_bytecode(site, Path(sysconfig.get_paths()["purelib"]))  # none where uv copied rather than linked

    (tmp_path / "train.py").write_text(TRAIN)
    done = sh(python, "train.py", tmp_path, ROOT / "testing", timeout=600)
    assert f"published {tmp_path / 'out'} (4 steps, test loss" in done.stdout, done.stdout
    published = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert published["steps"] == 4 and (tmp_path / "out" / "adapter_model.safetensors").is_file()
