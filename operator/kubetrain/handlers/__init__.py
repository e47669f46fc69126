"""The kubetrain operator: TrainingRuns, Pipelines and Sweeps, and how to run it.

Pipelines and Sweeps are kopf handlers; TrainingRuns, a thousand at a time, are followed by
informers and visited by a pool of workers of our own (`kubetrain.handlers.runs`), started
by kopf's startup handler and stopped by its cleanup.

Two ways in, same handlers. `run_operator(...)` (what `kubetrain operator` calls) builds a
fresh kopf registry with the options given and runs until stopped. `kopf run -m
kubetrain.handlers` imports this package, which registers the handlers in kopf's default
registry with options from the environment: KUBETRAIN_RECONCILE_INTERVAL (seconds between
status checks of a running run, default 10), KUBETRAIN_METRICS_PORT (default 8080, 0 turns
the metrics server off) and KUBETRAIN_API_SERVER (an explicit API URL; otherwise the
service account or kubeconfig); run it with `--standalone` (its peering is kopf's alone:
the runs' workers follow only `run_operator`'s). kopf's liveness probe answers where
`--liveness` says (`run_operator`: http://0.0.0.0:8081/healthz).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import secrets
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf

from kubetrain import k8s, opmetrics
from kubetrain.api import GROUP, PIPELINE_PLURAL, SWEEP_PLURAL, VERSION
from kubetrain.handlers import pipeline, sweep
from kubetrain.handlers.children import SYNC_TIMEOUT_SECONDS, Children
from kubetrain.handlers.runs import KOPF_FINALIZER, Peering, RunController
from kubetrain.handlers.trainingrun import MetricsAddress, forget, is_unfinished, reconcile

DEFAULT_RECONCILE_INTERVAL = 10.0
DEFAULT_METRICS_PORT = 8080
DEFAULT_LIVENESS_PORT = 8081
# Visits of runs wait on the network (the API, rank 0's metrics), not on the CPU: at 1000
# runs 16 workers kept the operator at a quarter of a core while visits queued.
RUN_WORKERS = 32
PIPELINE_WORKERS = 8  # kopf's executor: Pipelines and Sweeps, a few objects
RECONCILE_INTERVAL_ENV = "KUBETRAIN_RECONCILE_INTERVAL"
METRICS_PORT_ENV = "KUBETRAIN_METRICS_PORT"
M_ARENA_MAX = -8  # glibc's malloc.h

__all__ = ["limit_malloc_arenas", "register", "run_operator"]


def register(
    registry: kopf.OperatorRegistry,
    *,
    reconcile_interval: float = DEFAULT_RECONCILE_INTERVAL,
    metrics_port: int | None = DEFAULT_METRICS_PORT,
) -> None:
    """Add the operator's handlers to `registry` (metrics_port None: no metrics server)."""

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        # Keep kopf's bookkeeping under our own prefix, in annotations, never in status
        # (the CRD's status schema would prune it).
        settings.persistence.finalizer = KOPF_FINALIZER
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=GROUP, key="last-handled-configuration"
        )
        # Events are for transitions the handlers announce, not kopf's own log lines.
        settings.posting.level = logging.WARNING
        settings.posting.reporting_component = "kubetrain-operator"
        # A deleted object keeps kopf's finalizer until its timer has exited; a timer caught
        # mid-reconcile (a sync call kopf cannot cancel) is re-checked after this many
        # seconds, not kopf's default 60, so deletions (and garbage collection of a
        # pipeline's runs) finish within one interval.
        settings.background.cancellation_polling = reconcile_interval
        if metrics_port is not None and metrics_port > 0 and "metrics_server" not in memo:
            memo.metrics_server = opmetrics.serve(metrics_port)
        # The children of runs and the claims, followed once for all runs; no run is visited
        # before their first lists are in. Then the runs themselves (handlers.runs).
        if "children" not in memo:
            namespaces = memo.get("namespaces") or ()
            children = Children(namespaces)
            children.start()
            memo.children = children
            peering_name, priority = memo.get("peering") or (None, 0)
            memo.run_controller = RunController(
                lambda namespace, name, cache: reconcile(namespace, name, memo, children, cache),
                lambda namespace, name: forget(namespace, name, memo),
                interval=reconcile_interval,
                workers=RUN_WORKERS,
                namespaces=namespaces,
                peering=Peering(peering_name, priority, namespaces),
            )
            memo.run_controller.start(SYNC_TIMEOUT_SECONDS)

    @kopf.on.cleanup(registry=registry)
    def stop_following(memo: kopf.Memo, **_: Any) -> None:
        for follower in (memo.get("run_controller"), memo.get("children")):
            if follower is not None:
                follower.stop()
        server = memo.get("metrics_server")
        if server is not None:
            server.shutdown()
            server.server_close()

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        server = k8s.api_server_override()
        if server:
            return kopf.ConnectionInfo(server=server, insecure=True)
        return kopf.login_via_client(**kwargs)

    # Pipelines: kopf handlers, one reconcile. Stage runs are TrainingRuns (RunController).
    @kopf.on.create(
        GROUP,
        VERSION,
        PIPELINE_PLURAL,
        id="pipeline-start",
        backoff=reconcile_interval,
        registry=registry,
    )
    @kopf.on.resume(
        GROUP,
        VERSION,
        PIPELINE_PLURAL,
        id="pipeline-resume",
        backoff=reconcile_interval,
        registry=registry,
    )
    @kopf.on.update(
        GROUP,
        VERSION,
        PIPELINE_PLURAL,
        id="pipeline-spec-changed",
        field="spec",
        backoff=reconcile_interval,
        registry=registry,
    )
    def react_pipeline(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
        pipeline.reconcile(namespace, name, memo)

    @kopf.timer(
        GROUP,
        VERSION,
        PIPELINE_PLURAL,
        id="pipeline-follow",
        interval=reconcile_interval,
        when=is_unfinished,
        registry=registry,
    )
    def follow_pipeline(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
        pipeline.reconcile(namespace, name, memo)

    @kopf.on.delete(
        GROUP, VERSION, PIPELINE_PLURAL, id="pipeline-forget", optional=True, registry=registry
    )
    def pipeline_deleted(namespace: str, name: str, **_: Any) -> None:
        pipeline.forget(namespace, name)

    # Sweeps: the same triggers, one reconcile. Trials are TrainingRuns, served above.
    @kopf.on.create(
        GROUP,
        VERSION,
        SWEEP_PLURAL,
        id="sweep-start",
        backoff=reconcile_interval,
        registry=registry,
    )
    @kopf.on.resume(
        GROUP,
        VERSION,
        SWEEP_PLURAL,
        id="sweep-resume",
        backoff=reconcile_interval,
        registry=registry,
    )
    @kopf.on.update(
        GROUP, VERSION, SWEEP_PLURAL, id="sweep-spec-changed", field="spec",
        backoff=reconcile_interval, registry=registry,
    )  # fmt: skip
    def react_sweep(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
        sweep.reconcile(namespace, name, memo)

    @kopf.timer(
        GROUP, VERSION, SWEEP_PLURAL, id="sweep-follow", interval=reconcile_interval,
        when=is_unfinished, registry=registry,
    )  # fmt: skip
    def follow_sweep(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
        sweep.reconcile(namespace, name, memo)

    @kopf.on.delete(
        GROUP, VERSION, SWEEP_PLURAL, id="sweep-forget", optional=True, registry=registry
    )
    def sweep_deleted(namespace: str, name: str, **_: Any) -> None:
        sweep.forget(namespace, name)


def run_operator(
    namespaces: Sequence[str] | None = None,
    *,
    metrics_port: int | None = DEFAULT_METRICS_PORT,
    liveness_port: int | None = DEFAULT_LIVENESS_PORT,
    reconcile_interval: float = DEFAULT_RECONCILE_INTERVAL,
    api_server: str | None = None,
    standalone: bool | None = None,
    peering: str | None = None,
    metrics_address: MetricsAddress | None = None,
    stop_flag: threading.Event | None = None,
    ready_flag: threading.Event | None = None,
) -> None:
    """Run the operator until `stop_flag` is set (or SIGINT/SIGTERM in the main thread).

    namespaces: serve these (None or empty: the whole cluster). metrics_port: where
    /metrics is served (None or 0: nowhere). liveness_port: kopf's health
    endpoint http://0.0.0.0:<port>/healthz (None: off).
    api_server: an explicit API URL (tests, `kubectl proxy`). standalone: skip kopf's
    peering (None: use it if its CRDs exist). peering: the kopf peering object (a
    ClusterKopfPeering, or a KopfPeering per namespace) that replicas share; each takes a
    random priority, the highest works and the others stand by until it stops.
    metrics_address: where a trainer pod's /metrics is (default: the pod IP, port 9400;
    tests point it at a stub).
    """
    if api_server:
        k8s.configure(api_server)
    registry = kopf.OperatorRegistry()
    register(registry, reconcile_interval=reconcile_interval, metrics_port=metrics_port)
    memo = kopf.Memo()
    memo.namespaces = list(namespaces or ())
    # kopf pauses every operator that meets one of equal priority: never tie.
    priority = secrets.randbelow(2**31 - 2) + 1 if peering else None
    if peering:
        memo.peering = (peering, priority)
    if metrics_address is not None:
        memo.metrics_address = metrics_address
    liveness = f"http://0.0.0.0:{liveness_port}/healthz" if liveness_port else None
    settings = kopf.OperatorSettings()
    # Our own pool for kopf's sync handlers, so that a reconcile still running when kopf
    # stops can finish (kopf leaves it orphaned) before this function returns.
    executor = ThreadPoolExecutor(
        max_workers=PIPELINE_WORKERS, thread_name_prefix="kubetrain-reconcile"
    )
    settings.execution.executor = executor
    try:
        asyncio.run(
            kopf.operator(
                registry=registry,
                settings=settings,
                clusterwide=not namespaces,
                namespaces=list(namespaces or ()),
                liveness_endpoint=liveness,
                standalone=standalone,
                peering_name=peering,
                priority=priority,
                memo=memo,
                stop_flag=stop_flag,
                ready_flag=ready_flag,
            )
        )
    finally:
        executor.shutdown(wait=True)


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Have glibc's malloc use `arenas` arenas, as MALLOC_ARENA_MAX would (unless it is set).

    glibc gives threads that allocate at once arenas of their own, up to eight per core. The
    operator's forty-odd threads (run workers, informers, kopf's) each parse JSON of the
    API's answers, and the memory they free stays spread over all those arenas: at 1000
    runs two arenas instead of glibc's sixteen (2 cores) took the operator's peak RSS from
    149 to 141 MiB (tests/bench/test_bench_operator.py). Call it before the threads start;
    not glibc (musl, macOS): nothing to do.
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_ARENA_MAX, arenas)


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


# `kopf run -m kubetrain.handlers` uses kopf's default registry.
register(
    kopf.get_default_registry(),
    reconcile_interval=_env_float(RECONCILE_INTERVAL_ENV, DEFAULT_RECONCILE_INTERVAL),
    metrics_port=int(_env_float(METRICS_PORT_ENV, DEFAULT_METRICS_PORT)),
)
