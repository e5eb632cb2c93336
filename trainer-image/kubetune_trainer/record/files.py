"""The run record's files in the output folder, written by rank 0 before publishing: the plots, then the model
card that links them (and the merged model's card); the metric history is already there (History.write)."""

from __future__ import annotations

from pathlib import Path

from .card import CardContext, model_card
from .history import HISTORY

CARD = "README.md"


def write_record(out: Path, doc: dict, records: list[dict], ctx: CardContext) -> dict:
    """Draw the plots and write the card(s) into `out` for the manifest document `doc`; returns the manifest's
    `record`: {"metrics", "card", "plots": {title: path}, and "mergedCard" with output.merged}."""
    from . import plots  # matplotlib: for the process that publishes, not for every one that imports the pipeline

    ctx.plots = plots.draw(out, doc, records)
    model_card(doc, ctx).save(out / CARD)
    record = {"metrics": HISTORY, "card": CARD, "plots": ctx.plots}
    if doc.get("merged"):
        merged_card = doc["merged"]["path"].rstrip("/") + "/" + CARD
        model_card(doc, ctx, merged=True).save(out / merged_card)
        record["mergedCard"] = merged_card
    return record
