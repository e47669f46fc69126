"""What a person watching a run sees: a rich progress bar on a terminal, plain lines elsewhere.

On a terminal (`kubetrain run` in a shell) world rank 0 draws one rich progress bar for the
run, named after it (a pipeline's stages each leave their own): step/total, epoch, loss,
eval loss, learning rate, tokens/s and ETA. Each evaluation and the end of training also
leave a plain line above the bar, so the scrollback keeps them; log records and warnings
print above it too instead of tearing it. Off a terminal (a pod's log, CI, a pipe)
`ConsoleProgressCallback` prints one plain line per logging step, because a redrawn bar
becomes one ever-growing line in `kubectl logs`. Either way transformers' tqdm bars and its
PrinterCallback (raw log dicts) stay off the screen: `progress_callbacks` decides before any
model loads, `drop_printer_callback` runs once the Trainer is built.
"""

from __future__ import annotations

import atexit
import logging
import sys
import time
from datetime import timedelta
from typing import IO, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from transformers import (
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from kubetrain_trainer.metrics import ThroughputWindow, tokens_seen


def format_duration(seconds: float) -> str:
    """H:MM:SS, the form tqdm and `kubectl get` users read at a glance."""
    return str(timedelta(seconds=round(seconds)))


def format_progress_line(
    logs: dict[str, Any],
    step: int,
    max_steps: int,
    epoch: float | None,
    tokens_per_second: float | None = None,
    eta_seconds: float | None = None,
) -> str:
    """One log line for a log event: training, eval, or the end-of-training summary."""
    # Training log events carry train_runtime too (with token counting on), so the
    # end-of-training summary is the one with train_loss and no loss.
    if "train_loss" in logs and "loss" not in logs:
        parts = [f"done step {step}/{max_steps}"]
        if "train_loss" in logs:
            parts.append(f"train_loss {logs['train_loss']:.3f}")
        if "train_runtime" in logs:
            parts.append(f"runtime {format_duration(logs['train_runtime'])}")
        return " ".join(parts)
    evaluating = "eval_loss" in logs
    prefix = "eval_" if evaluating else ""
    parts = [f"{'eval ' if evaluating else ''}step {step}/{max_steps}"]
    if epoch is not None:
        parts.append(f"epoch {epoch:.2f}")
    if evaluating:
        parts.append(f"eval_loss {logs['eval_loss']:.3f}")
    if "loss" in logs:
        parts.append(f"loss {logs['loss']:.3f}")
    if f"{prefix}rewards/accuracies" in logs:
        parts.append(f"acc {logs[f'{prefix}rewards/accuracies']:.3f}")
    if f"{prefix}rewards/margins" in logs:
        parts.append(f"margin {logs[f'{prefix}rewards/margins']:.3f}")
    if "learning_rate" in logs:
        parts.append(f"lr {logs['learning_rate']:.1e}")
    if not evaluating and tokens_per_second is not None:
        parts.append(f"tok/s {tokens_per_second:.0f}")
    if not evaluating and eta_seconds is not None:
        parts.append(f"eta {format_duration(eta_seconds)}")
    return " ".join(parts)


def format_bar_stats(
    epoch: float | None,
    loss: float | None,
    eval_loss: float | None,
    learning_rate: float | None,
    tokens_per_second: float | None,
    eta_seconds: float | None,
) -> str:
    """The text beside the bar, e.g. `epoch 0.40  loss 2.314  eval 2.401  lr 1.9e-05  5123
    tok/s  eta 0:01:02`; what is not known yet (no eval, no rate) is left out."""
    parts = [f"epoch {epoch or 0:.2f}"]
    if loss is not None:
        parts.append(f"loss {loss:.3f}")
    if eval_loss is not None:
        parts.append(f"eval {eval_loss:.3f}")
    if learning_rate is not None:
        parts.append(f"lr {learning_rate:.1e}")
    if tokens_per_second is not None:
        parts.append(f"{tokens_per_second:.0f} tok/s")
    if eta_seconds is not None:
        parts.append(f"eta {format_duration(eta_seconds)}")
    return "  ".join(parts)


class _MeasuredProgress(TrainerCallback):
    """What both displays share: tokens/s and the ETA over the recent training logs."""

    def __init__(self) -> None:
        self._window = ThroughputWindow()

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._window.reset(time.monotonic(), state.global_step, tokens_seen(args, state, {}))

    def _measure(self, args: TrainingArguments, state: TrainerState, logs: dict[str, Any]) -> None:
        """Feed a log event to the window; only training logs carry new tokens."""
        if "loss" in logs:
            self._window.add(time.monotonic(), state.global_step, tokens_seen(args, state, logs))


class ConsoleProgressCallback(_MeasuredProgress):
    """Prints one plain line per log event on world rank 0, for logs that are not a terminal.

    e.g. `step 20/100 epoch 0.40 loss 2.314 lr 1.9e-05 tok/s 5123 eta 0:01:02`. A tqdm bar
    redraws with carriage returns, which `kubectl logs` shows as one ever-growing line.
    """

    def __init__(self, stream: IO[str] | None = None) -> None:
        super().__init__()
        self._stream = stream

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
        self._measure(args, state, logs)
        line = format_progress_line(
            logs,
            state.global_step,
            state.max_steps,
            state.epoch,
            self._window.tokens_per_second(),
            self._window.eta_seconds(state.global_step, state.max_steps),
        )
        print(line, file=self._stream or sys.stdout, flush=True)


class TerminalProgressCallback(_MeasuredProgress):
    """A rich progress bar for the run on world rank 0, from train begin to train end.

    `console` defaults to the terminal on stderr (where tqdm drew). While the bar is live,
    rich routes writes to stdout and stderr above it; log handlers opened on stderr before
    that are pointed there too for the same time, so a warning never splits the bar.
    """

    def __init__(self, run_name: str, console: Console | None = None) -> None:
        super().__init__()
        self.run_name = run_name
        self.console = console if console is not None else Console(stderr=True)
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._last: dict[str, float | None] = {}
        self._rerouted: list[tuple[logging.StreamHandler, IO[str]]] = []

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero:
            return
        super().on_train_begin(args, state, control, **kwargs)
        # A resumed run restores its log history: show where it stands from the first frame.
        self._last = {"loss": None, "eval_loss": None, "learning_rate": None}
        for entry in state.log_history:
            self._last.update({k: entry[k] for k in self._last if k in entry})
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            console=self.console,
            refresh_per_second=4,
        )
        self._task = self._progress.add_task(
            self.run_name,
            total=state.max_steps,
            completed=state.global_step,
            stats=self._stats(state),
        )
        stderr_before = sys.stderr
        self._progress.start()
        self._reroute_logging(stderr_before, sys.stderr)
        atexit.register(self.stop)  # a crash must not leave the terminal without a cursor

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._update(state)

    def on_prediction_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, description=f"{self.run_name} (evaluating)")

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, description=self.run_name)

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
        self._measure(args, state, logs)
        self._last.update({k: logs[k] for k in self._last if k in logs})
        self._update(state)
        if self._progress is not None:
            self._progress.refresh()  # a line printed above repeats the bar's last frame
        # Evaluations and the summary stay in the scrollback; training logs live in the bar.
        if "eval_loss" in logs or "train_loss" in logs:
            self.console.print(
                format_progress_line(logs, state.global_step, state.max_steps, state.epoch),
                highlight=False,
            )

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """Leave the bar's last frame on screen and give stderr back (idempotent)."""
        if self._progress is None:
            return
        self._progress.stop()
        self._progress = None
        for handler, stream in self._rerouted:
            handler.setStream(stream)
        self._rerouted.clear()

    def _stats(self, state: TrainerState) -> str:
        return format_bar_stats(
            state.epoch,
            self._last.get("loss"),
            self._last.get("eval_loss"),
            self._last.get("learning_rate"),
            self._window.tokens_per_second(),
            self._window.eta_seconds(state.global_step, state.max_steps),
        )

    def _update(self, state: TrainerState) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=state.global_step, stats=self._stats(state))

    def _reroute_logging(self, stderr: IO[str], proxy: IO[str]) -> None:
        if proxy is stderr:
            return  # rich redirects nothing when its console is not a terminal
        loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
        for logger in loggers:
            for handler in getattr(logger, "handlers", ()):
                if isinstance(handler, logging.StreamHandler) and handler.stream is stderr:
                    handler.setStream(proxy)
                    self._rerouted.append((handler, stderr))


def progress_callbacks(is_tty: bool, run_name: str) -> list[TrainerCallback]:
    """The progress policy: the callbacks that show progress; tqdm is always off.

    On a terminal a rich bar (TerminalProgressCallback), elsewhere plain lines. This also
    switches off transformers' own bars ("Writing model shards" at every checkpoint, hub
    downloads), which would tear the bar on a terminal and litter a pod log with
    carriage-return redraws; off a terminal datasets' map bars go too. With tqdm off the
    Trainer adds its PrinterCallback, which prints every log dict: call
    `drop_printer_callback(trainer)` after building the trainer.
    """
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    if is_tty:
        return [TerminalProgressCallback(run_name)]
    import datasets

    datasets.disable_progress_bars()
    return [ConsoleProgressCallback()]


def drop_printer_callback(trainer: Trainer) -> None:
    """Remove the Trainer's PrinterCallback (raw log dicts) when one of ours shows progress."""
    ours = (ConsoleProgressCallback, TerminalProgressCallback)
    if any(isinstance(cb, ours) for cb in trainer.callback_handler.callbacks):
        trainer.remove_callback(PrinterCallback)
