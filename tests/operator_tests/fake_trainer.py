"""A stand-in for the trainer image's entrypoint in the operator's e2e tests (the node agent maps the image
`ghcr.io/kubetune/trainer:fake` to `python fake_trainer.py ARGS`): it takes the operator's accelerate args,
counts `hyperparameters.maxSteps` steps (one every FAKE_STEP_SECONDS) and, on rank 0, serves the real
TrainerMetrics on `metrics.port` and writes `{"manifestSha256": ...}` as its termination message.
A job whose name contains "hang" stops counting after step 2; one whose name contains "held" waits after step 2
until `release(run_id)` (its FineTuneJob's uid) is called, so that a test can keep it running as long as it needs.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import yaml
from kubetune_trainer.metrics import TrainerMetrics

SHA = "0" * 63 + "1"
# outside /tmp, which a pod has as its own emptyDir
RELEASES = Path("/var/tmp/kubetune-fake-trainer-releases")


def release(run_id: str) -> None:
    """Let the held job of this run (its FineTuneJob's uid) count on to its last step."""
    RELEASES.mkdir(parents=True, exist_ok=True)
    (RELEASES / run_id).touch()


def main(argv: list[str]) -> None:
    config = yaml.safe_load(Path(argv[argv.index("--config") + 1]).read_text())
    name, steps = config["jobName"], int(config["hyperparameters"].get("maxSteps") or 5)
    rank = int(argv[argv.index("--machine_rank") + 1]) if "--machine_rank" in argv else 0
    print(json.dumps({"event": "start", "rank": rank, "argv": argv,
                      "env": {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE",
                                                             "NODE_RANK", "AWS_ACCESS_KEY_ID")}}), flush=True)
    metrics = TrainerMetrics(name, "lora", config["baseModel"]["uri"]) if rank == 0 else None
    if metrics:
        metrics.serve(int(config["metrics"]["port"]))
        metrics.set_phase("training")
    every = float(os.environ.get("FAKE_STEP_SECONDS", "1"))
    for step in range(1, steps + 1):
        time.sleep(every)
        while "hang" in name and step > 2:
            time.sleep(1)
        while "held" in name and step > 2 and not (RELEASES / str(config.get("runId"))).exists():
            time.sleep(0.2)
        if metrics:
            metrics.set(step=step, total_steps=steps, epoch=step / steps, progress_ratio=step / steps,
                        eta_seconds=(steps - step) * every, train_loss=3.0 / step, tokens_per_second=1000.0)
            metrics.add_tokens(512)
            if step == 2:
                metrics.checkpoint_done()
                metrics.set(validation_loss=2.5)
    if metrics:
        metrics.set_phase("done")
        time.sleep(2 * every)  # let the operator scrape the final values
        Path("/dev/termination-log").write_text(json.dumps({"manifestSha256": SHA}))


if __name__ == "__main__":
    main(sys.argv[1:])
