"""The task examples do what their READMEs promise: generate their data and base model, train with `kubetune run`
on CPU, and beat the untrained model on the test split by a wide margin. Slow (a minute or two each): the
examples are the first thing a newcomer runs, so they are run here as documented."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name, generated, margin", [
    ("text-classification", "work", 0.5),
    ("image-classification", "data", 0.4),
])
def test_the_example_beats_its_baseline(name, generated, margin, tmp_path):
    example = ROOT / "examples" / name
    out = tmp_path / generated
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as the READMEs advise on a busy machine
    subprocess.run([sys.executable, example / "generate.py", "--out", out], check=True, env=env,
                   capture_output=True, timeout=600)
    # local.yaml, with its paths (relative to the repository root) pointing at this test's copy of the data.
    text = (example / "local.yaml").read_text().replace(f"examples/{name}/{generated}", str(out))
    doc = yaml.safe_load(text)
    doc["spec"]["output"]["uri"] = str(tmp_path / "output") + "/"
    (tmp_path / "local.yaml").write_text(yaml.safe_dump(doc))
    done = subprocess.run([BIN / "kubetune", "run", tmp_path / "local.yaml", "--work-dir", tmp_path / "run",
                           "--metrics-port", "-1"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Warning" not in done.stderr and "{'" not in done.stdout + done.stderr
    manifest = json.loads((tmp_path / "output" / "manifest.json").read_text())
    test, baseline = manifest["metrics"]["test"], manifest["metrics"]["baseline"]["test"]
    assert test["accuracy"] - baseline["accuracy"] >= margin, (test, baseline)
    assert f"test accuracy {test['accuracy']:.4g} vs base {baseline['accuracy']:.4g}" in done.stdout
    assert_pipeline_names_the_labels(doc, tmp_path / "output", manifest["labels"])


def assert_pipeline_names_the_labels(doc: dict, output: Path, labels: list[str]) -> None:
    """transformers' pipeline() on the published model (LoRA: merged into its base) answers with class names."""
    from transformers import AutoConfig, pipeline

    if doc["spec"]["task"] == "sequence-classification":
        from kubetune_trainer.modeling import load_adapter
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        base = AutoModelForSequenceClassification.from_pretrained(doc["spec"]["baseModel"]["uri"],
                                                                  config=AutoConfig.from_pretrained(output))
        model = load_adapter(base, output).merge_and_unload()
        classify = pipeline("text-classification", model=model, tokenizer=AutoTokenizer.from_pretrained(output))
        answer = classify("Either Party may terminate this Agreement by giving thirty (30) days written notice.")
    else:
        from PIL import Image

        classify = pipeline("image-classification", model=str(output))
        answer = classify(Image.new("RGB", (64, 64), (128, 128, 128)))
    assert answer[0]["label"] in labels, answer
