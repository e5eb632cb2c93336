"""Prometheus metrics of a trainer process (served on rank 0 only).

Names follow Prometheus conventions: the `kubetune_trainer_` prefix, base units, `_total` for counters.
Every series carries the `finetunejob` label so one Prometheus can tell runs apart. The list is a
contract with the dashboard and alerts in charts/kubetune; trainer-image/README.md documents it.
"""

from __future__ import annotations

import math
import os
import threading
import time
from numbers import Real
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from kubetune_api import METRICS_LINGER_ENV, OPERATOR_SCRAPER
from prometheus_client import CollectorRegistry, Counter, Gauge, make_wsgi_app

PHASES = ("downloading", "validating", "training", "evaluating", "uploading", "done", "failed")

_GAUGES = {
    "step": "Optimizer steps completed",
    "total_steps": "Optimizer steps the run will take",
    "epoch": "Epochs completed, fractional",
    "progress_ratio": "step / total_steps",
    "eta_seconds": "Estimated seconds until training ends",
    "train_loss": "Mean training loss over the last logging window",
    "validation_loss": "Loss on the validation split at the last evaluation",
    "validation_step": "The step of the last evaluation on the validation split",
    "test_loss": "Loss on the test split",
    "test_perplexity": "Perplexity on the test split",
    "test_token_accuracy": "Share of trained test tokens predicted exactly (argmax)",
    "learning_rate": "Current learning rate",
    "grad_norm": "Gradient norm before clipping at the last step",
    "tokens_per_second": "Non-padding tokens processed per second, all workers",
    "samples_per_second": "Training samples processed per second, all workers",
    "last_checkpoint_timestamp_seconds": "Unix time of the last uploaded checkpoint",
    "last_checkpoint_step": "Optimizer step of the last uploaded checkpoint",
    "heartbeat_timestamp_seconds": "Unix time of the trainer's last sign of life (a step, an evaluation batch, "
                                   "a storage transfer making progress)",
}


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape in progress does not hold the process's exit


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args) -> None:  # no access log in the trainer's output
        pass


class _Sent:
    """A response's body that calls `sent` when the WSGI server closes it, which it does once it has written the
    whole body to the socket (PEP 3333): the wait for a scrape's response ends on that, not after a fixed time."""

    def __init__(self, body: list[bytes], sent) -> None:
        self.body, self.sent = body, sent

    def __iter__(self):
        return iter(self.body)

    def __len__(self) -> int:  # a list's length: wsgiref sets Content-Length from it, as for the list itself
        return len(self.body)

    def close(self) -> None:
        self.sent()


class TrainerMetrics:
    def __init__(self, job: str, method: str, base_model: str):
        self.registry = CollectorRegistry()
        self.job = job
        labels = ["finetunejob"]
        self.gauges = {
            name: Gauge(f"kubetune_trainer_{name}", doc, labels, registry=self.registry)
            for name, doc in _GAUGES.items()
        }
        self.tokens_trained = Counter(
            "kubetune_trainer_tokens_trained", "Trained (loss-bearing) tokens processed", labels,
            registry=self.registry,
        )
        self.checkpoints = Counter(
            "kubetune_trainer_checkpoints", "Checkpoints uploaded", labels, registry=self.registry
        )
        self._phase = Gauge(
            "kubetune_trainer_phase", "1 for the phase the trainer is in", ["finetunejob", "phase"],
            registry=self.registry,
        )
        self.gpu_memory = Gauge(
            "kubetune_trainer_gpu_memory_used_bytes", "GPU memory allocated by the trainer",
            ["finetunejob", "gpu"], registry=self.registry,
        )
        self.gpu_utilization = Gauge(
            "kubetune_trainer_gpu_utilization_ratio", "GPU utilization, 0..1", ["finetunejob", "gpu"],
            registry=self.registry,
        )
        info = Gauge(
            "kubetune_trainer_info", "Constant 1, labelled with what this run trains",
            ["finetunejob", "method", "base_model"], registry=self.registry,
        )
        info.labels(job, method, base_model).set(1)
        self.evaluation = Gauge(
            "kubetune_trainer_evaluation", "An evaluation result: a scalar metric of a split, on the fine-tuned "
            "model or on the base model (baseline)", ["finetunejob", "split", "model", "metric"],
            registry=self.registry,
        )
        self.train_metric = Gauge(
            "kubetune_trainer_train_metric", "A training metric of the objective over the last logging window "
            "(preference tuning: rewards_accuracy, rewards_margin, ...)", ["finetunejob", "metric"],
            registry=self.registry,
        )
        self._evaluated: dict[tuple[str, str], set[str]] = {}  # (split, model) -> the metrics exported
        for name in ("tokens_trained", "checkpoints"):
            getattr(self, name).labels(job)  # export 0 from the start
        self._heartbeat = self.gauges["heartbeat_timestamp_seconds"].labels(job)
        self._last_beat = 0.0
        self.set_phase("downloading")
        self.port: int | None = None
        self._final = False  # linger() has begun: a scrape collected from now on reads the final values
        self._scraped = threading.Event()  # such a scrape (not the operator's) has been answered

    def wsgi_app(self):
        """prometheus_client's app for the registry, noting when a scrape (not the operator's) of the final
        values has been answered (linger)."""
        app = make_wsgi_app(self.registry)

        def noted(environ, start_response):
            final = self._final  # before collecting: a scrape begun earlier may read older values
            body = app(environ, start_response)  # collected: the values as they are now
            if final and not environ.get("HTTP_USER_AGENT", "").startswith(OPERATOR_SCRAPER):
                return _Sent(body, self._scraped.set)
            return body

        return noted

    def serve(self, port: int) -> int:
        """Start the HTTP endpoint; returns the bound port (useful with port 0)."""
        server = make_server("0.0.0.0", port, self.wsgi_app(), _Server, handler_class=_Quiet)
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
        self.port = server.server_address[1]
        return self.port

    def linger(self) -> None:
        """Keep serving the final values until a scrape has read them, for at most
        $KUBETUNE_METRICS_LINGER_SECONDS (the image sets 30) before the process exits, so that Prometheus
        scrapes them (test results, phase done) at least once; a scrape that comes early ends the wait early (a
        sweep's trials wait for their results). The operator's own scrapes (OPERATOR_SCRAPER) do not count."""
        seconds = float(os.environ.get(METRICS_LINGER_ENV) or 0)
        if self.port is not None and seconds > 0:
            self._scraped.clear()
            self._final = True  # every value is final: whoever collects from now on reads them
            self._scraped.wait(seconds)  # ends once such a scrape's response has gone out

    def set(self, **values: float | None) -> None:
        for name, value in values.items():
            if value is not None:
                self.gauges[name].labels(self.job).set(value)

    def set_evaluation(self, split: str, model: str, values: dict) -> None:
        """Export one evaluation's scalars (`model`: "finetuned" or "baseline"). Nested values (per-class scores, a
        confusion matrix, generated samples) and non-finite numbers are left out; a metric the previous evaluation
        of this split and model had but this one lacks is removed, so no stale value lingers."""
        scalars = {name: float(v) for name, v in values.items()
                   if isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v)}
        for name in self._evaluated.get((split, model), set()) - scalars.keys():
            self.evaluation.remove(self.job, split, model, name)
        for name, value in scalars.items():
            self.evaluation.labels(self.job, split, model, name).set(value)
        self._evaluated[(split, model)] = set(scalars)

    def set_train(self, values: dict[str, float]) -> None:
        """Export the objective's training metrics of the last logging window (finite ones)."""
        for name, value in values.items():
            if math.isfinite(value):
                self.train_metric.labels(self.job, name).set(value)

    def set_phase(self, phase: str) -> None:
        for p in PHASES:
            self._phase.labels(self.job, p).set(1 if p == phase else 0)
        self.beat()

    def beat(self, min_interval: float = 0.0) -> None:
        """A sign of life: set the heartbeat gauge to now. Call it where work completes (a step, a batch, a file,
        bytes moving), never from a timer, so that a hung process (a stuck collective, storage that moves
        nothing) stops beating. Cheap; `min_interval` (seconds) rate-limits very frequent callers."""
        now = time.time()
        if abs(now - self._last_beat) >= min_interval:  # abs: a clock stepped back beats rather than stalls
            self._last_beat = now
            self._heartbeat.set(now)

    def add_tokens(self, n: int) -> None:
        self.tokens_trained.labels(self.job).inc(n)

    def checkpoint_done(self, step: int | None = None) -> None:
        self.checkpoints.labels(self.job).inc()
        self.set(last_checkpoint_timestamp_seconds=time.time(), last_checkpoint_step=step)
        self.beat()

    def sample_gpus(self) -> None:
        import torch

        if not torch.cuda.is_available():
            return
        for i in range(torch.cuda.device_count()):
            self.gpu_memory.labels(self.job, str(i)).set(torch.cuda.memory_allocated(i))
            try:
                self.gpu_utilization.labels(self.job, str(i)).set(torch.cuda.utilization(i) / 100)
            except Exception:  # needs NVML; memory alone is still useful
                pass
