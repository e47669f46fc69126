"""Run a Sweep on this machine: trials as trainer processes, the operator's plan deciding.

`kubetrain.sweeps.plan_sweep` decides here too. Each pass it is shown the trials as their
TrainingRuns would read on a cluster: the parameters asked, the evaluation history each
trainer serves on its own metrics port (the same `/metrics` the operator reads, so the
pruner sees the same history), and how each process ended (exit 0 with metrics.json:
Succeeded; anything else: Failed). It answers with the trials to start (up to `parallelism`
at once, each its own process with its log in `<trial output>/trial.log`) and the trials to
prune, which get SIGTERM: the trainer saves a checkpoint and stops, the way a suspended run
stops on a cluster. Ctrl-C, SIGTERM or SIGHUP to the runner stop every running trial the same
way (runner.ForwardSignals); the sweep then ends where it stands, with its report, and exits
128 + the signal. A live table shows every trial while the sweep runs; at the end the
sweep's report (kubetrain_trainer.report.write_sweep_report) lands in the template's
output folder beside the trials. A trial's output is cleared before it starts, so a sweep
run again searches again rather than resuming old trials.
"""

from __future__ import annotations

import datetime
import json
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from kubetrain.api import (
    FINISHED_PHASES,
    PHASE_FAILED,
    PHASE_RUNNING,
    PHASE_SUCCEEDED,
    PHASE_SUSPENDED,
    Sweep,
    TrainingRun,
    to_trainer_config,
)
from kubetrain.api.sweep import ANNOTATION_PRUNED_AT_STEP, LABEL_TRIAL, TrialStatus
from kubetrain.local.runner import (
    CONFIG_FILE,
    ForwardSignals,
    clear_previous_run,
    clearable_output_dir,
    finished_metrics,
    free_port,
    read_local_metrics,
    resolve_local_uri,
    trainer_command,
)
from kubetrain.status import eval_history_status, parse_trainer_metrics
from kubetrain.sweeps import parameter_importances, plan_sweep
from kubetrain_trainer.config import ConfigError, dump_trainer_config
from kubetrain_trainer.contract import output_metrics
from kubetrain_trainer.report import SweepTrial, write_sweep_report

TRIAL_LOG = "trial.log"
POLL_SECONDS = 1.0  # how often the runner looks at its trials (a loop's pace, not a wait)


@dataclass
class LocalTrial:
    """One trial's process and what it has shown so far."""

    run: TrainingRun
    output_dir: Path
    metrics_port: int
    process: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None
    eval_history: list[dict[str, Any]] = field(default_factory=list)
    pruned_at_step: int | None = None
    exit_code: int | None = None

    @property
    def number(self) -> int:
        return int(self.run.metadata.labels[LABEL_TRIAL])

    def as_run(self) -> dict[str, Any]:
        """The trial as its TrainingRun would read on a cluster (what plan_sweep observes)."""
        body = self.run.model_dump(mode="json", by_alias=True, exclude_none=True)
        if self.pruned_at_step is not None:
            body["metadata"]["annotations"][ANNOTATION_PRUNED_AT_STEP] = str(self.pruned_at_step)
        status: dict[str, Any] = {"phase": PHASE_RUNNING, "evalHistory": self.eval_history}
        if self.exit_code is not None:
            summary = finished_metrics(self.output_dir) if self.exit_code == 0 else None
            if summary is not None:
                # The finished trainer's own record holds the last evaluation too.
                status["evalHistory"] = [
                    {"step": int(p["step"]), "metrics": {k: v for k, v in p.items() if k != "step"}}
                    for p in summary.get("eval_history") or []
                ] or self.eval_history
                status["phase"] = PHASE_SUCCEEDED
                status["outputs"] = {
                    "modelUri": str(self.output_dir),
                    "metrics": output_metrics(summary),
                }
            elif self.pruned_at_step is not None:
                status["phase"] = PHASE_SUSPENDED
            else:
                status["phase"] = PHASE_FAILED
                status["conditions"] = [
                    {"type": "Ready", "message": f"exit {self.exit_code}; see {self.log_path}"}
                ]
        body["status"] = status
        return body

    @property
    def log_path(self) -> Path:
        return self.output_dir / TRIAL_LOG


@dataclass
class LocalSweepRun:
    """What a local sweep did."""

    name: str
    phase: str
    message: str
    trials: list[TrialStatus]
    best: TrialStatus | None
    report: Path | None = None
    interrupted_by: int | None = None  # the signal that stopped the sweep here

    @property
    def exit_code(self) -> int:
        if self.interrupted_by is not None:
            return 128 + self.interrupted_by
        return 0 if self.phase == PHASE_SUCCEEDED else 1


def start_trial(run: TrainingRun) -> LocalTrial:
    """Write the trial's TrainerConfig and start its trainer, its output going to trial.log."""
    try:
        cfg = to_trainer_config(run.metadata.name, run.spec, resolve_local_uri)
    except ValueError as e:
        raise ConfigError(f"TrainingRun {run.metadata.name}: {e}") from e
    output_dir = clearable_output_dir(cfg.output_dir, f"trial {run.metadata.name}")
    trial = LocalTrial(run=run, output_dir=output_dir, metrics_port=free_port())
    cfg.metrics_port = trial.metrics_port
    trial.output_dir.mkdir(parents=True, exist_ok=True)
    clear_previous_run(trial.output_dir)
    config_path = trial.output_dir / CONFIG_FILE
    config_path.write_text(dump_trainer_config(cfg))
    processes = run.spec.resources.nodes * run.spec.resources.proc_per_node
    trial.log = trial.log_path.open("wb")
    # A process group of its own: a terminal's Ctrl-C reaches the runner alone, which stops
    # every trial with SIGTERM (runner.ForwardSignals) so each saves a checkpoint.
    trial.process = subprocess.Popen(
        trainer_command(config_path, processes, run.spec.training.sharding != "none"),
        stdout=trial.log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return trial


def poll_trial(trial: LocalTrial, read_metrics: Callable[[int], str | None]) -> None:
    """Read the trial's evaluation history from its metrics port; note its exit."""
    if trial.exit_code is not None or trial.process is None:
        return
    text = read_metrics(trial.metrics_port)
    if text:
        try:
            history = eval_history_status(parse_trainer_metrics(text))
        except ValueError:
            history = []
        if history:
            trial.eval_history = history
    code = trial.process.poll()
    if code is not None:
        trial.exit_code = code
        if trial.log is not None:
            trial.log.close()


def run_sweep_locally(
    sweep: Sweep,
    *,
    console: Console | None = None,
    read_metrics: Callable[[int], str | None] = read_local_metrics,
) -> LocalSweepRun:
    """Run the sweep's trials here until the plan says it is done; returns the outcome."""
    console = console or Console()
    # spec.suspend holds a sweep back on a cluster; `kubetrain run` is asked to run it now.
    sweep = sweep.model_copy(update={"spec": sweep.spec.model_copy(update={"suspend": False})})
    trials: dict[int, LocalTrial] = {}
    plan = plan_sweep(sweep, {}, now=_now())  # what stands if a signal comes before a trial
    with ForwardSignals() as signals, Live(console=console, auto_refresh=False) as live:
        while True:
            for trial in trials.values():
                poll_trial(trial, read_metrics)
            if signals.first is not None:
                # Interrupted: the trials were sent SIGTERM; nothing new starts. Once every
                # trial has saved its checkpoint and exited, the sweep stops where it stands.
                if all(t.exit_code is not None for t in trials.values()):
                    break
                time.sleep(POLL_SECONDS)
                continue
            observed = {n: t.as_run() for n, t in trials.items()}
            plan = plan_sweep(sweep, observed, now=_now())
            sweep.status = plan.status
            for pruned in plan.prune:
                stop_trial(trials[_number(pruned.name)], pruned.step)
            for run in plan.create:
                trial = start_trial(run)
                signals.add(trial.process)
                trials[trial.number] = trial
            live.update(trials_table(sweep, plan.status.trials), refresh=True)
            if plan.status.phase in FINISHED_PHASES:
                break
            time.sleep(POLL_SECONDS)
    console.print()
    status = plan.status
    ready = next((c for c in status.conditions if c.type == "Ready"), None)
    best = next(
        (t for t in status.trials if status.best_trial and t.name == status.best_trial.name), None
    )
    result = LocalSweepRun(
        name=sweep.metadata.name,
        phase=status.phase or "",
        message=ready.message if ready else "",
        trials=status.trials,
        best=best,
        interrupted_by=signals.first,
    )
    result.report = write_report(sweep, status.trials, {t.number: t for t in trials.values()})
    return result


def stop_trial(trial: LocalTrial, step: int) -> None:
    """Prune: SIGTERM, so the trainer saves a checkpoint and exits (75), as on a cluster."""
    trial.pruned_at_step = step
    if trial.process is not None and trial.process.poll() is None:
        trial.process.send_signal(signal.SIGTERM)


def sweep_folder(sweep: Sweep) -> Path:
    """Where the sweep's report goes: the template's output, the trials' parent folder."""
    return clearable_output_dir(sweep.spec.template.output, "a local sweep's every trial")


def write_report(
    sweep: Sweep, trials: list[TrialStatus], local: dict[int, LocalTrial]
) -> Path | None:
    """The sweep's report.html; failing to write it is a warning, never a failed sweep."""
    shown = [
        SweepTrial(
            name=t.name,
            number=t.number,
            state=t.state,
            parameters=dict(t.parameters),
            value=t.value,
            intermediate=[(p.step, p.value) for p in t.intermediate],
            pruned_at_step=t.pruned_at_step,
            output_dir=local[t.number].output_dir if t.number in local else None,
        )
        for t in trials
    ]
    importances = parameter_importances(sweep.spec, sweep.metadata.name, trials)
    best = sweep.status.best_trial.name if sweep.status and sweep.status.best_trial else None
    try:
        return write_sweep_report(
            sweep_folder(sweep),
            sweep.metadata.name,
            sweep.spec.objective.metric,
            sweep.spec.objective.direction,
            shown,
            importances,
            best,
        )
    except Exception as e:
        Console(stderr=True).print(f"warning: the sweep's report could not be written: {e!r}")
        return None


def trials_table(sweep: Sweep, trials: list[TrialStatus]) -> Table:
    """The live table: trial, state, parameters, latest intermediate objective, value."""
    objective = sweep.spec.objective.metric
    direction = sweep.spec.objective.direction
    table = Table(title=f"Sweep {sweep.metadata.name}: {objective} ({direction})")
    table.add_column("TRIAL", no_wrap=True)
    table.add_column("STATE", no_wrap=True)
    for parameter in sweep.spec.parameters:
        # The field's own name: a terminal's width goes to the values, not the paths.
        table.add_column(parameter.path.rsplit(".", 1)[-1], justify="right", no_wrap=True)
    table.add_column("STEP", justify="right")
    table.add_column("LATEST", justify="right")
    table.add_column(objective, justify="right")
    best = sweep.status.best_trial.name if sweep.status and sweep.status.best_trial else None
    for t in trials:
        latest = t.intermediate[-1] if t.intermediate else None
        state = t.state + (f" @{t.pruned_at_step}" if t.pruned_at_step is not None else "")
        table.add_row(
            t.name + ("*" if t.name == best else ""),
            state,
            *(_cell(t.parameters.get(p.path)) for p in sweep.spec.parameters),
            str(latest.step) if latest else "-",
            _cell(latest.value) if latest else "-",
            _cell(t.value),
        )
    return table


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value) if not isinstance(value, str) else value


def _number(trial_name: str) -> int:
    return int(trial_name.rsplit("-", 1)[1])


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
