"""The operator's own Prometheus metrics, served on :8080/metrics by default.

Fleet-level: `kubetrain_trainingruns{phase}` (runs this operator sees, by phase),
`kubetrain_reconcile_duration_seconds`, `kubetrain_restarts_total{cause}`,
`kubetrain_queue_wait_seconds` (run created -> all its pods running) and
`kubetrain_time_to_first_step_seconds` (run created -> the trainer reports step > 0).
Per run, copied from rank 0's metrics so one dashboard query covers every run:
`kubetrain_run_step`, `kubetrain_run_loss` and `kubetrain_run_tokens_per_second`
{namespace, name}, whose series are dropped when the run is deleted. The metrics live in
prometheus-client's default registry, next to the process and Python collectors.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from kubetrain.api import (
    PHASE_FAILED,
    PHASE_PENDING,
    PHASE_RUNNING,
    PHASE_SUCCEEDED,
    PHASE_SUSPENDED,
)
from kubetrain.status import TrainerMetrics

PHASES = (PHASE_PENDING, PHASE_RUNNING, PHASE_SUCCEEDED, PHASE_FAILED, PHASE_SUSPENDED)
# Waiting for GPUs takes seconds on an idle cluster and hours on a busy one.
_WAIT_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)

TRAININGRUNS = Gauge("kubetrain_trainingruns", "TrainingRuns by phase.", ["phase"])
RECONCILE_DURATION = Histogram(
    "kubetrain_reconcile_duration_seconds", "Time one reconcile of one TrainingRun takes."
)
RESTARTS = Counter(
    "kubetrain_restarts", "Gang restarts after retriable failures, by cause.", ["cause"]
)
QUEUE_WAIT = Histogram(
    "kubetrain_queue_wait_seconds",
    "From a TrainingRun's creation until all its pods run (scheduling, queueing, pulls).",
    buckets=_WAIT_BUCKETS,
)
TIME_TO_FIRST_STEP = Histogram(
    "kubetrain_time_to_first_step_seconds",
    "From a TrainingRun's creation until its trainer reports the first optimizer step.",
    buckets=_WAIT_BUCKETS,
)
RUN_STEP = Gauge("kubetrain_run_step", "Optimizer steps done by a run.", ["namespace", "name"])
RUN_LOSS = Gauge("kubetrain_run_loss", "Latest training loss of a run.", ["namespace", "name"])
RUN_TOKENS_PER_SECOND = Gauge(
    "kubetrain_run_tokens_per_second", "Training throughput of a run.", ["namespace", "name"]
)
_PER_RUN = (RUN_STEP, RUN_LOSS, RUN_TOKENS_PER_SECOND)

_lock = threading.Lock()
_phases: dict[tuple[str, str], str] = {}
for _phase in PHASES:  # export every phase from the start, so sums and alerts see zeros
    TRAININGRUNS.labels(phase=_phase).set(0)


def _recount() -> None:
    counts = dict.fromkeys(PHASES, 0)
    for phase in _phases.values():
        counts[phase] = counts.get(phase, 0) + 1
    for phase, count in counts.items():
        TRAININGRUNS.labels(phase=phase).set(count)


def observe_phase(namespace: str, name: str, phase: str) -> None:
    """Record a run's current phase (idempotent; call on every reconcile)."""
    with _lock:
        if _phases.get((namespace, name)) != phase:
            _phases[(namespace, name)] = phase
            _recount()


def observe_progress(namespace: str, name: str, metrics: TrainerMetrics) -> None:
    """Copy a run's step, loss and tokens/s from its trainer's latest metrics."""
    for gauge, value in (
        (RUN_STEP, metrics.step),
        (RUN_LOSS, metrics.loss),
        (RUN_TOKENS_PER_SECOND, metrics.tokens_per_second),
    ):
        if value is not None:
            gauge.labels(namespace=namespace, name=name).set(value)


def forget_run(namespace: str, name: str) -> None:
    """Drop a deleted run from the phase counts and remove its per-run series."""
    with _lock:
        if _phases.pop((namespace, name), None) is not None:
            _recount()
    for gauge in _PER_RUN:
        with contextlib.suppress(KeyError):  # the run never reported that value
            gauge.remove(namespace, name)


def serve(port: int, addr: str = "0.0.0.0") -> Any:
    """Serve /metrics on addr:port from a daemon thread; returns the server (`.shutdown()`).

    Port 0 picks a free port (read it from `server.server_port`).
    """
    server, _thread = start_http_server(port, addr=addr)
    return server
