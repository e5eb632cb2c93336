"""`kubetune sweep`: a FineTuneSweep's trials one after another in one process, the operator's search (the same
trials, names, outputs and data cache), pruned trials stopped through the loop's StopSignal, maxFailedTrials,
promote best; a live leaderboard and the best trial at the end. The fakes stand in for `pipeline.run`; the last test
runs the real trainer on a tiny model made from a config."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from kubetune_api import FineTuneSweep, SweepPhase, TrialPhase
from kubetune_search import grid_point
from kubetune_trainer.cli import app
from kubetune_trainer.errors import DatasetError, Preempted
from kubetune_trainer.sweep import leaderboard, run_sweep
from rich.console import Console
from typer.testing import CliRunner

LR = "hyperparameters.learningRate"


def manifest(out: Path, name: str = "lr", template: dict | None = None, **spec) -> dict:
    template = template or {"baseModel": {"uri": str(out / "base")},
                            "dataset": {"train": str(out / "train.jsonl"), "validation": str(out / "val.jsonl")},
                            "hyperparameters": {"maxSteps": 8}, "evaluation": {"everySteps": 2}}
    body = {"template": template, "parameters": [{"path": LR, "min": 1e-5, "max": 1e-1, "log": True}],
            "output": {"uri": str(out / "sweep") + "/"}, "maxTrials": 3, "seed": 1, **spec}
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneSweep", "metadata": {"name": name}, "spec": body}


def sweep(out: Path, **spec) -> FineTuneSweep:
    return FineTuneSweep.model_validate(manifest(out, **spec))


class FakeTrainer:
    """pipeline.run's contract: events through `report`, Preempted at the step after a requested stop (the loop
    checkpoints first), the published manifest. A trial's validation loss is `losses(lr)` at each evaluation."""

    def __init__(self, losses=lambda lr: [10 * lr + s for s in (4, 3, 2, 1)], fail=None):
        self.losses, self.fail, self.configs = losses, fail, []

    def __call__(self, config, report, stop):
        self.configs.append(config)
        report({"event": "phase", "phase": "training"})
        report({"event": "plan", "total_steps": 8, "start_step": 0})
        if self.fail:
            raise self.fail
        for i, loss in enumerate(self.losses(config.hyperparameters.learning_rate)):
            step = 2 * (i + 1)
            if stop.requested:  # the loop's next step: a checkpoint, then Preempted
                report({"event": "stopped", "step": step - 1, "reason": stop.why})
                raise Preempted(f"stopped by {stop.why} at step {step - 1}")
            report({"event": "train", "step": step, "loss": loss})
            report({"event": "validation", "step": step, "loss": loss})
        out = Path(config.output.uri)
        out.mkdir(parents=True, exist_ok=True)
        doc = {"job": config.job_name, "steps": 8, "selected": {"step": 8}, "metrics": {"validation": {"loss": loss}}}
        (out / "adapter_model.safetensors").write_text(config.job_name)
        (out / "manifest.json").write_text(json.dumps(doc))
        return doc


def test_the_trials_are_the_operators_one_after_another(tmp_path):
    """Random search samples each trial from (seed, number) alone: the operator's decide, creating the three trials
    at once, makes the same ones, with the same names, outputs and one data cache."""
    from datetime import UTC, datetime

    from kubetune_operator import sweep as operator

    fake = FakeTrainer()
    run = run_sweep(sweep(tmp_path, algorithm="random", earlyStopping="none"), tmp_path / "work", train=fake)
    doc = manifest(tmp_path, algorithm="random", earlyStopping="none", parallelTrials=3)
    created = operator.decide({**doc, "metadata": {"name": "lr", "uid": "u"}}, [], datetime.now(UTC)).create
    assert [c.job_name for c in fake.configs] == [j["metadata"]["name"] for j in created] == ["lr-0", "lr-1", "lr-2"]
    assert [r.parameters for r in run.trials] == [json.loads(j["metadata"]["annotations"][operator.PARAMETERS])
                                                 for j in created]
    assert [c.output.uri for c in fake.configs] == [j["spec"]["output"]["uri"] for j in created]
    assert {c.dataset.cache_uri for c in fake.configs} == {created[0]["spec"]["dataset"]["cacheUri"]}
    assert [c.hyperparameters.learning_rate for c in fake.configs] == [r.parameters[LR] for r in run.trials]
    assert not any(c.metrics.enabled for c in fake.configs) and fake.configs[0].work_dir == str(tmp_path / "work")
    assert run.phase == SweepPhase.Succeeded and run.best.metric == min(r.metric for r in run.trials)
    assert [r.step for r in run.trials] == [8, 8, 8]


def test_a_trial_trailing_at_a_rung_is_stopped_and_pruned(tmp_path):
    """ASHA (rungs at steps 2 and 6): a grid puts the best learning rate first, the others trail it at step 2 and
    stop at the next step, Pruned; the best is the first."""
    grid = {"algorithm": "grid", "parameters": [{"path": LR, "values": [1e-3, 1e-2, 1e-1]}], "seed": 0}
    spec = sweep(tmp_path, **grid).spec
    order = [grid_point(spec, n)[LR] for n in range(3)]
    fake = FakeTrainer(losses=lambda lr: [1 + abs(lr - order[0]) + s for s in (3, 2, 1, 0)])
    run = run_sweep(sweep(tmp_path, **grid), tmp_path / "work", train=fake)
    assert [r.phase for r in run.trials] == [TrialPhase.Succeeded, TrialPhase.Pruned, TrialPhase.Pruned]
    assert [r.step for r in run.trials] == [8, 2, 2]
    assert run.trials[1].reason.startswith("loss 4.") and "SuccessiveHalvingPruner" in run.trials[1].reason
    assert run.best is run.trials[0] and run.phase == SweepPhase.Succeeded


def test_max_failed_trials_ends_the_sweep_with_the_trials_reason(tmp_path):
    fake = FakeTrainer(fail=DatasetError("train.jsonl", 3, "not JSON"))
    run = run_sweep(sweep(tmp_path, maxTrials=5, maxFailedTrials=2), tmp_path / "work", train=fake)
    assert len(fake.configs) == 2 and [r.phase for r in run.trials] == [TrialPhase.Failed] * 2
    assert (run.phase, run.reason, run.exit_code) == (SweepPhase.Failed, "TooManyFailedTrials", 65)
    assert "lr-1: DatasetInvalid: train.jsonl:3: not JSON" in run.message


def test_values_that_make_the_template_invalid_end_the_sweep(tmp_path):
    fake = FakeTrainer()
    run = run_sweep(sweep(tmp_path, parameters=[{"path": LR, "values": [2.0, 3.0]}]), tmp_path / "work",
                    train=fake)
    assert not fake.configs and (run.reason, run.exit_code) == ("InvalidChildSpec", 78)
    assert "hyperparameters.learningRate: Input should be less than or equal to 1" in run.message


def test_promote_best_copies_the_best_trials_output(tmp_path):
    run = run_sweep(sweep(tmp_path, promote="best"), tmp_path / "work", train=FakeTrainer())
    best = tmp_path / "sweep" / "best"
    record = json.loads((best / "sweep.json").read_text())
    assert run.promoted == str(best) + "/" and record["trial"] == run.best.name
    assert record["parameters"] == run.best.parameters and record["metric"] == {"loss": run.best.metric}
    assert (best / "adapter_model.safetensors").read_text() == run.best.name


def test_promote_retrain_trains_the_best_parameters_on_train_and_validation_then_promotes_that(tmp_path):
    """As the operator's <sweep>-fit: the best trial's values, train + validation, nothing evaluated while training,
    its own output (retrain/), and that output promoted, sweep.json naming the trial and the retrain."""
    trainer = FakeTrainer()
    run = run_sweep(sweep(tmp_path, promote="retrain"), tmp_path / "work", train=trainer)
    fit = trainer.configs[-1]
    assert len(trainer.configs) == 4 and fit.job_name == "lr-fit" == run.retrain.name
    assert fit.dataset.train_on_validation and fit.evaluation.every_steps is None
    assert fit.hyperparameters.learning_rate == run.best.parameters[LR]
    assert fit.output.uri == str(tmp_path / "sweep" / "retrain") + "/"
    best = tmp_path / "sweep" / "best"
    record = json.loads((best / "sweep.json").read_text())
    assert record["trial"] == run.best.name and record["retrain"] == "lr-fit"
    assert (best / "adapter_model.safetensors").read_text() == "lr-fit"
    assert run.phase == SweepPhase.Succeeded and "retrained as lr-fit" in run.message
    console = Console(width=100, record=True, color_system=None)
    console.print(leaderboard(run))
    assert "lr-fit" in console.export_text()


def test_a_failed_retrain_fails_the_sweep_with_its_reason(tmp_path):
    trainer = FakeTrainer()

    def fit_fails(config, report, stop):
        if config.job_name.endswith("-fit"):
            raise DatasetError("s3://x/val.jsonl", 3, "no assistant turn")
        return trainer(config, report, stop)

    run = run_sweep(sweep(tmp_path, promote="retrain"), tmp_path / "work", train=fit_fails)
    assert (run.phase, run.reason, run.exit_code) == (SweepPhase.Failed, "RetrainFailed", 65)
    assert "lr-fit: DatasetInvalid: s3://x/val.jsonl:3: no assistant turn" in run.message
    assert not (tmp_path / "sweep" / "best").exists()


def test_the_leaderboard_shows_each_trial_for_people(tmp_path):
    run = run_sweep(sweep(tmp_path, algorithm="grid", parameters=[{"path": LR, "values": [1e-3, 1e-1]}]),
                    tmp_path / "work", train=FakeTrainer())
    console = Console(width=100, record=True, color_system=None)
    console.print(leaderboard(run))
    text = console.export_text()
    assert "learningRate" in text and "loss (minimize)" in text and "Succeeded" in text and "best" in text
    assert "TrialPhase" not in text and "{" not in text


def test_a_sigterm_stops_the_sweep_as_it_stopped_the_trial(tmp_path):
    """Not the pruner's stop: the trial checkpointed, and the sweep ends there (Preempted, exit 75)."""

    def sigterm(config, report, stop):
        stop(15, None)  # the StopSignal as the SIGTERM handler
        raise Preempted("stopped by SIGTERM at step 1; checkpoint written, the run resumes from it")

    with pytest.raises(Preempted):
        run_sweep(sweep(tmp_path), tmp_path / "work", train=sigterm)


def test_a_bad_manifest_is_refused_naming_the_field(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(tmp_path / "termination-log"))
    doc = manifest(tmp_path, parameters=[{"path": LR, "min": 1e-1, "max": 1e-3}])
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(doc))
    done = CliRunner().invoke(app, ["sweep", str(tmp_path / "sweep.yaml")])
    assert done.exit_code == 78
    assert "spec.parameters.0: Value error, parameters[].min must not be above parameters[].max" in done.output


@pytest.mark.slow
def test_kubetune_sweep_runs_a_tiny_model_prunes_and_promotes(tmp_path, monkeypatch):
    """The real trainer: three trials of a tiny Llama made from a config, 8 steps; the seeded grid's order is 3e-2,
    1e-2, 1e-6, and the last (a learning rate too small to move the loss) trails the first at step 2: pruned. The
    best promoted, the data tokenized once into the sweep's cache."""
    from kubetune_dev import demo_data
    from kubetune_dev.tiny import make_tiny_base

    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(tmp_path / "termination-log"))
    texts = demo_data.generic_texts(60) + demo_data.chat_texts(demo_data.support_records(40))
    make_tiny_base(tmp_path / "base", texts, vocab_size=384, hidden_size=32, layers=1, heads=2)
    data = demo_data.write_support_dataset(tmp_path / "data", train=32, validation=8, test=0)
    template = {"baseModel": {"uri": str(tmp_path / "base")},
                "dataset": {"train": str(data["train"]), "validation": str(data["validation"])},
                "hyperparameters": {"maxSteps": 8, "batchSize": 4, "maxSeqLength": 96, "warmupRatio": 0.0},
                "evaluation": {"everySteps": 2, "baseline": False}, "checkpoint": {"everySteps": 100}}
    doc = manifest(tmp_path, name="tiny", template=template, algorithm="grid", promote="best",
                   parameters=[{"path": LR, "values": [3e-2, 1e-6, 1e-2]}], seed=0)
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(doc))
    started = time.monotonic()
    done = CliRunner().invoke(app, ["sweep", str(tmp_path / "sweep.yaml"), "--work-dir", str(tmp_path / "work")])
    print(f"kubetune sweep: {time.monotonic() - started:.1f} s\n{done.output}")
    assert done.exit_code == 0, done.output
    assert "Pruned" in done.output and "best tiny-" in done.output and "{" not in done.output
    record = json.loads((tmp_path / "sweep" / "best" / "sweep.json").read_text())
    assert record["parameters"][LR] != 1e-6 and f"promoted to {tmp_path / 'sweep' / 'best'}/" in done.output
    caches = {p.parent for p in (tmp_path / "sweep" / "data-cache").rglob("*") if p.is_file()}
    assert caches and not list((tmp_path / "sweep" / "trials").glob("*/checkpoints/data-cache"))
