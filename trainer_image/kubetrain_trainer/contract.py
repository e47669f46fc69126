"""What the trainer and the operator both rely on, spelled once: names, files, exit codes.

The trainer writes these and the operator (or `kubetrain run` on a laptop) reads them, so a
name typed on both sides could drift apart silently; both import it from here instead, and
tests/unit/test_contract.py fails when one of these strings or codes is spelled anywhere
else. This module is imported by the operator, whose image has no torch: it imports the
standard library and pydantic only.

- Prometheus metrics rank 0 serves on METRICS_PORT (`kubetrain_trainer_*`), and how evaluation
  metrics are named (`kubetrain_eval_<metric>{suite=...}`, `<suite>.<metric>` in metrics.json).
- Files under the output dir: metrics.json (`TrainerMetricsFile`, written last, so it means
  the final model is complete), `checkpoint-<step>` folders (transformers' names) with their
  completion marker, and the merged model of a LoRA run.
- Exit codes (`ExitCode`, BSD sysexits.h values, which nothing else in the stack uses) and
  the termination message the trainer leaves in TERMINATION_LOG, which Kubernetes copies
  into the pod's status and the operator reads into the run's conditions.
- The cache folder (CACHE_DIR_ENV) and where an s3:// output is staged in it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from enum import IntEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

# -- Prometheus -------------------------------------------------------------------------------

METRICS_PORT = 9400  # rank 0 serves /metrics here unless the config says otherwise

# What rank 0 serves: gauges, NaN until measured (no eval yet, no checkpoint saved yet), and
# one counter, TOKENS_TOTAL (its sample name; prometheus-client names the family without
# `_total`). Every name passes `promtool check metrics` (tests/trainer/test_prometheus.py).
STEP = "kubetrain_trainer_step"
TOTAL_STEPS = "kubetrain_trainer_total_steps"
EPOCH = "kubetrain_trainer_epoch"
LOSS = "kubetrain_trainer_loss"
EVAL_LOSS = "kubetrain_trainer_eval_loss"
LEARNING_RATE = "kubetrain_trainer_learning_rate"
GRAD_NORM = "kubetrain_trainer_grad_norm"
TOKENS_TOTAL = "kubetrain_trainer_tokens_total"  # a counter
TOKENS_PER_SECOND = "kubetrain_trainer_tokens_per_second"
CHECKPOINT_STEP = "kubetrain_trainer_checkpoint_step"  # becomes status.latestCheckpoint
START_TIME_SECONDS = "kubetrain_trainer_start_time_seconds"
INFO = "kubetrain_trainer_info"  # always 1; labels name the run and its method
PERPLEXITY = "kubetrain_trainer_perplexity"  # language-modelling methods only
REWARDS_ACCURACY = "kubetrain_trainer_rewards_accuracy"  # DPO only
REWARDS_MARGIN = "kubetrain_trainer_rewards_margin"  # DPO only
GPU_MEMORY_BYTES = "kubetrain_trainer_gpu_memory_bytes"  # only where there is a GPU
# Unix time of the training loop's last sign of life (a micro-batch, an evaluation batch, a
# save): with the step it tells a hung trainer from a slow one, and from none at all (no
# answer). The operator compares its changes, never its value, with its own clock.
HEARTBEAT = "kubetrain_trainer_heartbeat_timestamp_seconds"
# Every evaluation during training, one sample per (metric, step): a sweep's pruner must see
# the whole history however seldom the operator polls. Bounded: the newest MAX_EVAL_HISTORY
# evaluations are kept.
EVAL_HISTORY = "kubetrain_trainer_eval_history"
EVAL_HISTORY_METRIC_LABEL = "metric"
EVAL_HISTORY_STEP_LABEL = "step"
MAX_EVAL_HISTORY = 50
TRAINER_METRICS = (
    STEP, TOTAL_STEPS, EPOCH, LOSS, EVAL_LOSS, LEARNING_RATE, GRAD_NORM, TOKENS_TOTAL,
    TOKENS_PER_SECOND, CHECKPOINT_STEP, START_TIME_SECONDS, INFO, PERPLEXITY,
    REWARDS_ACCURACY, REWARDS_MARGIN, GPU_MEMORY_BYTES, EVAL_HISTORY, HEARTBEAT,
)  # fmt: skip

EVAL_GAUGE_PREFIX = "kubetrain_eval_"  # kubetrain_eval_<metric>{suite=...}
EVAL_SUITE_LABEL = "suite"

EvalSuiteName = Literal[
    "perplexity", "loss", "qa", "summarization", "translation", "preference", "safety"
]
# What each evaluation suite reports, headline first (`kubectl get tr` shows the first
# suite's headline). Snake case throughout, so every gauge passes `promtool check metrics`.
EVAL_SUITE_METRICS: dict[str, tuple[str, ...]] = {
    "perplexity": ("perplexity", "loss"),
    "loss": ("loss", "perplexity"),
    "qa": ("exact_match", "f1"),
    "summarization": ("rouge_l", "rouge1", "rouge2"),
    "translation": ("bleu", "chrf"),
    "preference": ("accuracy", "margin"),
    "safety": ("refusal_rate", "over_refusal_rate"),
}


# What a finished run of each training method reports in metrics.json (numbers a sweep may
# optimise, metrics.json keys), and which of them it also reports at every evaluation during
# training (the history a pruner reads; evaluation needs data.eval). Method evaluate reports
# its suites' `<suite>.<metric>` keys instead, at the end only.
LANGUAGE_MODELLING_METHODS = ("from_scratch", "sft", "lora")
_FINAL_METRICS = ("eval_loss", "train_loss", "train_loss_mean", "tokens_per_second")
_INTERMEDIATE_METRICS: dict[str, tuple[str, ...]] = {
    **{method: ("eval_loss", "perplexity") for method in LANGUAGE_MODELLING_METHODS},
    "dpo": ("eval_loss", "rewards_accuracy", "rewards_margin"),
}


def intermediate_metrics(method: str) -> tuple[str, ...]:
    """The metrics.json keys a training method reports at every evaluation (none: evaluate)."""
    return _INTERMEDIATE_METRICS.get(method, ())


def reported_metrics(method: str, suites: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The numeric metrics.json keys a finished run of `method` reports (`suites`: method
    evaluate's suite names, whose metrics it reports)."""
    if method == "evaluate":
        return tuple(eval_metric_key(s, m) for s in suites for m in EVAL_SUITE_METRICS[s])
    extra = tuple(m for m in intermediate_metrics(method) if m not in _FINAL_METRICS)
    return (*_FINAL_METRICS, *extra)


def eval_metric_key(suite: str, metric: str) -> str:
    """The metrics.json key of an evaluation metric, e.g. `qa.exact_match`."""
    return f"{suite}.{metric}"


def eval_gauge_name(metric: str) -> str:
    """The Prometheus gauge of an evaluation metric, e.g. `kubetrain_eval_exact_match`."""
    return f"{EVAL_GAUGE_PREFIX}{metric}"


# -- Files under the output dir ---------------------------------------------------------------

METRICS_FILE = "metrics.json"
CHECKPOINT_MARKER = "kubetrain-complete.json"  # a checkpoint folder is complete only with it
MERGED_DIR = "merged"  # a LoRA run's adapter merged into its base model (merge: true)
# The report a person reads (kubetrain_trainer.report, `kubetrain report`): one
# self-contained report.html, its plots also as PNG files in REPORT_PLOTS_DIR; the final log
# history it plots, in transformers' trainer_state.json format (transformers itself writes
# that only into checkpoints); beside a pipeline's report, the stages it covers, and beside a
# sweep's, its trials.
REPORT_FILE = "report.html"
REPORT_PLOTS_DIR = "report-plots"
TRAINER_STATE_FILE = "trainer_state.json"
PIPELINE_STAGES_FILE = "pipeline-stages.json"
SWEEP_TRIALS_FILE = "sweep-trials.json"  # beside a sweep's report: its trials, to re-render
# transformers' PREFIX_CHECKPOINT_DIR, which names the folders its Trainer saves into (a
# trainer test holds the two equal); the operator builds status.latestCheckpoint from it.
CHECKPOINT_DIR_PREFIX = "checkpoint"
_CHECKPOINT_DIR = re.compile(rf"^{CHECKPOINT_DIR_PREFIX}-(\d+)$")


def checkpoint_dir_name(step: int) -> str:
    """`checkpoint-<step>`, the folder the checkpoint of optimizer step `step` lives in."""
    return f"{CHECKPOINT_DIR_PREFIX}-{step}"


def checkpoint_dir_step(name: str) -> int | None:
    """The step in a `checkpoint-<step>` folder name, or None for any other name."""
    match = _CHECKPOINT_DIR.match(name)
    return int(match.group(1)) if match else None


class TrainerMetricsFile(BaseModel):
    """metrics.json, the summary rank 0 writes last into the output dir of a finished run.

    Values that do not apply to the method are absent (perplexity outside language
    modelling, rewards outside DPO); values that apply but were never measured are null
    (eval_loss without eval data). NaN and infinity are not JSON: they become null. Any
    other key is an evaluation metric, named `<suite>.<metric>` (`eval_metric_key`).
    Dump with `exclude_unset=True` to keep absent keys absent.
    """

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    method: str | None = None
    global_step: int | None = None
    train_loss: float | None = None  # last logged training loss: the model as saved
    train_loss_mean: float | None = None  # mean over this train() call (TrainOutput's)
    eval_loss: float | None = None  # at the last evaluation
    tokens_total: int | None = None  # non-padding tokens, all ranks, resumes included
    tokens_per_second: float | None = None  # this train() call's tokens over its runtime
    runtime_seconds: float | None = None  # wall clock, model loading included
    train_runtime_seconds: float | None = None  # the Trainer's own train() runtime
    perplexity: float | None = None  # exp(eval loss, else train loss); language modelling
    rewards_accuracy: float | None = None  # DPO, eval set first, else training batches
    rewards_margin: float | None = None  # DPO, eval set first, else training batches
    replica_checksums: list[float] | None = None  # one per data-parallel rank: equal weights
    merged_dir: str | None = None  # where the merged model went (lora with merge: true)
    # The batch trained with (training.autoFindBatchSize may have made it smaller, and the
    # accumulation larger, keeping their product).
    per_device_train_batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    # The data the model was trained on: the fingerprint of the train and eval files' bytes
    # (`sha256:<hex>`, data.data_fingerprint) and the rows each held after validation; of
    # those, the rows dropped because truncation to data.maxLength left them nothing to
    # learn (sft/lora: no completion or assistant token; dpo: the prompt fills maxLength).
    data_fingerprint: str | None = None
    train_rows: int | None = None
    eval_rows: int | None = None
    train_rows_dropped: int | None = None
    eval_rows_dropped: int | None = None
    # Every evaluation during training, oldest first: {"step": N, "<metric>": value, ...}
    # with intermediate_metrics(method) keys; at most MAX_EVAL_HISTORY entries.
    eval_history: list[dict[str, float | int]] | None = None

    @field_validator("*", mode="before")
    @classmethod
    def _finite(cls, value: Any) -> Any:
        return None if isinstance(value, float) and not math.isfinite(value) else value

    @model_validator(mode="before")
    @classmethod
    def _evaluation_metrics(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        unknown = [k for k in data if k not in cls.model_fields and "." not in str(k)]
        if unknown:
            raise ValueError(
                f"unknown metrics.json keys {sorted(unknown)}: evaluation metrics are named "
                "<suite>.<metric>"
            )
        return {key: cls._finite(value) for key, value in data.items()}


# -- Exit codes and the termination message -------------------------------------------------


class ExitCode(IntEnum):
    """How the trainer (and the torchrun launcher, which passes these through) exits."""

    OK = 0
    DEVICE_OUT_OF_MEMORY = 71  # caught CUDA OOM
    TRAINING_UNSTABLE = 72  # NaN/inf loss, exploding gradients
    PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM after saving a checkpoint; resume
    CONFIG_ERROR = 78  # EX_CONFIG: bad spec or data; retrying cannot help, never retried


EXIT_MEANINGS: dict[ExitCode, str] = {
    ExitCode.OK: "done: the final model and metrics.json are written",
    ExitCode.DEVICE_OUT_OF_MEMORY: "the device ran out of memory (caught CUDA OOM)",
    ExitCode.TRAINING_UNSTABLE: "training became unstable (NaN/inf loss, exploding gradients)",
    ExitCode.PREEMPTED: "stopped by SIGTERM after saving a checkpoint; rerun to resume",
    ExitCode.CONFIG_ERROR: "the configuration or data is wrong; retrying cannot help",
}


def is_complete(folder: str | Path) -> bool:
    """Whether a checkpoint folder has a readable marker naming the folder's own step.

    A marker whose step differs from the folder name (a folder copied or renamed by hand)
    does not count: the state inside would resume at a different step than it claims.
    """
    folder = Path(folder)
    try:
        marker = json.loads((folder / CHECKPOINT_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("step") == checkpoint_dir_step(folder.name)


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """All `checkpoint-<step>` folders under output_dir as (step, path), oldest step first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        step = checkpoint_dir_step(child.name)
        if step is not None and child.is_dir():
            found.append((step, child))
    return sorted(found)


def newest_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint folder under output_dir that has its completion marker."""
    complete = [path for _, path in list_checkpoints(output_dir) if is_complete(path)]
    return complete[-1] if complete else None


# The trainer's cache folder (downloads of s3:// and hf:// inputs, the local copy of an
# s3:// output, the tokenized-data cache of such a run): the operator mounts the pod's cache
# volume there and names it in this variable; elsewhere it defaults to ~/.cache/kubetrain.
CACHE_DIR_ENV = "KUBETRAIN_CACHE_DIR"
# What the staging of remote storage leaves beside a finished download: the objects' ETags,
# so a changed object is fetched again and an unchanged one is not.
DOWNLOAD_MARKER = ".kubetrain-download.json"


def cache_root() -> Path:
    """The trainer's cache folder: $KUBETRAIN_CACHE_DIR, else ~/.cache/kubetrain."""
    configured = os.environ.get(CACHE_DIR_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "kubetrain"


def staged_output_dir(uri: str) -> Path:
    """The local folder the trainer works in for a remote (s3://) output URI: under the
    cache, named by the URI, so a rerun of the same output finds what it left there."""
    digest = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    return cache_root() / "outputs" / digest


# A dataset repository on the Hugging Face hub, as data.train/data.eval may name it.
HF_DATASETS_SCHEME = "hf://datasets/"
HF_DATASETS_FORM = "hf://datasets/<org>/<name>[@<revision>][/<path>]"


class HubDataset(BaseModel):
    """`hf://datasets/org/name[@revision][/path/in/repo]` taken apart."""

    model_config = ConfigDict(frozen=True)

    repo_id: str
    revision: str | None = None
    path: str = ""


def parse_hf_uri(uri: str) -> HubDataset:
    """Split an hf://datasets/ URI; ValueError naming the form for anything else."""
    parts = uri[len(HF_DATASETS_SCHEME) :].strip("/").split("/")
    name, _, revision = parts[1].partition("@") if len(parts) > 1 else ("", "", "")
    if not uri.startswith(HF_DATASETS_SCHEME) or not parts[0] or not name or "@" in revision:
        raise ValueError(f"{uri!r}: write {HF_DATASETS_FORM}")
    if any(p in ("", ".", "..") for p in parts[2:]):
        raise ValueError(f"{uri!r}: the path inside the repository has an empty, '.' or '..' part")
    return HubDataset(
        repo_id=f"{parts[0]}/{name}", revision=revision or None, path="/".join(parts[2:])
    )


# Where Kubernetes reads a container's termination message (its terminationMessagePath
# default); the trainer's env KUBETRAIN_TERMINATION_LOG overrides it outside a pod.
TERMINATION_LOG = "/dev/termination-log"
# The trainer's termination message for exit 78 starts with this; the operator also treats
# a message starting with it as a configuration error, whatever the exit code.
CONFIG_ERROR_PREFIX = "config error"
PREEMPTED_PREFIX = "preempted"
# The termination messages of exit 71 and 72 start with these.
OUT_OF_MEMORY_PREFIX = "device out of memory"
UNSTABLE_PREFIX = "training unstable"


def config_error_message(detail: str) -> str:
    """`config error: <detail>`, the termination message of a configuration error."""
    return f"{CONFIG_ERROR_PREFIX}: {detail}"


def preempted_message(detail: str) -> str:
    """`preempted: <detail>`, the termination message after a SIGTERM and a checkpoint."""
    return f"{PREEMPTED_PREFIX}: {detail}"


# A finished run's termination message: its metrics, which the operator cannot read from
# the output dir, for status.outputs.metrics (and pipeline gates), and under OUTPUTS_DATA_KEY
# the data it trained on (DataRecord, for status.data). Bounded so it fits the 4 KiB
# Kubernetes keeps and the run's status stays small.
OUTPUTS_PREFIX = "outputs"
OUTPUTS_DATA_KEY = "data"
MAX_OUTPUT_METRICS = 32
_OUTPUT_DIGITS = 6
# metrics.json's fields that describe the data, not the model: in DataRecord, not metrics.
DATA_FIELDS = (
    "data_fingerprint",
    "train_rows",
    "eval_rows",
    "train_rows_dropped",
    "eval_rows_dropped",
)


class DataRecord(BaseModel):
    """The data a model was trained on, as metrics.json and the termination message say."""

    fingerprint: str
    train_rows: int
    eval_rows: int
    # Absent from the messages of trainers older than the count: none known dropped.
    train_rows_dropped: int = 0
    eval_rows_dropped: int = 0

    @classmethod
    def of(cls, summary: dict[str, Any]) -> DataRecord | None:
        if not isinstance(summary.get("data_fingerprint"), str):
            return None  # an evaluate run, or a metrics.json from before fingerprints
        return cls(
            fingerprint=summary["data_fingerprint"],
            train_rows=summary.get("train_rows") or 0,
            eval_rows=summary.get("eval_rows") or 0,
            train_rows_dropped=summary.get("train_rows_dropped") or 0,
            eval_rows_dropped=summary.get("eval_rows_dropped") or 0,
        )


def output_metrics(summary: dict[str, Any]) -> dict[str, float | int]:
    """The finite numbers of a metrics.json summary, evaluation metrics first, at most
    MAX_OUTPUT_METRICS of them, floats to 6 significant digits: status.outputs.metrics."""
    numbers = {
        key: float(f"{value:.{_OUTPUT_DIGITS}g}") if isinstance(value, float) else value
        for key, value in summary.items()
        if isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and key not in DATA_FIELDS
    }
    ordered = sorted(numbers, key=lambda key: "." not in key)  # stable: suites keep their order
    return {key: numbers[key] for key in ordered[:MAX_OUTPUT_METRICS]}


def outputs_message(summary: dict[str, Any]) -> str:
    """`outputs: {json}`, a finished run's termination message: output_metrics, and the
    DataRecord under OUTPUTS_DATA_KEY when the summary has one."""
    outputs: dict[str, Any] = dict(output_metrics(summary))
    data = DataRecord.of(summary)
    if data is not None:
        outputs[OUTPUTS_DATA_KEY] = data.model_dump()
    return f"{OUTPUTS_PREFIX}: {json.dumps(outputs, separators=(',', ':'))}"


def _outputs_body(message: str) -> dict[str, Any] | None:
    head, _, body = message.strip().partition(":")
    if head != OUTPUTS_PREFIX:
        return None
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def parse_outputs_message(message: str) -> dict[str, float] | None:
    """The metrics of an `outputs: {json}` termination message; None for any other message."""
    parsed = _outputs_body(message)
    if parsed is None:
        return None
    return {
        str(key): float(value)
        for key, value in list(parsed.items())[:MAX_OUTPUT_METRICS]
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


def parse_outputs_data(message: str) -> DataRecord | None:
    """The DataRecord of an `outputs: {json}` termination message, if it carries one."""
    parsed = _outputs_body(message) or {}
    try:
        return DataRecord.model_validate(parsed[OUTPUTS_DATA_KEY])
    except (KeyError, ValueError):
        return None


def is_config_error_message(message: str) -> bool:
    """Whether a termination message reports a configuration error (any case)."""
    return message.strip().lower().startswith(CONFIG_ERROR_PREFIX)
