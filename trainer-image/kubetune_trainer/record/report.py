"""`kubetune report`: one self-contained HTML page about a run, or about several side by side.

One run: what it is (job, task, method, base model, output), its test metrics before and after, the plots of its
output, the curves of its metric history, its checkpoints with their metrics, its data (the data report's counts and
the data-quality findings), and its model card (README.md, rendered). Several runs: their parameters in one table,
the ones that differ marked; their test, baseline and difference metrics; their curves overlaid.

Self-contained: the CSS is inline, every image a PNG data: URI (the plots of the output, and the curves drawn here
headless on matplotlib's Agg canvas, like plots.py), no script and no request to anywhere. Every value from a
manifest, a history or a card is escaped: the data can hold anything.

`load_run` reads a run from its manifest's folder (object storage or a local folder); `page` is a pure function of
the runs.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

import yaml
from markdown_it import MarkdownIt
from matplotlib.figure import Figure

from ..errors import ConfigError
from ..quality.report import compact, quality_rows
from .card import measures
from .history import HISTORY, scalars
from .plots import DPI, SIZE, STEP_AXIS, metric_label

TRAIN_CURVES = ("loss", "learning_rate", "grad_norm", "tokens_per_second", "step_seconds", "gpu_memory_bytes",
                "rewards_margin", "rewards_accuracy")  # the training scalars drawn, in this order, when present
VALIDATION_CURVES = ("loss", "accuracy", "f1", "token_accuracy", "rewards_accuracy", "perplexity")
UNITS = {"learning_rate": "learning rate", "grad_norm": "gradient norm (L2)", "tokens_per_second": "tokens/s",
         "step_seconds": "seconds per step", "gpu_memory_bytes": "peak GPU memory (GiB)",
         "rewards_margin": "rewards margin (nats)", "loss": "loss"}
CARD_SHOWN = ("Task", "Training", "Hardware and time", "Use it")  # the card's sections (card.py) the page renders;
#                                                                  the others it shows from the manifest
CARD_METADATA = ("base_model", "library_name", "pipeline_tag", "license", "tags", "datasets")
GIB = 2**30
LABELS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # the runs of a comparison; the 27th on are numbered


@dataclass
class Run:
    """What the page shows of one run, read from its output."""

    source: str  # the manifest's URI (or path)
    manifest: dict
    records: list[dict] = field(default_factory=list)  # metrics.jsonl (the manifest's `history` when none)
    card: str | None = None  # README.md, as published
    plots: dict[str, bytes] = field(default_factory=dict)  # title -> PNG


# -- reading a run --------------------------------------------------------------------------------------------

def _relative(path: object) -> str | None:
    """A path the manifest names inside its folder, or None (absolute, or climbing out of it)."""
    if not isinstance(path, str) or not path:
        return None
    parts = PurePosixPath(path)
    return None if parts.is_absolute() or ".." in parts.parts else parts.as_posix()


def load_run(storage, manifest_uri: str, manifest: dict) -> Run:
    """The run whose manifest is at `manifest_uri`: its history, card and plots from the same folder, as its
    `record` names them (an output from before the run record: the manifest's `history` only)."""
    folder = manifest_uri.rsplit("/", 1)[0] + "/"
    record = manifest.get("record") or {}

    def fetch(path: object) -> bytes | None:
        rel = _relative(path)
        if rel is None or not storage.exists(folder + rel):
            return None
        with tempfile.TemporaryDirectory(prefix="kubetune-report-") as tmp:
            return storage.download_to(folder + rel, Path(tmp) / "file").read_bytes()

    history = fetch(record.get("metrics", HISTORY) if record else None)
    records = (_lines(folder + str(record.get("metrics", HISTORY)), history.decode(errors="replace")) if history else
               [{"kind": "train", **r} for r in manifest.get("history") or [] if isinstance(r, dict)])
    card = fetch(record.get("card"))
    plots = {str(title): png for title, path in (record.get("plots") or {}).items()
             if (png := fetch(path)) is not None}
    return Run(manifest_uri, manifest, records, card.decode(errors="replace") if card else None, plots)


def _lines(uri: str, text: str) -> list[dict]:
    """The records of a metrics.jsonl; a line that is not JSON is an error naming it."""
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except ValueError as e:
                raise ConfigError(f"{uri}, line {number}: not JSON ({e}); the metric history is damaged") from None
            if isinstance(record, dict):
                records.append(record)
    return records


# -- small pieces ---------------------------------------------------------------------------------------------

def e(value: object) -> str:
    """Any value as escaped text."""
    return html.escape(_text(value), quote=True)


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else "n/a"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, list | tuple):
        return ", ".join(_text(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k} {_text(v)}" for k, v in value.items())
    return str(value)


def _table(header: list[str], rows: list[list], classes: list[str] | None = None, caption: str = "") -> str:
    """An HTML table; the header and the cells escaped; `classes`: a CSS class per row."""
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join(("<tr>" if not c else f'<tr class="{e(c)}">') + "".join(f"<td>{e(v)}</td>" for v in row)
                   + "</tr>" for row, c in zip(rows, classes or [""] * len(rows), strict=True))
    cap = f"<caption>{e(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _image(title: str, png: bytes) -> str:
    data = base64.b64encode(png).decode()
    return (f'<figure><img alt="{e(title)}" src="data:image/png;base64,{data}"><figcaption>{e(title)}</figcaption>'
            "</figure>")


def _section(title: str, body: str, anchor: str) -> str:
    return f'<section id="{anchor}"><h2>{e(title)}</h2>{body}</section>' if body else ""


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _series(records: list[dict], kind: str, key: str) -> tuple[list[int], list[float]]:
    points = [(r.get("step"), r[key]) for r in records if r.get("kind") == kind and isinstance(r.get(key), int | float)
              and not isinstance(r.get(key), bool) and math.isfinite(r[key]) and isinstance(r.get("step"), int)]
    scale = 1 / GIB if key == "gpu_memory_bytes" else 1
    return [s for s, _ in points], [v * scale for _, v in points]


def curves(runs: list[tuple[str, list[dict]]], title: str) -> bytes | None:
    """The metric histories as one PNG: a panel per training scalar and per validation metric that any run has,
    one line per run (labelled with its name when several); None when there is nothing to draw."""
    panels = [(kind, key) for kind, keys in (("train", TRAIN_CURVES), ("validation", VALIDATION_CURVES))
              for key in keys if any(_series(records, kind, key)[0] for _, records in runs)]
    if not panels:
        return None
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(SIZE[0] * 1.5, SIZE[1] * 0.75 * rows), layout="constrained")
    axes = list(figure.subplots(rows, columns, squeeze=False).flat)
    figure.suptitle(title)
    for ax, (kind, key) in zip(axes, panels, strict=False):
        for name, records in runs:
            steps, values = _series(records, kind, key)
            if steps:
                ax.plot(steps, values, marker="o" if kind == "validation" else None, markersize=3, label=name)
        label = metric_label(key) if kind == "validation" else UNITS.get(key, metric_label(key))
        ax.set(title=f"{kind}: {key.replace('_', ' ')}", xlabel=STEP_AXIS, ylabel=label)
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize="small")
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    return _png(figure)


def _difference(metrics: dict) -> dict[str, float]:
    """Fine-tuned minus base model, per test metric: the manifest's own, or computed."""
    test, base = measures(metrics.get("test")), measures((metrics.get("baseline") or {}).get("test"))
    given = scalars(metrics.get("difference"))
    return {k: given.get(k, v - base[k]) for k, v in test.items() if k in base}


def _outcome(doc: dict) -> str:
    metrics, headline = doc.get("metrics") or {}, doc.get("headline") or "loss"
    test = measures(metrics.get("test")).get(headline)
    base = measures((metrics.get("baseline") or {}).get("test")).get(headline)
    if test is None:
        return "no test split"
    return f"test {headline} {_text(test)}" + (f" (base model {_text(base)})" if base is not None else "")


def _facts(doc: dict, source: str) -> list[list]:
    selected = doc.get("selected") or {}
    method = doc.get("method", "") + (f", {doc['objective']}" if doc.get("objective") else "")
    return [["job", doc.get("job")], ["output", source.rsplit("/", 1)[0] + "/"],
            ["task", doc.get("task")], ["method", method], ["base model", (doc.get("baseModel") or {}).get("uri")],
            ["steps", f"{_text(doc.get('steps'))} of {_text(doc.get('totalSteps'))}"],
            ["published step", f"{_text(selected.get('step'))} (output.select {_text(selected.get('select'))})"],
            ["result", _outcome(doc)]]


# -- one run --------------------------------------------------------------------------------------------------

def _results(doc: dict) -> str:
    metrics = doc.get("metrics") or {}
    test = measures(metrics.get("test"))
    if not test:
        return "<p>No test split (dataset.test): the run was not scored on held-out data.</p>"
    base, difference = measures((metrics.get("baseline") or {}).get("test")), _difference(metrics)
    rows = [[k, base.get(k, "n/a"), v, difference.get(k, "")] for k, v in test.items()]
    return _table(["metric", "base model", "fine-tuned", "difference"], rows, caption="the test split")


def _checkpoints(doc: dict) -> str:
    rows = [r for r in doc.get("checkpoints") or [] if isinstance(r, dict)]
    if not rows:
        return ""
    names = list(dict.fromkeys(k for r in rows for k in scalars(r.get("validation"))))
    table = [[r.get("step"), str(r.get("time") or "").replace("T", " ")[:19],
              *[scalars(r.get("validation")).get(k, "") for k in names],
              "published" if r.get("published") else "pruned" if r.get("kept") is False else "", r.get("uri")]
             for r in rows]
    return _table(["step", "time (UTC)", *names, "", "uri"], table,
                  caption="the metrics: the validation split's at each step")


def _data(doc: dict, card_data: str | None) -> str:
    """The splits (file, records, tokens, sha256), the data report's line (the card's Data section has it), and the
    data-quality findings with what the policy did."""
    datasets = {split: d for split, d in (doc.get("datasets") or {}).items() if isinstance(d, dict)}
    rows = [[split, d.get("uri"), d.get("samples"), d.get("tokens"), str(d.get("sha256") or "")[:12]]
            for split, d in datasets.items()]
    text = _table(["split", "file", "records", "tokens", "sha256"], rows) if rows else ""
    if doc.get("format"):
        text += f"<p>Format: {e(doc['format'])}.</p>"
    # The card's Data section: its table (above), the data report's line, the quality line (below, from the manifest)
    lines = [line for line in (card_data or "").splitlines()[1:]
             if line.strip() and not line.startswith(("|", "Data quality: "))]
    if lines:
        text += _markdown().render("\n\n".join(lines))
    quality = doc.get("quality")
    if isinstance(quality, dict):
        found = compact(quality)
        text += f"<h3>Data quality</h3><p>{e(found.get('summary') or 'no findings')}</p>"
        rows = quality_rows(found, quality.get("policy") or {})
        if rows:
            text += _table(["quality check", "split", "found", "action"], [list(r) for r in rows])
    return text


def _markdown() -> MarkdownIt:
    """Markdown as the card has it (CommonMark and tables); raw HTML is not rendered but escaped, an image only
    named."""
    markdown = MarkdownIt("commonmark", {"html": False}).enable("table")
    markdown.add_render_rule("image", lambda _self, tokens, i, *_: f"<em>[image: {e(tokens[i].content)}]</em>")
    return markdown


def card_parts(text: str | None) -> tuple[dict, str, dict[str, str]]:
    """A model card as (its front matter, the body before the first section less its title, {section title: the
    section's markdown, its heading line first})."""
    if not text:
        return {}, "", {}
    meta, body = {}, text
    if text.startswith("---\n") and "\n---" in text[4:]:
        front, body = text[4:].split("\n---", 1)
        try:
            meta = yaml.safe_load(front)
        except yaml.YAMLError:
            meta = None
    sections = re.split(r"(?m)^## ", body)
    intro = re.sub(r"(?m)^# .*$", "", sections[0])  # the card's title: the page has its own
    return (meta if isinstance(meta, dict) else {}, intro,
            {s.split("\n", 1)[0].strip(): s for s in sections[1:]})


def _card(run: Run, meta: dict, intro: str, sections: dict[str, str]) -> str:
    """The model card: its front matter as a table, its intro and the sections the page does not show from the
    manifest already (CARD_SHOWN)."""
    if not run.card:
        return "<p>No model card (README.md) in this output.</p>"
    kept = [intro, *(f"### {text}" for title, text in sections.items() if title in CARD_SHOWN)]
    rows = [[k, meta[k]] for k in CARD_METADATA if meta.get(k) is not None]
    front_table = _table(["card metadata", ""], rows) if rows else ""
    return f'{front_table}<div class="card">{_markdown().render(chr(10).join(kept))}</div>'


def _one(run: Run) -> str:
    doc = run.manifest
    meta, intro, card = card_parts(run.card)
    history = curves([(str(doc.get("job", "")), run.records)], f"{doc.get('job', '')}: metric history")
    sections = [
        _section("Run", _table(["", ""], _facts(doc, run.source)), "run"),
        _section("Results", _results(doc), "results"),
        _section("Plots", "".join(_image(title, png) for title, png in run.plots.items()), "plots"),
        _section("Metric history", _image("Metric history", history) if history else
                 "<p>No metric history in this output.</p>", "history"),
        _section("Checkpoints", _checkpoints(doc), "checkpoints"),
        _section("Data", _data(doc, card.get("Data")), "data"),
        _section("Model card", _card(run, meta, intro, card), "card"),
    ]
    return "".join(sections)


# -- several runs ---------------------------------------------------------------------------------------------

def _flat(prefix: str, value: object) -> list[tuple[str, object]]:
    if isinstance(value, dict):
        return [pair for k, v in value.items() for pair in _flat(f"{prefix}.{k}" if prefix else str(k), v)]
    return [(prefix, value)]


def parameters(doc: dict) -> dict[str, object]:
    """A run's parameters, flat: what was trained, how and on what."""
    datasets = {split: {"uri": d.get("uri"), "sha256": str(d.get("sha256") or "")[:12]}
                for split, d in (doc.get("datasets") or {}).items() if isinstance(d, dict)}
    base = doc.get("baseModel") or {}
    chosen = {"task": doc.get("task"), "objective": doc.get("objective"), "method": doc.get("method"),
              "baseModel": {"uri": base.get("uri"), "sha256": str(base.get("sha256") or "")[:12] or None},
              "datasets": datasets, "format": doc.get("format"),
              "hyperparameters": doc.get("hyperparameters"), "lora": doc.get("lora"), "precision": doc.get("precision"),
              "processes": doc.get("processes"), "steps": doc.get("steps"), "epochs": doc.get("epochs"),
              "tokensTrained": doc.get("tokensTrained"), "output.select": (doc.get("selected") or {}).get("select"),
              "published step": (doc.get("selected") or {}).get("step")}
    return {k: v for k, v in _flat("", chosen) if v is not None}


def _compare(runs: list[Run]) -> str:
    names = [f"{LABELS[i] if i < len(LABELS) else i + 1}: {run.manifest.get('job', '')}" for i, run in enumerate(runs)]
    legend = _table(["run", "output", "result"],
                    [[name, run.source.rsplit("/", 1)[0] + "/", _outcome(run.manifest)] for name, run in
                     zip(names, runs, strict=True)])
    # The parameters: one row each, the ones that differ between the runs marked.
    params = [parameters(run.manifest) for run in runs]
    keys = list(dict.fromkeys(k for p in params for k in p))
    differs = [len({_text(p.get(k)) for p in params}) > 1 for k in keys]
    rows = [[k, *[p.get(k, "") for p in params], "differs" if d else ""] for k, d in zip(keys, differs, strict=True)]
    table = _table(["parameter", *names, ""], rows, ["differs" if d else "" for d in differs],
                   caption=f"{sum(differs)} of {len(keys)} parameters differ")
    # The test metrics: fine-tuned, base model and the difference, per run.
    metrics = [run.manifest.get("metrics") or {} for run in runs]
    tests = [measures(m.get("test")) for m in metrics]
    bases = [measures((m.get("baseline") or {}).get("test")) for m in metrics]
    differences = [_difference(m) for m in metrics]
    names_of = list(dict.fromkeys(k for t in tests for k in t))
    header = ["metric", *[f"{n} {what}" for n in names for what in ("test", "base model", "difference")]]
    metric_rows = [[k, *[v for t, b, d in zip(tests, bases, differences, strict=True)
                        for v in (t.get(k, ""), b.get(k, ""), d.get(k, ""))]] for k in names_of]
    scores = _table(header, metric_rows, caption="the test split") if metric_rows else "<p>No test metrics.</p>"
    overlay = curves([(name, run.records) for name, run in zip(names, runs, strict=True)],
                     f"{len(runs)} runs: metric history")
    return "".join([
        _section("Runs", legend, "runs"),
        _section("Parameters", table, "parameters"),
        _section("Metrics", scores, "metrics"),
        _section("Curves", _image("Metric history, overlaid", overlay) if overlay else
                 "<p>No metric history in these outputs.</p>", "curves"),
    ])


# -- the page -------------------------------------------------------------------------------------------------

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #1b1f24; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #d0d7de; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; } caption { text-align: left; color: #57606a; }
th, td { border: 1px solid #d0d7de; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f6f8fa; } tr.differs td { background: #fff8c5; } td { overflow-wrap: break-word; }
figure { margin: 1em 0; } img { max-width: 100%; border: 1px solid #d0d7de; } figcaption { color: #57606a; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; } .meta { color: #57606a; }
""".strip()


# Defence in depth beside the escaping: the page may load nothing and run nothing, whatever the data holds.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"


def page(runs: list[Run], now: datetime | None = None) -> str:
    """The HTML page: one run's report, or several runs compared."""
    if not runs:
        raise ValueError("no runs")
    when = (now or datetime.now(UTC)).strftime("%Y-%m-%d %H:%M UTC")
    if len(runs) == 1:
        title, body = f"{runs[0].manifest.get('job', 'run')}: run report", _one(runs[0])
    else:
        title, body = f"{len(runs)} runs compared: " + ", ".join(str(r.manifest.get("job", "")) for r in runs), \
            _compare(runs)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>'
            f'<body><h1>{e(title)}</h1><p class="meta">Written by kubetune report, {e(when)}.</p>{body}</body>'
            "</html>\n")
