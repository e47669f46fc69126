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
from typing import Any

import kopf
from pydantic import ValidationError

from kubetrain import k8s, opmetrics
from kubetrain.api import REASON_CREATED, REASON_SUSPENDED
from kubetrain.api.sweep import LABEL_TRIAL, REASON_TRIAL_PRUNED, Sweep, SweepStatus
from kubetrain.handlers.passes import OwnerPass
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


class SweepPass(OwnerPass):
    """One pass over one Sweep, as read at the start of the pass."""

    def run(self) -> None:
        # Optuna (and numpy) load with the first sweep: an operator that serves none is
        # about 40 MiB smaller.
        from kubetrain.sweeps import plan_sweep, prune_patch, suspend_patch

        if self.keeps_verdict():
            return
        try:
            sweep = self.validated(Sweep, SweepStatus)
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

    def trial_runs(self) -> dict[int, dict[str, Any]]:
        """Trial number -> its TrainingRun, for the trials this sweep owns."""
        runs = {}
        for run in k8s.list_sweep_trials(self.namespace, self.name):
            number = (run["metadata"].get("labels") or {}).get(LABEL_TRIAL, "")
            if number.isdigit() and self.owns(run):
                runs[int(number)] = run
        return runs

    def patch_status(self, patch: dict[str, Any]) -> None:
        k8s.patch_sweep_status(self.namespace, self.name, patch)

    def observe(self, status: dict[str, Any]) -> None:
        objective = ((self.body.get("spec") or {}).get("objective") or {}).get("metric")
        opmetrics.observe_sweep(self.namespace, self.name, status, objective)


def forget(namespace: str, name: str) -> None:
    """A sweep is gone: drop it from the metrics (its trials go by garbage collection)."""
    opmetrics.forget_sweep(namespace, name)
