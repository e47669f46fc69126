"""The operator's own Prometheus metrics, served on :8080/metrics by default.

Fleet-level: `kubetrain_trainingruns{phase}`, `kubetrain_pipelines{phase}` and
`kubetrain_sweeps{phase}` (the objects this operator sees, by phase),
`kubetrain_reconcile_duration_seconds`, `kubetrain_restarts_total{cause}`,
`kubetrain_queue_wait_seconds` (run created -> all its pods running) and
`kubetrain_time_to_first_step_seconds` (run created -> the trainer reports step > 0).
Per run, copied from rank 0's metrics so one dashboard query covers every run:
`kubetrain_run_step`, `kubetrain_run_loss` and `kubetrain_run_tokens_per_second`
{namespace, name}, whose series are dropped when the run is deleted. Per sweep:
`kubetrain_sweep_trials{namespace, name, state}` (Running, Complete, Pruned, Failed) and
`kubetrain_sweep_best_value{namespace, name, objective}`, dropped when the sweep is deleted.
The metrics live in prometheus-client's default registry, next to the process and Python
collectors.
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
from kubetrain.api.sweep import TRIAL_STATES
from kubetrain.status import TrainerMetrics

PHASES = (PHASE_PENDING, PHASE_RUNNING, PHASE_SUCCEEDED, PHASE_FAILED, PHASE_SUSPENDED)
# Waiting for GPUs takes seconds on an idle cluster and hours on a busy one.
_WAIT_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)

TRAININGRUNS = Gauge("kubetrain_trainingruns", "TrainingRuns by phase.", ["phase"])
PIPELINES = Gauge("kubetrain_pipelines", "Pipelines by phase.", ["phase"])
SWEEPS = Gauge("kubetrain_sweeps", "Sweeps by phase.", ["phase"])
SWEEP_TRIALS = Gauge(
    "kubetrain_sweep_trials", "Trials of a sweep by state.", ["namespace", "name", "state"]
)
SWEEP_BEST_VALUE = Gauge(
    "kubetrain_sweep_best_value",
    "The objective of a sweep's best complete trial.",
    ["namespace", "name", "objective"],
)
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


class _PhaseCounts:
    """How many objects of one kind are in each phase, kept in one gauge labelled by phase."""

    def __init__(self, gauge: Gauge) -> None:
        self.gauge = gauge
        self.lock = threading.Lock()
        self.phases: dict[tuple[str, str], str] = {}
        for phase in PHASES:  # export every phase from the start, so sums and alerts see zeros
            gauge.labels(phase=phase).set(0)

    def _recount(self) -> None:
        counts = dict.fromkeys(PHASES, 0)
        for phase in self.phases.values():
            counts[phase] = counts.get(phase, 0) + 1
        for phase, count in counts.items():
            self.gauge.labels(phase=phase).set(count)

    def observe(self, namespace: str, name: str, phase: str) -> None:
        with self.lock:
            if self.phases.get((namespace, name)) != phase:
                self.phases[(namespace, name)] = phase
                self._recount()

    def forget(self, namespace: str, name: str) -> None:
        with self.lock:
            if self.phases.pop((namespace, name), None) is not None:
                self._recount()


_run_phases = _PhaseCounts(TRAININGRUNS)
_pipeline_phases = _PhaseCounts(PIPELINES)
_sweep_phases = _PhaseCounts(SWEEPS)
_sweep_objectives: dict[tuple[str, str], str] = {}


def observe_phase(namespace: str, name: str, phase: str) -> None:
    """Record a run's current phase (idempotent; call on every reconcile)."""
    _run_phases.observe(namespace, name, phase)


def observe_pipeline_phase(namespace: str, name: str, phase: str) -> None:
    """Record a pipeline's current phase (idempotent; call on every reconcile)."""
    _pipeline_phases.observe(namespace, name, phase)


def forget_pipeline(namespace: str, name: str) -> None:
    """Drop a deleted pipeline from the phase counts."""
    _pipeline_phases.forget(namespace, name)


def observe_sweep(namespace: str, name: str, status: dict[str, Any], objective: str | None) -> None:
    """Record a sweep's phase, trials by state and best value from its status (camelCase);
    `objective` is the metric it optimises (spec.objective.metric)."""
    _sweep_phases.observe(namespace, name, status.get("phase", ""))
    for state, count in (status.get("trialCounts") or {}).items():
        SWEEP_TRIALS.labels(namespace=namespace, name=name, state=state).set(count)
    best = status.get("bestTrial") or {}
    if best.get("value") is not None and objective:
        previous = _sweep_objectives.get((namespace, name))
        if previous and previous != objective:
            with contextlib.suppress(KeyError):
                SWEEP_BEST_VALUE.remove(namespace, name, previous)
        _sweep_objectives[namespace, name] = objective
        SWEEP_BEST_VALUE.labels(namespace=namespace, name=name, objective=objective).set(
            best["value"]
        )


def forget_sweep(namespace: str, name: str) -> None:
    """Drop a deleted sweep from the phase counts and remove its series."""
    _sweep_phases.forget(namespace, name)
    for state in TRIAL_STATES:
        with contextlib.suppress(KeyError):
            SWEEP_TRIALS.remove(namespace, name, state)
    objective = _sweep_objectives.pop((namespace, name), None)
    if objective:
        with contextlib.suppress(KeyError):
            SWEEP_BEST_VALUE.remove(namespace, name, objective)


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
    _run_phases.forget(namespace, name)
    for gauge in _PER_RUN:
        with contextlib.suppress(KeyError):  # the run never reported that value
            gauge.remove(namespace, name)


def serve(port: int, addr: str = "0.0.0.0") -> Any:
    """Serve /metrics on addr:port from a daemon thread; returns the server (`.shutdown()`).

    Port 0 picks a free port (read it from `server.server_port`).
    """
    server, _thread = start_http_server(port, addr=addr)
    return server
