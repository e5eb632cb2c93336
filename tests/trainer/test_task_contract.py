"""The contract every task honours (tasks/base.py), checked on every registered task and on each objective of the
causal-LM task, and on `Toy`: the least a task implements, a bag-of-words text classifier defined here.

Each case reads a few records of one of its formats on a tiny randomly initialised model and goes through what the
pipeline asks of a task: the processor, validation, examples, batches and blanks, the model, the loss, an
evaluation, what the manifest records, and each capability it has (tasks.CachesRows, GeneratesText, WindowMetrics).
A new task registers with @register and adds its case to CASES: test_every_registered_task_has_a_case says so.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from kubetune_api import TASK_FORMATS, DataFormat, Objective, TaskType, TrainerConfig
from kubetune_dev.tiny import make_tiny_base
from kubetune_dev.tiny_vision import make_tiny_vit
from kubetune_trainer.data import DatasetReport
from kubetune_trainer.data.cache import Cache, write_meta
from kubetune_trainer.data.records import load_records
from kubetune_trainer.evaluate import Evaluation, evaluate
from kubetune_trainer.objectives import OBJECTIVES
from kubetune_trainer.registry import Registry
from kubetune_trainer.tasks import TASKS, CachesRows, GeneratesText, Task, WindowMetrics, base, register, task_for
from PIL import Image

from tests.datafixtures import CHAT, CORPUS

LABELS = ["ham", "spam"]


class OneProcess:
    """What an Evaluation and window_metrics ask of accelerate's Accelerator, for one process on the CPU."""

    device = torch.device("cpu")
    num_processes, process_index = 1, 0

    @staticmethod
    def reduce(tensor, reduction="sum"):
        return tensor

    @staticmethod
    def autocast():
        return torch.autocast("cpu", enabled=False)


# -- the toy: the least a task implements ---------------------------------------------------------------------


@dataclass
class ToyExample:
    ids: list[int]
    label: int


class BagOfWords(torch.nn.Module):
    def __init__(self, vocabulary: int, classes: int):
        super().__init__()
        self.embed = torch.nn.EmbeddingBag(vocabulary, 16, mode="mean")
        self.head = torch.nn.Linear(16, classes)

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids, offsets))


class Toy(Task):
    """Classifies {"text", "label"} records (format classification) into dataset.labels with a bag of words over
    the base model's tokenizer. It borrows sequence-classification's type for its formats; a real task registers
    its own with @register(TaskType.x) (docs/adding-a-task.md)."""

    name = TaskType.sequence_classification
    unit, headline = "sample", "accuracy"

    def load_processor(self):
        from transformers import AutoTokenizer

        self.processor = AutoTokenizer.from_pretrained(self.model_dir)
        return self.processor

    def validate(self, split, path, uri, fmt, min_samples) -> DatasetReport:
        examples = self.examples(split, path, uri, fmt)
        return DatasetReport(uri, DataFormat.classification, len(examples), 0, 0, 0, 0)

    def examples(self, split, path, uri, fmt) -> list[ToyExample]:
        labels = self.config.dataset.labels
        return [ToyExample(self.processor(r.value["text"])["input_ids"], labels.index(r.value["label"]))
                for r in load_records(Path(path), uri)]

    def collate(self, examples: list[ToyExample]) -> dict[str, torch.Tensor]:
        lengths = torch.tensor([len(e.ids) for e in examples])
        return {"ids": torch.tensor([i for e in examples for i in e.ids]),
                "offsets": torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]]),
                "labels": torch.tensor([e.label for e in examples])}

    def blank(self, example: ToyExample) -> dict[str, torch.Tensor]:
        return {**self.collate([example]), "labels": torch.tensor([-100])}

    def units(self, batch) -> int:
        return int((batch["labels"] != -100).sum())

    def load_model(self, mixed_precision: str, sharded: bool):
        torch.manual_seed(self.config.hyperparameters.seed)
        return BagOfWords(len(self.processor), len(self.config.dataset.labels))

    def loss(self, model, batch):
        logits = model(batch["ids"], batch["offsets"])
        return F.cross_entropy(logits, batch["labels"], reduction="sum"), (batch["labels"] != -100).sum()

    def evaluation(self, split: str) -> Evaluation:
        return ToyEvaluation(self)

    def load_base(self, dtype: torch.dtype):
        return self.load_model("no", False).to(dtype)


class ToyEvaluation(Evaluation):
    def __init__(self, task: Toy):
        self.task, self.totals = task, torch.zeros(3, dtype=torch.float64)

    def add(self, model, batch) -> None:
        loss, labelled = self.task.loss(model, batch)
        right = (model(batch["ids"], batch["offsets"]).argmax(-1) == batch["labels"]).sum()
        self.totals += torch.stack([loss.double(), right.double(), labelled.double()])

    def result(self, accelerator) -> dict[str, Any]:
        loss, right, samples = accelerator.reduce(self.totals, reduction="sum").tolist()
        return {"loss": loss / samples, "accuracy": right / samples, "samples": int(samples)} if samples else {
            "loss": math.nan, "accuracy": math.nan, "samples": 0}


# -- the cases: a task (and objective), its base model and a few records -----------------------------------------


def texts(folder: Path) -> Path:
    return make_tiny_base(folder, CORPUS * 4, vocab_size=512, hidden_size=32, layers=2, heads=4, pretrain_steps=0)


def vision(folder: Path) -> Path:
    return make_tiny_vit(folder, image_size=32, patch_size=8, hidden_size=32, layers=2, heads=2)


def jsonl(records: list[dict]):
    def write(folder: Path) -> Path:
        path = folder / "train.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return path

    return write


def images(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    records = []
    for i, label in enumerate(LABELS * 2):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        records.append({"image": f"{i}.png", "label": label})
    return jsonl(records)(folder)


PAIRS = [{"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "Rome."},
         {"prompt": "Translate to French: good morning", "chosen": "bonjour", "rejected": "merci"}]
CLASSIFIED = [{"text": "The quick brown fox.", "label": "ham"}, {"text": "Kubernetes schedules pods.", "label": "spam"},
              {"text": "Paris is the capital of France.", "label": "ham"}]


@dataclass
class Case:
    task: type[Task] | TaskType
    fmt: DataFormat
    base: Any  # folder -> the model folder
    records: Any  # folder -> the train split
    sections: dict


CASES = {
    "causal-lm-sft": Case(TaskType.causal_lm, DataFormat.chat, texts, jsonl([CHAT, CHAT, CHAT]), {}),
    "causal-lm-dpo": Case(TaskType.causal_lm, DataFormat.preference, texts, jsonl(PAIRS), {"objective": "dpo"}),
    "causal-lm-orpo": Case(TaskType.causal_lm, DataFormat.preference, texts, jsonl(PAIRS), {"objective": "orpo"}),
    "sequence-classification": Case(TaskType.sequence_classification, DataFormat.classification, texts,
                                    jsonl(CLASSIFIED), {}),
    "image-classification": Case(TaskType.image_classification, DataFormat.classification, vision, images, {}),
    "toy": Case(Toy, DataFormat.classification, texts, jsonl(CLASSIFIED), {}),
}


def make_task(case: Case, folder: Path) -> tuple[Task, Path]:
    model = case.base(folder / "model")
    name = case.task.name if isinstance(case.task, type) else case.task
    doc = {"jobName": "contract", "task": name.value, "baseModel": {"uri": str(model)},
           "dataset": {"train": str(folder / "train.jsonl")},
           "method": {"type": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
           "hyperparameters": {"maxSeqLength": 64, "batchSize": 2},
           "output": {"uri": str(folder / "out")}, "metrics": {"enabled": False}, "workDir": str(folder / "work")}
    if name != TaskType.causal_lm:
        doc["dataset"]["labels"] = LABELS
    for key, value in case.sections.items():
        doc[key] = {**doc.get(key, {}), **value} if isinstance(value, dict) else value
    config = TrainerConfig.model_validate(doc)
    task = case.task(config, model) if isinstance(case.task, type) else task_for(config, model)
    task.load_processor()
    return task, case.records(folder)


@pytest.fixture(params=list(CASES), scope="module")
def contract(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    (folder / "model").mkdir()
    return (CASES[request.param], *make_task(CASES[request.param], folder))


# -- the contract -------------------------------------------------------------------------------------------------


def test_every_registered_task_and_objective_has_a_case():
    assert set(TASKS) == {c.task for c in CASES.values() if isinstance(c.task, TaskType)}
    assert set(OBJECTIVES) == {Objective(c.sections.get("objective", "sft")) for c in CASES.values()
                               if c.task == TaskType.causal_lm}


def test_the_registry_knows_each_task_by_its_type():
    for task_type, cls in TASKS.items():
        assert cls.name == task_type and issubclass(cls, Task)


def test_a_task_registers_once():
    assert register == TASKS.register and TASKS is base.TASKS
    assert TASKS[TaskType.sequence_classification].__name__ == "SequenceClassification"
    tasks = Registry("task")  # a registry of its own: the trainer's stays as it is

    @tasks.register(TaskType.sequence_classification)
    class Again(Toy):
        pass

    assert tasks == {TaskType.sequence_classification: Again} and Again.name == TaskType.sequence_classification
    with pytest.raises(ValueError, match="task sequence-classification is registered twice: Again and Toy"):
        tasks.register(TaskType.sequence_classification)(Toy)


def test_formats_come_from_the_spec(contract):
    case, task, _ = contract
    assert task.formats == tuple(f for f in TASK_FORMATS[task.name] if f != DataFormat.auto)
    assert case.fmt in task.formats


def test_validates_and_makes_batches(contract):
    case, task, train = contract
    report = task.validate("train", train, str(train), case.fmt, 1)
    assert report.format == case.fmt and report.samples == len(train.read_text().splitlines())
    examples = task.examples("train", train, str(train), report.format)
    assert len(examples) > 0
    batch = task.collate(list(examples[:2]))
    assert task.units(batch) > 0
    assert task.units(task.blank(examples[0])) == 0
    tokens, samples = task.size(examples[0])
    assert tokens >= 0 and samples >= 1
    assert task.unit in ("token", "sample")


def test_trains_and_evaluates(contract):
    case, task, train = contract
    examples = task.examples("train", train, str(train), case.fmt)
    model = task.load_model("no", False)
    batch = task.collate(list(examples[:2]))
    loss, units = task.loss(model, batch)
    assert torch.isfinite(loss) and int(units) == task.units(batch)
    loss.backward()
    assert any(p.grad is not None for p in model.parameters() if p.requires_grad)
    nothing, none = task.loss(model, task.blank(examples[0]))  # a process whose share of a step ran out
    assert float(nothing.detach()) == 0 and int(none) == 0
    nothing.backward()  # joins the others' backward pass (DDP and FSDP reduce the gradients there)
    result = evaluate(task, model, examples, "test", OneProcess(), 2)
    assert math.isfinite(result[task.headline]) and math.isfinite(result["loss"])
    blank = task.evaluation("test")
    blank.add(model, task.blank(examples[0]))
    assert blank.result(OneProcess()).get("samples", blank.result(OneProcess()).get("tokens")) == 0
    if isinstance(task, WindowMetrics):
        assert all(math.isfinite(v) for v in task.window_metrics(OneProcess()).values())
    if isinstance(task, GeneratesText):
        assert task.generation_metrics(model, OneProcess(), lambda: None) == {}  # evaluation.generation not set


def test_records_itself_and_publishes(contract, tmp_path):
    case, task, _ = contract
    described = task.describe()
    assert described["task"] == task.name.value and json.loads(json.dumps(described)) == described
    task.save(task.load_model("no", False), tmp_path)
    assert any(tmp_path.iterdir())
    assert task.load_base(torch.float32) is not None


def test_a_caching_task_reads_back_what_it_validated(contract, tmp_path):
    case, task, train = contract
    if not isinstance(task, CachesRows):
        pytest.skip(f"{case.task} does not cache rows")
    report = task.prepare("train", train, str(train), case.fmt, 1, tmp_path / "train")
    assert report.samples == task.validate("train", train, str(train), case.fmt, 1).samples
    write_meta(tmp_path, "key", {}, {"train": report})
    cached = task.load("train", Cache(tmp_path))
    assert len(cached) == len(task.examples("train", train, str(train), case.fmt))
    torch.testing.assert_close(task.collate([cached[0]]), task.collate([task.examples("train", train, str(train),
                                                                                      case.fmt)[0]]))
