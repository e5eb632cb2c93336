"""Reading the trainer's config file (kubetune_api.TrainerConfig), or a FineTuneJob manifest in its place
(`kubetune run`), or a FineTuneSweep manifest (`kubetune sweep`); what is wrong with it is a ConfigError that names
the file and the fields."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TypeVar

import yaml
from kubetune_api import FineTuneJob, FineTuneJobSpec, FineTuneSweep, TrainerConfig
from kubetune_api.sweep import MAX_SWEEP_NAME, NAME_TOO_LONG
from pydantic import BaseModel, ValidationError

from .errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def _describe(err: ValidationError, source: str) -> str:
    problems = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(document)"
        problems.append(f"{field}: {e['msg']}")
    return f"{source}: invalid config: " + "; ".join(problems)


def _read_document(path: Path) -> dict:
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: file not found") from e
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML/JSON: {e}") from e
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return doc


def load_config(path: str | Path) -> TrainerConfig:
    """Read a TrainerConfig file, or a FineTuneJob manifest (its spec, named after the job)."""
    path = Path(path)
    doc = _read_document(path)
    try:
        if doc.get("kind") == "FineTuneJob":
            job = FineTuneJob.model_validate(doc)
            return TrainerConfig(**dict(job.spec), job_name=job.metadata.name)
        return TrainerConfig.model_validate(doc)
    except ValidationError as e:
        raise ConfigError(_describe(e, str(path))) from e


def _load(path: str | Path, model: type[M]) -> M:
    path = Path(path)
    try:
        return model.model_validate(_read_document(path))
    except ValidationError as e:
        raise ConfigError(_describe(e, str(path))) from e


def load_job(path: str | Path) -> FineTuneJob:
    return _load(path, FineTuneJob)


def load_sweep(path: str | Path) -> FineTuneSweep:
    """A FineTuneSweep manifest, checked by the model its CRD is made from (and the name rule of its CEL)."""
    sweep = _load(path, FineTuneSweep)
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", sweep.metadata.name) or \
            len(sweep.metadata.name) > MAX_SWEEP_NAME:
        raise ConfigError(f"{path}: invalid config: {NAME_TOO_LONG}")
    return sweep


def trial_config(spec: dict, job_name: str, source: str) -> TrainerConfig:
    """A FineTuneJob spec as written (a sweep's trial) as the trainer's config named `job_name`; what is wrong with
    it names `source` and the fields."""
    try:
        return TrainerConfig(**dict(FineTuneJobSpec.model_validate(spec)), job_name=job_name)
    except ValidationError as e:
        raise ConfigError(_describe(e, source)) from e
