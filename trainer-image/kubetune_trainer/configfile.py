"""Reading the trainer's config file (kubetune_api.TrainerConfig), or a FineTuneJob manifest in its place
(`kubetune run`); what is wrong with it is a ConfigError that names the file and the fields."""

from __future__ import annotations

from pathlib import Path

import yaml
from kubetune_api import FineTuneJob, TrainerConfig
from pydantic import ValidationError

from .errors import ConfigError


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


def load_job(path: str | Path) -> FineTuneJob:
    path = Path(path)
    try:
        return FineTuneJob.model_validate(_read_document(path))
    except ValidationError as e:
        raise ConfigError(_describe(e, str(path))) from e
