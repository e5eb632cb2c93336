"""python -m kubetune_operator [--namespace NS ...|--all-namespaces] [--standalone] [--verbose]

Runs the kopf operator. Environment, read once at startup (settings.OperatorSettings.from_env) and passed down:
KUBETUNE_TRAINER_IMAGE (default ghcr.io/kubetune/trainer:0.1.0), KUBETUNE_HEALTH_PORT (8081, liveness at
/healthz), KUBETUNE_READY_PORT (8082, readiness at /readyz: 200 `active`, 503 `standby` while another replica
holds the Lease; 0 turns it off), KUBETUNE_METRICS_PORT (8080, /metrics; 0 turns it off),
KUBETUNE_LEASE_NAME, KUBETUNE_LEASE_NAMESPACE (kubetune-operator in default: the leader election's Lease; the
chart's is in the operator's namespace), KUBETUNE_LEASE_{DURATION,RENEW_DEADLINE,RETRY_PERIOD}_SECONDS (15, 10, 2),
KUBETUNE_RESYNC_SECONDS (60), KUBETUNE_SCRAPE_SECONDS (10, rank 0's /metrics),
KUBETUNE_RENDEZVOUS_PORT (29500, the workers' rendezvous), KUBETUNE_TRAINER_METRICS_PORT (9400, rank 0's /metrics),
KUBETUNE_TRAINER_METRICS_LINGER_SECONDS (unset: the image's; the training pods' KUBETUNE_METRICS_LINGER_SECONDS),
KUBETUNE_VALIDATION_{CPU,MEMORY,EPHEMERAL_STORAGE,DEADLINE_SECONDS} (500m, 1Gi, 10Gi, 3600),
KUBETUNE_ESTIMATE_GPU_TFLOPS (400, the data report's GPU-hours estimate),
KUBETUNE_STORAGE_{ENDPOINT,REGION,SECRET_NAME} (storage defaults),
KUBETUNE_POLICY_{IMAGE_PREFIXES,CREDENTIALS_NAMESPACES,ALLOW_TRUST_REMOTE_CODE,BINDING} (policy.py);
KUBETUNE_POLICY_{NODE_SELECTORS,TOLERATIONS,GPU_RESOURCE_NAMES,MAX_GRACE_SECONDS,REQUIRE_QUEUE} (policy.Scheduling);
KUBECONFIG outside a cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import sys
import time

import kopf

from . import GROUP, VERSION, discovery, handlers, kube, kueue, leader, metrics, sweeps
from .settings import OperatorSettings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kubetune_operator", description="The Kubetune operator")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", default=[],
                       help="watch this namespace (repeatable)")
    scope.add_argument("--all-namespaces", "-A", action="store_true",
                       help="watch every namespace (the default)")
    p.add_argument("--standalone", action="store_true",
                   help="no leader election: for a single replica only (never two with it)")
    p.add_argument("--verbose", "-v", action="store_true")
    return p.parse_args(argv)


def _quiet(record: logging.LogRecord) -> bool:
    return not re.fullmatch(r"(Handler|Indexer) '[\w/.]+' succeeded\.", record.getMessage())


def served(api_version: str, plural: str, attempts: int = 5) -> bool:
    """Whether the API server serves `plural`; asked once at startup, retried while the API server does not
    answer."""
    for _ in range(attempts - 1):
        try:
            return kube.client().serves(api_version, plural)
        except Exception:  # noqa: BLE001 -- unreachable for now: ask again; the last attempt's error goes through
            time.sleep(2)
    return kube.client().serves(api_version, plural)


def kueue_served() -> bool:
    """Whether Kueue is installed (its Workloads are served) at startup; discovery.follow asks again while the
    operator runs."""
    return served(kueue.API_VERSION, kueue.PLURAL)


def sweeps_served() -> bool:
    """Whether the FineTuneSweep CRD is installed."""
    return served(f"{GROUP}/{VERSION}", sweeps.SWEEPS)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = OperatorSettings.from_env()  # the only place the operator reads its environment
    kopf.configure(verbose=args.verbose)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    if not args.verbose:  # kopf logs every index update and event handler call: two lines per watch event
        logging.getLogger("kopf.objects").addFilter(_quiet)
    if config.metrics_port:
        metrics.serve(config.metrics_port)
    if config.ready_port:
        leader.serve(config.ready_port)
    clusterwide = not args.namespace
    assert handlers.FTJ  # the import registers the handlers
    handlers.serve_kueue()  # watched while served: discovery.follow asks again while the operator runs
    discovery.found(kueue_served())
    if not discovery.served():
        logging.getLogger(__name__).info(
            "Kueue is not installed (the API server serves no %s %s): jobs with spec.scheduling.queueName wait "
            "for it; it is noticed once installed, within %ss", kueue.API_VERSION, kueue.PLURAL,
            discovery.CHECK_SECONDS)
    if sweeps_served():
        sweeps.serve()
    else:
        logging.getLogger(__name__).info("The FineTuneSweep CRD is not installed: sweeps are not served; restart "
                                         "the operator once it is")
    elector = None if args.standalone else elect(config)
    leader.set_active(True)
    kopf_settings = kopf.OperatorSettings()
    # With namespaces given, serve exactly those and the resources found at startup: kopf then lists neither
    # namespaces nor CRDs, so the operator needs no permission outside the namespaces it serves.
    kopf_settings.scanning.disabled = not clusterwide
    view = discovery.new_view()
    try:
        asyncio.run(kopf.operator(
            settings=kopf_settings, clusterwide=clusterwide, namespaces=args.namespace,
            standalone=True,  # no kopf peering: the Lease (or --standalone) makes this replica the only one
            liveness_endpoint=f"http://0.0.0.0:{config.health_port}/healthz",
            # every handler's `memo`: the supervisors take their settings from it, discovery.follow kopf's view
            memo=kopf.Memo(settings=config, insights=view), insights=view,
        ))
    finally:
        leader.set_active(False)
        if elector:
            elector.release()


def elect(config: OperatorSettings) -> leader.Elector:
    """Block until this replica holds the Lease (alive on the liveness port meanwhile, not ready), then renew it
    in a thread that ends the process with LOST_EXIT_CODE, at once, when it is lost."""
    timing = leader.Timing.of(config)  # ValueError naming the variables, before anything else
    elector = leader.Elector(leader.KubeLeases(kube.client(), config.lease_namespace, config.lease_name),
                             config.lease_name, leader.identity(), timing)
    probe = leader.serve(config.health_port)
    try:
        elector.acquire()
    finally:
        leader.stop_serving(probe)  # kopf serves /healthz from now on
    elector.keep_in_background(_lost)
    return elector


def _lost(why: str) -> None:
    """Another replica may lead from now on: stop reconciling this instant, without cleanup (the Deployment
    restarts this pod, a standby now)."""
    logging.getLogger(__name__).error("Lost the leadership: %s; exiting (status %d)", why, leader.LOST_EXIT_CODE)
    logging.shutdown()
    sys.stderr.flush()
    os._exit(leader.LOST_EXIT_CODE)

if __name__ == "__main__":
    main()
