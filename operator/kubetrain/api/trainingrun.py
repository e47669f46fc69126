"""TrainingRun (kubetrain.dev/v1alpha1): spec, status, condition constants and conversions.

The spec reuses the trainer's own config blocks (`kubetrain_trainer.config`) for the
model, data, training and per-method settings, so a knob means the same thing in a CR, in a
local run and inside the pod, and adds what only a cluster needs: resources, image, env,
storage for the output, restarts and the backend. Every field carries a description (it
becomes `kubectl explain` text) and the cross-field rules exist twice, as pydantic
validators here and as CEL rules in the CRD, built side by side in `spec_rules` so they
agree (a unit test holds them to it). Status follows kstatus: `phase`, `conditions[]` with
the types and reasons below, and `observedGeneration`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from kubetrain.api.cel import flag, present, rule, value_or_default
from kubetrain.api.uris import DATA_SCHEMES, SCHEMES, UriRef, check_uri, scheme_rule, uri_refs
from kubetrain_trainer.config import (
    FSDP_KNOBS_NEED_FSDP,
    METHOD_DESCRIPTION,
    QLORA_SHARDED_REFUSED,
    Architecture,
    DataSpec,
    Dpo,
    EvalSuite,
    Evaluate,
    FromScratch,
    Lora,
    Method,
    ModelSpec,
    ReferenceModel,
    S3Storage,
    Spec,
    Storage,
    TrainerConfig,
    Training,
    check_method_blocks,
)
from kubetrain_trainer.contract import (
    MAX_EVAL_HISTORY,
    MAX_OUTPUT_METRICS,
    METRICS_PORT,
    ExitCode,
)

GROUP = "kubetrain.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "TrainingRun"
PLURAL = "trainingruns"
SINGULAR = "trainingrun"
SHORT_NAMES = ["tr"]
CATEGORIES = ["kubetrain"]

DEFAULT_IMAGE = "ghcr.io/kubetrain/trainer:0.1.0"
C10D_PORT = 29500

# Labels the operator puts on every child and pod, and the one Kueue reads from the CR.
LABEL_RUN = "kubetrain.dev/run"
LABEL_ATTEMPT = "kubetrain.dev/attempt"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"

# Pods' hostnames are `<run>-<attempt>-<index>` (JobSet: `<run>-<attempt>-node-0-<index>`)
# and must fit a 63-character DNS label with up to 3 attempt and 4 index digits.
MAX_RUN_NAME_LENGTH = 40
RUN_NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
MAX_NODES = 1024
MAX_RESTARTS = 100

# Environment the operator owns: torchrun's rendezvous (PyTorchJob / Trainer v2 names),
# what torchrun itself sets per worker, and the Hugging Face cache and token it wires up.
# Users setting these would silently break the gang, so validation refuses them.
OPERATOR_ENV_NAMES = (
    "PET_NNODES",
    "PET_NPROC_PER_NODE",
    "PET_NODE_RANK",
    "PET_MASTER_ADDR",
    "PET_MASTER_PORT",
    "MASTER_ADDR",
    "MASTER_PORT",
    "WORLD_SIZE",
    "HF_HOME",
    "HF_TOKEN",
)
TORCHRUN_ENV_NAMES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE")
RESERVED_ENV_NAMES = OPERATOR_ENV_NAMES + TORCHRUN_ENV_NAMES
RESERVED_ENV_PREFIXES = ("PET_", "TORCHELASTIC_")
MAX_ENV_VARS = 128

Phase = Literal["Pending", "Running", "Succeeded", "Failed", "Suspended"]
PHASE_PENDING: Phase = "Pending"
PHASE_RUNNING: Phase = "Running"
PHASE_SUCCEEDED: Phase = "Succeeded"
PHASE_FAILED: Phase = "Failed"
PHASE_SUSPENDED: Phase = "Suspended"
# A run, stage or sweep in one of these has its verdict and keeps it.
FINISHED_PHASES: tuple[Phase, ...] = (PHASE_SUCCEEDED, PHASE_FAILED)

# Condition types. Ready is True only once the run Succeeded (kstatus: the resource has
# reached its desired state); Running, Succeeded, Failed and Suspended mirror the phase so
# `kubectl wait --for=condition=Succeeded` works.
CONDITION_READY = "Ready"
CONDITION_RUNNING = "Running"
CONDITION_SUCCEEDED = "Succeeded"
CONDITION_FAILED = "Failed"
CONDITION_SUSPENDED = "Suspended"
# kstatus' own abnormal-true conditions, so generic tools (kstatus, Flux, kubectl wait)
# read a run without kubetrain-specific rules: Reconciling while it works toward its spec
# (pending or training), Stalled once it failed and will not recover on its own.
CONDITION_RECONCILING = "Reconciling"
CONDITION_STALLED = "Stalled"
CONDITION_TYPES = (
    CONDITION_READY,
    CONDITION_RUNNING,
    CONDITION_SUCCEEDED,
    CONDITION_FAILED,
    CONDITION_SUSPENDED,
    CONDITION_RECONCILING,
    CONDITION_STALLED,
)

# Condition reasons (CamelCase, as Kubernetes conditions require).
REASON_CREATED = "Created"  # children created, no pod running yet
REASON_WAITING_FOR_DEPENDENCIES = "WaitingForDependencies"  # a PVC or Secret is missing
REASON_QUEUED = "Queued"  # the workload is suspended by a queue (Kueue), not by the spec
REASON_SUSPENDED = "Suspended"  # spec.suspend is true
REASON_PODS_STARTING = "PodsStarting"  # some pods scheduled, not all running
REASON_TRAINING = "Training"  # all pods running
REASON_RESTARTING = "Restarting"  # a retriable failure; starting the next attempt
REASON_PREEMPTED = "Preempted"  # the trainer saved a checkpoint on SIGTERM (exit 75)
REASON_COMPLETED = "Completed"  # every pod exited 0
REASON_CONFIG_ERROR = "ConfigError"  # the trainer refused its config or data (exit 78)
REASON_INVALID_SPEC = "InvalidSpec"  # the operator could not render the spec
REASON_RESTARTS_EXHAUSTED = "RestartsExhausted"  # failed again after maxRestarts restarts
REASON_NO_PROGRESS = "NoProgress"  # neither step nor heartbeat advanced: restarted (a hang)
REASON_DEADLINE_EXCEEDED = "DeadlineExceeded"  # ran past spec.activeDeadlineSeconds
REASON_OUT_OF_MEMORY = "OutOfMemory"  # OOM-killed or CUDA OOM again after its one retry
REASON_INSTABILITY_DETECTED = "InstabilityDetected"  # NaN/inf loss or exploding gradients
REASON_EXIT_CODE_NOT_RETRIED = "ExitCodeNotRetried"  # an exit code in restartPolicy.failOn
REASON_CLEANED_UP = "CleanedUp"  # workload deleted ttlSecondsAfterFinished after the verdict
# How many ended attempts status.attempts keeps (the newest).
MAX_ATTEMPT_HISTORY = 20


class K8sObject(BaseModel):
    """Base for Kubernetes-shaped objects that are not trainer blocks (same conventions)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class SecretKeySelector(K8sObject):
    """A key of a Secret in the run's namespace."""

    name: str = Field(min_length=1, description="Name of the Secret.")
    key: str = Field("token", min_length=1, description="Key inside the Secret.")


class RunModel(ModelSpec):
    """The starting model, plus how the pods authenticate to the Hugging Face hub."""

    # Same field as the trainer's, bounded so the API server can cost the CEL rule that
    # reads it (unbounded strings make CEL cost estimates fail at CRD creation).
    name: str | None = Field(
        None, max_length=1024, description=ModelSpec.model_fields["name"].description
    )

    token_secret_ref: SecretKeySelector | None = Field(
        None,
        description="Secret key holding a Hugging Face token for gated or private hub "
        "models; the pods get it as HF_TOKEN. Key defaults to `token`.",
    )

    @field_validator("name", "tokenizer")
    @classmethod
    def _model_uri(cls, value: str | None) -> str | None:
        return check_uri(value) if value is not None else None


class RunReferenceModel(ReferenceModel):
    """DPO's frozen reference model, with its URI checked like model.name."""

    name: str | None = Field(
        None, max_length=1024, description=ReferenceModel.model_fields["name"].description
    )

    @field_validator("name")
    @classmethod
    def _model_uri(cls, value: str | None) -> str | None:
        return check_uri(value) if value is not None else None


class RunDpo(Dpo):
    """DPO settings whose reference model URI is checked where it is written."""

    reference_model: RunReferenceModel = Field(
        default_factory=RunReferenceModel,
        description=Dpo.model_fields["reference_model"].description,
    )


# Bounds the URI strings so the API server can cost the CEL rules that read them.
MAX_URI_LENGTH = 4096


class RunData(DataSpec):
    """The trainer's data block, with train and eval checked as URIs where they are written."""

    train: str = Field(
        min_length=1,
        max_length=MAX_URI_LENGTH,
        description=DataSpec.model_fields["train"].description,
    )
    eval: str | None = Field(
        None, max_length=MAX_URI_LENGTH, description=DataSpec.model_fields["eval"].description
    )

    @field_validator("train", "eval")
    @classmethod
    def _data_uri(cls, value: str | None) -> str | None:
        if value is not None and value and not value.strip():
            raise ValueError("is blank; give a data file or folder (pvc://claim/path or a path)")
        return check_uri(value, DATA_SCHEMES) if value is not None else None


class RunEvalSuite(EvalSuite):
    """An evaluation suite whose data URI (and classifier) is checked where it is written."""

    data: str = Field(
        min_length=1,
        max_length=MAX_URI_LENGTH,
        description=EvalSuite.model_fields["data"].description,
    )
    refusal_classifier: str | None = Field(
        None,
        max_length=1024,
        description=EvalSuite.model_fields["refusal_classifier"].description,
    )

    @field_validator("data")
    @classmethod
    def _data_uri(cls, value: str) -> str:
        return check_uri(value, DATA_SCHEMES)

    @field_validator("refusal_classifier")
    @classmethod
    def _model_uri(cls, value: str | None) -> str | None:
        return check_uri(value) if value is not None else None


class RunEvaluate(Evaluate):
    """Method evaluate's block, with every URI in it checked like model.name."""

    suites: list[RunEvalSuite] = Field(
        min_length=1,
        max_length=Evaluate.model_fields["suites"].metadata[1].max_length,
        description=Evaluate.model_fields["suites"].description,
    )
    reference_model: RunReferenceModel = Field(
        default_factory=RunReferenceModel,
        description=Evaluate.model_fields["reference_model"].description,
    )


class ConfigMapKeySelector(K8sObject):
    """A key of a ConfigMap in the run's namespace."""

    name: str = Field(min_length=1, description="Name of the ConfigMap.")
    key: str = Field(min_length=1, description="Key inside the ConfigMap.")
    optional: StrictBool | None = Field(None, description="Start even if the key is missing.")


class EnvSecretKeySelector(K8sObject):
    """A key of a Secret in the run's namespace, for an environment variable."""

    name: str = Field(min_length=1, description="Name of the Secret.")
    key: str = Field(min_length=1, description="Key inside the Secret.")
    optional: StrictBool | None = Field(None, description="Start even if the key is missing.")


class ObjectFieldSelector(K8sObject):
    """A field of the pod (downward API)."""

    field_path: str = Field(description="Pod field, e.g. metadata.name or status.podIP.")
    api_version: str | None = Field(None, description="Schema version of fieldPath (v1).")


# resource.Quantity as controller-gen writes it: an integer or a string in Kubernetes'
# quantity syntax (`4`, "500m", "64Gi"). Fractions must be quoted strings, as on the API.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
    r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
_QUANTITY = re.compile(QUANTITY_PATTERN)
# Bounds quantity strings (and so the cost of the CEL rules that parse them).
MAX_QUANTITY_LENGTH = 64
MAX_RESOURCE_NAMES = 16
# Quantity suffixes and their factors, for comparing a request with its limit. The pydantic
# check (`quantity_value`) and the CEL one (`quantity_value_cel`) both read this table and do
# the same float arithmetic, so they agree on every value. Exponents (`1e3`) need no entry:
# both parsers read them as numbers. Binary suffixes all end in `i`, which no decimal one
# does, so no suffix is the tail of another.
QUANTITY_SUFFIXES: dict[str, float] = {
    **{
        suffix: 1024.0**power
        for power, suffix in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"), 1)
    },
    "n": 1e-9,
    "u": 1e-6,
    "m": 1e-3,
    **{suffix: 1000.0**power for power, suffix in enumerate(("k", "M", "G", "T", "P", "E"), 1)},
}


def check_quantity(quantity: Any) -> Any:
    """Refuse what Kubernetes would not parse as a resource.Quantity, saying how to fix it."""
    if isinstance(quantity, float):
        raise ValueError(
            f'{quantity!r}: write fractional quantities as strings ("500m" or "0.5"); '
            "the API accepts only integers and strings"
        )
    if isinstance(quantity, bool):
        raise ValueError(f"{quantity!r} is not a quantity; write a number such as 8 or 64Gi")
    if isinstance(quantity, str) and (
        len(quantity) > MAX_QUANTITY_LENGTH or not _QUANTITY.match(quantity)
    ):
        raise ValueError(f'{quantity!r} is not a Kubernetes quantity (e.g. 8, "500m", "64Gi")')
    return quantity


def quantity_value(quantity: int | str) -> float:
    """A quantity as a number (`64Gi` -> 68719476736.0), computed as `quantity_value_cel`."""
    text = str(quantity)
    for suffix, factor in QUANTITY_SUFFIXES.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def quantity_value_cel(expression: str) -> str:
    """CEL for the number a quantity (int or string) at `expression` stands for.

    The string branch reads the value itself, never `string(value)`: the API server costs a
    conversion of an int-or-string as an unbounded string and refuses the CRD.
    """
    value = f"double({expression})"
    for suffix, factor in reversed(QUANTITY_SUFFIXES.items()):
        number = f"double({expression}.substring(0, {expression}.size() - {len(suffix)}))"
        value = f"({expression}.endsWith('{suffix}') ? {number} * {factor!r} : {value})"
    return f"(type({expression}) == int ? double({expression}) : {value})"


def is_extended_resource(name: str) -> bool:
    """Kubernetes' IsExtendedResourceName: a name in a domain other than kubernetes.io."""
    return "/" in name and "kubernetes.io/" not in name


def extended_resource_cel(key: str) -> str:
    """CEL twin of `is_extended_resource` for the map key variable `key`."""
    return f"({key}.contains('/') && !{key}.contains('kubernetes.io/'))"


Quantity = Annotated[
    int
    | Annotated[
        str,
        WithJsonSchema(
            {"type": "string", "pattern": QUANTITY_PATTERN, "maxLength": MAX_QUANTITY_LENGTH}
        ),
    ],
    BeforeValidator(check_quantity),
]


class ResourceFieldSelector(K8sObject):
    """A resource request or limit of the trainer container (downward API)."""

    resource: str = Field(description="Resource, e.g. limits.memory or requests.cpu.")
    container_name: str | None = Field(None, description="Container; defaults to trainer.")
    divisor: Quantity | None = Field(None, description="Unit to express the value in.")


class EnvVarSource(K8sObject):
    """Where an environment variable's value comes from; set exactly one field."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                rule(
                    "(has(self.secretKeyRef) ? 1 : 0) + (has(self.configMapKeyRef) ? 1 : 0)"
                    " + (has(self.fieldRef) ? 1 : 0) + (has(self.resourceFieldRef) ? 1 : 0)"
                    " == 1",
                    "set exactly one of secretKeyRef, configMapKeyRef, fieldRef or "
                    "resourceFieldRef",
                )
            ]
        }
    )

    secret_key_ref: EnvSecretKeySelector | None = Field(None, description="A Secret's key.")
    config_map_key_ref: ConfigMapKeySelector | None = Field(None, description="A ConfigMap's key.")
    field_ref: ObjectFieldSelector | None = Field(None, description="A pod field.")
    resource_field_ref: ResourceFieldSelector | None = Field(
        None, description="A container resource."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> EnvVarSource:
        chosen = [
            self.secret_key_ref,
            self.config_map_key_ref,
            self.field_ref,
            self.resource_field_ref,
        ]
        if sum(c is not None for c in chosen) != 1:
            raise ValueError(
                "set exactly one of secretKeyRef, configMapKeyRef, fieldRef or resourceFieldRef"
            )
        return self


class EnvVar(K8sObject):
    """An environment variable for the trainer container (Kubernetes EnvVar)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                rule(
                    "!(has(self.value) && has(self.valueFrom))",
                    "set value or valueFrom, not both",
                )
            ]
        }
    )

    name: str = Field(
        min_length=1,
        max_length=253,
        pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$",
        description="Variable name. PET_*, TORCHELASTIC_*, MASTER_ADDR, MASTER_PORT, "
        "WORLD_SIZE, RANK, LOCAL_RANK, NODE_RANK, GROUP_RANK, LOCAL_WORLD_SIZE, HF_HOME and "
        "HF_TOKEN are set by the operator and torchrun and may not be given here.",
    )
    value: str | None = Field(None, description="Literal value.")
    value_from: EnvVarSource | None = Field(
        None, description="Take the value from a Secret, ConfigMap or the pod."
    )

    @model_validator(mode="after")
    def _one_source(self) -> EnvVar:
        if self.value is not None and self.value_from is not None:
            raise ValueError(f"env {self.name}: set value or valueFrom, not both")
        return self


def is_reserved_env_name(name: str) -> bool:
    """Whether the operator or torchrun owns this environment variable name."""
    return name in RESERVED_ENV_NAMES or name.startswith(RESERVED_ENV_PREFIXES)


def check_env_not_reserved(env: list[EnvVar]) -> list[EnvVar]:
    """Refuse environment names the operator or torchrun own, naming them and the fix."""
    taken = [e.name for e in env if is_reserved_env_name(e.name)]
    if taken:
        raise ValueError(
            f"env sets {', '.join(taken)}, which the operator and torchrun set "
            "(PET_*, TORCHELASTIC_*, MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK, "
            "LOCAL_RANK, NODE_RANK, GROUP_RANK, LOCAL_WORLD_SIZE, HF_HOME, HF_TOKEN); "
            "remove them (use model.tokenSecretRef for HF_TOKEN)"
        )
    return env


# The API server's toleration rules (ValidateTolerations), refused here and in the CRD so a
# bad toleration fails at `kubectl apply`, not when the operator creates the Job. Each entry:
# (CEL on the toleration, fieldPath, message); `Toleration._api_server_rules` is its twin.
TOLERATION_RULES = [
    (
        "(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
        ".operator",
        "a toleration without key must use operator: Exists (it then tolerates every taint)",
    ),
    (
        "!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
        ".value",
        "operator Exists matches any taint value; drop value (or use operator: Equal)",
    ),
    (
        "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
        ".tolerationSeconds",
        "tolerationSeconds applies to NoExecute taints only; set effect: NoExecute or drop "
        "tolerationSeconds",
    ),
]


class Toleration(K8sObject):
    """A Kubernetes toleration, e.g. for the taint on GPU nodes."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                rule(expression, message, field_path=path)
                for expression, path, message in TOLERATION_RULES
            ]
        }
    )

    key: str | None = Field(
        None, max_length=316, description="Taint key; empty with Exists matches all."
    )
    operator: Literal["Exists", "Equal"] | None = Field(
        None, description="Exists or Equal (the default)."
    )
    value: str | None = Field(None, max_length=63, description="Taint value to match with Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to match; empty matches all effects."
    )
    toleration_seconds: StrictInt | None = Field(
        None,
        description="How long a NoExecute taint is tolerated before eviction (needs effect "
        "NoExecute).",
    )

    @model_validator(mode="after")
    def _api_server_rules(self) -> Toleration:
        broken = [
            message
            for ok, (_, _, message) in zip(
                [
                    bool(self.key) or self.operator == "Exists",
                    self.operator != "Exists" or not self.value,
                    self.toleration_seconds is None or self.effect == "NoExecute",
                ],
                TOLERATION_RULES,
                strict=True,
            )
            if not ok
        ]
        if broken:
            raise ValueError("; ".join(broken))
        return self


_WHOLE_NUMBER = r"^[0-9]+$"


def resource_rules() -> list[dict[str, str]]:
    """CEL twins of `Resources._api_server_rules`: the API server's rules for a container's
    requests and limits, so that kubectl refuses what a Job would be refused for."""
    req, lim = "self.requests[k]", "self.limits[k]"
    ext = extended_resource_cel("k")
    whole = " && ".join(
        f"(!has(self.{m}) || self.{m}.all(k, !{ext} || type(self.{m}[k]) == int || "
        f"self.{m}[k].matches('{_WHOLE_NUMBER}')))"
        for m in ("requests", "limits")
    )
    return [
        rule(whole, EXTENDED_WHOLE_MESSAGE),
        rule(
            f"!has(self.requests) || self.requests.all(k, !{ext} || (has(self.limits) && "
            f"k in self.limits && {quantity_value_cel(req)} == {quantity_value_cel(lim)}))",
            EXTENDED_LIMIT_MESSAGE,
            field_path=".requests",
        ),
        rule(
            "!has(self.requests) || !has(self.limits) || self.requests.all(k, "
            f"!(k in self.limits) || {quantity_value_cel(req)} <= {quantity_value_cel(lim)})",
            REQUEST_ABOVE_LIMIT_MESSAGE,
            field_path=".requests",
        ),
    ]


EXTENDED_WHOLE_MESSAGE = (
    "extended resources (a name with a domain, e.g. nvidia.com/gpu) are counted in whole "
    "units: write them as whole numbers (8, not 0.5 or 500m)"
)
EXTENDED_LIMIT_MESSAGE = (
    "an extended resource (e.g. nvidia.com/gpu) in resources.requests needs the same value "
    "in resources.limits, or Kubernetes refuses the pods; set GPUs in limits only (the "
    "request defaults to the limit)"
)
REQUEST_ABOVE_LIMIT_MESSAGE = (
    "a resources.requests value is above its resources.limits value; Kubernetes refuses "
    "the pods, so lower the request or raise the limit"
)


class Resources(K8sObject):
    """How many pods the run uses and what each one asks of its node."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": resource_rules()})

    nodes: StrictInt = Field(
        1, ge=1, le=MAX_NODES, description="Pods (one per node) that train together."
    )
    proc_per_node: StrictInt = Field(
        1,
        ge=1,
        le=64,
        description="Worker processes per pod, usually the GPUs per node "
        "(torchrun --nproc-per-node).",
    )
    requests: dict[str, Quantity] = Field(
        default_factory=dict,
        max_length=MAX_RESOURCE_NAMES,
        description="Per-pod resource requests, e.g. cpu: 8, memory: 64Gi; each at most its "
        "limit. GPUs and other extended resources go in limits (a request alone is refused).",
    )
    limits: dict[str, Quantity] = Field(
        default_factory=dict,
        max_length=MAX_RESOURCE_NAMES,
        description="Per-pod resource limits, e.g. nvidia.com/gpu: 8, memory: 64Gi; GPUs and "
        "other extended resources are set here, in whole numbers.",
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels the pods must land on."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list,
        max_length=64,
        description="Taints the pods tolerate (e.g. GPU node taints).",
    )
    priority_class_name: str | None = Field(
        None, description="PriorityClass of the pods (preemption order)."
    )

    @model_validator(mode="after")
    def _api_server_rules(self) -> Resources:
        problems = []
        for kind in ("requests", "limits"):
            problems += [
                f"{kind}.{name}: {quantity!r}: {EXTENDED_WHOLE_MESSAGE}"
                for name, quantity in getattr(self, kind).items()
                if is_extended_resource(name) and not re.match(_WHOLE_NUMBER, str(quantity))
            ]
        if problems:
            raise ValueError("; ".join(problems))
        for name, request in self.requests.items():
            limit = self.limits.get(name)
            if is_extended_resource(name) and (
                limit is None or quantity_value(request) != quantity_value(limit)
            ):
                problems.append(
                    f"requests.{name}: {request!r} "
                    f"{'has no limit' if limit is None else f'differs from its limit {limit!r}'}"
                    f": {EXTENDED_LIMIT_MESSAGE}"
                )
            elif limit is not None and quantity_value(request) > quantity_value(limit):
                problems.append(
                    f"requests.{name}: {request!r} is above limits.{name}: {limit!r}: "
                    f"{REQUEST_ABOVE_LIMIT_MESSAGE}"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self


# A process exit code that restartPolicy.retryOn / failOn may name, and how many each holds.
ExitCodeNumber = Annotated[int, Field(ge=1, le=255)]
MAX_EXIT_CODES = 32


class RestartPolicy(K8sObject):
    """When the operator starts the whole gang again after a failure."""

    # The same two rules as `_codes_consistent`, for the apiserver (CEL).
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                rule(
                    "!has(self.retryOn) || !has(self.failOn) || "
                    "!self.retryOn.exists(c, c in self.failOn)",
                    "an exit code cannot be in both retryOn and failOn",
                    field_path=".retryOn",
                ),
                rule(
                    "!has(self.retryOn) || !(78 in self.retryOn)",
                    "78 is a config or data error, which no restart can fix: take it out of "
                    "retryOn and fix the spec or data",
                    field_path=".retryOn",
                ),
            ]
        }
    )

    max_restarts: StrictInt = Field(
        3,
        ge=0,
        le=MAX_RESTARTS,
        description="Restarts after retriable failures (node loss, preemption, crashes); "
        "never after a config error (exit 78). Each restart resumes from the newest "
        "checkpoint.",
    )
    startup_timeout_seconds: StrictInt = Field(
        3600,
        ge=1,
        description="How long each pod waits at startup for rank 0's address to resolve and "
        "for every node to join the rendezvous (torchrun's rendezvous timeout, 900 by "
        "default): long enough to schedule the last pod and pull a large image. The attempt "
        "fails after it, and is restarted like any retriable failure.",
    )
    force_delete_after_seconds: StrictInt | None = Field(
        None,
        ge=0,
        le=86400,
        description="Force-delete (grace period 0) pods of a finished attempt that are still "
        "terminating this long past their grace period, so the next attempt can start: their "
        "node no longer answers. Unset: wait, and name the pods and their node in the status "
        "after 300s. Force-deleting is safe only if the node is really gone (or fenced).",
    )
    stall_timeout_seconds: StrictInt = Field(
        1800,
        ge=0,
        description="Hang detection: when neither rank 0's step nor its heartbeat has advanced "
        "for this long while the attempt runs, the attempt ends with reason NoProgress and "
        "restarts from its newest checkpoint (a retriable failure). Until the trainer's "
        "first sample the bound is startupTimeoutSeconds (model download, rendezvous). 0 "
        "turns hang detection off.",
    )
    retry_on: list[ExitCodeNumber] = Field(
        default_factory=list,
        max_length=MAX_EXIT_CODES,
        description="Exit codes always restarted within maxRestarts, whatever their default "
        "(e.g. 72 to retry instability). The defaults: 78 (config or data error) is never "
        "retried; 75 and 143 (preempted, checkpoint saved) and pod disruptions (eviction, "
        "node loss) are always retried and not counted against maxRestarts; OOMKilled and "
        "71 (CUDA out of memory) are retried once, then fail with advice; 72 (training "
        "unstable) is not retried; any other code is retried within maxRestarts.",
    )
    fail_on: list[ExitCodeNumber] = Field(
        default_factory=list,
        max_length=MAX_EXIT_CODES,
        description="Exit codes that fail the run at once (reason ExitCodeNotRetried), e.g. "
        "an exit code of your own image that means the data is bad.",
    )

    @model_validator(mode="after")
    def _codes_consistent(self) -> RestartPolicy:
        both = sorted(set(self.retry_on) & set(self.fail_on))
        if both:
            raise ValueError(f"restartPolicy: exit codes {both} are in both retryOn and failOn")
        if int(ExitCode.CONFIG_ERROR) in self.retry_on:
            raise ValueError(
                "restartPolicy.retryOn: 78 is a config or data error, which no restart can fix; "
                "fix the spec or data instead"
            )
        return self


# The rule that every method but from_scratch names its starting model. Pipeline stages
# swap it for one that also accepts model.fromStage (see `spec_rules`).
MODEL_NAME_RULE = rule(
    f"self.method == 'from_scratch' || ({present('model.name')} && "
    "self.model.name.matches('\\\\S'))",
    "this method needs model.name (the model to start from)",
    field_path=".model",
    reason="FieldValueRequired",
)


def env_rule() -> dict[str, str]:
    """CEL twin of `check_env_not_reserved`, for any object with an `env` list."""
    reserved = ", ".join(f"'{n}'" for n in RESERVED_ENV_NAMES)
    prefixes = " && ".join(f"!e.name.startsWith('{p}')" for p in RESERVED_ENV_PREFIXES)
    return rule(
        f"!has(self.env) || self.env.all(e, {prefixes} && !(e.name in [{reserved}]))",
        "env may not set PET_*, TORCHELASTIC_*, MASTER_ADDR, MASTER_PORT, WORLD_SIZE, "
        "RANK, LOCAL_RANK, NODE_RANK, GROUP_RANK, LOCAL_WORLD_SIZE, HF_HOME or HF_TOKEN: "
        "the operator and torchrun set them (use model.tokenSecretRef for HF_TOKEN)",
        field_path=".env",
        reason="FieldValueForbidden",
    )


def spec_rules(model_name_rule: dict[str, str] = MODEL_NAME_RULE) -> list[dict[str, str]]:
    """CEL twins of check_method_blocks, Training's validator and the env rule.

    `model_name_rule` replaces MODEL_NAME_RULE, for specs (Pipeline stage templates) that
    may take the starting model from elsewhere.
    """
    eval_strategy = value_or_default("training.evalStrategy", Training, "eval_strategy")
    save_strategy = value_or_default("training.saveStrategy", Training, "save_strategy")
    load_best = flag("training.loadBestModelAtEnd")
    eval_every = (
        f"({present('training.evalSteps')} ? self.training.evalSteps : "
        f"{value_or_default('training.loggingSteps', Training, 'logging_steps')})"
    )
    max_steps = value_or_default("training.maxSteps", Training, "max_steps")
    heads = value_or_default(
        "model.architecture.numAttentionHeads", Architecture, "num_attention_heads"
    )
    hidden = value_or_default("model.architecture.hiddenSize", Architecture, "hidden_size")
    nodes = value_or_default("resources.nodes", Resources, "nodes")
    procs = value_or_default("resources.procPerNode", Resources, "proc_per_node")
    kv_heads = (
        f"({present('model.architecture.numKeyValueHeads')} ? "
        f"self.model.architecture.numKeyValueHeads : {heads})"
    )
    return [
        rule(
            f"!has(self.lora) || self.method == 'lora' || {flag('dpo.useLora')}",
            "lora block given but method is not lora; use method lora (or method dpo with "
            "dpo.useLora: true)",
            field_path=".lora",
            reason="FieldValueForbidden",
        ),
        rule(
            "!has(self.dpo) || self.method == 'dpo'",
            "dpo block given but method is not dpo",
            field_path=".dpo",
            reason="FieldValueForbidden",
        ),
        rule(
            "!has(self.fromScratch) || self.method == 'from_scratch'",
            "fromScratch block given but method is not from_scratch",
            field_path=".fromScratch",
            reason="FieldValueForbidden",
        ),
        rule(
            f"self.method != 'from_scratch' || ({present('model.architecture')})",
            "method from_scratch needs model.architecture (the model shape)",
            field_path=".model",
            reason="FieldValueRequired",
        ),
        rule(
            f"self.method != 'from_scratch' || !({present('model.name')})",
            "method from_scratch builds a new model; drop model.name or use method sft to "
            "continue training an existing one",
            field_path=".model",
            reason="FieldValueForbidden",
        ),
        model_name_rule,
        rule(
            "self.method == 'evaluate' || has(self.data)",
            "this method trains on data: set data.train",
            field_path=".data",
            reason="FieldValueRequired",
        ),
        rule(
            "self.method != 'evaluate' || !has(self.data)",
            "method evaluate reads its data from evaluate.suites[].data; remove the data block",
            field_path=".data",
            reason="FieldValueForbidden",
        ),
        rule(
            "self.method != 'evaluate' || has(self.evaluate)",
            "method evaluate needs an evaluate block with its suites",
            field_path=".evaluate",
            reason="FieldValueRequired",
        ),
        rule(
            "!has(self.evaluate) || self.method == 'evaluate'",
            "evaluate block given but method is not evaluate; use method evaluate",
            field_path=".evaluate",
            reason="FieldValueForbidden",
        ),
        rule(
            f"self.method != 'evaluate' || ({nodes} == 1 && {procs} == 1)",
            EVALUATE_ONE_PROCESS_MESSAGE,
            field_path=".resources",
        ),
        rule(
            f"!{flag('training.autoFindBatchSize')} || ({nodes} == 1 && {procs} == 1)",
            AUTO_BATCH_ONE_PROCESS_MESSAGE,
            field_path=".training.autoFindBatchSize",
        ),
        rule(
            f"self.method == 'dpo' || !({present('data.maxPromptLength')})",
            "data.maxPromptLength applies to method dpo only",
            field_path=".data.maxPromptLength",
            reason="FieldValueForbidden",
        ),
        rule(
            f"self.method != 'dpo' || !({present('data.format')}) || "
            "self.data.format in ['auto', 'preference']",
            "method dpo needs preference data (prompt/chosen/rejected): data.format must be "
            "auto or preference",
            field_path=".data.format",
        ),
        rule(
            f"!(self.method in ['sft', 'lora']) || !({present('data.format')}) || "
            "self.data.format != 'preference'",
            "methods sft and lora train on text, messages or instruction data, not "
            "preference pairs",
            field_path=".data.format",
        ),
        rule(
            f"!({present('data.mlmProbability')})",
            "data.mlmProbability masks tokens for masked language models; kubetrain trains "
            "causal decoders, so remove the field",
            field_path=".data.mlmProbability",
            reason="FieldValueForbidden",
        ),
        rule(
            f"self.method == 'evaluate' || {eval_strategy} == 'no' || "
            f"({present('data.eval')} && self.data.eval != '')",
            "training.evalStrategy steps or epoch needs data.eval",
            field_path=".data",
            reason="FieldValueRequired",
        ),
        rule(
            f"!({flag('training.bf16')} && {flag('training.fp16')})",
            "bf16 and fp16 are exclusive; pick one",
            field_path=".training",
        ),
        rule(
            f"{max_steps} == -1 || {max_steps} > 0",
            "training.maxSteps must be -1 (use epochs) or positive",
            field_path=".training",
        ),
        rule(
            f"!({present('training.earlyStoppingPatience')}) || {load_best}",
            "training.earlyStoppingPatience needs loadBestModelAtEnd: true so the best "
            "checkpoint is known",
            field_path=".training",
        ),
        rule(
            f"!{load_best} || {eval_strategy} != 'no'",
            "training.loadBestModelAtEnd needs evalStrategy steps or epoch",
            field_path=".training",
        ),
        rule(
            f"!{load_best} || {save_strategy} == {eval_strategy}",
            "training.loadBestModelAtEnd needs saveStrategy to match evalStrategy",
            field_path=".training",
        ),
        rule(
            f"!{load_best} || {eval_strategy} != 'steps' || "
            f"{value_or_default('training.saveSteps', Training, 'save_steps')} % {eval_every}"
            " == 0",
            "training.loadBestModelAtEnd needs saveSteps to be a multiple of evalSteps "
            "(loggingSteps when evalSteps is unset)",
            field_path=".training",
        ),
        rule(
            f"!({present('model.architecture')}) || "
            f"({hidden} % {heads} == 0 && {heads} % {kv_heads} == 0)",
            "model.architecture: hiddenSize must be a multiple of numAttentionHeads, and "
            "numAttentionHeads a multiple of numKeyValueHeads",
            field_path=".model.architecture",
        ),
        *sharding_rules(),
        env_rule(),
    ]


def sharding_rules() -> list[dict[str, str]]:
    """CEL twins of config.check_sharding, the QLoRA rule of check_method_blocks and
    check_offload_memory."""
    sharding = value_or_default("training.sharding", Training, "sharding")
    offload = flag("training.fsdpCpuOffload")
    keeps_gathered = (
        f"({present('training.fsdpReshardAfterForward')} && !self.training.fsdpReshardAfterForward)"
    )
    memory = (
        f"(({present('resources.requests')} && 'memory' in self.resources.requests) || "
        f"({present('resources.limits')} && 'memory' in self.resources.limits))"
    )
    return [
        rule(
            f"{sharding} == 'fsdp' || !({offload} || {keeps_gathered})",
            FSDP_KNOBS_NEED_FSDP,
            field_path=".training",
            reason="FieldValueForbidden",
        ),
        rule(
            f"{sharding} == 'none' || !{flag('lora.loadIn4Bit')}",
            QLORA_SHARDED_REFUSED,
            field_path=".lora.loadIn4Bit",
            reason="FieldValueForbidden",
        ),
        rule(
            f"!{offload} || {memory}",
            OFFLOAD_MEMORY_MESSAGE,
            field_path=".resources",
            reason="FieldValueRequired",
        ),
    ]


OFFLOAD_MEMORY_MESSAGE = (
    "training.fsdpCpuOffload keeps the parameter shards, gradients and optimizer states in "
    "host memory (about 16 bytes per parameter per pod / nodes): request that memory in "
    "resources.requests.memory (or limits.memory), so the pods land on nodes that have it "
    "instead of being OOM-killed; `kubetrain validate --preflight` prints the figure"
)


def check_offload_memory(training: Training, resources: Resources) -> None:
    if training.fsdp_cpu_offload and not (
        "memory" in resources.requests or "memory" in resources.limits
    ):
        raise ValueError(OFFLOAD_MEMORY_MESSAGE)


class S3CredentialsRef(K8sObject):
    """A Secret holding the access key pair the pods use for s3:// URIs."""

    name: str = Field(
        min_length=1, max_length=253, description="Name of the Secret in the run's namespace."
    )
    access_key_id_key: str = Field(
        "AWS_ACCESS_KEY_ID",
        min_length=1,
        max_length=253,
        description="Key of the Secret holding the access key id (the pods' AWS_ACCESS_KEY_ID).",
    )
    secret_access_key_key: str = Field(
        "AWS_SECRET_ACCESS_KEY",
        min_length=1,
        max_length=253,
        description="Key of the Secret holding the secret access key (the pods' "
        "AWS_SECRET_ACCESS_KEY). Never copied into the spec, the status, events or logs.",
    )


class RunS3Storage(S3Storage):
    """Where s3:// URIs point, and the credentials the pods use for them."""

    credentials_secret_ref: S3CredentialsRef | None = Field(
        None,
        description="Secret with an access key pair for the store. Empty: the pods' own "
        "identity through the AWS SDK's default chain (IRSA or EKS Pod Identity, GKE/Azure "
        "workload identity to S3-compatible stores, an instance profile).",
    )


class RunStorage(Storage):
    """How the pods reach remote storage (s3://): endpoint, region and credentials."""

    s3: RunS3Storage | None = Field(
        None, description="Settings for s3:// URIs of model, data and output."
    )


CACHE_SIZE_LIMIT_MESSAGE = (
    "cache.sizeLimit bounds the emptyDir used without a claim; a claim's size is its own, so "
    "drop sizeLimit or claimName"
)


class CacheVolume(K8sObject):
    """The pods' cache volume: downloads of s3:// and hub inputs, hub models (HF_HOME), the
    local copy of an s3:// output and its tokenized-data cache."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                rule(
                    "!has(self.claimName) || !has(self.sizeLimit)",
                    CACHE_SIZE_LIMIT_MESSAGE,
                    field_path=".sizeLimit",
                )
            ]
        }
    )

    claim_name: str | None = Field(
        None,
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description="A PersistentVolumeClaim to keep the cache across attempts (a restarted "
        "attempt then reuses the downloads and the tokenized data). ReadWriteMany when "
        "resources.nodes > 1. Empty: an emptyDir per pod, gone with the pod.",
    )
    size_limit: Quantity | None = Field(
        None,
        description="Most the emptyDir may hold (e.g. 200Gi) before the kubelet evicts the "
        "pod; only without claimName (a claim's size is its own).",
    )

    @model_validator(mode="after")
    def _size_limit_for_empty_dir(self) -> CacheVolume:
        if self.claim_name and self.size_limit is not None:
            raise ValueError(CACHE_SIZE_LIMIT_MESSAGE)
        return self


# URI fields whose scheme the CRD checks (the CEL twin of `check_uri`'s scheme check), with
# the schemes each takes; each is length-bounded so the API server can cost the regex.
SCHEME_CHECKED_FIELDS = {
    "model.name": SCHEMES,
    "dpo.referenceModel.name": SCHEMES,
    "data.train": DATA_SCHEMES,
    "data.eval": DATA_SCHEMES,
    "output": SCHEMES,
}


EVALUATE_ONE_PROCESS_MESSAGE = (
    "method evaluate runs in one process: set resources.nodes and resources.procPerNode to 1"
)


AUTO_BATCH_ONE_PROCESS_MESSAGE = (
    "training.autoFindBatchSize works in one process: a rank that runs out of memory alone "
    "would leave its peers waiting in the gradient all-reduce. Find the size on a run with "
    "resources.nodes and resources.procPerNode 1, then set perDeviceTrainBatchSize"
)


def check_evaluate_resources(method: str, resources: Resources) -> None:
    """Evaluation is not data-parallel: every rank would score the same rows again."""
    if method == "evaluate" and (resources.nodes != 1 or resources.proc_per_node != 1):
        raise ValueError(EVALUATE_ONE_PROCESS_MESSAGE)


def check_one_process_batch_finder(training: Training, resources: Resources) -> None:
    if training.auto_find_batch_size and (resources.nodes != 1 or resources.proc_per_node != 1):
        raise ValueError(AUTO_BATCH_ONE_PROCESS_MESSAGE)


def scheme_rules() -> list[dict[str, str]]:
    """One rule per URI field: only the schemes it takes (`check_uri` refuses the rest)."""
    return [
        rule(
            scheme_rule(path, schemes),
            f"{path}: unsupported URI scheme; use {' or '.join(schemes)} URIs, a hub id "
            "(models) or a local path",
            field_path=f".{path}",
        )
        for path, schemes in SCHEME_CHECKED_FIELDS.items()
    ]


class TrainingRunSpec(Spec):
    """What to train, on what data, with which resources, and where the model goes."""

    model_config = ConfigDict(
        json_schema_extra={"x-kubernetes-validations": spec_rules() + scheme_rules()}
    )

    method: Method = Field(description=METHOD_DESCRIPTION)
    model: RunModel = Field(
        default_factory=RunModel,
        description="The starting model: a hub id, pvc://claim/path, or (from_scratch) an "
        "architecture.",
    )
    data: RunData | None = Field(
        None,
        description="Training and evaluation data (pvc://, s3:// or hf://datasets/ URIs); "
        "every method but evaluate.",
    )
    training: Training = Field(
        default_factory=Training,
        description="Optimisation, precision, evaluation and checkpoint cadence.",
    )
    lora: Lora | None = Field(None, description="LoRA settings (method lora, or dpo.useLora).")
    dpo: RunDpo | None = Field(None, description="DPO settings (method dpo).")
    from_scratch: FromScratch | None = Field(
        None, description="Tokenizer settings for method from_scratch."
    )
    evaluate: RunEvaluate | None = Field(
        None, description="Method evaluate: the suites to score model.name on."
    )
    output: str = Field(
        min_length=1,
        max_length=MAX_URI_LENGTH,
        description="Where checkpoints and the final model go: pvc://claim/sub/path (the "
        "claim is mounted read-write), s3://bucket/prefix (each complete checkpoint and the "
        "final model are uploaded; a restart resumes from the bucket), or a local path for "
        "`kubetrain run`.",
    )
    image: str = Field(DEFAULT_IMAGE, min_length=1, description="Trainer container image.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        None, description="Image pull policy; empty uses the Kubernetes default."
    )
    resources: Resources = Field(
        default_factory=Resources, description="Pods, processes per pod and their resources."
    )
    env: list[EnvVar] = Field(
        default_factory=list,
        max_length=MAX_ENV_VARS,
        description="Extra environment for the trainer (e.g. WANDB_API_KEY from a Secret). "
        "Names the operator or torchrun set are refused.",
    )
    suspend: StrictBool = Field(
        False,
        description="Hold the run: no pods start (running pods are stopped; training "
        "resumes from the newest checkpoint when set back to false).",
    )
    restart_policy: RestartPolicy = Field(
        default_factory=RestartPolicy, description="Restarts after retriable failures."
    )
    active_deadline_seconds: StrictInt | None = Field(
        None,
        ge=1,
        description="The most seconds the run may take, counted from status.startTime (its "
        "pods first all ran) across restarts and suspensions. Past it the workload is "
        "stopped (the trainer saves a checkpoint on SIGTERM) and the run fails with reason "
        "DeadlineExceeded, which is final.",
    )
    ttl_seconds_after_finished: StrictInt | None = Field(
        None,
        ge=0,
        description="Delete the finished run's workload and pods this long after the "
        "operator recorded its verdict (the run, its status and outputs stay; nothing is "
        "re-created). Unset: they stay until the run is deleted.",
    )
    backend: Literal["job", "jobset"] = Field(
        "job",
        description="Workload kind: job (an Indexed Job and a headless Service, plain "
        "Kubernetes) or jobset (one JobSet; needs the JobSet controller).",
    )
    storage: RunStorage | None = Field(
        None,
        description="How the pods reach s3:// storage: endpoint, region and a credentials "
        "Secret (or the pods' own identity).",
    )
    cache: CacheVolume | None = Field(
        None,
        description="The pods' cache volume (downloads, hub models, the local copy of an "
        "s3:// output): an emptyDir unless claimName names a claim to keep it across attempts.",
    )

    @field_validator("output")
    @classmethod
    def _output_uri(cls, value: str) -> str:
        return check_uri(value)

    @field_validator("env")
    @classmethod
    def _env_not_reserved(cls, env: list[EnvVar]) -> list[EnvVar]:
        return check_env_not_reserved(env)

    @model_validator(mode="after")
    def _method_blocks(self) -> TrainingRunSpec:
        # Same attribute names as TrainerConfig, so the trainer's own rule applies as is.
        check_method_blocks(self)  # type: ignore[arg-type]
        check_evaluate_resources(self.method, self.resources)
        check_one_process_batch_finder(self.training, self.resources)
        check_offload_memory(self.training, self.resources)
        return self


class Condition(K8sObject):
    """One observation of the run (metav1.Condition)."""

    type: str = Field(
        description="Ready, Running, Succeeded, Failed, Suspended, or kstatus' Reconciling "
        "and Stalled.",
        max_length=316,
    )
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(
        description="CamelCase cause, e.g. Training, Completed, ConfigError.", max_length=1024
    )
    message: str = Field("", description="What happened and, on failure, how to fix it.")
    last_transition_time: str = Field(
        description="When status last changed (RFC 3339).",
        json_schema_extra={"format": "date-time"},
    )
    observed_generation: int | None = Field(
        None, ge=0, description="metadata.generation the condition was computed from."
    )


class Progress(K8sObject):
    """Training progress read from rank 0's metrics endpoint."""

    step: int | None = Field(None, ge=0, description="Optimizer steps done.")
    total_steps: int | None = Field(None, ge=0, description="Optimizer steps planned.")
    epoch: float | None = Field(None, ge=0, description="Epochs done (fractional).")
    loss: float | None = Field(None, description="Latest training loss.")
    eval_loss: float | None = Field(None, description="Latest evaluation loss.")
    tokens_per_second: float | None = Field(
        None, ge=0, description="Training throughput over all workers."
    )
    eta: str | None = Field(None, description="Estimated time left as a Go duration, e.g. 1h2m3s.")
    percent: int | None = Field(
        None, ge=0, le=100, description="step / totalSteps as a whole percentage."
    )
    heartbeat_time: str | None = Field(
        None,
        description="The training loop's last sign of life by the trainer's own clock (a "
        "micro-batch, an evaluation batch, a save), RFC 3339.",
        json_schema_extra={"format": "date-time"},
    )


class EvalPoint(K8sObject):
    """One evaluation during training, as rank 0's metrics endpoint reported it."""

    step: int = Field(ge=0, description="The optimizer step the evaluation ran at.")
    metrics: dict[str, float] = Field(
        description="eval_loss and the method's other evaluation metrics (perplexity; DPO "
        "rewards_accuracy, rewards_margin), named as in the final metrics (outputs.metrics).",
        max_length=8,
    )


class DataStatus(K8sObject):
    """The data a finished run trained on, as its trainer recorded it (metrics.json)."""

    fingerprint: str = Field(
        max_length=80,
        description="sha256:<hex> of the train and eval files' bytes: the same data wherever "
        "it lives gives the same fingerprint, a change to any row a new one.",
    )
    train_rows: int = Field(ge=0, description="Training rows, after validation.")
    eval_rows: int = Field(ge=0, description="Evaluation rows (0 without eval data).")
    train_rows_dropped: int = Field(
        0,
        ge=0,
        description="Training rows dropped because truncation to data.maxLength left them "
        "nothing to learn (sft, lora: no output or assistant token left; dpo: the prompt "
        "fills maxLength). Raise maxLength to keep them.",
    )
    eval_rows_dropped: int = Field(
        0, ge=0, description="Evaluation rows dropped for the same reason as trainRowsDropped."
    )


class Outputs(K8sObject):
    """What a finished run leaves behind."""

    model_uri: str | None = Field(
        None, description="URI of the final model (spec.output); adapters for LoRA runs."
    )
    metrics: dict[str, float] | None = Field(
        None,
        max_length=MAX_OUTPUT_METRICS,
        description="The run's final metrics, as the trainer summed them up: evaluation metrics "
        "named <suite>.<metric> (qa.exact_match, perplexity.perplexity), then train_loss, "
        f"eval_loss and the like; at most {MAX_OUTPUT_METRICS}. Pipeline gates read them.",
    )
    headline: str | None = Field(
        None,
        description="Method evaluate: the first suite's headline metric and its value "
        "(`kubectl get tr` shows it), e.g. qa.exact_match=0.82.",
    )


class KstatusStatus(K8sObject):
    """The status fields every kubetrain kind shares, as kstatus, Flux and Argo CD read them."""

    # Tolerate status fields this version does not know (written by a newer operator or by
    # kopf) rather than failing to read the object.
    model_config = ConfigDict(extra="ignore")

    phase: Phase | None = Field(
        None, description="Pending, Running, Succeeded, Failed or Suspended."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Ready, Running, Succeeded, Failed and Suspended (and kstatus' "
        "Reconciling and Stalled), each with a reason.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    )
    observed_generation: int | None = Field(
        None, ge=0, description="metadata.generation this status was computed from."
    )


class AttemptRecord(K8sObject):
    """One ended attempt: why it ended, and whether its restart used the budget."""

    attempt: int = Field(ge=1, description="The attempt number (the Job <run>-<attempt>).")
    cause: str = Field(
        description="Why it ended: OOMKilled, DeviceOutOfMemory, Preempted, Evicted, NodeLost, "
        "NetworkError, NoProgress, Crashed, Signalled, TrainingUnstable, ..."
    )
    exit_code: int | None = Field(None, description="The failed container's exit code.")
    message: str = Field("", description="What the pod or the operator said.")
    counted: bool = Field(
        True, description="Whether its restart counted against restartPolicy.maxRestarts."
    )
    finished_at: str | None = Field(
        None,
        description="When the operator saw it end (RFC 3339).",
        json_schema_extra={"format": "date-time"},
    )


class TrainingRunStatus(KstatusStatus):
    """Observed state of a TrainingRun, written by the operator only."""

    start_time: str | None = Field(
        None,
        description="When the first attempt's pods started (RFC 3339).",
        json_schema_extra={"format": "date-time"},
    )
    completion_time: str | None = Field(
        None,
        description="When the run Succeeded or Failed (RFC 3339).",
        json_schema_extra={"format": "date-time"},
    )
    attempt: int | None = Field(
        None, ge=0, description="Current attempt; the Job is named <run>-<attempt>."
    )
    restarts: int | None = Field(
        None,
        ge=0,
        description="Restarts that counted against restartPolicy.maxRestarts; one after a "
        "preemption or a pod disruption does not (the attempt number counts every restart, "
        "status.attempts says why each ended).",
    )
    attempts: list[AttemptRecord] | None = Field(
        None,
        max_length=MAX_ATTEMPT_HISTORY,
        description=f"How each ended attempt ended, oldest first (the newest "
        f"{MAX_ATTEMPT_HISTORY}).",
    )
    last_progress_time: str | None = Field(
        None,
        description="When the operator last saw the current attempt advance (its step or "
        "the trainer's heartbeat), or saw it start running; the stall timeout counts from "
        "here (RFC 3339).",
        json_schema_extra={"format": "date-time"},
    )
    cleaned_up_time: str | None = Field(
        None,
        description="When the operator deleted the finished run's workload and pods "
        "(ttlSecondsAfterFinished) (RFC 3339).",
        json_schema_extra={"format": "date-time"},
    )
    progress: Progress | None = Field(None, description="Training progress of the attempt.")
    eval_history: list[EvalPoint] | None = Field(
        None,
        max_length=MAX_EVAL_HISTORY,
        description="Every evaluation during training, oldest first (the newest "
        f"{MAX_EVAL_HISTORY}); a Sweep's pruner reads its trials' history here.",
    )
    latest_checkpoint: str | None = Field(
        None, description="URI of the newest complete checkpoint (<output>/checkpoint-N)."
    )
    outputs: Outputs | None = Field(None, description="Results of a finished run.")
    data: DataStatus | None = Field(
        None, description="The data a finished run trained on: fingerprint and row counts."
    )


class ObjectMeta(BaseModel):
    """Kubernetes object metadata; fields beyond these are kept as given."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    name: str = Field(min_length=1, description="Object name.")
    namespace: str | None = Field(None, description="Namespace (the current one if empty).")
    labels: dict[str, str] = Field(default_factory=dict, description="Labels.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Annotations.")
    uid: str | None = Field(None, description="Set by the API server.")
    generation: int | None = Field(None, description="Set by the API server.")


_RUN_NAME = re.compile(RUN_NAME_PATTERN)


class TrainingRun(K8sObject):
    """A training job for an LLM: one method, one model, its data, and the gang that runs it."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                rule(
                    f"!has(self.metadata.name) || (self.metadata.name.size() <= "
                    f"{MAX_RUN_NAME_LENGTH} && self.metadata.name.matches('{RUN_NAME_PATTERN}'))",
                    f"metadata.name must be a DNS label of at most {MAX_RUN_NAME_LENGTH} "
                    "characters (lowercase letters, digits, '-', starting with a letter) so "
                    "the pods' hostnames <name>-<attempt>-<index> fit 63 characters",
                )
            ]
        }
    )

    api_version: Literal["kubetrain.dev/v1alpha1"] = Field(
        API_VERSION, description="kubetrain.dev/v1alpha1"
    )
    kind: Literal["TrainingRun"] = Field(KIND, description="TrainingRun")
    metadata: ObjectMeta = Field(description="Standard object metadata.")
    spec: TrainingRunSpec = Field(description="What to train and how.")
    status: TrainingRunStatus | None = Field(None, description="Written by the operator.")

    @model_validator(mode="after")
    def _name_fits_hostnames(self) -> TrainingRun:
        name = self.metadata.name
        if len(name) > MAX_RUN_NAME_LENGTH or not _RUN_NAME.match(name):
            raise ValueError(
                f"metadata.name {name!r} must be a DNS label of at most "
                f"{MAX_RUN_NAME_LENGTH} characters (lowercase letters, digits, '-', starting "
                "with a letter) so the pods' hostnames <name>-<attempt>-<index> fit 63"
            )
        return self


def to_trainer_config(
    name: str,
    spec: TrainingRunSpec,
    resolve_uri: Callable[[UriRef], str],
    *,
    metrics_port: int = METRICS_PORT,
) -> TrainerConfig:
    """The TrainerConfig a run's pods (or local processes) read.

    `resolve_uri` turns each URI-bearing field (see `uri_refs`) into the path the trainer
    opens: the renderer maps pvc:// to the claim's mount, the local runner to a folder. It
    may raise ValueError naming `ref.field` to refuse a form (a local path on a cluster).
    Hub ids are passed to it too, so it decides whether to leave them alone.
    """
    resolved = {ref.field: resolve_uri(ref) for ref in uri_refs(spec)}
    model = spec.model.model_dump(exclude={"token_secret_ref"}, exclude_none=True)
    for key in ("name", "tokenizer"):
        if f"spec.model.{key}" in resolved:
            model[key] = resolved[f"spec.model.{key}"]
    data: dict[str, Any] | None = None
    if spec.data is not None:
        data = spec.data.model_dump(exclude_none=True)
        data["train"] = resolved["spec.data.train"]
        if "spec.data.eval" in resolved:
            data["eval"] = resolved["spec.data.eval"]
    evaluate: dict[str, Any] | None = None
    if spec.evaluate is not None:
        evaluate = spec.evaluate.model_dump(exclude_none=True)
        for index, suite in enumerate(evaluate["suites"]):
            for key, camel in (("data", "data"), ("refusal_classifier", "refusalClassifier")):
                where = f"spec.evaluate.suites[{index}].{camel}"
                if where in resolved:
                    suite[key] = resolved[where]
        if "spec.evaluate.referenceModel.name" in resolved:
            evaluate["reference_model"]["name"] = resolved["spec.evaluate.referenceModel.name"]
    dpo: dict[str, Any] | None = None
    if spec.dpo is not None:
        dpo = spec.dpo.model_dump(exclude_none=True)
        if "spec.dpo.referenceModel.name" in resolved:
            dpo["reference_model"]["name"] = resolved["spec.dpo.referenceModel.name"]
    return TrainerConfig.model_validate(
        {
            "method": spec.method,
            "model": model,
            "data": data,
            "training": spec.training.model_dump(),
            "lora": spec.lora.model_dump() if spec.lora else None,
            "dpo": dpo,
            "from_scratch": spec.from_scratch.model_dump() if spec.from_scratch else None,
            "evaluate": evaluate,
            # The endpoint and region only: credentials reach the pods as env from a Secret.
            "storage": (
                spec.storage.model_dump(exclude={"s3": {"credentials_secret_ref"}})
                if spec.storage
                else None
            ),
            "output_dir": resolved["spec.output"],
            "run_name": name,
            "metrics_port": metrics_port,
        }
    )
