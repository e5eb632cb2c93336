"""Kubetune's API: the resources' spec, status and defaults, the trainer's config and the exit-code contract.

Both the operator and the trainer import it; it imports nothing of theirs (and no torch, kopf or kubernetes), so
either side, and the CRD generator (`python -m kubetune_api.crd`), read the same typed models.

Modules: `finetunejob` (the FineTuneJob spec, its defaults and cross-field rules), `status` (its status, phases
and reasons), `trainer_config` (the spec plus the cluster-side fields: what the trainer reads), `exitcodes` (what
the trainer's exit codes mean to the operator), `crd` (the generator). The validation messages and value syntaxes
the CRD's CEL rules share are in `finetunejob`.
"""

from .exitcodes import (
    EXIT_CONFIG_INVALID,
    EXIT_DATA_INVALID,
    EXIT_OK,
    EXIT_OUTPUT_IN_USE,
    EXIT_PEER_LOST,
    EXIT_RETRYABLE,
    EXIT_UNEXPECTED,
    PERMANENT_EXIT_CODES,
    PERMANENT_REASONS,
)
from .finetunejob import (
    API_GROUP,
    API_VERSION,
    CLASSIFICATION_TASKS,
    DEFAULT_TRAINER_IMAGE,
    KIND,
    PREFERENCE_FORMATS,
    PREFERENCE_OBJECTIVES,
    TASK_FORMATS,
    AdapterDtype,
    AttentionKernel,
    BaseModelSpec,
    CheckpointSpec,
    DataFormat,
    DatasetSpec,
    DpoLoss,
    EarlyStoppingSpec,
    EvalMetric,
    EvaluationSpec,
    FineTuneJob,
    FineTuneJobSpec,
    GenerationSpec,
    Hyperparameters,
    LoraSpec,
    LossKernel,
    MethodSpec,
    MethodType,
    Model,
    Objective,
    ObjectiveParams,
    ObjectMeta,
    OutputDtype,
    OutputSpec,
    PerformanceSpec,
    Precision,
    ResourcesSpec,
    RunPolicy,
    Scheduler,
    SchedulingSpec,
    SecretRef,
    Select,
    StorageEndpoint,
    StorageSpec,
    Strategy,
    TaskType,
    Toleration,
    ValidationSpec,
    format_problem,
    task_problem,
)
from .status import (
    CONDITION_TYPES,
    TERMINAL,
    ChildRef,
    Condition,
    DatasetReport,
    FineTuneJobStatus,
    LastCheckpoint,
    MetricsScrape,
    Phase,
    Progress,
    QueueStatus,
    Reason,
    Result,
    ResultMetrics,
)
from .trainer_config import (
    CONFIG_VERSION,
    DEFAULT_GPU_TFLOPS,
    WORK_DIR,
    Hardware,
    MetricsSpec,
    TrainerConfig,
    join_uri,
)

__all__ = [
    "API_GROUP", "API_VERSION", "CLASSIFICATION_TASKS", "CONDITION_TYPES", "CONFIG_VERSION", "DEFAULT_GPU_TFLOPS",
    "DEFAULT_TRAINER_IMAGE",
    "EXIT_CONFIG_INVALID", "EXIT_DATA_INVALID", "EXIT_OK", "EXIT_OUTPUT_IN_USE", "EXIT_PEER_LOST", "EXIT_RETRYABLE",
    "EXIT_UNEXPECTED", "KIND", "PERMANENT_EXIT_CODES", "PERMANENT_REASONS", "PREFERENCE_FORMATS",
    "PREFERENCE_OBJECTIVES", "TASK_FORMATS", "TERMINAL", "WORK_DIR",
    "AdapterDtype", "AttentionKernel", "BaseModelSpec", "CheckpointSpec", "ChildRef", "Condition", "DataFormat",
    "DatasetReport", "DatasetSpec", "DpoLoss", "EarlyStoppingSpec", "EvalMetric", "EvaluationSpec", "FineTuneJob",
    "FineTuneJobSpec", "FineTuneJobStatus", "GenerationSpec", "Hardware", "Hyperparameters", "LastCheckpoint",
    "LoraSpec", "LossKernel", "MethodSpec", "MethodType", "MetricsScrape", "MetricsSpec", "Model", "ObjectMeta",
    "Objective", "ObjectiveParams", "OutputDtype", "OutputSpec", "PerformanceSpec", "Phase", "Precision",
    "Progress", "QueueStatus", "Reason", "ResourcesSpec", "Result", "ResultMetrics", "RunPolicy", "Scheduler",
    "SchedulingSpec", "SecretRef", "Select", "StorageEndpoint", "StorageSpec", "Strategy", "TaskType", "Toleration",
    "TrainerConfig", "ValidationSpec", "format_problem", "join_uri", "task_problem",
]
