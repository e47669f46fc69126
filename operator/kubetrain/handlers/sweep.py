"""kopf glue for Sweep: every trigger runs one idempotent, level-based reconcile.

Create, resume (operator start), spec updates and a timer all call `reconcile`, which reads
the sweep fresh from the API under a per-sweep lock, lists its trials (TrainingRuns labelled
`kubetrain.dev/sweep`, counting only those this sweep owns), lets `kubetrain.sweeps` decide,
acts through `kubetrain.k8s` and writes the whole status. The trials are the only memory:
the plan rebuilds the Optuna study from them on every pass and trial n is always named
`<sweep>-<n>`, so an operator restarted at any point creates nothing twice. Pruned trials
are suspended (their checkpoints kept) and marked with the step; `spec.suspend` is copied
to the other unfinished trials. A finished sweep keeps its verdict: edits only advance
observedGeneration. A sweep pydantic refuses (a bound or choice the template's field does
not take, an objective the method never reports) fails with InvalidSpec and creates nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import kopf
from pydantic import ValidationError

from kubetrain import k8s, opmetrics
from kubetrain.api import PHASE_FAILED, REASON_CREATED, REASON_INVALID_SPEC, REASON_SUSPENDED
from kubetrain.api.sweep import LABEL_TRIAL, REASON_TRIAL_PRUNED, Sweep, SweepStatus
from kubetrain.handlers.passes import ObjectPass, rfc3339
from kubetrain.status import (
    CONDITION_READY,
    condition_of,
    invalid_spec_status,
    merge_patch,
    next_status,
)
from kubetrain.sweeps import (
    FINISHED_PHASES,
    plan_sweep,
    prune_patch,
    suspend_patch,
)
from kubetrain_trainer.config import format_validation_error

log = logging.getLogger(__name__)


def reconcile(namespace: str, name: str, memo: kopf.Memo) -> None:
    """Bring one Sweep one step closer to its spec; safe to call any time, any often."""
    lock = memo.setdefault("reconcile_lock", threading.Lock())
    with lock:
        body = k8s.get_sweep(namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return
        SweepPass(body).run()


class SweepPass(ObjectPass):
    """One pass over one Sweep, as read at the start of the pass."""

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__(body)
        self.now = rfc3339(time.time())

    def run(self) -> None:
        ready = condition_of(self.status, CONDITION_READY) or {}
        phase = self.status.get("phase")
        if phase in FINISHED_PHASES and ready.get("reason") != REASON_INVALID_SPEC:
            # A finished sweep keeps its verdict; only acknowledge the generation (kstatus).
            self.write(
                next_status(
                    self.status,
                    phase=phase,
                    reason=ready.get("reason", ""),
                    message=ready.get("message", ""),
                    now=self.now,
                    generation=self.generation,
                )
            )
            return
        try:
            sweep = self.validated()
        except ValidationError as e:
            self.invalid(format_validation_error(e, f"Sweep {self.qualified}"))
            return
        runs = self.trial_runs()
        plan = plan_sweep(sweep, runs, now=self.now)
        for run in runs.values():
            patch = suspend_patch(sweep, run)
            if patch is not None:
                k8s.patch_trainingrun(self.namespace, run["metadata"]["name"], patch)
                verb = "Suspended" if sweep.spec.suspend else "Resumed"
                self.announce(REASON_SUSPENDED, f"{verb} {k8s.describe(run)}")
        for pruned in plan.prune:
            k8s.patch_trainingrun(self.namespace, pruned.name, prune_patch(pruned.step))
            self.announce(
                REASON_TRIAL_PRUNED,
                f"Pruned trial {pruned.name} at step {pruned.step}: its "
                f"{sweep.spec.objective.metric} lags the other trials'",
            )
        for run in plan.create:
            body = run.model_dump(mode="json", by_alias=True, exclude_none=True)
            if k8s.create_trainingrun(body):
                self.announce(REASON_CREATED, f"Created {k8s.describe(body)}")
        self.write(plan.status.model_dump(mode="json", by_alias=True, exclude_none=True))

    def validated(self) -> Sweep:
        """The sweep as a model (ValidationError if its spec is bad), with its status."""
        sweep = Sweep.model_validate({k: v for k, v in self.body.items() if k != "status"})
        try:
            sweep.status = SweepStatus.model_validate(self.status) if self.status else None
        except ValidationError as e:
            log.warning("Sweep %s: rebuilding an unreadable status: %s", self.qualified, e)
            sweep.status = None
        return sweep

    def trial_runs(self) -> dict[int, dict[str, Any]]:
        """Trial number -> its TrainingRun, for the trials this sweep owns."""
        runs = {}
        for run in k8s.list_sweep_trials(self.namespace, self.name):
            number = (run["metadata"].get("labels") or {}).get(LABEL_TRIAL, "")
            references = run["metadata"].get("ownerReferences") or []
            if number.isdigit() and any(ref.get("uid") == self.uid for ref in references):
                runs[int(number)] = run
        return runs

    def invalid(self, message: str) -> None:
        ready = condition_of(self.status, CONDITION_READY) or {}
        if (ready.get("reason"), ready.get("message")) != (REASON_INVALID_SPEC, message):
            self.announce(REASON_INVALID_SPEC, f"Failed: {message}", warning=True)
        self.write(
            invalid_spec_status(self.status, message, now=self.now, generation=self.generation)
        )

    def write(self, new: dict[str, Any]) -> None:
        """Patch the status to `new` (only what changed), announce a new phase, count it."""
        patch = merge_patch(self.status, new)
        if patch:
            k8s.patch_sweep_status(self.namespace, self.name, patch)
        phase = new.get("phase", "")
        ready = condition_of(new, CONDITION_READY) or {}
        reason = ready.get("reason", "")
        if phase != self.status.get("phase") and reason != REASON_INVALID_SPEC:
            self.announce(
                reason, f"{phase}: {ready.get('message', '')}", warning=phase == PHASE_FAILED
            )
        objective = ((self.body.get("spec") or {}).get("objective") or {}).get("metric")
        opmetrics.observe_sweep(self.namespace, self.name, new, objective)
        self.status = new


def forget(namespace: str, name: str) -> None:
    """A sweep is gone: drop it from the metrics (its trials go by garbage collection)."""
    opmetrics.forget_sweep(namespace, name)
