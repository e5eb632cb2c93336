"""The published README.md: a Hugging Face model card, for a reader and for the Hub.

Its YAML front matter (huggingface_hub's ModelCardData) names the base model, the library that loads the folder
(peft for an adapter, transformers for a full or merged model), the pipeline, the tags, the datasets (their URIs;
their sha256 under `kubetune`), the license (output.license) and a `model-index` with the test metrics of the
fine-tuned model and of the base model before training (the baseline). The body says what was trained, on what,
how, on what hardware for how long, how well (the before/after table, the plots), and how to load it with peft,
transformers' pipeline() and vLLM. A merged model (output.merged) gets its own card in merged/README.md.

Built from the manifest document (manifest.Manifest.dump()) and a CardContext: a pure function of both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .history import scalars

PIPELINE_TAGS = {"causal-lm": "text-generation", "sequence-classification": "text-classification",
                 "image-classification": "image-classification"}
AUTO_CLASSES = {"causal-lm": "AutoModelForCausalLM", "sequence-classification": "AutoModelForSequenceClassification",
                "image-classification": "AutoModelForImageClassification"}
COUNTS = ("tokens", "samples", "generated")  # scalars of a result that count, not measure
PROJECT = "https://github.com/kubetune/kubetune"


@dataclass
class CardContext:
    """What the card says beyond the manifest."""

    base_model: str  # as the spec names it: org/name for hf://org/name, other URIs as given (publish.base_model_name)
    output_uri: str
    license: str | None = None  # output.license
    data_summary: str | None = None  # the data report's one line
    quality_summary: str | None = None  # the data-quality checks' one line, when they ran
    gpus: int = 0
    gpu_name: str | None = None
    plots: dict[str, str] = field(default_factory=dict)  # title -> path under the output folder


def model_card(doc: dict, ctx: CardContext, merged: bool = False) -> ModelCard:
    """The card of the published folder (`merged`: of the merged model under merged/)."""
    data = card_data(doc, ctx, merged)
    sections = (_intro(doc, ctx, merged), _task(doc), _data(doc, ctx), _training(doc), _hardware(doc, ctx),
                _results(doc), _plots(ctx, "../" if merged else ""), _checkpoints(doc), _usage(doc, ctx, merged),
                _files(merged))
    body = "\n\n".join(s for s in sections if s)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")


def card_data(doc: dict, ctx: CardContext, merged: bool = False) -> ModelCardData:
    task = doc["task"]
    adapter = doc["method"] != "full" and not merged
    tags = ["kubetune", task, doc["method"], *([doc["objective"]] if doc.get("objective") else []),
            *(["merged"] if merged else [])]
    return ModelCardData(
        model_name=doc["job"] + ("-merged" if merged else ""),
        base_model=ctx.base_model,
        library_name="peft" if adapter else "transformers",
        pipeline_tag=PIPELINE_TAGS.get(task),
        tags=tags,
        license=ctx.license,
        datasets=[d["uri"] for d in doc["datasets"].values()],
        eval_results=eval_results(doc) or None,
        kubetune={"job": doc["job"], "run": doc.get("run", {}).get("uid"), "output": ctx.output_uri,
                  "baseModelSha256": doc["baseModel"].get("sha256"),
                  "datasets": {split: {"uri": d["uri"], "sha256": d["sha256"]}
                               for split, d in doc["datasets"].items()}},
    )


def measures(result: dict | None) -> dict[str, float]:
    """A result's scalar metrics, counts left out."""
    return {k: v for k, v in scalars(result).items() if k not in COUNTS}


def eval_results(doc: dict) -> list[EvalResult]:
    """model-index: the test split's metrics, fine-tuned, then the base model's (named as such)."""
    metrics, test_data = doc.get("metrics") or {}, doc["datasets"].get("test")
    if not test_data or not metrics.get("test"):
        return []
    common = {"task_type": PIPELINE_TAGS.get(doc["task"], doc["task"]), "dataset_type": test_data["uri"],
              "dataset_name": f"{doc['job']} test split", "dataset_split": "test",
              "dataset_revision": test_data["sha256"]}
    base = measures((metrics.get("baseline") or {}).get("test"))
    return ([EvalResult(**common, metric_type=k, metric_name=k, metric_value=v)
             for k, v in measures(metrics["test"]).items()] +
            [EvalResult(**common, metric_type=k, metric_name=f"{k} (base model, before fine-tuning)", metric_value=v)
             for k, v in base.items()])


# -- the body ------------------------------------------------------------------------------------------------

def _number(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s" if m else f"{s} s"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(_number(c) for c in row) + " |" for row in rows])


def _intro(doc: dict, ctx: CardContext, merged: bool) -> str:
    what = "The base model with the adapter merged in" if merged else \
        "A LoRA adapter" if doc["method"] == "lora" else "A QLoRA adapter" if doc["method"] == "qlora" else \
        "A fully fine-tuned model"
    return (f"# {doc['job']}{' (merged)' if merged else ''}\n\n{what}: `{ctx.base_model}` fine-tuned for "
            f"{doc['task']} with [Kubetune]({PROJECT}) (FineTuneJob `{doc['job']}`), published at "
            f"`{ctx.output_uri}`.")


def _task(doc: dict) -> str:
    if doc["task"] == "causal-lm":
        what = "Text generation (causal language modelling)"
        if doc.get("objective"):
            what += f", preference-tuned with {doc['objective'].upper()} on (prompt, chosen, rejected) pairs"
    else:
        labels = [str(label) for label in doc.get("labels") or []]
        kind = "Text" if doc["task"] == "sequence-classification" else "Image"
        what = f"{kind} classification into {len(labels)} classes: {', '.join(labels)}"
    return f"## Task\n\n{what}. Headline metric: {doc.get('headline', 'loss')}."


def _data(doc: dict, ctx: CardContext) -> str:
    rows = [[split, f"`{d['uri']}`", d.get("samples", ""), d.get("tokens", ""), f"`{d['sha256'][:12]}`"]
            for split, d in doc["datasets"].items()]
    text = "## Data\n\n" + _table(["split", "file", "records", "tokens", "sha256"], rows)
    for line in (ctx.data_summary, ctx.quality_summary and f"Data quality: {ctx.quality_summary}"):
        if line:
            text += f"\n\n{line}"
    return text


def _training(doc: dict) -> str:
    method = doc["method"]
    lines = [f"Method: **{method}**" + (f", objective **{doc['objective']}**" if doc.get("objective") else "")]
    if doc.get("lora"):
        lora = doc["lora"]
        lines.append("LoRA: " + ", ".join(f"{k} {v}" for k, v in lora.items() if isinstance(v, int | float | str)))
    selected = doc.get("selected") or {}
    lines.append(f"Steps: {doc['steps']} of {doc['totalSteps']} ({doc['epochs']:.2f} epochs"
                 + (", early stopped" if doc.get("earlyStopped") else "") + f"), {doc['tokensTrained']:,} tokens "
                 f"trained; published: step {selected.get('step')} (output.select {selected.get('select')})")
    hp = [[k, v] for k, v in doc["hyperparameters"].items() if isinstance(v, int | float | str | bool)]
    return "## Training\n\n" + "  \n".join(lines) + "\n\n" + _table(["hyperparameter", "value"], hp)


def _hardware(doc: dict, ctx: CardContext) -> str:
    wall, train = doc.get("wallTimeSeconds", 0.0), doc.get("trainTimeSeconds", 0.0)
    gpus = f"{ctx.gpus} x {ctx.gpu_name}" if ctx.gpus and ctx.gpu_name else f"{ctx.gpus} GPUs" if ctx.gpus else \
        "CPU only"
    rows = [["processes", doc.get("processes")], ["accelerators", gpus], ["precision", doc.get("precision")],
            ["wall time", _duration(wall)], ["training time", _duration(train)]]
    if ctx.gpus:
        rows.append(["GPU-hours", f"{ctx.gpus * wall / 3600:.2f}"])
    return "## Hardware and time\n\n" + _table(["", ""], rows)


def _results(doc: dict) -> str:
    metrics = doc.get("metrics") or {}
    test = measures(metrics.get("test"))
    if not test:
        return "## Results\n\nNo test split (dataset.test): the run was not scored on held-out data."
    base = measures((metrics.get("baseline") or {}).get("test"))
    rows = [[k, base.get(k, "n/a"), v, _number(v - base[k]) if k in base else ""] for k, v in test.items()]
    note = "" if base else "\n\nNo baseline (evaluation.baseline: false): the base model was not scored."
    return ("## Results\n\nThe test split, before fine-tuning (the base model) and after:\n\n"
            + _table(["metric", "base model", "fine-tuned", "change"], rows) + note)


def _plots(ctx: CardContext, prefix: str) -> str:
    if not ctx.plots:
        return ""
    return "## Plots\n\n" + "\n\n".join(f"![{title}]({prefix}{path})" for title, path in ctx.plots.items())


def _checkpoints(doc: dict) -> str:
    rows = doc.get("checkpoints") or []
    if not rows:
        return ""
    names = list(dict.fromkeys(k for r in rows for k in (r.get("validation") or {})))
    table = [[r["step"], *[(r.get("validation") or {}).get(k, "") for k in names],
              "published" if r.get("published") else "" if r.get("kept", True) else "pruned", f"`{r['uri']}`"]
             for r in rows]
    return ("## Checkpoints\n\nWith the validation metrics at their step (`kubetune checkpoints "
            f"{doc['job']}`):\n\n" + _table(["step", *names, "", "uri"], table))


def _usage(doc: dict, ctx: CardContext, merged: bool) -> str:
    task, folder, base = doc["task"], f"./{doc['job']}" + ("-merged" if merged else ""), ctx.base_model
    auto, pipeline_tag = AUTO_CLASSES[task], PIPELINE_TAGS[task]
    processor = "AutoImageProcessor" if task == "image-classification" else "AutoTokenizer"
    example = {"causal-lm": '"Where is my order?", max_new_tokens=64',
               "sequence-classification": '"I love it"', "image-classification": '"photo.jpg"'}[task]
    source = f"{ctx.output_uri.rstrip('/')}/" + ("merged/" if merged else "")
    download = (f"```sh\naws s3 sync {source} {folder}/ --exclude 'checkpoints/*' --exclude 'merged/*'\n```"
                if source.startswith("s3://") else f"The folder: `{source}`.")
    if doc["method"] != "full" and not merged:
        load = (f"from peft import PeftModel\nfrom transformers import AutoConfig, {auto}, {processor}, pipeline\n\n"
                f"base = {auto}.from_pretrained(\"{base}\""
                + (f", config=AutoConfig.from_pretrained(\"{folder}\")" if task != "causal-lm" else "") + ")\n"
                f"model = PeftModel.from_pretrained(base, \"{folder}\").merge_and_unload()\n")
    else:
        load = (f"from transformers import {auto}, {processor}, pipeline\n\n"
                f"model = {auto}.from_pretrained(\"{folder}\")\n")
    processor_arg = "image_processor" if task == "image-classification" else "tokenizer"
    load += (f"{processor_arg} = {processor}.from_pretrained(\"{folder}\")\n"
             f"run = pipeline(\"{pipeline_tag}\", model=model, {processor_arg}={processor_arg})\nprint(run({example}))")
    text = f"## Use it\n\nDownload the folder:\n\n{download}\n\nWith transformers' `pipeline()`" + \
        (" and peft" if "peft" in load else "") + f":\n\n```python\n{load}\n```"
    if task == "causal-lm":
        serve = f"vllm serve {folder} --served-model-name {doc['job']}" if merged or doc["method"] == "full" else (
            f"vllm serve {base} --enable-lora --lora-modules {doc['job']}={folder} "
            f"--max-lora-rank {max(16, (doc.get('lora') or {}).get('r', 16))}")
        text += (f"\n\nWith vLLM (an OpenAI-compatible server; requests name the model `{doc['job']}`):\n\n"
                 f"```sh\n{serve}\n```")
    elif not merged and doc["method"] != "full":
        text += "\n\nvLLM does not load a classifier's adapter (its head is trained in full): serve the merged model."
    return text


def _files(merged: bool) -> str:
    up = "../" if merged else ""
    return (f"## Files\n\n- `{up}manifest.json`: what was trained, from what (sha256 of every input and file), how "
            f"and how well\n- `{up}metrics.jsonl`: the metric history, one JSON object per logged step, validation, "
            f"baseline and test\n- `{up}plots/`: the plots above, as PNG")
