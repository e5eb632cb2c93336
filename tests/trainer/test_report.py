"""`kubetune report` (issue 31): one self-contained HTML page about a run, or several side by side. The outputs are
written here like the trainer's (the manifest, metrics.jsonl, the card and the plots of record/files.py); the page
is read back with html.parser, and once in a real headless Chromium (test_the_page_in_a_real_browser)."""

from __future__ import annotations

import base64
import copy
import io
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from kubetune_api import StorageEndpoint
from kubetune_trainer.cli import app
from kubetune_trainer.record.files import write_record
from kubetune_trainer.record.history import HISTORY
from kubetune_trainer.record.report import Run, curves, load_run, page, parameters
from kubetune_trainer.storage import Storage
from PIL import Image
from typer.testing import CliRunner

from .test_record_card import CLASSIFIER, CONTEXT, _records

QUALITY = {"policy": {"duplicates": "drop", "leakage": "warn"}, "duplicates": {"train": {"count": 2}},
           "leakage": {"test": {"exact": 1, "near": 0}}, "dropped": {"train": {"count": 2}}, "findings": 3,
           "summary": "2 duplicates dropped in train; 1 test record also in train"}


def write_output(folder: Path, doc: dict | None = None, records: list[dict] | None = None) -> Path:
    """A published output like the trainer's: the plots and the card (write_record), metrics.jsonl, manifest.json."""
    doc = copy.deepcopy(doc or {**CLASSIFIER, "quality": QUALITY, "format": "classification"})
    records = _records() if records is None else records
    folder.mkdir(parents=True, exist_ok=True)
    (folder / HISTORY).write_text("".join(json.dumps(r) + "\n" for r in records))
    doc["record"] = write_record(folder, doc, records, copy.deepcopy(CONTEXT))
    (folder / "manifest.json").write_text(json.dumps(doc))
    return folder


FAST = {**copy.deepcopy(CLASSIFIER), "job": "tickets-fast", "hyperparameters": {
    **CLASSIFIER["hyperparameters"], "learningRate": 1e-3}, "metrics": {
    **CLASSIFIER["metrics"], "test": {**CLASSIFIER["metrics"]["test"], "accuracy": 0.9}}}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, Path]:
    """Two published outputs, drawn once for the module: tickets-clf, and tickets-fast (a higher learning rate)."""
    root = tmp_path_factory.mktemp("outputs")
    return {"clf": write_output(root / "clf"), "fast": write_output(root / "fast", FAST)}


def _load(folder: Path) -> Run:
    uri = str(folder / "manifest.json")
    return load_run(Storage(StorageEndpoint()), uri, json.loads(Path(uri).read_text()))


class Page(HTMLParser):
    """What a test reads of a page: the images' sources, the rows of the tables, the text, the resource links."""

    def __init__(self, text: str):
        super().__init__()
        self.images, self.rows, self.links, self.text, self._row = [], [], [], [], None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag == "tr":
            self._row = ([], attrs.get("class"))
        for name in ("src", "href", "action", "data", "poster", "srcset"):
            if attrs.get(name) and tag != "a" and not attrs[name].startswith("data:image/png;base64,"):
                self.links.append(attrs[name])
        if tag in ("script", "link", "iframe", "object", "embed", "base"):
            self.links.append(f"<{tag}>")

    def handle_endtag(self, tag):
        if tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data):
        self.text.append(data)
        if self._row is not None and data.strip():
            self._row[0].append(data.strip())

    def row(self, first: str) -> tuple[list[str], str | None]:
        (found,) = [r for r in self.rows if r[0] and r[0][0] == first]
        return found


def _png(src: str) -> np.ndarray:
    assert src.startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("L"), dtype=float)


def test_one_run_shows_its_results_plots_history_checkpoints_data_and_card(outputs):
    run = _load(outputs["clf"])
    text = page([run])
    seen = Page(text)
    assert not seen.links  # self-contained: nothing to load, no script
    assert "default-src 'none'; img-src data:" in text  # and the browser is told to load nothing else
    # every plot of the output and the metric history, each an image drawn on
    assert len(seen.images) == len(run.plots) + 1 == 5
    for src in seen.images:
        assert _png(src).std() > 5
    assert seen.row("accuracy")[0] == ["accuracy", "0.33", "0.85", "0.52"]  # base, fine-tuned, difference
    assert seen.row("loss")[0][:3] == ["loss", "1.1", "0.41"]
    assert seen.row("15")[0][-2:] == ["published", "s3://out/clf/checkpoints/step-00000015/"]
    assert "pruned" in seen.row("10")[0] and "2026-12-06 15:00:00" in seen.row("10")[0]
    assert seen.row("duplicates")[0] == ["duplicates", "train", "2", "drop"]
    assert seen.row("in train (leakage)")[0] == ["in train (leakage)", "test", "1 exact, 0 near", "warn"]
    words = " ".join(seen.text)
    assert QUALITY["summary"] in words and "s3://data/tickets/train.jsonl" in words
    assert CONTEXT.data_summary in words  # the data report's line, from the card's Data section
    assert "Use it" in words and "PeftModel.from_pretrained" in words  # the card's body, rendered
    assert "Hardware and time" in words and "2 x NVIDIA H100" in words
    assert seen.row("license")[0] == ["license", "apache-2.0"]  # its front matter
    assert "None" not in words and "{'" not in words  # for people: no reprs


def test_every_value_is_escaped(outputs, tmp_path):
    hostile = '<script>alert(1)</script><img src="https://example.com/x.png">'
    folder = Path(shutil.copytree(outputs["clf"], tmp_path / "bad"))
    doc = json.loads((folder / "manifest.json").read_text())
    doc.update(job=hostile, labels=[hostile, "b", "c"])
    doc["hyperparameters"]["scheduler"] = hostile
    doc["datasets"]["train"]["uri"] = hostile
    doc["record"]["plots"][hostile] = "plots/loss.png"
    (folder / "manifest.json").write_text(json.dumps(doc))
    card = (folder / "README.md").read_text().replace("## Task", f"{hostile}\n\n![x](https://e.com/y.png)\n\n## Task")
    (folder / "README.md").write_text(card)
    for runs in ([_load(folder)], [_load(folder), _load(outputs["clf"])]):
        text = page(runs)
        seen = Page(text)
        assert not seen.links and "<script>" not in text
        assert hostile in "".join(seen.text)  # shown as text
    assert "[image: x]" in "".join(Page(page([_load(folder)])).text)  # the card's images are named, not loaded


def test_several_runs_side_by_side(outputs):
    runs = [_load(outputs["clf"]), _load(outputs["fast"])]
    seen = Page(page(runs))
    assert not seen.links
    cells, mark = seen.row("hyperparameters.learningRate")
    assert cells == ["hyperparameters.learningRate", "0.0002", "0.001", "differs"] and mark == "differs"
    assert seen.row("method")[0] == ["method", "lora", "lora"] and seen.row("method")[1] is None
    assert seen.row("baseModel.uri")[0] == ["baseModel.uri", "hf://org/tiny-bert", "hf://org/tiny-bert"]
    # test, base model and difference of each run
    assert seen.row("accuracy")[0] == ["accuracy", "0.85", "0.33", "0.52", "0.9", "0.33", "0.57"]
    assert len(seen.images) == 1 and _png(seen.images[0]).std() > 5  # the curves, overlaid
    assert "A: tickets-clf" in " ".join(seen.text) and "B: tickets-fast" in " ".join(seen.text)


def test_the_parameters_are_flat_and_the_curves_need_a_history():
    flat = parameters(CLASSIFIER)
    assert flat["lora.r"] == 8 and flat["datasets.test.sha256"] == "abababababab" and flat["published step"] == 15
    assert curves([("a", [])], "nothing") is None
    assert curves([("a", _records()), ("b", [{"step": 1, "kind": "train", "learning_rate": 1e-4}])], "x")


def test_an_output_from_before_the_run_record(tmp_path):
    doc = {k: v for k, v in CLASSIFIER.items() if k != "checkpoints"}
    doc["history"] = [{"step": s, "loss": 2.0 / s} for s in range(1, 5)]
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    run = _load(tmp_path)
    assert run.records[0] == {"kind": "train", "step": 1, "loss": 2.0} and run.card is None and not run.plots
    seen = Page(page([run]))
    assert len(seen.images) == 1 and "No model card (README.md) in this output." in " ".join(seen.text)


def test_a_damaged_history_is_a_clear_error(outputs, tmp_path):
    folder = Path(shutil.copytree(outputs["clf"], tmp_path / "damaged"))
    with (folder / HISTORY).open("a") as f:
        f.write('{"step": 21, "kind": "tra\n')
    result = CliRunner().invoke(app, ["report", str(folder), "-o", str(tmp_path / "x.html")])
    lines = len((folder / HISTORY).read_text().splitlines())
    assert result.exit_code == 78 and f"metrics.jsonl, line {lines}: not JSON" in result.output


def test_the_command_writes_the_page(outputs, tmp_path):
    first, second = outputs["clf"], outputs["fast"]
    target = tmp_path / "report.html"
    result = CliRunner().invoke(app, ["report", str(first), str(second / "manifest.json"), "-o", str(target)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"wrote {target} (2 runs)"
    assert "2 runs compared" in target.read_text()
    result = CliRunner().invoke(app, ["report", str(tmp_path / "c"), "-o", str(target)])
    assert result.exit_code == 78 and "no manifest.json there" in result.output


def test_a_job_name_reads_its_manifest_from_the_status(outputs, tmp_path):
    import os
    import stat

    folder = outputs["clf"]
    kubectl = tmp_path / "kubectl"
    status = {"status": {"phase": "Succeeded", "result": {"manifestUri": str(folder / "manifest.json")}}}
    kubectl.write_text(f"#!/bin/sh\ncat <<'EOF'\n{json.dumps(status)}\nEOF\n")
    kubectl.chmod(kubectl.stat().st_mode | stat.S_IEXEC)
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}"}
    target = tmp_path / "job.html"
    result = CliRunner().invoke(app, ["report", "tickets-clf", "-n", "ml", "-o", str(target)], env=env)
    assert result.exit_code == 0, result.output
    assert "tickets-clf: run report" in target.read_text()
    status["status"] = {"phase": "Running"}
    kubectl.write_text(f"#!/bin/sh\ncat <<'EOF'\n{json.dumps(status)}\nEOF\n")
    result = CliRunner().invoke(app, ["report", "tickets-clf", "-o", str(target)], env=env)
    assert result.exit_code == 78 and "has published nothing yet (phase Running)" in result.output


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _not_blank(png: bytes) -> None:
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and image.width >= 800 and image.height >= 1000
        pixels = np.asarray(image.convert("RGB"), dtype=np.uint32)
    colors = np.unique((pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2])
    assert len(colors) > 50  # not one color: text, tables and plots drawn


@pytest.mark.slow
def test_the_page_in_a_real_browser(outputs, tmp_path):
    """Both pages, one run's and two runs compared, in one headless Chromium: they load with no console error and
    no request beyond the file itself, the DOM holds the metric values and every plot, decoded, and the screenshot
    is not blank. A canary page first shows that the checks see an error and a request."""
    from kubetune_dev.browser import INSTALL_HINT, Chromium

    if shutil.which("chromium") is None:
        pytest.fail(f"chromium not found: {INSTALL_HINT}")
    one, other = _load(outputs["clf"]), _load(outputs["fast"])
    pages = {"one": (tmp_path / "one.html", [one], 5, ("0.85", "0.33", "0.52", "step-00000015", QUALITY["summary"])),
             "two": (tmp_path / "two.html", [one, other], 1, ("0.85", "0.9", "0.57", "B: tickets-fast", "differs"))}
    ask = {"text": "document.body.innerText",
           "images": "[...document.images].map(i => [i.src.slice(0, 22), i.complete && i.naturalWidth > 0])",
           "scripts": "document.scripts.length + document.querySelectorAll('link, iframe, object, embed').length"}
    canary = tmp_path / "canary.html"  # what the checks must catch: a console error and a request out
    canary.write_text('<!DOCTYPE html><p>x<script>console.error("canary")</script><img src="http://127.0.0.1:9/x.png">')
    with Chromium.start() as browser:
        visit = browser.visit(canary, {})
        assert "canary" in visit.errors and "http://127.0.0.1:9/x.png" in visit.requests
        for name, (path, runs, images, values) in pages.items():
            path.write_text(page(runs))
            visit = browser.visit(path, ask)
            assert visit.errors == [], name
            outside = [url for url in visit.requests if not url.startswith("data:image/png;base64,")]
            assert outside == [path.resolve().as_uri()], name  # the page itself, then only its own images
            assert visit.answers["images"] == [["data:image/png;base64,", True]] * images, name
            assert visit.answers["scripts"] == 0
            text = visit.answers["text"]
            for value in values:
                assert value in text, (name, value)
            _not_blank(visit.screenshot)


def test_a_run_in_object_storage(outputs, storage, tmp_path):
    """An output URI on S3 (the kit's server): the manifest, the history, the card and the plots are read there."""
    storage.upload_dir(outputs["clf"], "s3://adapters/report-clf/")
    target = tmp_path / "s3.html"
    result = CliRunner().invoke(app, ["report", "s3://adapters/report-clf/", "--endpoint", storage.endpoint.endpoint,
                                      "-o", str(target)])
    assert result.exit_code == 0, result.output
    seen = Page(target.read_text())
    assert len(seen.images) == 5 and seen.row("accuracy")[0] == ["accuracy", "0.33", "0.85", "0.52"]
    assert "Use it" in " ".join(seen.text)
