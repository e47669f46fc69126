"""Pipeline (kubetrain.dev/v1alpha1): TrainingRun stages chained by dependsOn, models handed on.

A Pipeline lists stages, each a TrainingRun spec template plus `dependsOn`. Every stage
becomes its own TrainingRun `<pipeline>-<stage>` once the stages it depends on succeeded (the
operator on a cluster, `kubetrain run` here). A stage starts from an earlier stage's model
with `model.fromStage` (DPO's reference too, `dpo.referenceModel.fromStage`); after a LoRA
stage, `fromStageOutput` picks the adapter or the merged model. `defaults` fill what stages
leave unset (image, resources, env, restarts, backend) and a stage without `output` writes to
`<outputRoot>/<stage>`. As for TrainingRun, rules exist twice: pydantic validators here and
CEL rules in the CRD (unique names, dependsOn and fromStage references, hand-offs, outputs,
name lengths), with messages that name the stage. Two checks are pydantic's only, because
CEL cannot express them: cycles in dependsOn (CEL cannot walk a graph), and each stage
judged as the full TrainingRun it becomes (defaults merged, upstream models filled in). The
operator validates with pydantic before it creates anything and reports such a pipeline as
InvalidSpec in its status.
"""

from __future__ import annotations

import graphlib
import itertools
import re
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from kubetrain.api.cel import present, rule
from kubetrain.api.sweep import SweepSearch, search_problems
from kubetrain.api.trainingrun import (
    API_VERSION,
    MAX_ENV_VARS,
    MAX_RUN_NAME_LENGTH,
    RUN_NAME_PATTERN,
    EnvVar,
    K8sObject,
    KstatusStatus,
    ObjectMeta,
    Resources,
    RestartPolicy,
    RunEvalSuite,
    RunModel,
    TrainingRunSpec,
    check_env_not_reserved,
    env_rule,
    spec_rules,
)
from kubetrain.api.uris import check_uri
from kubetrain_trainer.config import (
    DataSpec,
    Dpo,
    Evaluate,
    FromScratch,
    Lora,
    Method,
    ReferenceModel,
    Spec,
    Training,
)
from kubetrain_trainer.contract import (
    EVAL_SUITE_METRICS,
    MAX_OUTPUT_METRICS,
    MERGED_DIR,
    eval_metric_key,
)

PIPELINE_KIND = "Pipeline"
PIPELINE_PLURAL = "pipelines"
PIPELINE_SINGULAR = "pipeline"
PIPELINE_SHORT_NAMES: list[str] = []

# Labels on every stage's TrainingRun, so `kubectl get tr -l kubetrain.dev/pipeline=x` works.
LABEL_PIPELINE = "kubetrain.dev/pipeline"
LABEL_STAGE = "kubetrain.dev/stage"

# A stage's run is `<pipeline>-<stage>` and must fit the TrainingRun name limit, so a stage
# name leaves room for at least a one-letter pipeline name and the dash.
MAX_STAGE_NAME_LENGTH = MAX_RUN_NAME_LENGTH - 2
# Bounds every list the CEL rules walk, so the API server can cost them (nested loops over
# stages and dependsOn stay far below its per-rule limit).
MAX_STAGES = 32

FailurePolicy = Literal["stopOnFailure", "continueIndependent"]
FAILURE_STOP = "stopOnFailure"
FAILURE_CONTINUE_INDEPENDENT = "continueIndependent"

# Which files of a LoRA stage's output the next stage loads: the adapter folder itself
# (transformers loads it on top of its base model) or `<output>/merged` (lora.merge: true).
StageOutputKind = Literal["adapter", "merged"]
MERGED_SUBDIR = MERGED_DIR  # where the trainer writes the merged model

# A stage's phase: a TrainingRun's, or Skipped when it will not run because a stage it
# depends on failed (or, with stopOnFailure, any stage failed).
StagePhase = Literal["Pending", "Running", "Succeeded", "Failed", "Suspended", "Skipped"]
STAGE_SKIPPED: StagePhase = "Skipped"

# Pipeline condition reasons beside the TrainingRun ones it shares (Completed, Suspended,
# InvalidSpec).
REASON_STAGES_PENDING = "StagesPending"  # no stage has started training yet
REASON_STAGES_RUNNING = "StagesRunning"  # at least one stage started; none failed
REASON_STAGE_FAILED = "StageFailed"  # a stage failed (the pipeline fails once nothing runs)
REASON_GATE_FAILED = "GateFailed"  # a gate held a stage back: an evaluation metric missed it
MAX_GATES = 16

StageName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_STAGE_NAME_LENGTH, pattern=RUN_NAME_PATTERN),
]
_NAME = re.compile(RUN_NAME_PATTERN)


def _description(model: type[K8sObject] | type[Spec], field: str) -> str:
    """A field's description, reused where a Pipeline type mirrors a TrainingRun field."""
    return model.model_fields[field].description or field


# ---------------------------------------------------------------- stage templates


def _hand_off_rules() -> list[dict[str, str]]:
    """CEL twins of StageHandOff's validator, on the object holding name and fromStage."""
    return [
        rule(
            "!(has(self.name) && has(self.fromStage))",
            "set name or fromStage, not both",
            field_path=".fromStage",
            reason="FieldValueForbidden",
        ),
        rule(
            "!has(self.fromStageOutput) || has(self.fromStage)",
            "fromStageOutput applies to the model of fromStage; set fromStage too",
            field_path=".fromStageOutput",
            reason="FieldValueForbidden",
        ),
    ]


class StageHandOff(Spec):
    """Where a stage takes a model from an earlier stage (mixed into model blocks)."""

    from_stage: StageName | None = Field(
        None,
        description="Use the model this earlier stage wrote (its status.outputs.modelUri) "
        "instead of `name`. The stage must also be listed in dependsOn.",
    )
    from_stage_output: StageOutputKind | None = Field(
        None,
        description="For a fromStage that trains LoRA (method lora, or dpo with useLora): "
        "adapter loads its adapter folder on top of its base model (the default); merged "
        "loads <output>/merged, which that stage writes with lora.merge: true.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> StageHandOff:
        if getattr(self, "name", None) and self.from_stage:
            raise ValueError("set name or fromStage, not both")
        if self.from_stage_output and not self.from_stage:
            raise ValueError("fromStageOutput applies to the model of fromStage; set fromStage too")
        return self


class StageModel(RunModel, StageHandOff):
    """A stage's starting model: named, built (from_scratch), or an earlier stage's output."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": _hand_off_rules()})

    name: str | None = Field(
        None,
        max_length=1024,
        description=_description(RunModel, "name") + " In a pipeline, fromStage takes an "
        "earlier stage's model instead.",
    )


class StageReferenceModel(ReferenceModel, StageHandOff):
    """DPO's frozen reference: by default the starting model, or a model or stage named here."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": _hand_off_rules()})

    name: str | None = Field(
        None, max_length=1024, description=_description(ReferenceModel, "name")
    )


class StageDpo(Dpo):
    """DPO settings, whose reference model may come from an earlier stage."""

    reference_model: StageReferenceModel = Field(
        default_factory=StageReferenceModel, description=_description(Dpo, "reference_model")
    )


class StageEvaluate(Evaluate):
    """Method evaluate's block, whose reference model may come from an earlier stage."""

    suites: list[RunEvalSuite] = Field(
        min_length=1,
        max_length=Evaluate.model_fields["suites"].metadata[1].max_length,
        description=_description(Evaluate, "suites"),
    )
    reference_model: StageReferenceModel = Field(
        default_factory=StageReferenceModel, description=_description(Evaluate, "reference_model")
    )


# The TrainingRun rule "this method needs model.name", widened to accept fromStage.
STAGE_MODEL_RULE = rule(
    f"self.method == 'from_scratch' || ({present('model.fromStage')}) || "
    f"({present('model.name')} && self.model.name.matches('\\\\S'))",
    "this method needs model.name or model.fromStage (the model to start from)",
    field_path=".model",
    reason="FieldValueRequired",
)
FROM_SCRATCH_FROM_STAGE_MESSAGE = (
    "method from_scratch builds a new model; drop model.fromStage or use method sft to "
    "continue training that stage's model"
)


class StageSpec(Spec):
    """A TrainingRun spec template; output, image, resources and env may come from the pipeline."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                *spec_rules(STAGE_MODEL_RULE),
                rule(
                    f"self.method != 'from_scratch' || !({present('model.fromStage')})",
                    FROM_SCRATCH_FROM_STAGE_MESSAGE,
                    field_path=".model",
                    reason="FieldValueForbidden",
                ),
            ]
        }
    )

    method: Method = Field(description=_description(TrainingRunSpec, "method"))
    model: StageModel = Field(
        default_factory=StageModel,
        description="The starting model: a hub id, pvc://claim/path, an architecture "
        "(from_scratch), or fromStage: an earlier stage's output.",
    )
    data: DataSpec | None = Field(None, description=_description(TrainingRunSpec, "data"))
    training: Training = Field(
        default_factory=Training, description=_description(TrainingRunSpec, "training")
    )
    lora: Lora | None = Field(None, description=_description(TrainingRunSpec, "lora"))
    dpo: StageDpo | None = Field(None, description=_description(TrainingRunSpec, "dpo"))
    from_scratch: FromScratch | None = Field(
        None, description=_description(TrainingRunSpec, "from_scratch")
    )
    evaluate: StageEvaluate | None = Field(
        None, description=_description(TrainingRunSpec, "evaluate")
    )
    output: str | None = Field(
        None,
        min_length=1,
        description="Where this stage's model goes (pvc://claim/path, or a local path for "
        "`kubetrain run`); defaults to <outputRoot>/<stage name>.",
    )
    image: str | None = Field(
        None, min_length=1, description="Trainer image; defaults to the pipeline's defaults."
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        None, description=_description(TrainingRunSpec, "image_pull_policy")
    )
    resources: Resources | None = Field(
        None,
        description="Pods, processes per pod and their resources; replaces the pipeline's "
        "defaults.resources as a whole.",
    )
    env: list[EnvVar] | None = Field(
        None,
        max_length=MAX_ENV_VARS,
        description="Extra environment for the trainer, added to defaults.env (a name set "
        "in both takes this stage's value).",
    )
    restart_policy: RestartPolicy | None = Field(
        None, description="Restarts after retriable failures; defaults to the pipeline's."
    )
    backend: Literal["job", "jobset"] | None = Field(
        None, description="Workload kind (job or jobset); defaults to the pipeline's, then job."
    )

    @field_validator("output")
    @classmethod
    def _output_uri(cls, value: str | None) -> str | None:
        return check_uri(value) if value is not None else None

    @field_validator("env")
    @classmethod
    def _env_not_reserved(cls, env: list[EnvVar] | None) -> list[EnvVar] | None:
        return check_env_not_reserved(env) if env is not None else None

    @model_validator(mode="after")
    def _starting_model(self) -> StageSpec:
        if self.method == "from_scratch" and self.model.from_stage:
            raise ValueError(FROM_SCRATCH_FROM_STAGE_MESSAGE)
        if self.method != "from_scratch" and not (self.model.name or self.model.from_stage):
            raise ValueError(
                "this method needs model.name or model.fromStage (the model to start from)"
            )
        return self

    def hand_offs(self) -> list[tuple[str, StageHandOff]]:
        """(field, block) for every model block that names a fromStage."""
        blocks: list[tuple[str, StageHandOff]] = [("model", self.model)]
        if self.dpo is not None:
            blocks.append(("dpo.referenceModel", self.dpo.reference_model))
        if self.evaluate is not None:
            blocks.append(("evaluate.referenceModel", self.evaluate.reference_model))
        return [(field, block) for field, block in blocks if block.from_stage]

    @property
    def trains_lora(self) -> bool:
        """Whether this stage's output is a LoRA adapter rather than a full model."""
        return self.method == "lora" or (self.dpo is not None and self.dpo.use_lora)


def _stage_rules() -> list[dict[str, str]]:
    """CEL on one stage: its fromStage references must be in its own dependsOn."""
    rules = [
        {
            **rule(
                "!has(self.dependsOn) || !(self.name in self.dependsOn)",
                "a stage cannot depend on itself",
                field_path=".dependsOn",
            ),
            "messageExpression": "'stage ' + self.name + ' lists itself in dependsOn; remove it'",
        }
    ]
    rules.append(
        {
            **rule(
                "!has(self.gate) || self.gate.all(g, has(self.dependsOn) && g.stage in "
                "self.dependsOn)",
                "a gate's stage must also be listed in dependsOn, so its metrics exist when "
                "this stage is judged",
                field_path=".gate",
                reason="FieldValueRequired",
            ),
        }
    )
    for field in ("model", "dpo.referenceModel", "evaluate.referenceModel"):
        path = f"spec.{field}.fromStage"
        rules.append(
            {
                **rule(
                    f"!({present(path)}) || (has(self.dependsOn) && self.{path} in self.dependsOn)",
                    f"{field}.fromStage must also be listed in dependsOn, so the stage starts "
                    "after the stage whose model it takes",
                    field_path=".dependsOn",
                    reason="FieldValueRequired",
                ),
                "messageExpression": f"'stage ' + self.name + ': {field}.fromStage ' + "
                f"self.{path} + ' must also be listed in dependsOn, so the stage starts "
                "after the stage whose model it takes'",
            }
        )
    return rules


class Gate(K8sObject):
    """A promotion gate: this stage starts only if an evaluation metric is good enough."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                rule(
                    "has(self.min) || has(self.max)",
                    "a gate needs min, max or both",
                    reason="FieldValueRequired",
                )
            ]
        }
    )

    stage: StageName = Field(
        description="An evaluate stage this stage depends on, whose metrics the gate reads."
    )
    metric: str = Field(
        min_length=3,
        max_length=64,
        pattern=r"^[a-z]+\.[a-z0-9_]+$",
        description="The metric, <suite>.<metric> (e.g. qa.exact_match, "
        "perplexity.perplexity); the suite must be one of that stage's.",
    )
    min: float | None = Field(None, description="The metric must be at least this.")
    max: float | None = Field(None, description="The metric must be at most this.")

    @model_validator(mode="after")
    def _a_bound(self) -> Gate:
        if self.min is None and self.max is None:
            raise ValueError("a gate needs min, max or both")
        return self

    def verdict(self, value: float | None) -> str | None:
        """Why the gate holds the stage back (None: it passes); `value` is the metric's."""
        where = f"{self.metric} of stage {self.stage}"
        if value is None:
            return f"{where} was not reported"
        if self.min is not None and value < self.min:
            return f"{where} is {value:.4g}, below the minimum {self.min:g}"
        if self.max is not None and value > self.max:
            return f"{where} is {value:.4g}, above the maximum {self.max:g}"
        return None


class PipelineStage(K8sObject):
    """One stage: a name, the stages it waits for, and the TrainingRun it becomes."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": _stage_rules()})

    name: StageName = Field(
        description="Stage name, a DNS label; the stage's TrainingRun is <pipeline>-<name>, "
        f"at most {MAX_RUN_NAME_LENGTH} characters in all."
    )
    depends_on: list[StageName] = Field(
        default_factory=list,
        max_length=MAX_STAGES,
        description="Stages that must succeed before this one starts. Every fromStage of "
        "this stage must be listed here.",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    spec: StageSpec = Field(description="The TrainingRun spec this stage runs.")
    sweep: SweepSearch | None = Field(
        None,
        description="Make this stage a hyperparameter sweep: a Sweep <pipeline>-<stage> "
        "over spec as its template, with these parameters, objective and search. Its best "
        "trial's model is the stage's model (what a later fromStage takes).",
    )
    gate: list[Gate] = Field(
        default_factory=list,
        max_length=MAX_GATES,
        description="Promotion gates: this stage (and all that need it) runs only if every "
        "gate's metric, from an evaluate stage listed in dependsOn, is within its bounds; "
        "otherwise the pipeline fails with reason GateFailed.",
    )

    @field_validator("depends_on")
    @classmethod
    def _listed_once(cls, depends_on: list[str]) -> list[str]:
        twice = sorted({d for d in depends_on if depends_on.count(d) > 1})
        if twice:
            raise ValueError(f"lists {', '.join(twice)} more than once")
        return depends_on


# ---------------------------------------------------------------- the pipeline


class PipelineDefaults(K8sObject):
    """Settings every stage gets unless it sets its own."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [env_rule()]})

    image: str | None = Field(
        None, min_length=1, description="Trainer image; empty uses kubetrain's default image."
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        None, description=_description(TrainingRunSpec, "image_pull_policy")
    )
    resources: Resources | None = Field(
        None, description="Pods, processes per pod and their resources, per stage."
    )
    env: list[EnvVar] | None = Field(
        None,
        max_length=MAX_ENV_VARS,
        description="Environment for every stage's trainer (e.g. WANDB_API_KEY from a "
        "Secret); a stage's env adds to it.",
    )
    restart_policy: RestartPolicy | None = Field(
        None, description="Restarts after retriable failures, per stage."
    )
    backend: Literal["job", "jobset"] | None = Field(
        None, description="Workload kind for every stage: job (default) or jobset."
    )

    @field_validator("env")
    @classmethod
    def _env_not_reserved(cls, env: list[EnvVar] | None) -> list[EnvVar] | None:
        return check_env_not_reserved(env) if env is not None else None


def _has(var: str, path: str) -> str:
    """CEL that is true when every step of `path` under `var` (e.g. s.spec) is set."""
    parts = path.split(".")
    return " && ".join(f"has({var}.{'.'.join(parts[: i + 1])})" for i in range(len(parts)))


def _is_lora_stage(var: str) -> str:
    """CEL: the stage in `var` trains LoRA (method lora, or dpo with useLora)."""
    dpo_lora = f"{_has(f'{var}.spec', 'dpo.useLora')} && {var}.spec.dpo.useLora"
    return f"({var}.spec.method == 'lora' || ({dpo_lora}))"


def _hand_off_cel(block: str) -> tuple[str, str]:
    """CEL (rule, test for a failing stage `s`) for fromStageOutput in one model block."""
    kind = f"s.spec.{block}.fromStageOutput"
    asks = f"{_has('s.spec', f'{block}.fromStageOutput')} && has(s.spec.{block}.fromStage)"
    upstream = f"self.stages.exists(u, u.name == s.spec.{block}.fromStage && "
    merges = f"{_has('u.spec', 'lora.merge')} && u.spec.lora.merge"
    fits = (
        f"({kind} == 'adapter' && {upstream}{_is_lora_stage('u')})) || "
        f"({kind} == 'merged' && {upstream}u.spec.method == 'lora' && {merges}))"
    )
    return f"self.stages.all(s, !({asks}) || {fits})", f"({asks}) && !({fits})"


def _pipeline_spec_rules() -> list[dict[str, str]]:
    """CEL for what one stage cannot see: names, references and outputs across stages."""
    rules = [
        {
            **rule(
                "self.stages.all(s, self.stages.exists_one(t, t.name == s.name))",
                "stage names must be unique",
                field_path=".stages",
                reason="FieldValueDuplicate",
            ),
            "messageExpression": "'stage ' + self.stages.map(s, !self.stages.exists_one("
            "t, t.name == s.name), s.name)[0] + ' is defined more than once; stage names must "
            "be unique'",
        },
        {
            **rule(
                "self.stages.all(s, !has(s.dependsOn) || "
                "s.dependsOn.all(d, self.stages.exists(t, t.name == d)))",
                "dependsOn names a stage that does not exist",
                field_path=".stages",
                reason="FieldValueInvalid",
            ),
            "messageExpression": "'stage ' + self.stages.map(s, has(s.dependsOn) && "
            "s.dependsOn.exists(d, !self.stages.exists(t, t.name == d)), s.name)[0] + "
            "' dependsOn a stage that does not exist; list only names from spec.stages'",
        },
        {
            **rule(
                "has(self.outputRoot) || self.stages.all(s, has(s.spec.output))",
                "a stage without spec.output needs the pipeline's outputRoot",
                field_path=".outputRoot",
                reason="FieldValueRequired",
            ),
            "messageExpression": "'stage ' + self.stages.map(s, !has(s.spec.output), s.name)[0]"
            " + ' has no spec.output; set it or the pipeline\\'s outputRoot (stages then "
            "write to <outputRoot>/<stage>)'",
        },
    ]
    for block in ("model", "dpo.referenceModel"):
        expression, failing = _hand_off_cel(block)
        rules.append(
            {
                **rule(
                    expression,
                    f"{block}.fromStageOutput adapter needs a fromStage that trains LoRA "
                    "(method lora, or dpo with useLora); merged needs a method lora stage "
                    "with lora.merge: true",
                    field_path=".stages",
                ),
                "messageExpression": f"'stage ' + self.stages.map(s, {failing}, s.name)[0] + "
                f"': {block}.fromStageOutput adapter needs a fromStage that trains LoRA "
                "(method lora, or dpo with useLora); merged needs a method lora stage with "
                "lora.merge: true'",
            }
        )
    return rules


class PipelineSpec(K8sObject):
    """Stages to run in dependency order, and what they share."""

    model_config = ConfigDict(
        json_schema_extra={"x-kubernetes-validations": _pipeline_spec_rules()}
    )

    stages: list[PipelineStage] = Field(
        min_length=1,
        max_length=MAX_STAGES,
        description="The stages, each a TrainingRun template; they run in dependsOn order, "
        "independent ones side by side.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["name"],
        },
    )
    defaults: PipelineDefaults = Field(
        default_factory=PipelineDefaults,
        description="Image, resources, env, restarts and backend for stages that do not set "
        "their own.",
    )
    output_root: str | None = Field(
        None,
        min_length=1,
        description="Folder for stage outputs: a stage without spec.output writes to "
        "<outputRoot>/<stage name> (pvc://claim/path, or a local path for `kubetrain run`).",
    )
    failure_policy: FailurePolicy = Field(
        FAILURE_STOP,
        description="stopOnFailure: once a stage fails, start no further stage (running "
        "ones finish). continueIndependent: keep running stages that do not depend on the "
        "failed one.",
    )
    suspend: bool = Field(
        False,
        description="Hold the pipeline: no new stage starts and running stages are "
        "suspended (they resume from their newest checkpoint when set back to false).",
    )

    @field_validator("output_root")
    @classmethod
    def _output_root_uri(cls, value: str | None) -> str | None:
        return check_uri(value) if value is not None else None

    @model_validator(mode="after")
    def _stages_form_a_dag(self) -> PipelineSpec:
        problems = _graph_problems(self.stages)
        if not problems:
            problems = _output_problems(self)
            problems += [p for stage in self.stages for p in _hand_off_problems(self, stage)]
            problems += [p for stage in self.stages for p in _gate_problems(self, stage)]
        if not problems:
            problems = [p for stage in self.stages for p in _trainingrun_problems(self, stage)]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def stage(self, name: str) -> PipelineStage:
        """The stage called `name`; KeyError names the stages there are."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"no stage {name!r}; stages: {', '.join(s.name for s in self.stages)}")


def _graph_problems(stages: list[PipelineStage]) -> list[str]:
    """Duplicate names, unknown dependencies and cycles, each naming the stages involved."""
    names = [s.name for s in stages]
    problems = [
        f"stage {name} is defined more than once; stage names must be unique"
        for name in sorted({n for n in names if names.count(n) > 1})
    ]
    for stage in stages:
        if stage.name in stage.depends_on:
            problems.append(f"stage {stage.name} lists itself in dependsOn; remove it")
        unknown = [d for d in stage.depends_on if d not in names]
        if unknown:
            problems.append(
                f"stage {stage.name} dependsOn {', '.join(unknown)}, which "
                f"{'is not a stage' if len(unknown) == 1 else 'are not stages'} of this "
                f"pipeline (stages: {', '.join(names)})"
            )
    if problems:
        return problems
    try:
        graphlib.TopologicalSorter({s.name: s.depends_on for s in stages}).prepare()
    except graphlib.CycleError as e:
        # graphlib lists the cycle along the arrows "is needed by"; read it backwards.
        cycle = list(reversed(e.args[1]))
        needs = ", ".join(f"{a} needs {b}" for a, b in itertools.pairwise(cycle))
        return [f"dependsOn forms a cycle: {needs}; remove one of these dependencies"]
    return []


def _output_problems(spec: PipelineSpec) -> list[str]:
    without = [s.name for s in spec.stages if s.spec.output is None]
    if not without or spec.output_root is not None:
        return []
    which = f"stage {without[0]} has" if len(without) == 1 else f"stages {', '.join(without)} have"
    return [
        f"{which} no spec.output; set it or the pipeline's outputRoot (stages then write to "
        "<outputRoot>/<stage>)"
    ]


def _hand_off_problems(spec: PipelineSpec, stage: PipelineStage) -> list[str]:
    """Each fromStage is a dependency, and fromStageOutput matches what that stage writes."""
    problems = []
    for field, block in stage.spec.hand_offs():
        upstream_name = block.from_stage or ""
        if upstream_name not in stage.depends_on:
            problems.append(
                f"stage {stage.name}: {field}.fromStage {upstream_name} must also be listed "
                "in dependsOn, so the stage starts after the stage whose model it takes"
            )
            continue
        upstream = spec.stage(upstream_name).spec
        kind = block.from_stage_output
        if kind == "adapter" and not upstream.trains_lora:
            problems.append(
                f"stage {stage.name}: {field}.fromStageOutput adapter needs a fromStage that "
                f"trains LoRA, but stage {upstream_name} is method {upstream.method} (its "
                "output is a full model); drop fromStageOutput"
            )
        if kind == "merged" and not (
            upstream.method == "lora" and upstream.lora is not None and upstream.lora.merge
        ):
            problems.append(
                f"stage {stage.name}: {field}.fromStageOutput merged needs stage "
                f"{upstream_name} to be method lora with lora.merge: true, so it writes "
                "<output>/merged"
            )
    return problems


def _gate_problems(spec: PipelineSpec, stage: PipelineStage) -> list[str]:
    """Each gate reads a metric an evaluate stage this one depends on will report."""
    problems = []
    for gate in stage.gate:
        if gate.stage not in stage.depends_on:
            problems.append(
                f"stage {stage.name}: gate on stage {gate.stage} must also be listed in "
                "dependsOn, so its metrics exist when this stage is judged"
            )
            continue
        judged = spec.stage(gate.stage).spec
        if judged.method != "evaluate" or judged.evaluate is None:
            problems.append(
                f"stage {stage.name}: gate on stage {gate.stage}, which is method "
                f"{judged.method}; gates read the metrics of evaluate stages"
            )
            continue
        reported = [
            eval_metric_key(suite.name, metric)
            for suite in judged.evaluate.suites
            for metric in EVAL_SUITE_METRICS[suite.name]
        ]
        if gate.metric not in reported:
            problems.append(
                f"stage {stage.name}: gate metric {gate.metric} is not one stage "
                f"{gate.stage} reports ({', '.join(reported)})"
            )
    return problems


def _trainingrun_problems(spec: PipelineSpec, stage: PipelineStage) -> list[str]:
    """The stage judged as the TrainingRun it becomes, upstream models as their outputs."""
    upstream_uris = {s.name: stage_output_uri(spec, s.name) for s in spec.stages}
    try:
        run_spec = stage_trainingrun_spec(spec, stage.name, upstream_uris)
    except ValidationError as e:
        return [_stage_error(stage.name, err) for err in e.errors()]
    if stage.sweep is None:
        return []
    template = run_spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    return search_problems(stage.sweep, template, f"stage {stage.name}: sweep")


def _stage_error(stage: str, err: Mapping[str, Any]) -> str:
    where = ".".join(str(p) for p in err["loc"])
    message = str(err["msg"]).removeprefix("Value error, ")
    return f"stage {stage}: spec{'.' + where if where else ''}: {message}"


# ---------------------------------------------------------------- status


class StageStatus(K8sObject):
    """One stage as the operator last saw it."""

    model_config = ConfigDict(extra="ignore")

    name: str = Field(description="Stage name.")
    phase: StagePhase | None = Field(
        None,
        description="Pending, Running, Succeeded, Failed or Suspended (its TrainingRun's), "
        "or Skipped: it will not run because a stage failed.",
    )
    run_name: str | None = Field(None, description="The stage's TrainingRun, <pipeline>-<stage>.")
    start_time: str | None = Field(
        None,
        description="When the stage's pods started (RFC 3339).",
        json_schema_extra={"format": "date-time"},
    )
    completion_time: str | None = Field(
        None,
        description="When the stage Succeeded or Failed (RFC 3339).",
        json_schema_extra={"format": "date-time"},
    )
    model_uri: str | None = Field(
        None, description="The stage's output model once it succeeded (what fromStage takes)."
    )
    metrics: dict[str, float] | None = Field(
        None,
        max_length=MAX_OUTPUT_METRICS,
        description="The stage's final metrics once it succeeded (its run's outputs.metrics).",
    )
    reason: str | None = Field(
        None, description="GateFailed when a gate held the stage back (it will not run)."
    )
    message: str | None = Field(None, description="What the stage is doing or waits for.")


class PipelineStatus(KstatusStatus):
    """Observed state of a Pipeline, written by the operator only."""

    start_time: str | None = Field(
        None,
        description="When the first stage was started (RFC 3339).",
        json_schema_extra={"format": "date-time"},
    )
    completion_time: str | None = Field(
        None,
        description="When the pipeline Succeeded or Failed (RFC 3339).",
        json_schema_extra={"format": "date-time"},
    )
    progress: str | None = Field(None, description="Stages succeeded out of all stages, e.g. 2/3.")
    current_stage: str | None = Field(
        None,
        description="The stages running now (comma-separated), else the failed or next ones.",
    )
    stages: list[StageStatus] = Field(
        default_factory=list,
        description="Every stage in dependency order: phase, TrainingRun, times and model.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["name"],
        },
    )


# ---------------------------------------------------------------- the resource


def _root_rules() -> list[dict[str, str]]:
    name_fits = (
        f"self.spec.stages.all(s, self.metadata.name.size() + 1 + s.name.size() <= "
        f"{MAX_RUN_NAME_LENGTH})"
    )
    too_long = (
        f"self.spec.stages.map(s, self.metadata.name.size() + 1 + s.name.size() > "
        f"{MAX_RUN_NAME_LENGTH}, s.name)[0]"
    )
    # A sweep stage's longest name is its last trial's, <pipeline>-<stage>-<maxTrials - 1>.
    trial_fits = (
        "self.spec.stages.all(s, !has(s.sweep) || self.metadata.name.size() + 1 + "
        f"s.name.size() + 1 + string(s.sweep.maxTrials - 1).size() <= {MAX_RUN_NAME_LENGTH})"
    )
    trial_too_long = (
        "self.spec.stages.map(s, has(s.sweep) && self.metadata.name.size() + 1 + "
        f"s.name.size() + 1 + string(s.sweep.maxTrials - 1).size() > {MAX_RUN_NAME_LENGTH}, "
        "s.name)[0]"
    )
    return [
        {
            **rule(
                f"!has(self.metadata.name) || {trial_fits}",
                f"every trial <pipeline>-<stage>-<n> of a sweep stage must fit "
                f"{MAX_RUN_NAME_LENGTH} characters; shorten the pipeline or stage name",
            ),
            "messageExpression": f"'stage ' + {trial_too_long} + ': its trials "
            f"<pipeline>-<stage>-<n> are longer than {MAX_RUN_NAME_LENGTH} characters; "
            "shorten the pipeline or stage name'",
        },
        rule(
            f"!has(self.metadata.name) || self.metadata.name.matches('{RUN_NAME_PATTERN}')",
            "metadata.name must be a DNS label (lowercase letters, digits, '-', starting with "
            "a letter): it starts every stage's TrainingRun name",
        ),
        {
            **rule(
                f"!has(self.metadata.name) || {name_fits}",
                f"every <pipeline>-<stage> TrainingRun name must fit {MAX_RUN_NAME_LENGTH} "
                "characters; shorten the pipeline or stage names",
            ),
            "messageExpression": f"'stage ' + {too_long} + ': its TrainingRun ' + "
            f"self.metadata.name + '-' + {too_long} + ' is longer than {MAX_RUN_NAME_LENGTH}"
            " characters; shorten the pipeline or stage name'",
        },
    ]


class Pipeline(K8sObject):
    """A chain of training stages (e.g. from_scratch -> sft -> dpo), each a TrainingRun."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": _root_rules()})

    api_version: Literal["kubetrain.dev/v1alpha1"] = Field(
        API_VERSION, description="kubetrain.dev/v1alpha1"
    )
    kind: Literal["Pipeline"] = Field(PIPELINE_KIND, description="Pipeline")
    metadata: ObjectMeta = Field(description="Standard object metadata.")
    spec: PipelineSpec = Field(description="The stages and what they share.")
    status: PipelineStatus | None = Field(None, description="Written by the operator.")

    @model_validator(mode="after")
    def _stage_run_names_fit(self) -> Pipeline:
        name = self.metadata.name
        if not _NAME.match(name):
            raise ValueError(
                f"metadata.name {name!r} must be a DNS label (lowercase letters, digits, "
                "'-', starting with a letter): it starts every stage's TrainingRun name"
            )
        for stage in self.spec.stages:
            run = stage_run_name(name, stage.name)
            if stage.sweep is not None:
                # A sweep stage's longest name is that of its last trial.
                run = f"{run}-{stage.sweep.max_trials - 1}"
            if len(run) > MAX_RUN_NAME_LENGTH:
                raise ValueError(
                    f"stage {stage.name}: its TrainingRun {run} is {len(run)} characters, "
                    f"longer than {MAX_RUN_NAME_LENGTH}; shorten the pipeline or stage name"
                )
        return self


# ---------------------------------------------------------------- from stage to TrainingRun


def stage_run_name(pipeline_name: str, stage_name: str) -> str:
    """The name of a stage's TrainingRun."""
    return f"{pipeline_name}-{stage_name}"


def stage_output_uri(spec: PipelineSpec, stage_name: str) -> str:
    """Where a stage writes its model: its own output, else <outputRoot>/<stage>."""
    stage = spec.stage(stage_name)
    if stage.spec.output is not None:
        return stage.spec.output
    if spec.output_root is None:
        raise ValueError(f"stage {stage_name} has no spec.output and the pipeline no outputRoot")
    return f"{spec.output_root.rstrip('/')}/{stage_name}"


def hand_off_uri(model_uri: str, kind: StageOutputKind | None) -> str:
    """The model a later stage loads from an earlier stage's modelUri."""
    if kind == "merged":
        return f"{model_uri.rstrip('/')}/{MERGED_SUBDIR}"
    return model_uri


def dependency_order(stages: Iterable[PipelineStage]) -> list[str]:
    """Stage names so that each comes after its dependsOn, ties kept in file order.

    Expects a validated pipeline (no cycles, no unknown names).
    """
    pending = list(stages)
    ordered: list[str] = []
    while pending:
        ready = next(s for s in pending if all(d in ordered for d in s.depends_on))
        ordered.append(ready.name)
        pending.remove(ready)
    return ordered


def dependents(spec: PipelineSpec, stage_name: str) -> list[str]:
    """Every stage that needs `stage_name`'s success, directly or through others, in order."""
    needs = {stage_name}
    for name in dependency_order(spec.stages):
        if needs & set(spec.stage(name).depends_on):
            needs.add(name)
    return [n for n in dependency_order(spec.stages) if n in needs - {stage_name}]


def stage_trainingrun_spec(
    spec: PipelineSpec, stage_name: str, upstream_model_uris: Mapping[str, str]
) -> TrainingRunSpec:
    """The spec of a stage's TrainingRun: pipeline defaults, then the stage's own fields.

    `upstream_model_uris` maps stage names to the model each wrote (status.outputs.modelUri
    on a cluster, the output folder here); every fromStage of this stage must be in it.
    Raises ValueError naming the stage when one is missing, and pydantic's ValidationError
    when the merged spec is not a valid TrainingRun spec.
    """
    template = spec.stage(stage_name).spec
    hand_off_fields = {"from_stage", "from_stage_output"}
    body = template.model_dump(
        exclude_none=True,
        exclude={
            "model": hand_off_fields,
            "dpo": {"reference_model": hand_off_fields},
            "evaluate": {"reference_model": hand_off_fields},
        },
    )
    for key, value in spec.defaults.model_dump(exclude_none=True).items():
        if key == "env":
            own = {e["name"] for e in body.get("env", [])}
            body["env"] = [e for e in value if e["name"] not in own] + body.get("env", [])
        else:
            body.setdefault(key, value)
    for field, block in template.hand_offs():
        upstream = block.from_stage or ""
        if upstream not in upstream_model_uris:
            raise ValueError(
                f"stage {stage_name}: {field}.fromStage {upstream} has no model yet (stage "
                f"{upstream} has not succeeded)"
            )
        uri = hand_off_uri(upstream_model_uris[upstream], block.from_stage_output)
        block_name = field.split(".")[0]
        target = body["model"] if field == "model" else body[block_name]["reference_model"]
        target["name"] = uri
    body["output"] = stage_output_uri(spec, stage_name)
    body["suspend"] = spec.suspend
    return TrainingRunSpec.model_validate(body)
