"""What one kind of fine-tuning contributes to the pipeline: a small core interface, optional capabilities, and the
registry the pipeline finds a task in.

The pipeline (fetch -> validate -> tokenize -> train -> evaluate -> publish), the training loop, checkpointing,
the metrics and the operator know only `Task`. A task brings its record checks, how records become training
examples and batches, how the model is loaded, its loss and its evaluation metrics. What only some tasks do is a
capability, a mixin the shared code finds by type (`isinstance(task, CachesRows)`), never a flag:

- `CachesRows`: validates and tokenizes in one pass into the shared memory-mapped cache (data/cache.py).
- `GeneratesText`: scores generated answers on the test split (evaluation.generation).
- `WindowMetrics`: training metrics of its own beside the loss, on each log line.
- `TokenizesText`: its processor is a tokenizer, which validates without torch (`kubetune validate` hides it).

A task registers itself for its spec.TaskType with `@register(TaskType.x)`; its record formats are
spec.TASK_FORMATS[x], nothing else. A Task is made once per process for a run (`tasks.task_for`); it may keep
what validating the training split taught it (the class names of a classification task), so splits are validated
train first. docs/adding-a-task.md walks through adding one; tests/trainer/test_task_contract.py checks them all.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from kubetune_api import TASK_FORMATS, DataFormat, EvalMetric, TaskType

from ..registry import Registry

if TYPE_CHECKING:
    import torch
    from kubetune_api import TrainerConfig

    from ..data import DatasetReport
    from ..data.cache import Cache
    from ..evaluate import Evaluation
    from ..quality.checks import Quality, SplitChecks
    from ..storage import Storage

Beat = Callable[[], None]


class Task(ABC):
    name: ClassVar[TaskType]  # set by @register
    unit: str  # what the loss is a mean over, "token" or "sample"
    headline: str  # the test metric `kubectl get` shows: "loss" or "accuracy"

    def __init__(self, config: TrainerConfig, model_dir: Path, storage: Storage | None = None):
        """`storage`: for what records point at in object storage (images), with the run's credentials."""
        self.config, self.model_dir, self.storage = config, Path(model_dir), storage
        self.processor: Any = None  # set by load_processor
        self.quality: Quality | None = None  # the data-quality checks of this pass over the splits (prepare.py)

    @property
    def formats(self) -> tuple[DataFormat, ...]:
        """The concrete record formats the task reads: spec.TASK_FORMATS of its type, less auto."""
        return tuple(f for f in TASK_FORMATS[self.name] if f != DataFormat.auto)

    @property
    def remote_code(self) -> dict[str, bool]:
        """from_pretrained's trust_remote_code, only when the spec opts in (baseModel.trustRemoteCode): otherwise
        transformers refuses a folder that needs its own Python code rather than running it."""
        return {"trust_remote_code": True} if self.config.base_model.trust_remote_code else {}

    @property
    def weight_formats(self) -> dict[str, bool]:
        """from_pretrained's use_safetensors=True for the model's weights (never the config's or the tokenizer's),
        unless the spec opts in to pickle-based formats (baseModel.allowPickleWeights): loading those can run
        code. fetch.check_weight_formats has refused a folder without safetensors weights already."""
        return {} if self.config.base_model.allow_pickle_weights else {"use_safetensors": True}

    # -- data ---------------------------------------------------------------------------------------------

    def checks(self, split: str, uri: str) -> SplitChecks | None:
        """The quality checks of a split, when prepare.validate_splits has set up this pass's."""
        return self.quality.checks(split, uri) if self.quality else None

    @abstractmethod
    def load_processor(self) -> Any:
        """The tokenizer or image processor of the model folder (ConfigError if it has none); kept as
        `self.processor` and saved with the output."""

    @abstractmethod
    def validate(self, split: str, path: Path, uri: str, fmt: DataFormat, min_samples: int) -> DatasetReport:
        """Check every record of a split (a local file or folder fetched from `uri`); raise DatasetError (exit 65)
        naming the file and line (or object key) of the first bad one. `fmt` may be auto for the train split;
        the report says the format found, which the other splits are then validated with."""

    @abstractmethod
    def examples(self, split: str, path: Path, uri: str, fmt: DataFormat) -> Sequence:
        """The split as training-ready examples (tokenized, packed where the task packs), indexable."""

    @abstractmethod
    def collate(self, examples: list) -> dict[str, torch.Tensor]:
        """A batch of examples, as the model's keyword arguments plus what `loss` and `units` read."""

    @abstractmethod
    def blank(self, example) -> dict[str, torch.Tensor]:
        """A batch shaped like collate([example]) that trains and scores nothing (0 units): a process whose share
        of a step or an evaluation ran out still joins the collectives."""

    @abstractmethod
    def units(self, batch: dict[str, torch.Tensor]) -> int:
        """The loss-bearing units of a batch: trained tokens, or labelled samples."""

    def size(self, example) -> tuple[int, int]:
        """(tokens, samples) of an example, for throughput: tokens is 0 for images, samples > 1 when packed."""
        return 0, 1

    # -- model --------------------------------------------------------------------------------------------

    @abstractmethod
    def load_model(self, mixed_precision: str, sharded: bool):
        """The model to train, wrapped for config.method (LoRA, QLoRA or full), initialised from
        hyperparameters.seed alone, so every process builds the same one."""

    @abstractmethod
    def loss(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss over the batch's units, the number of units), in this process."""

    @abstractmethod
    def evaluation(self, split: str) -> Evaluation:
        """A fresh accumulator for evaluating `split` ("validation" or "test")."""

    # -- what is recorded and published ---------------------------------------------------------------------

    @abstractmethod
    def load_base(self, dtype: torch.dtype):
        """The base model for inference or merging (output.merged), without an adapter: the task's auto class and
        head settings, every weight in `dtype`, on the CPU."""

    def describe(self) -> dict[str, Any]:
        """What the manifest and the checkpoints' fingerprint record of the task (its labels, for example)."""
        return {"task": self.name.value}

    def save(self, model, directory: Path) -> None:
        """Add what the task needs beside the weights to the output folder (the processor; a classifier's config
        with id2label/label2id)."""
        self.processor.save_pretrained(directory)

    @staticmethod
    def better(metric: EvalMetric, value: float, best: float | None, min_delta: float = 0.0) -> bool:
        """Whether `value` of `metric` improves on `best` by more than min_delta (loss down, the others up)."""
        if best is None:
            return True
        return value < best - min_delta if metric == EvalMetric.loss else value > best + min_delta


# -- capabilities: what only some tasks do, found by isinstance ---------------------------------------------------


class CachesRows(ABC):
    """The task's examples are token arrays: it validates and tokenizes in one pass into the memory-mapped cache of
    data/cache.py, shared by the processes, the retries and the jobs with the same data. The pipeline then calls
    prepare() and load() instead of validate() and examples()."""

    @abstractmethod
    def prepare(self, split: str, path: Path, uri: str, fmt: DataFormat, min_samples: int, into: Path,
                beat: Beat | None = None) -> DatasetReport:
        """validate(), writing the split's training-ready arrays into the folder `into` in the same pass; beats
        as the records go by (a pass over millions of records takes minutes)."""

    @abstractmethod
    def load(self, split: str, cache: Cache) -> Sequence:
        """examples() of a split, from the cache that prepare() wrote (memory-mapped)."""


class GeneratesText(ABC):
    """The task generates text, and scores generated answers on the test split (evaluation.generation)."""

    @abstractmethod
    def generation_metrics(self, model, accelerator, beat: Beat) -> dict[str, Any]:
        """Metrics of generated answers on the test split; {} when the spec asks for none. A collective: every
        process calls it."""


class WindowMetrics(ABC):
    """The task has training metrics of its own beside the loss (preference rewards), on each log line."""

    @abstractmethod
    def window_metrics(self, accelerator) -> dict[str, float]:
        """The metrics since the last call, over every process (a collective when there are any); {} when none."""


class TokenizesText:
    """The task's processor is a tokenizer, and nothing its validation does needs torch: `kubetune validate`
    hides torch from transformers for it (validation.without_torch). Not an image task: transformers' fast image
    processors compute with torch, and the slow ones it would fall back to give other pixel values."""


# -- the registry -------------------------------------------------------------------------------------------------

TASKS: Registry[type[Task]] = Registry("task")  # spec.task -> the class that trains it
register = TASKS.register  # class decorator: @register(TaskType.x)
