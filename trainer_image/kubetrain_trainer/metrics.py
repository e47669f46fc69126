"""Training metrics: Prometheus gauges on rank 0, a plain progress line, and metrics.json.

`PrometheusCallback` turns the Trainer's events into the `kubetrain_trainer_*` gauges
kubetrain_trainer.contract names; `serve_metrics` exposes them on :9400/metrics, where
Prometheus scrapes them and the operator reads them into `status.progress` and
`status.latestCheckpoint`. Gauges start at NaN where no value exists yet (no eval run, no
checkpoint saved); method-specific gauges exist only for their methods (perplexity for
language modelling, rewards for DPO). Tokens are the Trainer's own count
(`include_num_input_tokens_seen="non_padding"`, summed over all ranks); tokens/s is measured
over a sliding window of the most recent log events, so it tracks the current speed instead
of an average dragged down by start-up (kubetrain_trainer.progress shows the same figures to
a person). At the end `summarize_run` + `write_metrics_json` leave `metrics.json`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from transformers import (
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer_utils import TrainOutput

from kubetrain_trainer import contract
from kubetrain_trainer.checkpoints import write_json_atomic
from kubetrain_trainer.contract import METRICS_FILE, TrainerMetricsFile

log = logging.getLogger(__name__)

# Methods whose loss is a next-token cross-entropy, so exp(loss) is a perplexity.
# DPO's loss is a preference loss: its exponential means nothing.
LANGUAGE_MODELLING_METHODS = frozenset(contract.LANGUAGE_MODELLING_METHODS)
# Log events averaged for tokens/s and the ETA: long enough to smooth one slow step,
# short enough to show a slowdown within a few logging intervals.
THROUGHPUT_WINDOW = 10

NAN = float("nan")


def perplexity(loss: float) -> float:
    """exp(loss), saturating to infinity instead of raising for a diverged loss."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def eval_point(method: str, logs: dict[str, Any]) -> dict[str, float]:
    """The intermediate metrics (contract.intermediate_metrics) of one evaluation log entry."""
    point = {"eval_loss": float(logs["eval_loss"])}
    if method in LANGUAGE_MODELLING_METHODS:
        point["perplexity"] = perplexity(point["eval_loss"])
    if method == "dpo":
        for key, name in (("accuracies", "rewards_accuracy"), ("margins", "rewards_margin")):
            if f"eval_rewards/{key}" in logs:
                point[name] = float(logs[f"eval_rewards/{key}"])
    return point


def eval_history(method: str, log_history: list[dict[str, Any]]) -> list[dict[str, float]]:
    """metrics.json's eval_history: every evaluation by step (the last one at a step wins,
    e.g. the final evaluate() after an eval at the last step), newest MAX_EVAL_HISTORY."""
    by_step: dict[int, dict[str, float]] = {}
    for entry in log_history:
        if "eval_loss" in entry and "step" in entry:
            point = eval_point(method, entry)
            by_step[int(entry["step"])] = {k: v for k, v in point.items() if math.isfinite(v)}
    points = [{"step": step, **by_step[step]} for step in sorted(by_step)]
    return points[-contract.MAX_EVAL_HISTORY :]


def tokens_seen(args: TrainingArguments, state: TrainerState, logs: dict[str, Any]) -> int | None:
    """Tokens trained on so far, all ranks together, or None when nothing counts them.

    The Trainer's count (state.num_input_tokens_seen) is preferred: it is saved in every
    checkpoint and so keeps growing across a resume. TRL trainers also log `num_tokens`,
    which restarts at 0 in each process; it is the fallback when the Trainer's count is off.
    """
    if args.include_num_input_tokens_seen not in ("no", False):
        return int(state.num_input_tokens_seen)
    if "num_tokens" in logs:
        return int(logs["num_tokens"])
    return None


class ThroughputWindow:
    """Steps/s and tokens/s between the oldest and newest of the last `size` samples."""

    def __init__(self, size: int = THROUGHPUT_WINDOW) -> None:
        self._samples: deque[tuple[float, int, int | None]] = deque(maxlen=size + 1)

    def reset(self, now: float, step: int, tokens: int | None) -> None:
        self._samples.clear()
        self.add(now, step, tokens)

    def add(self, now: float, step: int, tokens: int | None) -> None:
        self._samples.append((now, step, tokens))

    def _rate(self, index: int) -> float | None:
        if len(self._samples) < 2:
            return None
        first, last = self._samples[0], self._samples[-1]
        elapsed = last[0] - first[0]
        if elapsed <= 0 or first[index] is None or last[index] is None:
            return None
        return (last[index] - first[index]) / elapsed

    def steps_per_second(self) -> float | None:
        return self._rate(1)

    def tokens_per_second(self) -> float | None:
        return self._rate(2)

    def eta_seconds(self, step: int, max_steps: int) -> float | None:
        rate = self.steps_per_second()
        if not rate:
            return None
        return max(max_steps - step, 0) / rate


class PrometheusCallback(TrainerCallback):
    """Keeps the `kubetrain_trainer_*` gauges current; updates only on world rank 0.

    The gauges live in the callback's own CollectorRegistry (`self.registry`), not the
    process-wide default, so two trainers in one process (tests, a pipeline run locally)
    never collide and the endpoint serves only these names.
    """

    def __init__(self, method: str, run_name: str) -> None:
        self.method = method
        self.registry = CollectorRegistry()
        self.tokens_at_start = 0
        self._window = ThroughputWindow()
        self._evaluated = False
        self._history_steps: deque[int] = deque()

        def gauge(name: str, doc: str, initial: float = NAN) -> Gauge:
            metric = Gauge(name, doc, registry=self.registry)
            metric.set(initial)
            return metric

        info = Gauge(
            contract.INFO,
            "Always 1; labels name the run and its training method.",
            ["method", "run_name"],
            registry=self.registry,
        )
        info.labels(method=method, run_name=run_name).set(1)
        self.start_time = gauge(contract.START_TIME_SECONDS, "Unix time training started.")
        self.step = gauge(contract.STEP, "Optimizer steps done (global step).", 0)
        self.total_steps = gauge(contract.TOTAL_STEPS, "Optimizer steps the run will take.", 0)
        self.epoch = gauge(contract.EPOCH, "Epochs done, fractional.", 0)
        self.loss = gauge(contract.LOSS, "Training loss, mean over the last logging window.")
        self.eval_loss = gauge(contract.EVAL_LOSS, "Loss on the evaluation set at the last eval.")
        self.learning_rate = gauge(contract.LEARNING_RATE, "Learning rate at the last logged step.")
        self.grad_norm = gauge(
            contract.GRAD_NORM, "Gradient norm before clipping, last logged step."
        )
        # A counter, so rate() works; it starts at the count a resumed checkpoint holds.
        self.tokens_total = Counter(
            contract.TOKENS_TOTAL,
            "Non-padding input tokens trained on, all ranks together, resumes included.",
            registry=self.registry,
        )
        self._tokens_counted = 0
        self.tokens_per_second = gauge(
            contract.TOKENS_PER_SECOND,
            f"Training tokens per second, all ranks, over the last {THROUGHPUT_WINDOW} logs.",
        )
        self.checkpoint_step = gauge(
            contract.CHECKPOINT_STEP, "Step of the newest checkpoint saved (NaN: none yet)."
        )
        self.perplexity = None
        if method in LANGUAGE_MODELLING_METHODS:
            self.perplexity = gauge(
                contract.PERPLEXITY, "exp(eval loss), or exp(training loss) until an eval ran."
            )
        self.rewards_accuracy = self.rewards_margin = None
        if method == "dpo":
            self.rewards_accuracy = gauge(
                contract.REWARDS_ACCURACY,
                "DPO: share of pairs where the chosen answer out-scores the rejected one "
                "(eval set once evaluated, else training batches).",
            )
            self.rewards_margin = gauge(
                contract.REWARDS_MARGIN,
                "DPO: mean reward of chosen minus rejected (eval set first).",
            )
        self.eval_history = Gauge(
            contract.EVAL_HISTORY,
            "Each evaluation during training: the metric in the label at the step in the "
            f"label (the newest {contract.MAX_EVAL_HISTORY} evaluations).",
            [contract.EVAL_HISTORY_METRIC_LABEL, contract.EVAL_HISTORY_STEP_LABEL],
            registry=self.registry,
        )
        self.heartbeat = gauge(
            contract.HEARTBEAT,
            "Unix time of the training loop's last sign of life (a micro-batch, an "
            "evaluation batch, a save); NaN until training begins.",
        )
        self.gpu_memory_bytes = None
        if _cuda_available():
            self.gpu_memory_bytes = gauge(
                contract.GPU_MEMORY_BYTES,
                "Peak GPU memory allocated by tensors on rank 0's GPU.",
                0,
            )

    def record_evaluation(self, metrics: dict[str, float]) -> None:
        """Serve each `<suite>.<metric>` as `kubetrain_eval_<metric>{suite="<suite>"}`."""
        gauges: dict[str, Gauge] = {}
        for key, value in metrics.items():
            suite, _, metric = key.partition(".")
            name = contract.eval_gauge_name(metric)
            if name not in gauges:
                gauges[name] = Gauge(
                    name,
                    f"Evaluation metric {metric} of the suite in the label (method evaluate).",
                    [contract.EVAL_SUITE_LABEL],
                    registry=self.registry,
                )
            gauges[name].labels(**{contract.EVAL_SUITE_LABEL: suite}).set(
                NAN if value is None else value
            )

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero:
            return
        self.start_time.set(time.time())
        self.heartbeat.set(time.time())
        self.total_steps.set(state.max_steps)
        self.step.set(state.global_step)
        self.epoch.set(state.epoch or 0)
        # A resumed run restores log_history from the checkpoint: replay it so the gauges
        # show where training stands before the first new log event.
        self._evaluated = False
        for entry in state.log_history:
            self._apply(entry, entry.get("step"))
        if state.global_step:
            self.checkpoint_step.set(state.global_step)
        self.tokens_at_start = int(state.num_input_tokens_seen)
        tokens = tokens_seen(args, state, {})
        if tokens is not None:
            self._count_tokens(tokens)
        self._window.reset(time.monotonic(), state.global_step, tokens)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.is_world_process_zero:
            self.step.set(state.global_step)
            self.epoch.set(state.epoch or 0)
            self.heartbeat.set(time.time())

    def on_substep_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # A micro-batch of a step with gradient accumulation: a long step is not a hang.
        if state.is_world_process_zero:
            self.heartbeat.set(time.time())

    def on_prediction_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # An evaluation batch: a long evaluation does not advance the step, nor is it a hang.
        if state.is_world_process_zero:
            self.heartbeat.set(time.time())

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        self._apply(logs, state.global_step)
        self.step.set(state.global_step)
        self.epoch.set(state.epoch or 0)
        tokens = tokens_seen(args, state, logs)
        if tokens is not None:
            self._count_tokens(tokens)
        if "loss" in logs:
            # Only training log events feed the window; eval events carry no new tokens.
            self._window.add(time.monotonic(), state.global_step, tokens)
            rate = self._window.tokens_per_second()
            if rate is not None:
                self.tokens_per_second.set(rate)
        if self.gpu_memory_bytes is not None:
            import torch

            self.gpu_memory_bytes.set(torch.cuda.max_memory_allocated())

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.is_world_process_zero:
            self.checkpoint_step.set(state.global_step)
            self.heartbeat.set(time.time())

    def _count_tokens(self, tokens: int) -> None:
        # A count that went down (TRL's per-process num_tokens) is not taken back.
        if tokens > self._tokens_counted:
            self.tokens_total.inc(tokens - self._tokens_counted)
            self._tokens_counted = tokens

    def _record_eval(self, step: int, logs: dict[str, Any]) -> None:
        """One evaluation into the history gauge, dropping the oldest beyond the bound."""
        if step in self._history_steps:
            self._history_steps.remove(step)  # a final evaluate() at an evaluated step
        self._history_steps.append(step)
        for metric, value in eval_point(self.method, logs).items():
            self.eval_history.labels(
                **{
                    contract.EVAL_HISTORY_METRIC_LABEL: metric,
                    contract.EVAL_HISTORY_STEP_LABEL: str(step),
                }
            ).set(value)
        while len(self._history_steps) > contract.MAX_EVAL_HISTORY:
            old = str(self._history_steps.popleft())
            for metric in contract.intermediate_metrics(self.method):
                with contextlib.suppress(KeyError):
                    self.eval_history.remove(metric, old)

    def _apply(self, logs: dict[str, Any], step: int | None) -> None:
        """Set the gauges one log entry (training, eval or a replayed history entry) carries."""
        if "eval_loss" in logs:
            self._evaluated = True
            if step is not None:
                self._record_eval(int(step), logs)
            self.eval_loss.set(logs["eval_loss"])
            if self.perplexity is not None:
                self.perplexity.set(perplexity(logs["eval_loss"]))
        if "loss" in logs:
            self.loss.set(logs["loss"])
            if self.perplexity is not None and not self._evaluated:
                self.perplexity.set(perplexity(logs["loss"]))
        if "learning_rate" in logs:
            self.learning_rate.set(logs["learning_rate"])
        if "grad_norm" in logs:
            self.grad_norm.set(logs["grad_norm"])
        if self.rewards_accuracy is not None and self.rewards_margin is not None:
            prefix = "eval_" if "eval_loss" in logs else ""
            if prefix or not self._evaluated:
                if f"{prefix}rewards/accuracies" in logs:
                    self.rewards_accuracy.set(logs[f"{prefix}rewards/accuracies"])
                if f"{prefix}rewards/margins" in logs:
                    self.rewards_margin.set(logs[f"{prefix}rewards/margins"])


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _world_rank() -> int:
    # torchrun sets RANK for every worker; a plain `python -m kubetrain_trainer` is rank 0.
    return int(os.environ.get("RANK", "0"))


def serve_metrics(registry: CollectorRegistry, port: int, addr: str = "0.0.0.0") -> Any | None:
    """Serve `registry` at http://addr:port/metrics from a daemon thread, on rank 0 only.

    Returns the server (call `.shutdown()` and `.server_close()` to stop it), or None when
    port is 0 (metrics off), on other ranks, or when the port is taken: metrics are for
    watching a run, so a busy port is a warning, never a reason to lose hours of training.
    """
    if port == 0 or _world_rank() != 0:
        return None
    try:
        server, _thread = start_http_server(port, addr=addr, registry=registry)
    except OSError as e:
        log.warning(
            "cannot serve metrics on %s:%d (%s); training continues without /metrics. "
            "Set metricsPort to a free port, or 0 to turn metrics off.",
            addr,
            port,
            e,
        )
        return None
    log.info("serving Prometheus metrics on %s:%d/metrics", addr, port)
    return server


def _last(log_history: list[dict[str, Any]], key: str) -> float | None:
    for entry in reversed(log_history):
        if key in entry:
            return float(entry[key])
    return None


def summarize_run(
    method: str,
    log_history: list[dict[str, Any]],
    train_output: TrainOutput,
    runtime_s: float,
    tokens_total: int,
    tokens_at_start: int = 0,
) -> dict[str, Any]:
    """The metrics.json summary of a finished run, from the Trainer's log_history.

    train_loss is the last logged training loss (the model as saved); train_loss_mean is
    TrainOutput's mean over this train() call. eval_loss and the DPO rewards come from the
    last evaluation, after any final `trainer.evaluate()` (rewards fall back to the last
    training batches without eval data). tokens_per_second divides the tokens this train()
    call processed (tokens_total - tokens_at_start; pass PrometheusCallback.tokens_at_start
    after a resume) by its train_runtime. runtime_seconds is `runtime_s`, the caller's wall
    clock (model loading included). Values that do not apply to the method are left out;
    values that apply but were never measured (eval_loss without eval data) are null.
    The keys are contract.TrainerMetricsFile's fields.
    """
    train_runtime = train_output.metrics.get("train_runtime")
    last_loss = _last(log_history, "loss")
    train_loss = last_loss if last_loss is not None else train_output.training_loss
    eval_loss = _last(log_history, "eval_loss")
    seconds = train_runtime if train_runtime else runtime_s
    summary = TrainerMetricsFile(
        method=method,
        global_step=train_output.global_step,
        train_loss=train_loss,
        train_loss_mean=train_output.training_loss,
        eval_loss=eval_loss,
        tokens_total=tokens_total,
        tokens_per_second=(tokens_total - tokens_at_start) / seconds if seconds else None,
        runtime_seconds=runtime_s,
        train_runtime_seconds=train_runtime,
    )
    if method in LANGUAGE_MODELLING_METHODS:
        summary.perplexity = perplexity(eval_loss if eval_loss is not None else train_loss)
    if method == "dpo":
        summary.rewards_accuracy = _last_eval_else_training(log_history, "rewards/accuracies")
        summary.rewards_margin = _last_eval_else_training(log_history, "rewards/margins")
    history = eval_history(method, log_history)
    if history:
        summary.eval_history = history
    return summary.model_dump(exclude_unset=True)


def _last_eval_else_training(log_history: list[dict[str, Any]], key: str) -> float | None:
    value = _last(log_history, f"eval_{key}")
    return value if value is not None else _last(log_history, key)


def write_metrics_json(
    output_dir: str | Path, summary: dict[str, Any] | TrainerMetricsFile
) -> Path:
    """Atomically write `<output_dir>/metrics.json` (call on world rank 0 only)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / METRICS_FILE
    if not isinstance(summary, TrainerMetricsFile):
        summary = TrainerMetricsFile.model_validate(summary)
    write_json_atomic(path, summary.model_dump(mode="json", exclude_unset=True))
    return path
