"""What the operator decides for a Sweep: pure functions of the sweep and its trial runs.

There is no study anywhere but in the trials. Every plan rebuilds an in-memory Optuna study
from them (`build_study`): each trial's parameters (the `kubetrain.dev/trial-parameters`
annotation on its TrainingRun), state, final objective (the run's status.outputs.metrics)
and intermediate values (the run's status.evalHistory). The study then asks for the next
trial's parameters (ask/tell) with a sampler seeded from the sweep's seed and the trial
number, so the same history asks the same: an operator restarted at any point rebuilds the
same study and, trial names being `<sweep>-<n>`, never creates a trial twice. The pruner
judges each running trial at every evaluation step it has not judged yet, oldest first, so
its verdicts do not depend on how often the operator looks; a pruned trial is suspended
(outputs and checkpoints kept) and marked with the step on its run. `plan_sweep` is the one
scheduler of sweeps: the handler and the local runner (`kubetrain run`) both execute it.
Phase and conditions follow kstatus through `kubetrain.status.next_status`; the clock is an
argument.
"""

from __future__ import annotations

import json
import warnings
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import FrozenTrial, TrialState, create_trial

from kubetrain.api import (
    FINISHED_PHASES,
    KUEUE_QUEUE_LABEL,
    PHASE_FAILED,
    PHASE_PENDING,
    PHASE_RUNNING,
    PHASE_SUCCEEDED,
    PHASE_SUSPENDED,
    REASON_COMPLETED,
    REASON_SUSPENDED,
    Outputs,
    TrainingRun,
)
from kubetrain.api.sweep import (
    ANNOTATION_PARAMETERS,
    ANNOTATION_PRUNED_AT_STEP,
    ANNOTATION_SYSTEM_ATTRIBUTES,
    LABEL_SWEEP,
    LABEL_TRIAL,
    REASON_NO_COMPLETE_TRIAL,
    REASON_TOO_MANY_FAILED_TRIALS,
    REASON_TRIALS_RUNNING,
    SWEEP_KIND,
    TRIAL_COMPLETE,
    TRIAL_FAILED,
    TRIAL_PRUNED,
    TRIAL_RUNNING,
    TRIAL_STATES,
    BestTrial,
    IntermediateValue,
    Sweep,
    SweepSearch,
    SweepStatus,
    TrialStatus,
    trial_name,
    trial_output_uri,
    with_parameters,
)
from kubetrain.status import next_status

optuna.logging.set_verbosity(optuna.logging.WARNING)

_OPTUNA_STATES = {
    TRIAL_RUNNING: TrialState.RUNNING,
    TRIAL_COMPLETE: TrialState.COMPLETE,
    TRIAL_PRUNED: TrialState.PRUNED,
    TRIAL_FAILED: TrialState.FAIL,
}


class TrialPrune(NamedTuple):
    """A running trial the pruner stopped: suspend its run, mark it with the step."""

    name: str
    step: int


class SweepPlan(NamedTuple):
    """What to do now: the trial runs to create and to prune, and the new status."""

    create: list[TrainingRun]
    prune: list[TrialPrune]
    status: SweepStatus


# ---------------------------------------------------------------- the study


def distributions(search: SweepSearch) -> dict[str, BaseDistribution]:
    """Field path -> the Optuna distribution of that parameter."""
    out: dict[str, BaseDistribution] = {}
    for p in search.parameters:
        if p.type == "categorical":
            out[p.path] = CategoricalDistribution(list(p.choices or []))
        elif p.type == "int":
            out[p.path] = IntDistribution(
                int(p.low or 0), int(p.high or 0), log=p.log, step=int(p.step or 1)
            )
        else:
            out[p.path] = FloatDistribution(p.low or 0.0, p.high or 0.0, log=p.log, step=p.step)
    return out


def sampler_seed(search: SweepSearch, study_name: str, number: int) -> int:
    """The seed that asks for trial `number`: from spec.seed (else the sweep's name).

    Each trial gets a seed of its own, or a sampler rebuilt for every ask would draw the
    same numbers every time; grid search alone keeps one, as it shuffles its grid with it.
    """
    base = search.seed if search.seed is not None else zlib.crc32(study_name.encode())
    if search.algorithm == "grid":
        return base % 2**32
    return (base * 1_000_003 + number) % 2**32


def _sampler(search: SweepSearch, seed: int) -> optuna.samplers.BaseSampler:
    if search.algorithm == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if search.algorithm == "grid":
        grid = {p.path: p.grid() or [] for p in search.parameters}
        return optuna.samplers.GridSampler(grid, seed=seed)
    if search.algorithm == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    # constant_liar: running trials count as bad guesses, so parallel trials spread out.
    startup = max(2, min(10, search.max_trials // 3))
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, constant_liar=True)


def _pruner(search: SweepSearch) -> optuna.pruners.BasePruner:
    pruner = search.pruner
    if pruner is None or pruner.type == "none":
        return optuna.pruners.NopPruner()
    if pruner.type == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=pruner.min_resource, reduction_factor=pruner.reduction_factor
        )
    return optuna.pruners.MedianPruner(
        n_startup_trials=pruner.startup_trials, n_warmup_steps=pruner.warmup_steps
    )


def _frozen(search: SweepSearch, trial: TrialStatus, up_to_step: int | None = None) -> FrozenTrial:
    """A trial as Optuna's FrozenTrial; `up_to_step` hides later intermediate values."""
    every = distributions(search)
    intermediate = {
        point.step: point.value
        for point in trial.intermediate
        if up_to_step is None or point.step <= up_to_step
    }
    state = _OPTUNA_STATES[trial.state]
    if up_to_step is not None:
        state = TrialState.RUNNING
    return create_trial(
        state=state,
        value=trial.value if state == TrialState.COMPLETE else None,
        params={k: v for k, v in trial.parameters.items() if k in every},
        distributions={k: d for k, d in every.items() if k in trial.parameters},
        intermediate_values=intermediate,
        system_attrs=dict(trial.system_attributes or {}),
    )


def build_study(
    search: SweepSearch,
    study_name: str,
    trials: Sequence[TrialStatus],
    *,
    seed: int = 0,
    judged: tuple[int, int] | None = None,
) -> optuna.Study:
    """The study the trials make, with a sampler seeded `seed` and the sweep's pruner.

    `judged` (trial number, step): that trial is shown running, with its intermediate
    values up to the step, as the pruner would have seen it then.
    """
    study = optuna.create_study(
        study_name=study_name,
        direction=search.objective.direction,
        sampler=_sampler(search, seed),
        pruner=_pruner(search),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna's ExperimentalWarning on add_trial
        for trial in sorted(trials, key=lambda t: t.number):
            step = judged[1] if judged and judged[0] == trial.number else None
            study.add_trial(_frozen(search, trial, step))
    return study


def ask_trial(
    search: SweepSearch, study_name: str, trials: Sequence[TrialStatus], number: int
) -> TrialStatus:
    """Trial `number`, running, with the parameters the study asks given the trials so far
    (a pure function of them) and what the sampler recorded for it."""
    study = build_study(search, study_name, trials, seed=sampler_seed(search, study_name, number))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        asked = study.ask(distributions(search))
    attributes = study.trials[asked.number].system_attrs
    return TrialStatus(
        name=trial_name(study_name, number),
        number=number,
        state=TRIAL_RUNNING,
        parameters={p.path: asked.params[p.path] for p in search.parameters},
        system_attributes=_json_ready(attributes) or None,
        message="created",
    )


def _json_ready(value: Any) -> Any:
    """Optuna's attributes as JSON values (tuples become lists), as the status stores them."""
    return json.loads(json.dumps(value))


def judge_trial(
    search: SweepSearch, study_name: str, trials: Sequence[TrialStatus], trial: TrialStatus
) -> TrialStatus:
    """`trial` after the pruner judged every step it had not judged yet, oldest first.

    Returns a copy: Pruned with prunedAtStep at the first step the pruner stops it, else
    still Running with judgedStep moved on; hyperband's rung values kept in it either way.
    """
    if search.pruner is None or search.pruner.type == "none" or trial.state != TRIAL_RUNNING:
        return trial
    judged = trial.model_copy(deep=True)
    others = [t for t in trials if t.number != trial.number]
    for point in trial.intermediate:
        if judged.judged_step is not None and point.step <= judged.judged_step:
            continue
        study = build_study(
            search, study_name, [*others, judged], judged=(trial.number, point.step)
        )
        frozen = next(t for t in study.trials if t.number == _index_of(trial, others))
        stop = study.pruner.prune(study, frozen)
        judged.system_attributes = _json_ready(study.trials[frozen.number].system_attrs) or None
        judged.judged_step = point.step
        if stop:
            judged.state, judged.pruned_at_step = TRIAL_PRUNED, point.step
            break
    return judged


def _index_of(trial: TrialStatus, others: Sequence[TrialStatus]) -> int:
    """The trial's number inside a rebuilt study (trials are added in number order)."""
    return sum(1 for t in others if t.number < trial.number)


def parameter_importances(
    search: SweepSearch, study_name: str, trials: Sequence[TrialStatus]
) -> dict[str, float]:
    """Optuna's parameter importances over the complete trials ({} with fewer than 2, or
    when the objective never varied)."""
    complete = [t for t in trials if t.state == TRIAL_COMPLETE]
    if len(complete) < 2 or len({t.value for t in complete}) < 2:
        return {}
    study = build_study(search, study_name, complete)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            importances = optuna.importance.get_param_importances(study)
        except (RuntimeError, ValueError):
            return {}
    return {path: float(value) for path, value in importances.items()}


# ---------------------------------------------------------------- trials as runs


def sweep_owner_reference(sweep: Sweep) -> dict[str, Any]:
    """The ownerReference that makes a trial the sweep's child (needs metadata.uid)."""
    if not sweep.metadata.uid:
        raise ValueError(f"Sweep {sweep.metadata.name}: metadata.uid is not set")
    return {
        "apiVersion": sweep.api_version,
        "kind": SWEEP_KIND,
        "name": sweep.metadata.name,
        "uid": sweep.metadata.uid,
        "controller": True,
    }


def trial_run(sweep: Sweep, trial: TrialStatus) -> TrainingRun:
    """The TrainingRun of a trial just asked: the template with its parameters set, writing
    to <template.output>/<sweep>-<number>, labelled and annotated with what it tries."""
    name, number, parameters = sweep.metadata.name, trial.number, trial.parameters
    template = sweep.spec.template.model_dump(mode="json", by_alias=True, exclude_none=True)
    body = with_parameters(template, parameters)
    body["output"] = trial_output_uri(sweep.spec.template.output, name, number)
    body["suspend"] = sweep.spec.suspend
    labels = {LABEL_SWEEP: name, LABEL_TRIAL: str(number)}
    queue = sweep.metadata.labels.get(KUEUE_QUEUE_LABEL)
    if queue:
        labels[KUEUE_QUEUE_LABEL] = queue
    metadata: dict[str, Any] = {
        "name": trial_name(name, number),
        "labels": labels,
        "annotations": {ANNOTATION_PARAMETERS: json.dumps(dict(parameters), sort_keys=True)},
    }
    if trial.system_attributes:
        metadata["annotations"][ANNOTATION_SYSTEM_ATTRIBUTES] = json.dumps(
            trial.system_attributes, sort_keys=True
        )
    if sweep.metadata.namespace:
        metadata["namespace"] = sweep.metadata.namespace
    if sweep.metadata.uid:
        metadata["ownerReferences"] = [sweep_owner_reference(sweep)]
    return TrainingRun.model_validate({"metadata": metadata, "spec": body})


def observe_trial(
    sweep: Sweep, number: int, run: Mapping[str, Any], previous: TrialStatus | None
) -> TrialStatus:
    """A trial as its TrainingRun shows it (`previous`: the sweep's last record of it)."""
    objective = sweep.spec.objective.metric
    meta = run.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    status = run.get("status") or {}
    trial = TrialStatus(
        name=trial_name(sweep.metadata.name, number),
        number=number,
        state=TRIAL_RUNNING,
        parameters=previous.parameters if previous else {},
        judged_step=previous.judged_step if previous else None,
        system_attributes=previous.system_attributes if previous else None,
    )
    if not trial.system_attributes and ANNOTATION_SYSTEM_ATTRIBUTES in annotations:
        try:
            trial.system_attributes = json.loads(annotations[ANNOTATION_SYSTEM_ATTRIBUTES])
        except ValueError:
            trial.system_attributes = None
    try:
        trial.parameters = json.loads(annotations[ANNOTATION_PARAMETERS])
    except (KeyError, ValueError, TypeError):
        if not trial.parameters:
            trial.state = TRIAL_FAILED
            trial.message = f"its run has no valid {ANNOTATION_PARAMETERS} annotation"
            return trial
    trial.intermediate = [
        IntermediateValue(step=point["step"], value=point["metrics"][objective])
        for point in status.get("evalHistory") or []
        if objective in (point.get("metrics") or {})
    ]
    phase = status.get("phase")
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    trial.message = str((conditions.get("Ready") or {}).get("message") or "") or None
    pruned_at = annotations.get(ANNOTATION_PRUNED_AT_STEP)
    if pruned_at is not None and str(pruned_at).isdigit():
        trial.state, trial.pruned_at_step = TRIAL_PRUNED, int(pruned_at)
        trial.message = f"pruned at step {pruned_at}"
    elif phase == PHASE_SUCCEEDED:
        outputs = status.get("outputs") or {}
        trial.metrics = outputs.get("metrics") or None
        trial.model_uri = outputs.get("modelUri")
        value = (outputs.get("metrics") or {}).get(objective)
        if value is None:
            trial.state = TRIAL_FAILED
            trial.message = f"it succeeded but reported no {objective}"
        else:
            trial.state, trial.value = TRIAL_COMPLETE, float(value)
    elif phase == PHASE_FAILED:
        trial.state = TRIAL_FAILED
    return trial


def suspend_patch(sweep: Sweep, run: Mapping[str, Any]) -> dict[str, Any] | None:
    """The merge patch that makes an unfinished, unpruned trial follow spec.suspend."""
    if ((run.get("status") or {}).get("phase")) in FINISHED_PHASES:
        return None
    if ANNOTATION_PRUNED_AT_STEP in ((run.get("metadata") or {}).get("annotations") or {}):
        return None
    if bool((run.get("spec") or {}).get("suspend")) == sweep.spec.suspend:
        return None
    return {"spec": {"suspend": sweep.spec.suspend}}


def prune_patch(step: int) -> dict[str, Any]:
    """The merge patch that stops a pruned trial: suspended (checkpoint kept), step noted."""
    return {
        "metadata": {"annotations": {ANNOTATION_PRUNED_AT_STEP: str(step)}},
        "spec": {"suspend": True},
    }


# ---------------------------------------------------------------- the plan


def plan_sweep(
    sweep: Sweep, trial_runs: Mapping[int, Mapping[str, Any] | None], *, now: str
) -> SweepPlan:
    """The trials to create and to prune now, and the sweep's new status.

    `trial_runs` maps trial numbers to their TrainingRun bodies (metadata, spec, status);
    `sweep.status` is the previous status (kept: what the pruner judged, condition times,
    trials whose run was deleted). `now` is the RFC 3339 time of this observation.
    """
    search, name = sweep.spec, sweep.metadata.name
    previous = {t.number: t for t in (sweep.status.trials if sweep.status else [])}
    trials: dict[int, TrialStatus] = {}
    for number in sorted(set(previous) | {n for n, run in trial_runs.items() if run}):
        run = trial_runs.get(number)
        if run:
            trials[number] = observe_trial(sweep, number, run, previous.get(number))
        else:
            gone = previous[number].model_copy()
            if gone.state == TRIAL_RUNNING:
                gone.state, gone.message = TRIAL_FAILED, "its TrainingRun was deleted"
            trials[number] = gone

    prune: list[TrialPrune] = []
    for number in sorted(trials):
        if trials[number].state == TRIAL_RUNNING:
            judged = judge_trial(search, name, list(trials.values()), trials[number])
            if judged.state == TRIAL_PRUNED and judged.pruned_at_step is not None:
                prune.append(TrialPrune(judged.name, judged.pruned_at_step))
                judged.message = f"pruned at step {judged.pruned_at_step}"
            trials[number] = judged

    create: list[TrainingRun] = []
    planned = search.trials_planned()
    next_number = max(trials, default=-1) + 1
    while (
        not search.suspend
        and not _too_many_failed(search, trials.values())
        and next_number < planned
        and _count(trials.values(), TRIAL_RUNNING) < search.parallelism
    ):
        asked = ask_trial(search, name, list(trials.values()), next_number)
        create.append(trial_run(sweep, asked))
        trials[next_number] = asked
        next_number += 1

    listed = [trials[n] for n in sorted(trials)]
    status = _sweep_status(sweep, listed, started=bool(trial_runs) or bool(create), now=now)
    return SweepPlan(create=create, prune=prune, status=status)


def _count(trials: Any, state: str) -> int:
    return sum(1 for t in trials if t.state == state)


def _too_many_failed(search: SweepSearch, trials: Any) -> bool:
    failed = _count(trials, TRIAL_FAILED)
    return search.max_failed_trials is not None and failed > search.max_failed_trials


def best_trial(search: SweepSearch, trials: Sequence[TrialStatus]) -> TrialStatus | None:
    """The complete trial with the best objective (the lowest number among equals)."""
    complete = [t for t in trials if t.state == TRIAL_COMPLETE and t.value is not None]
    if not complete:
        return None
    sign = 1 if search.objective.direction == "minimize" else -1
    return min(complete, key=lambda t: (sign * (t.value or 0.0), t.number))


def _sweep_status(
    sweep: Sweep, trials: list[TrialStatus], *, started: bool, now: str
) -> SweepStatus:
    search = sweep.spec
    counts = {state: _count(trials, state) for state in TRIAL_STATES}
    planned = search.trials_planned()
    done = len(trials) - counts[TRIAL_RUNNING]
    best = best_trial(search, trials)
    objective = search.objective.metric
    best_text = f"; best {best.name} {objective}={best.value:.4g}" if best else ""
    summary = (
        f"{done}/{planned} trials done: {counts[TRIAL_COMPLETE]} complete, "
        f"{counts[TRIAL_PRUNED]} pruned, {counts[TRIAL_FAILED]} failed{best_text}"
    )
    too_many = _too_many_failed(search, trials)
    nothing_runs = counts[TRIAL_RUNNING] == 0
    outputs = None
    if nothing_runs and (done >= planned or too_many):
        if too_many:
            phase, reason = PHASE_FAILED, REASON_TOO_MANY_FAILED_TRIALS
            message = f"more than maxFailedTrials ({search.max_failed_trials}) failed; {summary}"
        elif best is None:
            phase, reason = PHASE_FAILED, REASON_NO_COMPLETE_TRIAL
            message = f"no trial completed; {summary}"
        else:
            phase, reason, message = PHASE_SUCCEEDED, REASON_COMPLETED, summary
            outputs = Outputs(model_uri=best.model_uri, metrics=best.metrics)
    elif search.suspend:
        phase, reason, message = (
            PHASE_SUSPENDED,
            REASON_SUSPENDED,
            f"spec.suspend is true; {summary}",
        )
    elif started:
        phase, reason, message = PHASE_RUNNING, REASON_TRIALS_RUNNING, summary
    else:
        phase, reason, message = PHASE_PENDING, REASON_TRIALS_RUNNING, summary
    previous = (
        sweep.status.model_dump(mode="json", by_alias=True, exclude_none=True)
        if sweep.status
        else {}
    )
    finished = phase in FINISHED_PHASES
    body = next_status(
        previous,
        phase=phase,
        reason=reason,
        message=message,
        now=now,
        generation=sweep.metadata.generation,
        startTime=previous.get("startTime") or (now if started else None),
        completionTime=(previous.get("completionTime") or now) if finished else None,
        progress=f"{done}/{planned}",
        trialCounts=counts,
        bestTrial=(
            BestTrial(
                name=best.name,
                number=best.number,
                parameters=best.parameters,
                value=best.value or 0.0,
                model_uri=best.model_uri,
            ).model_dump(mode="json", by_alias=True, exclude_none=True)
            if best
            else None
        ),
        trials=[t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in trials],
        outputs=outputs.model_dump(mode="json", by_alias=True, exclude_none=True)
        if outputs
        else None,
    )
    return SweepStatus.model_validate(body)
