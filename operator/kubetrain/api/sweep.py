"""Sweep (kubetrain.dev/v1alpha1): hyperparameter search over a TrainingRun template.

A Sweep names the fields of a TrainingRun spec to tune (`parameters[].path`, e.g.
`training.learningRate`, each a float, int or categorical distribution as Optuna has them),
the metric to optimise (`objective`, a metrics.json key the template's method reports), the
sampler (`algorithm`: tpe, random, grid or cmaes, seedable), how many trials run
(`maxTrials`, `parallelism`) and an optional pruner (median or hyperband) that stops trials
whose intermediate evaluations lag. Each trial is a TrainingRun `<sweep>-<n>` the sweep
owns, writing to `<template.output>/<sweep>-<n>`. `SweepSearch` is everything but the
template, so a Pipeline stage can carry it inline (`stage.sweep`) over its own spec.

Which fields can be tuned is one table, `tunable_fields()`, built from the TrainingRun
model: scalar fields (numbers, booleans, choices) under model, data, training, lora, dpo
and fromScratch. The CRD's CEL rules and the pydantic validators both read it; pydantic
also judges every bound and choice as the TrainingRun spec it would make, and the objective
against what the method reports (contract.reported_metrics), which CEL cannot.
"""

from __future__ import annotations

import functools
import json
import re
import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kubetrain.api.cel import rule
from kubetrain.api.trainingrun import (
    API_VERSION,
    MAX_RUN_NAME_LENGTH,
    RUN_NAME_PATTERN,
    K8sObject,
    KstatusStatus,
    ObjectMeta,
    Outputs,
    TrainingRunSpec,
)
from kubetrain_trainer.contract import intermediate_metrics, reported_metrics

SWEEP_KIND = "Sweep"
SWEEP_PLURAL = "sweeps"
SWEEP_SINGULAR = "sweep"
SWEEP_SHORT_NAMES: list[str] = []

# Labels on every trial, so `kubectl get tr -l kubetrain.dev/sweep=x` lists a sweep's trials.
LABEL_SWEEP = "kubetrain.dev/sweep"
LABEL_TRIAL = "kubetrain.dev/trial"  # the trial number
# What the sweep decided for a trial, kept on the trial itself: the parameters it was asked
# to try (JSON), and the step at which the pruner stopped it. With them the trial runs alone
# rebuild the study, even if the sweep's status were lost.
ANNOTATION_PARAMETERS = "kubetrain.dev/trial-parameters"
ANNOTATION_PRUNED_AT_STEP = "kubetrain.dev/pruned-at-step"
# What Optuna's sampler recorded when it asked (e.g. the grid point), JSON.
ANNOTATION_SYSTEM_ATTRIBUTES = "kubetrain.dev/trial-system-attributes"

MAX_TRIALS = 200  # trials are listed in status: keep it well below etcd's object size limit
MAX_PARAMETERS = 16
MAX_CHOICES = 32
MAX_PATH_LENGTH = 64
# A trial is `<sweep>-<n>`, n below maxTrials, and must fit the TrainingRun name limit.
MAX_SWEEP_NAME_LENGTH = MAX_RUN_NAME_LENGTH - 1 - len(str(MAX_TRIALS - 1))

ParameterType = Literal["float", "int", "categorical"]
Algorithm = Literal["tpe", "random", "grid", "cmaes"]
Direction = Literal["minimize", "maximize"]
PrunerType = Literal["median", "hyperband", "none"]
# A trial's state, Optuna's names: Running (its run has not finished), Complete (it reported
# the objective), Pruned (the pruner stopped it; its run is suspended, outputs kept), Failed.
TrialState = Literal["Running", "Complete", "Pruned", "Failed"]
TRIAL_RUNNING: TrialState = "Running"
TRIAL_COMPLETE: TrialState = "Complete"
TRIAL_PRUNED: TrialState = "Pruned"
TRIAL_FAILED: TrialState = "Failed"
TRIAL_STATES: tuple[TrialState, ...] = typing.get_args(TrialState)

REASON_TRIALS_RUNNING = "TrialsRunning"
REASON_TOO_MANY_FAILED_TRIALS = "TooManyFailedTrials"
REASON_NO_COMPLETE_TRIAL = "NoCompleteTrial"
REASON_TRIAL_PRUNED = "TrialPruned"  # event: the pruner stopped a trial

ParameterValue = float | int | str | bool

# The blocks of a TrainingRun spec whose scalar fields a sweep may tune; data's URIs are
# not hyperparameters.
TUNABLE_BLOCKS = ("model", "data", "training", "lora", "dpo", "fromScratch")
# Nor are credentials or the switch that lets a model run its own code.
NOT_TUNABLE = frozenset(
    {
        "data.train",
        "data.eval",
        "model.trustRemoteCode",
        "model.tokenSecretRef.name",
        "model.tokenSecretRef.key",
    }
)
FieldKind = Literal["float", "int", "bool", "choice"]


def _scalar_kind(annotation: Any) -> FieldKind | None:
    """float, int, bool or choice (a str or Literal) for a scalar annotation, else None."""
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        arms = [a for a in typing.get_args(annotation) if a is not type(None)]
        kinds = {_scalar_kind(a) for a in arms}
        return kinds.pop() if len(kinds) == 1 else None
    if typing.get_origin(annotation) is Literal:
        return "choice"
    return {bool: "bool", int: "int", float: "float", str: "choice"}.get(annotation)


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an (optional) annotation holds, else None."""
    arms = typing.get_args(annotation) if typing.get_origin(annotation) else (annotation,)
    for arm in arms:
        if isinstance(arm, type) and issubclass(arm, BaseModel):
            return arm
    return None


@functools.cache
def tunable_fields() -> dict[str, FieldKind]:
    """Field path (camelCase, e.g. training.learningRate) -> kind, for every tunable field."""
    found: dict[str, FieldKind] = {}

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            path = f"{prefix}.{info.alias or name}"
            nested = _model_of(info.annotation)
            if nested is not None:
                walk(nested, path)
                continue
            kind = _scalar_kind(info.annotation)
            if kind is not None and path not in NOT_TUNABLE:
                found[path] = kind

    for name, info in TrainingRunSpec.model_fields.items():
        block = info.alias or name
        model = _model_of(info.annotation)
        if block in TUNABLE_BLOCKS and model is not None:
            walk(model, block)
    return found


def _paths_of(*kinds: FieldKind) -> list[str]:
    return sorted(p for p, k in tunable_fields().items() if k in kinds)


def _cel_list(items: list[str]) -> str:
    return "[" + ", ".join(f"'{item}'" for item in items) + "]"


def _parameter_rules() -> list[dict[str, str]]:
    """CEL twins of SweepParameter's checks; the path lists come from tunable_fields().

    None reads `choices`: its items may be numbers, strings or booleans, which a structural
    schema can only keep untyped, and CEL cannot compile a rule on an untyped field; the
    operator's pydantic checks them (InvalidSpec).
    """
    numeric = "self.type == 'float' || self.type == 'int'"
    return [
        {
            **rule(
                f"self.path in {_cel_list(_paths_of('float', 'int', 'bool', 'choice'))}",
                "path is not a field a sweep can tune",
                field_path=".path",
            ),
            "messageExpression": "'path ' + self.path + ' is not a field a sweep can tune: "
            "name a number, boolean or choice under model, data, training, lora, dpo or "
            "fromScratch, in camelCase (e.g. training.learningRate)'",
        },
        {
            **rule(
                f"self.type != 'float' || self.path in {_cel_list(_paths_of('float'))}",
                "type float needs a float field",
                field_path=".type",
            ),
            "messageExpression": "'path ' + self.path + ' is not a float field; use type int "
            "for integer fields or categorical for booleans and choices'",
        },
        {
            **rule(
                f"self.type != 'int' || self.path in {_cel_list(_paths_of('int', 'float'))}",
                "type int needs a numeric field",
                field_path=".type",
            ),
            "messageExpression": "'path ' + self.path + ' is not a numeric field; use type "
            "categorical for booleans and choices'",
        },
        rule(
            f"!({numeric}) || (has(self.low) && has(self.high) && self.low < self.high)",
            "type float and int need low < high",
            field_path=".low",
            reason="FieldValueRequired",
        ),
        rule(
            "!has(self.log) || !self.log || (has(self.low) && self.low > 0.0)",
            "log scale needs low > 0",
            field_path=".low",
        ),
        rule(
            "!has(self.log) || !self.log || !has(self.step)",
            "set log or step, not both (Optuna samples a log scale continuously)",
            field_path=".step",
            reason="FieldValueForbidden",
        ),
        rule(
            "self.type != 'categorical' || (!has(self.low) && !has(self.high) && "
            "!has(self.step) && (!has(self.log) || !self.log))",
            "type categorical takes choices, not low, high, step or log",
            field_path=".type",
            reason="FieldValueForbidden",
        ),
    ]


class SweepParameter(K8sObject):
    """One field of the template to tune, and the distribution its values come from."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": _parameter_rules()})

    path: str = Field(
        min_length=3,
        max_length=MAX_PATH_LENGTH,
        pattern=r"^[a-z][a-zA-Z0-9]*(\.[a-z][a-zA-Z0-9]*)+$",
        description="The template field to tune, in camelCase: training.learningRate, "
        "lora.r, training.perDeviceTrainBatchSize, training.warmupSteps, ...",
    )
    type: ParameterType = Field(
        description="float (suggest_float), int (suggest_int) or categorical (suggest_categorical)."
    )
    low: float | None = Field(None, description="Smallest value (float and int).")
    high: float | None = Field(None, description="Largest value, included (float and int).")
    log: bool = Field(
        False, description="Sample on a log scale (needs low > 0), as for learning rates."
    )
    step: float | None = Field(
        None, gt=0, description="Sample on a grid low, low+step, ... (float and int; not with log)."
    )
    choices: list[ParameterValue] | None = Field(
        None,
        min_length=1,
        max_length=MAX_CHOICES,
        description="The values to choose from (categorical): numbers, strings or booleans "
        "the field accepts.",
    )

    @model_validator(mode="after")
    def _a_distribution(self) -> SweepParameter:
        kind = tunable_fields().get(self.path)
        if kind is None:
            raise ValueError(
                f"path {self.path} is not a field a sweep can tune: name a number, boolean or "
                "choice under model, data, training, lora, dpo or fromScratch, in camelCase "
                "(e.g. training.learningRate)"
            )
        if self.type == "categorical":
            if self.choices is None:
                raise ValueError(f"{self.path}: type categorical needs choices")
            if {self.low, self.high, self.step} != {None} or self.log:
                raise ValueError(
                    f"{self.path}: type categorical takes choices, not low, high, step or log"
                )
            return self
        if self.type == "float" and kind != "float":
            fix = "use type int" if kind == "int" else "use type categorical"
            raise ValueError(f"{self.path} is not a float field; {fix}")
        if self.type == "int" and kind not in ("int", "float"):
            raise ValueError(f"{self.path} is not a numeric field; use type categorical")
        if self.choices is not None:
            raise ValueError(
                f"{self.path}: choices apply to type categorical only; {self.type} takes low "
                "and high"
            )
        if self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"{self.path}: type {self.type} needs low < high")
        if self.log and self.low <= 0:
            raise ValueError(f"{self.path}: log scale needs low > 0, got low {self.low:g}")
        if self.log and self.step is not None:
            raise ValueError(
                f"{self.path}: set log or step, not both (Optuna samples a log scale continuously)"
            )
        if self.type == "int":
            for name in ("low", "high", "step"):
                value = getattr(self, name)
                if value is not None and value != int(value):
                    raise ValueError(f"{self.path}: type int needs a whole {name}, got {value:g}")
        return self

    def values_to_check(self) -> list[ParameterValue]:
        """Values whose fit the template must accept: the bounds, or every choice."""
        if self.type == "categorical":
            return list(self.choices or [])
        bounds = [self.low, self.high]
        return [int(b) for b in bounds] if self.type == "int" else bounds  # type: ignore[misc]

    def grid(self) -> list[ParameterValue] | None:
        """Every value grid search tries, or None when the distribution is continuous."""
        if self.type == "categorical":
            return list(self.choices or [])
        low, high = self.low or 0.0, self.high or 0.0
        step = self.step if self.step is not None else (1 if self.type == "int" else None)
        if step is None:
            return None
        count = int((high - low) // step) + 1
        values = [low + i * step for i in range(count)]
        return [int(v) for v in values] if self.type == "int" else values


class SweepObjective(K8sObject):
    """The metric a sweep optimises, as the trials report it."""

    metric: str = Field(
        min_length=1,
        max_length=64,
        pattern=r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)?$",
        description="A final metric (outputs.metrics) the template's method reports: eval_loss, "
        "train_loss, perplexity, rewards_accuracy (dpo), or <suite>.<metric> for method "
        "evaluate (e.g. qa.exact_match).",
    )
    direction: Direction = Field("minimize", description="minimize or maximize the metric.")


class SweepPruner(K8sObject):
    """When to stop a trial early, judged on the objective at each evaluation it reports."""

    type: PrunerType = Field(
        description="median (stop a trial whose objective is worse than the median of "
        "earlier trials at the same step), hyperband, or none."
    )
    startup_trials: int = Field(
        2,
        ge=0,
        description="median: prune nothing until this many trials completed.",
    )
    warmup_steps: int = Field(
        0, ge=0, description="median: prune no trial before this optimizer step."
    )
    min_resource: int = Field(
        1, ge=1, description="hyperband: steps a trial gets before it can be pruned."
    )
    reduction_factor: int = Field(
        3, ge=2, description="hyperband: 1/reductionFactor of the trials go on at each rung."
    )


class SweepSearch(K8sObject):
    """The search: what to tune, what to optimise, how to sample and how many trials."""

    parameters: list[SweepParameter] = Field(
        min_length=1,
        max_length=MAX_PARAMETERS,
        description="The fields of the template to tune, each with its distribution.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["path"],
        },
    )
    objective: SweepObjective = Field(description="The metric to optimise and its direction.")
    algorithm: Algorithm = Field(
        "tpe",
        description="Optuna sampler: tpe (Bayesian, the default), random, grid (every "
        "combination of categorical choices and stepped ranges) or cmaes.",
    )
    seed: int | None = Field(
        None, ge=0, description="Seed of the sampler: the same seed and history ask the same."
    )
    max_trials: int = Field(
        ge=1, le=MAX_TRIALS, description=f"Trials to run in all (at most {MAX_TRIALS})."
    )
    parallelism: int = Field(1, ge=1, description="Trials running at the same time.")
    pruner: SweepPruner | None = Field(
        None, description="Stop trials early on their intermediate evaluations; none by default."
    )
    max_failed_trials: int | None = Field(
        None,
        ge=0,
        description="Fail the sweep once more trials than this failed (unset: it fails only "
        "when no trial completes).",
    )

    def parameter(self, path: str) -> SweepParameter:
        return next(p for p in self.parameters if p.path == path)

    def trials_planned(self) -> int:
        """maxTrials, or fewer for a grid with fewer combinations."""
        if self.algorithm != "grid":
            return self.max_trials
        size = 1
        for parameter in self.parameters:
            size *= len(parameter.grid() or [])
        return min(self.max_trials, size)


def search_problems(search: SweepSearch, template: Mapping[str, Any], where: str) -> list[str]:
    """What is wrong with `search` over `template` (a TrainingRun spec body, camelCase, or a
    stage spec before the pipeline fills it in); `where` starts each message."""
    problems = []
    paths = [p.path for p in search.parameters]
    twice = sorted({p for p in paths if paths.count(p) > 1})
    if twice:
        problems.append(f"{where}.parameters: {', '.join(twice)} listed more than once")
    if search.parallelism > search.max_trials:
        problems.append(
            f"{where}.parallelism {search.parallelism} is more than maxTrials {search.max_trials}"
        )
    if search.algorithm == "grid":
        continuous = [p.path for p in search.parameters if p.grid() is None]
        if continuous:
            problems.append(
                f"{where}.algorithm grid needs a step for float parameters "
                f"({', '.join(continuous)}): a grid lists every value"
            )
    for i, parameter in enumerate(search.parameters):
        for value in parameter.values_to_check():
            problem = _value_problem(template, parameter.path, value)
            if problem:
                problems.append(
                    f"{where}.parameters[{i}] ({parameter.path}): value {value!r} does not "
                    f"fit the template: {problem}"
                )
    problems += _objective_problems(search, template, where)
    return problems


def _value_problem(template: Mapping[str, Any], path: str, value: ParameterValue) -> str | None:
    """Why the template with `path` set to `value` is no valid TrainingRun spec, else None."""
    body = with_parameters(template, {path: value})
    try:
        TrainingRunSpec.model_validate(body)
    except ValidationError as e:
        return "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'spec'}: "
            f"{str(err['msg']).removeprefix('Value error, ')}"
            for err in e.errors()
        )
    return None


def _objective_problems(search: SweepSearch, template: Mapping[str, Any], where: str) -> list[str]:
    method = str(template.get("method"))
    suites = tuple(s.get("name", "") for s in (template.get("evaluate") or {}).get("suites") or [])
    metric = search.objective.metric
    reported = reported_metrics(method, suites)
    if metric not in reported:
        return [
            f"{where}.objective.metric {metric} is not reported by method {method} (it "
            f"reports {', '.join(reported)})"
        ]
    problems = []
    evaluated = metric in intermediate_metrics(method) or metric == "eval_loss"
    if evaluated and not (template.get("data") or {}).get("eval"):
        problems.append(
            f"{where}.objective.metric {metric} is measured on evaluation data; set "
            "template data.eval"
        )
    if search.pruner is not None and search.pruner.type != "none":
        during = intermediate_metrics(method)
        strategy = (template.get("training") or {}).get("evalStrategy", "no")
        if metric not in during:
            problems.append(
                f"{where}.pruner {search.pruner.type} judges the objective during training, "
                f"but method {method} reports {metric} only at the end (during training: "
                f"{', '.join(during) or 'nothing'}); drop the pruner"
            )
        elif strategy == "no":
            problems.append(
                f"{where}.pruner {search.pruner.type} needs evaluations during training; set "
                "template training.evalStrategy to steps (and evalSteps)"
            )
    return problems


def with_parameters(template: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a spec body (camelCase) with each `path` set to its value."""
    body = json.loads(json.dumps(template))
    for path, value in values.items():
        *blocks, leaf = path.split(".")
        node = body
        for block in blocks:
            node = node.setdefault(block, {})
            if node is None:
                node = {}
        node[leaf] = value
    return body


class SweepSpec(SweepSearch):
    """A search over a TrainingRun template: trials are TrainingRuns `<sweep>-<n>`."""

    template: TrainingRunSpec = Field(
        description="The TrainingRun spec every trial starts from; each trial sets the "
        "parameters' paths and writes to <template.output>/<sweep>-<n>."
    )
    suspend: bool = Field(
        False,
        description="Hold the sweep: no new trials start and running ones are suspended "
        "(they resume from their newest checkpoint when set back to false).",
    )

    @model_validator(mode="after")
    def _search_fits_template(self) -> SweepSpec:
        template = self.template.model_dump(mode="json", by_alias=True, exclude_none=True)
        problems = search_problems(self, template, "spec")
        if problems:
            raise ValueError("; ".join(problems))
        return self


# ---------------------------------------------------------------- status


class IntermediateValue(K8sObject):
    """The objective at one evaluation of a trial during training."""

    step: int = Field(ge=0, description="Optimizer step of the evaluation.")
    value: float = Field(description="The objective's value there.")


class TrialStatus(K8sObject):
    """One trial as the sweep last saw it: what it tried and how it did."""

    model_config = ConfigDict(extra="ignore")

    name: str = Field(description="The trial's TrainingRun, <sweep>-<number>.")
    number: int = Field(ge=0, description="Trial number, from 0 in the order asked.")
    state: TrialState = Field(description="Running, Complete, Pruned or Failed.")
    parameters: dict[str, ParameterValue] = Field(
        description="Field path -> the value this trial tries."
    )
    value: float | None = Field(None, description="The objective's final value (Complete).")
    intermediate: list[IntermediateValue] = Field(
        default_factory=list,
        description="The objective at each evaluation during training, oldest first.",
    )
    pruned_at_step: int | None = Field(
        None, description="The step at which the pruner stopped the trial (Pruned)."
    )
    judged_step: int | None = Field(
        None, description="The last intermediate step the pruner has judged."
    )
    system_attributes: dict[str, Any] | None = Field(
        None,
        description="What Optuna's sampler and pruner recorded for the trial (grid point, "
        "CMA-ES state, hyperband's rung values), so the study rebuilds exactly.",
    )
    model_uri: str | None = Field(None, description="The trial's model once it completed.")
    metrics: dict[str, float] | None = Field(
        None, description="The trial run's final metrics (its outputs.metrics)."
    )
    message: str | None = Field(None, description="What the trial run is doing, or why it failed.")


class BestTrial(K8sObject):
    """The best complete trial so far."""

    name: str = Field(description="The trial's TrainingRun.")
    number: int = Field(ge=0, description="Trial number.")
    parameters: dict[str, ParameterValue] = Field(description="Its parameters.")
    value: float = Field(description="Its objective value.")
    model_uri: str | None = Field(None, description="Its model (what a later stage takes).")


class SweepStatus(KstatusStatus):
    """Observed state of a Sweep, written by the operator only: the study, trial by trial."""

    start_time: str | None = Field(
        None,
        description="When the first trial was created (RFC 3339).",
        json_schema_extra={"format": "date-time"},
    )
    completion_time: str | None = Field(
        None,
        description="When the sweep Succeeded or Failed (RFC 3339).",
        json_schema_extra={"format": "date-time"},
    )
    progress: str | None = Field(
        None, description="Trials done (complete, pruned or failed) out of all, e.g. 3/6."
    )
    trial_counts: dict[str, int] | None = Field(
        None, description="Trials by state: Running, Complete, Pruned, Failed."
    )
    best_trial: BestTrial | None = Field(None, description="The best complete trial so far.")
    trials: list[TrialStatus] = Field(
        default_factory=list,
        max_length=MAX_TRIALS,
        description="Every trial created so far, by number.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["name"],
        },
    )
    outputs: Outputs | None = Field(
        None,
        description="Once Succeeded: the best trial's model and final metrics (what a "
        "Pipeline's next stage takes).",
    )


# ---------------------------------------------------------------- the resource


class Sweep(K8sObject):
    """A hyperparameter search: trials of a TrainingRun template, chosen by Optuna."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                rule(
                    f"!has(self.metadata.name) || (self.metadata.name.matches("
                    f"'{RUN_NAME_PATTERN}') && self.metadata.name.size() + 1 + "
                    f"string(self.spec.maxTrials - 1).size() <= {MAX_RUN_NAME_LENGTH})",
                    "metadata.name must be a DNS label short enough that every trial "
                    f"<sweep>-<n> fits {MAX_RUN_NAME_LENGTH} characters",
                )
            ]
        }
    )

    api_version: Literal["kubetrain.dev/v1alpha1"] = Field(
        API_VERSION, description="kubetrain.dev/v1alpha1"
    )
    kind: Literal["Sweep"] = Field(SWEEP_KIND, description="Sweep")
    metadata: ObjectMeta = Field(description="Standard object metadata.")
    spec: SweepSpec = Field(description="The template, the parameters and the search.")
    status: SweepStatus | None = Field(None, description="Written by the operator.")

    @model_validator(mode="after")
    def _trial_names_fit(self) -> Sweep:
        longest = trial_name(self.metadata.name, self.spec.max_trials - 1)
        if not _matches_dns_label(self.metadata.name) or len(longest) > MAX_RUN_NAME_LENGTH:
            raise ValueError(
                f"metadata.name {self.metadata.name!r} must be a DNS label short enough that "
                f"every trial <sweep>-<n> fits {MAX_RUN_NAME_LENGTH} characters ({longest} "
                f"is {len(longest)})"
            )
        return self


def _matches_dns_label(name: str) -> bool:
    return re.match(RUN_NAME_PATTERN, name) is not None


def trial_name(sweep_name: str, number: int) -> str:
    """The TrainingRun of trial `number`: `<sweep>-<number>`."""
    return f"{sweep_name}-{number}"


def trial_output_uri(template_output: str, sweep_name: str, number: int) -> str:
    """Where trial `number` writes: `<template.output>/<sweep>-<number>`."""
    return f"{template_output.rstrip('/')}/{trial_name(sweep_name, number)}"
