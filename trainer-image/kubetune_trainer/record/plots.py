"""The run's plots, PNG files under <output>/plots/, drawn headless (matplotlib's Figure on the Agg canvas: no
pyplot, no display, no global state) from the metric history and the manifest:

- loss.png: the training loss and the validation loss over the steps, the published step marked;
- metric.png: the task's metric on the validation split over the steps (accuracy, token accuracy, ...);
- confusion.png: classification, the test split's confusion matrix;
- before-after.png: the test metrics of the base model and of the fine-tuned one;
- preference.png: preference tuning (dpo, orpo), the rewards margin and accuracy over the steps.

Each is drawn only when the run has what it shows; every one has labelled axes with units and the job's name in
its title. `draw` returns {title: path under the output}, what the card and the manifest list.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from .card import measures

DIR = "plots"
SIZE, DPI = (8, 4.5), 100
STEP_AXIS = "optimizer step"
METRICS = ("accuracy", "f1", "token_accuracy", "rewards_accuracy", "perplexity")  # the task metric, in this order
SHARES = ("accuracy", "f1", "f1_weighted", "precision", "recall", "token_accuracy", "rewards_accuracy")  # 0..1


def draw(directory: Path, doc: dict, records: list[dict]) -> dict[str, str]:
    """Draw the plots this run's data allows into directory/plots/; {title: "plots/<file>.png"}."""
    (directory / DIR).mkdir(parents=True, exist_ok=True)
    job = doc["job"]
    drawn = {}
    for title, name, plot in (("Loss", "loss", _loss), ("Task metric", "metric", _metric),
                              ("Confusion matrix", "confusion", _confusion),
                              ("Before and after fine-tuning", "before-after", _before_after),
                              ("Preference rewards", "preference", _preference)):
        figure = plot(job, doc, records)
        if figure is not None:
            path = f"{DIR}/{name}.png"
            figure.savefig(directory / path, dpi=DPI)
            drawn[title] = path
    return drawn


def _series(records: list[dict], kind: str, key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if r["kind"] == kind and isinstance(r.get(key), int | float)]
    return [s for s, _ in points], [v for _, v in points]


def _unit(doc: dict) -> str:
    if doc.get("objective"):
        return "preference loss"
    return "cross-entropy (nats per token)" if doc["task"] == "causal-lm" else "cross-entropy (nats per sample)"


def metric_label(name: str) -> str:
    return f"{name.replace('_', ' ')} (share, 0 to 1)" if name in SHARES else name.replace("_", " ")


def _figure(title: str, job: str, rows: int = 1, columns: int = 1):
    figure = Figure(figsize=SIZE, layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    figure.suptitle(f"{job}: {title}")
    return figure, axes


def _over_steps(ax, doc: dict, ylabel: str, legend: bool = True) -> None:
    """A plot over the steps: the published step marked, the axes labelled, a grid and the legend."""
    step = (doc.get("selected") or {}).get("step")
    if step is not None:
        ax.axvline(step, color="tab:green", linestyle="--", label=f"published (step {step})")
    ax.set(xlabel=STEP_AXIS, ylabel=ylabel)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend()


def _loss(job: str, doc: dict, records: list[dict]) -> Figure | None:
    train, validation = _series(records, "train", "loss"), _series(records, "validation", "loss")
    if not train[0] and not validation[0]:
        return None
    figure, axes = _figure("training and validation loss", job)
    ax = axes[0][0]
    if train[0]:
        ax.plot(*train, label="training (logging window)")
    if validation[0]:
        ax.plot(*validation, marker="o", label="validation")
    _over_steps(ax, doc, _unit(doc))
    return figure


def _metric(job: str, doc: dict, records: list[dict]) -> Figure | None:
    validation = [r for r in records if r["kind"] == "validation"]
    name = next((m for m in METRICS if any(isinstance(r.get(m), int | float) for r in validation)), None)
    if name is None:
        return None
    figure, axes = _figure(f"{name.replace('_', ' ')} on the validation split", job)
    ax = axes[0][0]
    ax.plot(*_series(records, "validation", name), marker="o", label="validation")
    base = measures(((doc.get("metrics") or {}).get("baseline") or {}).get("test")).get(name)
    if base is not None:
        ax.axhline(base, color="tab:gray", linestyle=":", label="base model (test split)")
    _over_steps(ax, doc, metric_label(name))
    return figure


def _confusion(job: str, doc: dict, records: list[dict]) -> Figure | None:
    confusion = ((doc.get("metrics") or {}).get("test") or {}).get("confusion_matrix")
    if not isinstance(confusion, dict) or not confusion.get("matrix"):
        return None
    labels, matrix = [str(label) for label in confusion["labels"]], confusion["matrix"]
    figure = Figure(figsize=(max(5, len(labels) * 0.6 + 3),) * 2, layout="constrained")
    ax = figure.subplots()
    image = ax.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=ax, label="test samples")
    ax.set(xticks=range(len(labels)), yticks=range(len(labels)), xlabel="predicted class", ylabel="true class",
           title=f"{job}: confusion matrix (test split)")
    ax.set_xticklabels(labels, rotation=45, ha="right")
    ax.set_yticklabels(labels)
    if len(labels) <= 20:  # the counts, readable up to a 20 x 20 matrix
        top = max(max(row) for row in matrix) or 1
        for i, row in enumerate(matrix):
            for j, n in enumerate(row):
                ax.text(j, i, str(n), ha="center", va="center", color="white" if n > top / 2 else "black")
    return figure


def _before_after(job: str, doc: dict, records: list[dict]) -> Figure | None:
    metrics = doc.get("metrics") or {}
    test, base = measures(metrics.get("test")), measures((metrics.get("baseline") or {}).get("test"))
    names = [k for k in test if k in base][:6]
    if not names:
        return None
    figure, axes = _figure("the test split before and after fine-tuning", job, 1, len(names))
    for ax, name in zip(axes[0], names, strict=True):
        bars = ax.bar(["base model", "fine-tuned"], [base[name], test[name]], color=["tab:gray", "tab:blue"])
        ax.bar_label(bars, fmt="%.3g")
        ax.set(ylabel=_unit(doc) if name == "loss" else metric_label(name), title=name.replace("_", " "))
        ax.tick_params(axis="x", labelrotation=30)
    return figure


def _preference(job: str, doc: dict, records: list[dict]) -> Figure | None:
    margin, accuracy = _series(records, "train", "rewards_margin"), _series(records, "train", "rewards_accuracy")
    if not margin[0]:
        return None
    figure, axes = _figure("preference rewards (training windows)", job, 1, 2)
    for ax, series, label, legend in ((axes[0][0], margin, "rewards margin, chosen - rejected (nats)", True),
                                      (axes[0][1], accuracy, "rewards accuracy (share of pairs, 0 to 1)", False)):
        ax.plot(*series)
        _over_steps(ax, doc, label, legend)
    return figure
