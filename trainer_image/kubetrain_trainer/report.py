"""The report a person looks at: report.html and PNG plots, made from an output dir's files.

A finished run leaves metrics.json (contract.TrainerMetricsFile) and its final log history
(contract.TRAINER_STATE_FILE, transformers' trainer_state.json). `write_run_report` turns
them into a summary table and plots over optimizer steps (train and eval loss, learning
rate, tokens/s, DPO rewards accuracy and margin) plus a bar chart of the evaluation suite
scores (`<suite>.<metric>` keys), and writes one self-contained report.html, the plots
embedded as data URIs so it opens anywhere with no network, and the same plots as PNG files
in contract.REPORT_PLOTS_DIR. A part without data is left out: an evaluate run has scores
and no history, so its report is the table and the bar chart. `write_pipeline_report` puts
a pipeline's stages side by side, each linked to its own report; `write_sweep_report` is a
hyperparameter sweep's page: a table of its trials (parameters, objective, where pruned,
the best marked, each linked to its own report), the objective per trial with the best so
far, the parameters' importances, a parallel-coordinates plot of the complete trials and
the objective each trial reported while it trained. `ensure_report` is what
`kubetrain report DIR` calls. What each page shows is planned by pure functions (the
`plan_*` ones, normalisation included) and only drawn by `render_png`. Everything
user-named (run, stage, trial, parameter and suite names, paths) is HTML-escaped. The
operator package imports this module, so it imports no torch and no optuna (a sweep's
trials arrive as SweepTrial), and matplotlib only when a plot is drawn (the operator image
has none).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pydantic import ValidationError

from kubetrain_trainer.contract import (
    METRICS_FILE,
    PIPELINE_STAGES_FILE,
    REPORT_FILE,
    REPORT_PLOTS_DIR,
    SWEEP_TRIALS_FILE,
    TRAINER_STATE_FILE,
    TrainerMetricsFile,
    checkpoint_dir_step,
)

LOSS_PLOT = "loss.png"  # a pipeline's report shows each stage's loss plot beside the others

# The metrics.json fields a summary shows, in reading order, with the words a person uses.
SUMMARY_FIELDS: tuple[tuple[str, str], ...] = (
    ("method", "method"),
    ("global_step", "steps"),
    ("train_loss", "final train loss"),
    ("train_loss_mean", "mean train loss"),
    ("eval_loss", "eval loss"),
    ("perplexity", "perplexity"),
    ("rewards_accuracy", "DPO rewards accuracy"),
    ("rewards_margin", "DPO rewards margin"),
    ("tokens_total", "tokens trained on"),
    ("tokens_per_second", "tokens/s"),
    ("per_device_train_batch_size", "batch per device"),
    ("gradient_accumulation_steps", "gradient accumulation"),
    ("train_runtime_seconds", "training time"),
    ("runtime_seconds", "wall clock"),
    ("merged_dir", "merged model"),
    ("train_rows", "training rows"),
    ("eval_rows", "evaluation rows"),
    ("train_rows_dropped", "training rows dropped by truncation"),
    ("eval_rows_dropped", "evaluation rows dropped by truncation"),
    ("data_fingerprint", "data fingerprint"),
)
DURATION_FIELDS = frozenset({"train_runtime_seconds", "runtime_seconds"})


class ReportError(Exception):
    """No report can be made: nothing finished in the folder, or matplotlib is missing."""


# -- What the report shows (pure functions of the files' contents) ----------------------------

Points = list[tuple[int, float]]  # (optimizer step, value)


@dataclass(frozen=True)
class LinePlot:
    """Values over optimizer steps, one line per legend label; those in `dashed` are dashed."""

    file_name: str
    title: str
    y_label: str
    lines: dict[str, Points]
    dashed: frozenset[str] = frozenset()  # a sweep's pruned trials


@dataclass(frozen=True)
class BarPlot:
    """One horizontal bar per label: evaluation scores (`<suite>.<metric>`), importances."""

    file_name: str
    title: str
    bars: dict[str, float]


Plot = LinePlot | BarPlot


@dataclass(frozen=True)
class Row:
    """One line of a summary table; `key` is the metrics.json key its cells show."""

    key: str
    label: str
    cells: list[str]


@dataclass(frozen=True)
class SummaryTable:
    """What both report.html and `kubetrain report` print: a header and rows of text."""

    columns: list[str]
    rows: list[Row]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def curve(log_history: list[dict[str, Any]], key: str) -> Points:
    """(step, value) for every log entry that holds a finite `key`, in logged order.

    Training log events carry `loss`, `learning_rate` and DPO's `rewards/*`; evaluation
    events carry the same names prefixed `eval_`, so the key alone says which is meant.
    """
    return [
        (int(entry["step"]), float(entry[key]))
        for entry in log_history
        if "step" in entry and _is_number(entry.get(key))
    ]


def tokens_per_second_curve(log_history: list[dict[str, Any]]) -> Points:
    """Training tokens/s between consecutive logging steps.

    With token counting on, transformers stamps every training log event with the tokens
    seen so far (`num_input_tokens_seen`) and the seconds since this train() call began
    (`train_runtime`); the difference of two events is the speed over that interval, which
    shows a slowdown that the run's average (`train_tokens_per_second`) would hide. The
    first event of a train() call (the run's, or a resume's, whose clock restarts at 0) has
    no interval before it and uses that average.
    """
    points: Points = []
    previous: tuple[float, float] | None = None
    for entry in log_history:
        tokens, seconds = entry.get("num_input_tokens_seen"), entry.get("train_runtime")
        if "loss" not in entry or "step" not in entry:
            continue  # evaluation events and the end-of-training summary
        if not (_is_number(tokens) and _is_number(seconds)):
            continue
        if previous is not None and seconds > previous[1] and tokens >= previous[0]:
            rate = (tokens - previous[0]) / (seconds - previous[1])
        else:
            rate = entry.get("train_tokens_per_second")
        previous = (tokens, seconds)
        if _is_number(rate):
            points.append((int(entry["step"]), float(rate)))
    return points


def evaluation_scores(metrics: TrainerMetricsFile) -> dict[str, float | None]:
    """The `<suite>.<metric>` scores in metrics.json, sorted so each suite's stay together.

    A score that was not finite is None (metrics.json stores it as null).
    """
    extra = metrics.model_extra or {}
    return {
        key: float(value) if _is_number(value) else None for key, value in sorted(extra.items())
    }


def plan_plots(log_history: list[dict[str, Any]], metrics: TrainerMetricsFile) -> list[Plot]:
    """The plots a run's data can fill, in the order the report shows them."""

    def lines(**by_label: Points) -> dict[str, Points]:
        return {label.replace("_", " "): points for label, points in by_label.items() if points}

    candidates: list[Plot] = [
        LinePlot(
            LOSS_PLOT,
            "Loss",
            "loss",
            lines(train_loss=curve(log_history, "loss"), eval_loss=curve(log_history, "eval_loss")),
        ),
        LinePlot(
            "learning_rate.png",
            "Learning rate",
            "learning rate",
            lines(learning_rate=curve(log_history, "learning_rate")),
        ),
        LinePlot(
            "tokens_per_second.png",
            "Training throughput",
            "tokens/s",
            lines(tokens_per_second=tokens_per_second_curve(log_history)),
        ),
        LinePlot(
            "rewards_accuracy.png",
            "DPO rewards accuracy (chosen out-scores rejected)",
            "accuracy",
            lines(
                train=curve(log_history, "rewards/accuracies"),
                eval=curve(log_history, "eval_rewards/accuracies"),
            ),
        ),
        LinePlot(
            "rewards_margin.png",
            "DPO rewards margin (chosen minus rejected)",
            "margin",
            lines(
                train=curve(log_history, "rewards/margins"),
                eval=curve(log_history, "eval_rewards/margins"),
            ),
        ),
        BarPlot(
            "eval_scores.png",
            "Evaluation suite scores",
            {k: v for k, v in evaluation_scores(metrics).items() if v is not None},
        ),
    ]
    return [p for p in candidates if (p.lines if isinstance(p, LinePlot) else p.bars)]


def format_metric(key: str, value: Any) -> str:
    """A metrics.json value as the summary shows it: 4 significant digits, H:MM:SS, 1,234."""
    if value is None:
        return "-"
    if key in DURATION_FIELDS and _is_number(value):
        return str(timedelta(seconds=round(value)))
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if key == "tokens_per_second" else f"{value:.4g}"
    return str(value)


def _shown_fields(metrics: TrainerMetricsFile) -> list[tuple[str, str]]:
    # Fields the file holds, null ones included: absent means "does not apply".
    return [(key, label) for key, label in SUMMARY_FIELDS if key in metrics.model_fields_set]


def run_summary(metrics: TrainerMetricsFile) -> SummaryTable:
    """metric | value, for the fields metrics.json holds and then its evaluation scores."""
    rows = [
        Row(key, label, [format_metric(key, getattr(metrics, key))])
        for key, label in _shown_fields(metrics)
    ]
    rows += [
        Row(key, key, [format_metric(key, v)]) for key, v in evaluation_scores(metrics).items()
    ]
    return SummaryTable(["metric", "value"], rows)


@dataclass(frozen=True)
class PipelineStage:
    """One stage as a pipeline's report shows it."""

    name: str
    method: str
    status: str  # how this pipeline run ended for it (trained, reused, failed, not run)
    output_dir: Path
    finished: bool  # its output's metrics.json and report belong to this pipeline run
    note: str = ""


def pipeline_summary(
    stages: list[PipelineStage], metrics: dict[str, TrainerMetricsFile | None]
) -> SummaryTable:
    """The stages side by side: one column per stage, one row per metric any stage has."""
    found = [m for m in metrics.values() if m is not None]
    rows = [
        Row("status", "status", [f"{s.status} ({s.note})" if s.note else s.status for s in stages]),
        Row("method", "method", [s.method for s in stages]),
    ]
    for key, label in SUMMARY_FIELDS:
        if key != "method" and any(key in m.model_fields_set for m in found):
            cells = [_stage_cell(metrics.get(s.name), key) for s in stages]
            rows.append(Row(key, label, cells))
    score_keys = sorted({key for m in found for key in evaluation_scores(m)})
    for key in score_keys:
        cells = [_stage_cell(metrics.get(s.name), key, score=True) for s in stages]
        rows.append(Row(key, key, cells))
    return SummaryTable(["", *(s.name for s in stages)], rows)


def _stage_cell(metrics: TrainerMetricsFile | None, key: str, score: bool = False) -> str:
    # Empty where the value does not apply to the stage; "-" where it applies but is null.
    if metrics is None:
        return ""
    if score:
        scores = evaluation_scores(metrics)
        return format_metric(key, scores[key]) if key in scores else ""
    return format_metric(key, getattr(metrics, key)) if key in metrics.model_fields_set else ""


# -- A sweep's page (pure functions of its trials) ---------------------------------------------

COMPLETE, PRUNED = "Complete", "Pruned"
DIRECTIONS = ("minimize", "maximize")
SWEEP_PLOT_PREFIX = "sweep-"  # a sweep folder's own plots, told apart from anything else there
SWEEP_OBJECTIVE_PLOT = f"{SWEEP_PLOT_PREFIX}objective.png"
SWEEP_IMPORTANCES_PLOT = f"{SWEEP_PLOT_PREFIX}importances.png"
SWEEP_PARALLEL_PLOT = f"{SWEEP_PLOT_PREFIX}parallel-coordinates.png"
SWEEP_INTERMEDIATE_PLOT = f"{SWEEP_PLOT_PREFIX}intermediate.png"
AXIS_TICKS = 5  # a parallel axis with more distinct values than this gets evenly spaced ticks
LOG_AXIS_DECADES = 2  # a positive parameter spanning more than this many decades: log axis

ParameterValue = float | int | str


@dataclass(frozen=True)
class SweepTrial:
    """One trial of a sweep as the report shows it."""

    name: str  # e.g. "lr-sweep-3"
    number: int  # 0, 1, 2...
    state: str  # "Complete", "Pruned", "Failed", "Running"
    parameters: dict[str, ParameterValue]  # field path -> value, e.g. {"lora.r": 8}
    value: float | None  # the objective's final value (Complete only)
    intermediate: list[tuple[int, float]]  # (step, objective value) reported while training
    pruned_at_step: int | None = None
    output_dir: Path | None = None  # the trial's output folder; its own report gets linked


@dataclass(frozen=True)
class ObjectivePlot:
    """A sweep's objective per trial number: complete and pruned trials, the best so far."""

    file_name: str
    title: str
    y_label: str
    complete: Points  # (trial number, final value)
    pruned: Points  # (trial number, the last value it reported)
    best: tuple[int, float] | None  # the best trial's point, drawn highlighted
    best_so_far: Points  # (trial number, best final value up to it), drawn as a dashed step


@dataclass(frozen=True)
class ParallelAxis:
    """One vertical axis of a parallel-coordinates plot, its values placed in [0, 1]."""

    label: str
    scale: str  # "linear", "log" or "categorical"
    ticks: list[tuple[float, str]]  # (position in [0, 1], the real value shown there)


@dataclass(frozen=True)
class ParallelLine:
    """One complete trial across the axes, coloured by its objective value."""

    trial: str
    positions: list[float | None]  # one per axis; None where the trial lacks the parameter
    value: float


@dataclass(frozen=True)
class ParallelCoordinatesPlot:
    """One axis per parameter and a last one for the objective; one line per complete trial."""

    file_name: str
    title: str
    color_label: str  # the objective, which the colorbar shows
    direction: str  # "minimize" or "maximize": the better end of the colour scale
    axes: list[ParallelAxis]
    lines: list[ParallelLine]
    best: str | None = None  # this trial's line is drawn thicker, on top


AnyPlot = Plot | ObjectivePlot | ParallelCoordinatesPlot  # everything render_png draws


def _check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"a sweep's direction is one of {DIRECTIONS}, not {direction!r}")


def _has_state(trial: SweepTrial, state: str) -> bool:
    return trial.state.lower() == state.lower()


def complete_trials(trials: list[SweepTrial]) -> list[SweepTrial]:
    """The trials that finished with a finite objective value, by trial number."""
    return sorted(
        (t for t in trials if _has_state(t, COMPLETE) and _is_number(t.value)),
        key=lambda t: t.number,
    )


def parameter_paths(trials: list[SweepTrial]) -> list[str]:
    """Every parameter any trial has, in the order the trials (by number) first name them."""
    paths: dict[str, None] = {}
    for trial in sorted(trials, key=lambda t: t.number):
        paths.update(dict.fromkeys(trial.parameters))
    return list(paths)


def _last_reported(trial: SweepTrial) -> tuple[int, float] | None:
    points = [(step, value) for step, value in trial.intermediate if _is_number(value)]
    return max(points, key=lambda p: p[0]) if points else None


def plan_objective_plot(
    trials: list[SweepTrial], objective: str, direction: str, best: str | None
) -> ObjectivePlot | None:
    """The objective per trial: complete trials' final values, pruned trials' last reported
    ones, the best trial highlighted and the best final value so far; None without any."""
    _check_direction(direction)
    done = complete_trials(trials)
    complete = [(t.number, float(t.value)) for t in done if t.value is not None]
    pruned = []
    for trial in sorted(trials, key=lambda t: t.number):
        last = _last_reported(trial) if _has_state(trial, PRUNED) else None
        if last is not None:
            pruned.append((trial.number, last[1]))
    if not complete and not pruned:
        return None
    pick = min if direction == "minimize" else max
    best_so_far: Points = []
    for number, value in complete:
        best_so_far.append((number, pick(value, best_so_far[-1][1]) if best_so_far else value))
    best_point = next(((t.number, float(t.value)) for t in done if t.name == best), None)
    return ObjectivePlot(
        SWEEP_OBJECTIVE_PLOT,
        f"{objective} per trial ({direction})",
        objective,
        complete,
        pruned,
        best_point,
        best_so_far,
    )


def plan_importance_plot(importances: dict[str, float]) -> BarPlot | None:
    """The parameters' importances, most important first; None without any."""
    bars = {k: float(v) for k, v in importances.items() if _is_number(v)}
    if not bars:
        return None
    ranked = dict(sorted(bars.items(), key=lambda item: (-item[1], item[0])))
    return BarPlot(SWEEP_IMPORTANCES_PLOT, "Parameter importances", ranked)


def plan_intermediate_plot(trials: list[SweepTrial], objective: str) -> LinePlot | None:
    """What each trial reported while it trained, by step; pruned trials dashed."""
    lines: dict[str, Points] = {}
    dashed = set()
    for trial in sorted(trials, key=lambda t: t.number):
        points = sorted((int(s), float(v)) for s, v in trial.intermediate if _is_number(v))
        if points:
            lines[trial.name] = points
            if _has_state(trial, PRUNED):
                dashed.add(trial.name)
    if not lines:
        return None
    title = f"{objective} while training" + (" (pruned trials dashed)" if dashed else "")
    return LinePlot(SWEEP_INTERMEDIATE_PLOT, title, objective, lines, frozenset(dashed))


def _tick_text(value: float) -> str:
    # 8, 1024, 0.0003, 1e-05: whole numbers as they are, others to 4 significant digits.
    if value.is_integer() and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.4g}"


def parallel_axis(
    label: str, values: list[ParameterValue | None]
) -> tuple[ParallelAxis, list[float | None]]:
    """An axis for `values` and each value's position on it, in [0, 1] (None stays None).

    Numbers are placed linearly between their smallest and largest, or by their logarithm
    when all are > 0 and span more than LOG_AXIS_DECADES decades (learning rates); a single
    value sits in the middle. Anything else (text, true/false, numbers mixed with text) is a
    category: the distinct values sorted, evenly spaced, each its own tick. The ticks show
    real values: each distinct number where there are at most AXIS_TICKS, else AXIS_TICKS
    evenly spaced positions labelled with the value found there.
    """
    present = [v for v in values if v is not None]
    if not present or not all(_is_number(v) for v in present):
        categories = sorted({format_metric("", v) for v in present})
        last = max(len(categories) - 1, 1)
        spots = {c: i / last if len(categories) > 1 else 0.5 for i, c in enumerate(categories)}
        positions = [None if v is None else spots[format_metric("", v)] for v in values]
        return ParallelAxis(label, "categorical", [(p, c) for c, p in spots.items()]), positions
    numbers = [float(v) for v in present]
    low, high = min(numbers), max(numbers)
    log = low > 0 and math.log10(high) - math.log10(low) > LOG_AXIS_DECADES + 1e-9
    to_axis = math.log10 if log else (lambda x: x)
    start, span = to_axis(low), to_axis(high) - to_axis(low)

    def place(x: float) -> float:
        return (to_axis(x) - start) / span if span else 0.5

    def real(position: float) -> float:
        x = start + position * span
        return 10**x if log else x

    distinct = sorted(set(numbers))
    if len(distinct) <= AXIS_TICKS or not span:
        ticks = [(place(x), _tick_text(x)) for x in distinct]
    else:
        spots = [i / (AXIS_TICKS - 1) for i in range(AXIS_TICKS)]
        ticks = [(p, _tick_text(real(p))) for p in spots]
    positions = [None if v is None else place(float(v)) for v in values]
    return ParallelAxis(label, "log" if log else "linear", ticks), positions


def plan_parallel_coordinates(
    trials: list[SweepTrial], objective: str, direction: str, best: str | None
) -> ParallelCoordinatesPlot | None:
    """The complete trials across one axis per parameter and one for the objective; None
    without a complete trial or without parameters."""
    _check_direction(direction)
    done = complete_trials(trials)
    paths = parameter_paths(done)
    if not done or not paths:
        return None
    columns = [parallel_axis(path, [t.parameters.get(path) for t in done]) for path in paths]
    columns.append(parallel_axis(objective, [t.value for t in done]))
    lines = [
        ParallelLine(trial.name, [positions[i] for _, positions in columns], float(trial.value))
        for i, trial in enumerate(done)
        if trial.value is not None
    ]
    return ParallelCoordinatesPlot(
        SWEEP_PARALLEL_PLOT,
        f"Parameters of the complete trials, coloured by {objective}",
        objective,
        direction,
        [axis for axis, _ in columns],
        lines,
        best,
    )


def plan_sweep_plots(
    trials: list[SweepTrial],
    objective: str,
    direction: str,
    importances: dict[str, float],
    best: str | None,
) -> list[AnyPlot]:
    """The plots a sweep's trials can fill, in the order its page shows them."""
    candidates: list[AnyPlot | None] = [
        plan_objective_plot(trials, objective, direction, best),
        plan_importance_plot(importances),
        plan_parallel_coordinates(trials, objective, direction, best),
        plan_intermediate_plot(trials, objective),
    ]
    return [p for p in candidates if p is not None]


def sweep_notes(trials: list[SweepTrial], importances: dict[str, float]) -> list[str]:
    """Why a part of a sweep's page is missing."""
    if not trials:
        return ["This sweep has no trials yet."]
    done = len(complete_trials(trials))
    notes = []
    if not done:
        notes.append(
            "No trial has completed yet, so there is no parallel-coordinates plot and no best."
        )
    if plan_importance_plot(importances) is None:
        if done < 2:
            notes.append(
                "No parameter importances: they are computed from at least 2 complete trials "
                f"and this sweep has {done}, so there is no importance plot."
            )
        else:
            notes.append(
                "No parameter importances were computed for this sweep, so there is no "
                "importance plot."
            )
    return notes


@dataclass(frozen=True)
class TrialRow:
    """One trial's line of a sweep's table; `report` links its own report (relative)."""

    name: str
    cells: list[str]  # one per TrialTable column
    best: bool = False
    report: str | None = None


@dataclass(frozen=True)
class TrialTable:
    """A sweep's trials: the trial's name, then (key, header) columns of text."""

    columns: list[tuple[str, str]]
    rows: list[TrialRow]


def sweep_table(
    trials: list[SweepTrial],
    objective: str,
    best: str | None,
    reports: dict[str, str] | None = None,
) -> TrialTable:
    """number, state, each parameter, the objective and where pruned, one row per trial by
    number; `reports` maps a trial's name to the link of its own report, where it has one."""
    links = reports or {}
    paths = parameter_paths(trials)
    columns = [("number", "#"), ("state", "state")]
    columns += [(path, path) for path in paths]
    columns += [("value", objective), ("pruned_at_step", "pruned at step")]
    rows = []
    for trial in sorted(trials, key=lambda t: t.number):
        cells = [str(trial.number), trial.state]
        cells += [format_metric("", trial.parameters.get(path)) for path in paths]
        pruned_at = trial.pruned_at_step
        cells += [format_metric("", trial.value), "" if pruned_at is None else str(pruned_at)]
        rows.append(TrialRow(trial.name, cells, trial.name == best, links.get(trial.name)))
    return TrialTable(columns, rows)


def sweep_overview(
    objective: str, direction: str, trials: list[SweepTrial], best: str | None
) -> str:
    """The line under a sweep's heading: its objective, its trials by state, the best."""
    counts: dict[str, int] = {}
    for trial in sorted(trials, key=lambda t: t.number):
        counts[trial.state] = counts.get(trial.state, 0) + 1
    states = ", ".join(f"{n} {state.lower()}" for state, n in counts.items())
    line = f"objective: {objective} ({direction}); {len(trials)} trials"
    line += f": {states}" if states else ""
    return line + (f"; best: {best}" if best else "")


# -- HTML ---------------------------------------------------------------------------------------


def _e(text: Any) -> str:
    """Text made safe for HTML content and attribute values (quotes included)."""
    return html.escape(str(text), quote=True)


def _href(path: str) -> str:
    """A relative file link: path segments percent-encoded, then escaped for the attribute."""
    return _e(quote(path.replace(os.sep, "/")))


_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; color: #1d2430; margin: 2em auto;
       max-width: 76em; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
.meta, .note { color: #5a6372; } .note { border-left: 3px solid #c9a227; padding-left: .6em; }
table { border-collapse: collapse; margin: .6em 0; }
th, td { border: 1px solid #d5d9e0; padding: .3em .7em; text-align: left; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
thead th { background: #f0f2f5; }
figure { display: inline-block; margin: .5em 1em .5em 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #e3e6ea; }
figcaption { font-size: .9em; color: #5a6372; }
tr.best th, tr.best td { background: #fff6d6; }
.badge { font-size: .8em; background: #c9a227; color: #fff; border-radius: 3px;
         padding: 0 .35em; margin-left: .3em; }
"""


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(title)}</title>\n<style>{_STYLE}</style>\n</head>\n"
        f"<body>\n{body}</body>\n</html>\n"
    )


def _looks_numeric(text: str) -> bool:
    try:
        float(text.replace(",", "").replace(":", ""))
    except ValueError:
        return False
    return True


def _table_html(table: SummaryTable, stage_links: dict[str, str] | None = None) -> str:
    """A summary table; with `stage_links` (a pipeline's) its columns are stages."""
    links = stage_links or {}
    header = "".join(
        f'<th><a href="{_href(links[c])}">{_e(c)}</a></th>' if c in links else f"<th>{_e(c)}</th>"
        for c in table.columns
    )
    body = []
    for row in table.rows:
        cells = []
        # Each value cell names its metrics.json key (and stage), so a reader or a test can
        # find the number without parsing labels.
        for column, cell in zip(table.columns[1:], row.cells, strict=True):
            stage = f' data-stage="{_e(column)}"' if stage_links is not None else ""
            css = ' class="number"' if _looks_numeric(cell) else ""
            cells.append(f'<td data-metric="{_e(row.key)}"{stage}{css}>{_e(cell)}</td>')
        body.append(f"<tr><th>{_e(row.label)}</th>{''.join(cells)}</tr>")
    return (
        f"<table>\n<thead><tr>{header}</tr></thead>\n<tbody>\n"
        + "\n".join(body)
        + "\n</tbody>\n</table>\n"
    )


@dataclass(frozen=True)
class RenderedPlot:
    """A drawn plot: its caption, PNG bytes, and where the PNG file lies (relative link)."""

    title: str
    png: bytes
    link: str


def _figure_html(plot: RenderedPlot) -> str:
    data = base64.b64encode(plot.png).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{_e(plot.title)}">'
        f'<figcaption>{_e(plot.title)} (<a href="{_href(plot.link)}">{_e(plot.link)}</a>)'
        "</figcaption></figure>\n"
    )


def render_run_html(
    title: str,
    output_dir: str,
    table: SummaryTable,
    plots: list[RenderedPlot],
    notes: list[str],
) -> str:
    """report.html of one run: heading, notes, summary table, then the plots."""
    parts = [f"<h1>{_e(title)}</h1>\n", f'<p class="meta">output: {_e(output_dir)}</p>\n']
    parts += [f'<p class="note">{_e(note)}</p>\n' for note in notes]
    parts += ["<h2>Summary</h2>\n", _table_html(table)]
    if plots:
        parts.append("<h2>Plots</h2>\n")
        parts += [_figure_html(p) for p in plots]
    return _page(title, "".join(parts))


def render_pipeline_html(
    name: str,
    table: SummaryTable,
    stage_links: dict[str, str],
    loss_plots: list[RenderedPlot],
) -> str:
    """report.html of a pipeline: its stages' metrics side by side, each linked to its report."""
    title = f"Pipeline {name}"
    parts = [
        f"<h1>{_e(title)}</h1>\n",
        f'<p class="meta">{len(table.columns) - 1} stages, in the order they run; a stage\'s '
        "name links its own report.</p>\n",
        "<h2>Stages</h2>\n",
        _table_html(table, stage_links),
    ]
    if loss_plots:
        parts.append("<h2>Loss by stage</h2>\n")
        parts += [_figure_html(p) for p in loss_plots]
    return _page(title, "".join(parts))


def _trials_table_html(table: TrialTable) -> str:
    """A sweep's trials, one row each; the best is marked and a name links its report."""
    header = "<th>trial</th>" + "".join(f"<th>{_e(title)}</th>" for _, title in table.columns)
    body = []
    for row in table.rows:
        trial = f' data-trial="{_e(row.name)}"'
        name = f'<a href="{_href(row.report)}">{_e(row.name)}</a>' if row.report else _e(row.name)
        badge = '<span class="badge">best</span>' if row.best else ""
        cells = []
        # Each cell names its trial and column (a parameter's path, or number, state, value,
        # pruned_at_step), so a reader or a test finds it without counting columns.
        for (key, _), cell in zip(table.columns, row.cells, strict=True):
            css = ' class="number"' if _looks_numeric(cell) else ""
            cells.append(f'<td{trial} data-column="{_e(key)}"{css}>{_e(cell)}</td>')
        tr = '<tr class="best">' if row.best else "<tr>"
        body.append(f"{tr}<th{trial}>{name}{badge}</th>{''.join(cells)}</tr>")
    return (
        f"<table>\n<thead><tr>{header}</tr></thead>\n<tbody>\n"
        + "\n".join(body)
        + "\n</tbody>\n</table>\n"
    )


def render_sweep_html(
    name: str,
    overview: str,
    table: TrialTable,
    plots: list[RenderedPlot],
    notes: list[str],
) -> str:
    """report.html of a sweep: heading, overview, notes, the trials, then the plots."""
    title = f"Sweep {name}"
    parts = [f"<h1>{_e(title)}</h1>\n", f'<p class="meta">{_e(overview)}</p>\n']
    parts += [f'<p class="note">{_e(note)}</p>\n' for note in notes]
    parts.append("<h2>Trials</h2>\n")
    if any(row.report for row in table.rows):
        parts.append('<p class="meta">A trial\'s name links its own report.</p>\n')
    parts.append(_trials_table_html(table))
    if plots:
        parts.append("<h2>Plots</h2>\n")
        parts += [_figure_html(p) for p in plots]
    return _page(title, "".join(parts))


# -- Drawing (matplotlib, imported here only) ---------------------------------------------------


def _plain(text: str) -> str:
    # matplotlib reads $...$ in any label as math; a name is shown as typed.
    return text.replace("$", r"\$")


MAX_LEGEND_ENTRIES = 12  # a sweep's many trials: a longer legend would hide the lines


def render_png(plot: AnyPlot) -> bytes:
    """Draw one plot as PNG bytes with matplotlib's Agg renderer (no display, no pyplot)."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as e:
        raise ReportError(
            "the report's plots need matplotlib, which the trainer extra installs: "
            "pip install 'kubetrain[trainer]'"
        ) from e
    if isinstance(plot, ParallelCoordinatesPlot):
        width = max(5.4, 1.4 * len(plot.axes) + 1.6)  # room for each axis's tick labels
        figure = Figure(figsize=(width, 3.8), dpi=100, layout="constrained")
        _draw_parallel_coordinates(figure, plot)
        return _png(figure)
    if isinstance(plot, LinePlot):
        figure = Figure(figsize=(5.4, 3.2), dpi=100, layout="constrained")
        axes = figure.subplots()
        for label, points in plot.lines.items():
            steps, values = zip(*points, strict=True)
            # Few points (evaluations, a short run) are drawn as dots too, so one shows at all.
            marker = "o" if len(points) <= 20 else None
            style = "--" if label in plot.dashed else "-"
            axes.plot(steps, values, style, label=_plain(label), marker=marker, markersize=3)
        axes.set_xlabel("step")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # no step 2.5 on short runs
        axes.set_ylabel(_plain(plot.y_label))
        if 1 < len(plot.lines) <= MAX_LEGEND_ENTRIES:
            axes.legend(fontsize=8 if len(plot.lines) > 4 else None)
    elif isinstance(plot, ObjectivePlot):
        figure = Figure(figsize=(5.4, 3.2), dpi=100, layout="constrained")
        axes = figure.subplots()
        if plot.best_so_far:
            numbers, values = zip(*plot.best_so_far, strict=True)
            axes.plot(
                numbers,
                values,
                "--",
                drawstyle="steps-post",
                color="#5a6372",
                label="best so far",
                zorder=1,
            )
        if plot.complete:
            numbers, values = zip(*plot.complete, strict=True)
            axes.scatter(numbers, values, marker="o", color="#3b6fb6", label="complete", zorder=2)
        if plot.pruned:
            numbers, values = zip(*plot.pruned, strict=True)
            axes.scatter(
                numbers,
                values,
                marker="x",
                color="#c0392b",
                label="pruned (last reported)",
                zorder=2,
            )
        if plot.best:
            axes.scatter(
                [plot.best[0]],
                [plot.best[1]],
                marker="*",
                s=220,
                color="#c9a227",
                edgecolors="#1d2430",
                linewidths=0.8,
                label="best",
                zorder=3,
            )
        axes.set_xlabel("trial")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel(_plain(plot.y_label))
        axes.legend(fontsize=8)
    else:
        # Horizontal bars keep long `<suite>.<metric>` names readable.
        figure = Figure(figsize=(5.4, 1.2 + 0.4 * len(plot.bars)), dpi=100, layout="constrained")
        axes = figure.subplots()
        labels = [_plain(k) for k in plot.bars]
        bars = axes.barh(labels, list(plot.bars.values()), color="#3b6fb6")
        axes.bar_label(bars, fmt="%.4g", padding=3)
        axes.invert_yaxis()  # first suite on top, as in the table
        axes.margins(x=0.15)
    axes.set_title(_plain(plot.title))
    axes.grid(alpha=0.3)
    return _png(figure)


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _draw_parallel_coordinates(figure: Any, plot: ParallelCoordinatesPlot) -> None:
    # Plain matplotlib: the axes are vertical lines at x = 0, 1, ... over positions in [0, 1]
    # (planned by parallel_axis), each labelled with its real values; a colorbar reads the
    # lines' colours. The better end of the scale is yellow, whichever the direction.
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    axes = figure.subplots()
    values = [line.value for line in plot.lines]
    low, high = min(values), max(values)
    if low == high:  # one value still needs a scale to colour by
        low, high = low - 0.5, high + 0.5
    scale = Normalize(low, high)
    colours = colormaps["viridis_r" if plot.direction == "minimize" else "viridis"]
    xs = list(range(len(plot.axes)))
    for line in plot.lines:
        best = line.trial == plot.best
        ys = [math.nan if p is None else p for p in line.positions]  # a gap where it lacks one
        axes.plot(
            xs,
            ys,
            color=colours(scale(line.value)),
            linewidth=2.8 if best else 1.2,
            alpha=1.0 if best else 0.75,
            zorder=3 if best else 2,
        )
    for x, axis in zip(xs, plot.axes, strict=True):
        axes.axvline(x, color="#5a6372", linewidth=0.8, zorder=1)
        for position, text in axis.ticks:
            axes.plot([x - 0.02, x], [position, position], color="#5a6372", linewidth=0.8)
            axes.text(
                x - 0.04,
                position,
                _plain(text),
                ha="right",
                va="center",
                fontsize=7,
                bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8},
                zorder=4,
            )
    labels = [_plain(a.label) + (" (log)" if a.scale == "log" else "") for a in plot.axes]
    axes.set_xticks(xs, labels, fontsize=8, rotation=15 if len(xs) > 4 else 0)
    axes.set_xlim(-0.45, xs[-1] + 0.15)
    axes.set_ylim(-0.05, 1.05)
    axes.set_yticks([])
    for spine in axes.spines.values():
        spine.set_visible(False)
    figure.colorbar(ScalarMappable(scale, colours), ax=axes, label=_plain(plot.color_label))
    axes.set_title(_plain(plot.title))


# -- Files ------------------------------------------------------------------------------------


def _write_text_atomic(path: Path, text: str) -> None:
    # A browser or `kubetrain report` reading meanwhile sees the old report or the new one.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_metrics(output_dir: Path) -> TrainerMetricsFile | None:
    """The folder's metrics.json, or None when it has none."""
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return None
    try:
        return TrainerMetricsFile.model_validate_json(path.read_bytes())
    except ValidationError as e:
        raise ReportError(f"{path} is not a kubetrain metrics file: {e}") from e


def read_log_history(output_dir: Path) -> tuple[list[dict[str, Any]], str | None]:
    """The run's log history and the file it came from (relative), or ([], None).

    The final one (TRAINER_STATE_FILE) first; outputs written before the trainer saved it
    still have the newest checkpoint's copy, which lacks the steps after that checkpoint.
    """
    output_dir = Path(output_dir)
    candidates = [output_dir / TRAINER_STATE_FILE]
    checkpoints = [p for p in output_dir.iterdir() if p.is_dir() and checkpoint_dir_step(p.name)]
    checkpoints.sort(key=lambda p: checkpoint_dir_step(p.name) or 0, reverse=True)
    candidates += [p / TRAINER_STATE_FILE for p in checkpoints]
    for path in candidates:
        try:
            history = json.loads(path.read_text()).get("log_history")
        except (OSError, ValueError, AttributeError):
            continue  # missing, torn or foreign: try the next one
        if isinstance(history, list):
            entries = [e for e in history if isinstance(e, dict)]
            return entries, str(path.relative_to(output_dir))
    return [], None


def history_notes(metrics: TrainerMetricsFile, source: str | None) -> list[str]:
    """What a reader should know about the history behind the plots."""
    if source is None and metrics.global_step:
        return [
            f"No training log history ({TRAINER_STATE_FILE}) in this folder, so there are no "
            "plots over steps."
        ]
    if source is not None and source != TRAINER_STATE_FILE:
        return [
            f"Plots over steps come from {source}: this output predates the final "
            f"{TRAINER_STATE_FILE}, so steps after that checkpoint are missing."
        ]
    return []


def write_run_report(output_dir: str | Path, run_name: str | None = None) -> Path:
    """Write report.html and the PNG plots of the finished run in `output_dir`; its path.

    `run_name` heads the report (default: the folder's name). Raises ReportError when the
    folder holds no metrics.json or matplotlib is missing.
    """
    output_dir = Path(output_dir)
    metrics = read_metrics(output_dir)
    if metrics is None:
        raise ReportError(f"{output_dir} holds no {METRICS_FILE}: no finished run to report")
    history, source = read_log_history(output_dir)
    plots = plan_plots(history, metrics)
    pngs = {plot.file_name: render_png(plot) for plot in plots}
    plots_dir = output_dir / REPORT_PLOTS_DIR
    if pngs:
        plots_dir.mkdir(exist_ok=True)
    for old in plots_dir.glob("*.png") if plots_dir.is_dir() else []:
        if old.name not in pngs:
            old.unlink()  # a plot this run's data no longer fills
    for name, png in pngs.items():
        (plots_dir / name).write_bytes(png)
    rendered = [
        RenderedPlot(plot.title, pngs[plot.file_name], f"{REPORT_PLOTS_DIR}/{plot.file_name}")
        for plot in plots
    ]
    page = render_run_html(
        run_name or output_dir.name,
        str(output_dir),
        run_summary(metrics),
        rendered,
        history_notes(metrics, source),
    )
    path = output_dir / REPORT_FILE
    _write_text_atomic(path, page)
    return path


def _relative_or_absolute(path: Path, folder: Path) -> str:
    try:
        return str(path.resolve().relative_to(folder.resolve()))
    except ValueError:
        return str(path.resolve())


def write_pipeline_report(folder: str | Path, name: str, stages: list[PipelineStage]) -> Path:
    """Write a pipeline's report.html (and its list of stages) into `folder`; its path.

    A finished stage whose output has no report yet (an older output) gets one first, so
    every link leads somewhere.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    listing = {
        "pipeline": name,
        "stages": [
            {
                "name": s.name,
                "method": s.method,
                "status": s.status,
                "note": s.note,
                "finished": s.finished,
                # Relative where it can be, so the folder may be moved or copied whole.
                "output": _relative_or_absolute(s.output_dir, folder),
            }
            for s in stages
        ],
    }
    _write_text_atomic(folder / PIPELINE_STAGES_FILE, json.dumps(listing, indent=2) + "\n")
    metrics: dict[str, TrainerMetricsFile | None] = {}
    links: dict[str, str] = {}
    loss_plots: list[RenderedPlot] = []
    for stage in stages:
        found = read_metrics(stage.output_dir) if stage.finished else None
        metrics[stage.name] = found
        if found is None:
            continue
        report = stage.output_dir / REPORT_FILE
        if not report.exists():
            write_run_report(stage.output_dir)
        links[stage.name] = os.path.relpath(report, folder)
        loss = stage.output_dir / REPORT_PLOTS_DIR / LOSS_PLOT
        if loss.is_file():
            link = os.path.relpath(loss, folder)
            loss_plots.append(RenderedPlot(f"{stage.name}: loss", loss.read_bytes(), link))
    page = render_pipeline_html(name, pipeline_summary(stages, metrics), links, loss_plots)
    path = folder / REPORT_FILE
    _write_text_atomic(path, page)
    return path


def write_sweep_report(
    folder: str | Path,
    name: str,
    objective: str,
    direction: str,
    trials: list[SweepTrial],
    importances: dict[str, float],
    best: str | None,
) -> Path:
    """Write <folder>/report.html and <folder>/report-plots/*.png for a sweep; the html's path.

    `direction` is "minimize" or "maximize", `best` the best trial's name (None before one
    completed), `importances` each parameter's importance in [0, 1] (empty when none could
    be computed: the page says why). A trial whose output_dir holds its own report is
    linked to it. Raises ValueError for another direction and ReportError when matplotlib
    is missing.
    """
    _check_direction(direction)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plots = plan_sweep_plots(trials, objective, direction, importances, best)
    pngs = {plot.file_name: render_png(plot) for plot in plots}
    plots_dir = folder / REPORT_PLOTS_DIR
    if pngs:
        plots_dir.mkdir(exist_ok=True)
    for old in plots_dir.glob(f"{SWEEP_PLOT_PREFIX}*.png") if plots_dir.is_dir() else []:
        if old.name not in pngs:
            old.unlink()  # a plot the sweep's trials no longer fill
    for file_name, png in pngs.items():
        (plots_dir / file_name).write_bytes(png)
    rendered = [
        RenderedPlot(plot.title, pngs[plot.file_name], f"{REPORT_PLOTS_DIR}/{plot.file_name}")
        for plot in plots
    ]
    path = folder / REPORT_FILE
    reports: dict[str, str] = {}
    for trial in trials:
        report = trial.output_dir / REPORT_FILE if trial.output_dir is not None else None
        if report is not None and report.is_file() and report.resolve() != path.resolve():
            reports[trial.name] = os.path.relpath(report, folder)
    page = render_sweep_html(
        name,
        sweep_overview(objective, direction, trials, best),
        sweep_table(trials, objective, best, reports),
        rendered,
        sweep_notes(trials, importances),
    )
    _write_text_atomic(path, page)
    record = {
        "sweep": name,
        "objective": objective,
        "direction": direction,
        "best": best,
        "importances": importances,
        "trials": [
            {
                **asdict(t),
                "output_dir": None
                if t.output_dir is None
                else _relative_or_absolute(t.output_dir, folder),
            }
            for t in trials
        ],
    }
    _write_text_atomic(folder / SWEEP_TRIALS_FILE, json.dumps(record, indent=2) + "\n")
    return path


@dataclass(frozen=True)
class SweepRecord:
    """What write_sweep_report left in a sweep's folder (SWEEP_TRIALS_FILE)."""

    name: str
    objective: str
    direction: str
    best: str | None
    importances: dict[str, float]
    trials: list[SweepTrial]


def read_sweep(folder: str | Path) -> SweepRecord | None:
    """The sweep whose report is in `folder`, or None when its trials file is not there."""
    folder = Path(folder)
    try:
        record = json.loads((folder / SWEEP_TRIALS_FILE).read_text())
        trials = [
            SweepTrial(
                name=str(t["name"]),
                number=int(t["number"]),
                state=str(t["state"]),
                parameters=dict(t["parameters"]),
                value=t.get("value"),
                intermediate=[(int(step), float(v)) for step, v in t.get("intermediate") or []],
                pruned_at_step=t.get("pruned_at_step"),
                output_dir=None if t.get("output_dir") is None else folder / t["output_dir"],
            )
            for t in record["trials"]
        ]
        return SweepRecord(
            name=str(record["sweep"]),
            objective=str(record["objective"]),
            direction=str(record["direction"]),
            best=record.get("best"),
            importances={str(k): float(v) for k, v in (record.get("importances") or {}).items()},
            trials=trials,
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def sweep_summary(sweep: SweepRecord) -> SummaryTable:
    """`kubetrain report`'s table of a sweep: one row per trial, the best marked."""
    table = sweep_table(sweep.trials, sweep.objective, sweep.best)
    rows = [
        Row(row.name, row.name + (" (best)" if row.best else ""), row.cells) for row in table.rows
    ]
    return SummaryTable(["trial", *(header for _key, header in table.columns)], rows)


def read_pipeline_stages(folder: str | Path) -> tuple[str, list[PipelineStage]] | None:
    """The pipeline whose report belongs in `folder`: (name, stages), or None if none is.

    The list a pipeline run left there (PIPELINE_STAGES_FILE) first. Without one (outputs
    written before it existed) every subfolder holding a metrics.json is a finished stage,
    in the order they finished, which for a pipeline run here is the order they ran.
    """
    folder = Path(folder)
    try:
        listing = json.loads((folder / PIPELINE_STAGES_FILE).read_text())
    except (OSError, ValueError):
        listing = None
    if isinstance(listing, dict) and isinstance(listing.get("stages"), list):
        stages = [
            PipelineStage(
                name=str(s["name"]),
                method=str(s.get("method", "")),
                status=str(s.get("status", "")),
                output_dir=folder / s["output"],  # an absolute output stays absolute
                finished=bool(s.get("finished")),
                note=str(s.get("note", "")),
            )
            for s in listing["stages"]
        ]
        return str(listing.get("pipeline") or folder.name), stages
    found = sorted(
        (p for p in folder.iterdir() if (p / METRICS_FILE).is_file()),
        key=lambda p: ((p / METRICS_FILE).stat().st_mtime, p.name),
    )
    if not found:
        return None
    stages = []
    for path in found:
        metrics = read_metrics(path)
        method = (metrics.method if metrics else None) or ""
        stages.append(PipelineStage(path.name, method, "finished", path, finished=True))
    return folder.name, stages


@dataclass(frozen=True)
class ShownReport:
    """What `kubetrain report` prints: a title, the summary table and where report.html is."""

    title: str
    table: SummaryTable
    path: Path


def ensure_report(folder: str | Path) -> ShownReport:
    """The report of the run or pipeline in `folder`, written first if it is missing.

    A folder with a metrics.json is a run; one with a sweep's trials file (read_sweep) that
    sweep; otherwise a folder holding a pipeline's stages (read_pipeline_stages) is that
    pipeline. Raises ReportError for anything else.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ReportError(f"{folder} is not a folder: pass a run's output or a pipeline's")
    path = folder / REPORT_FILE
    metrics = read_metrics(folder)
    if metrics is not None:
        if not path.exists():
            write_run_report(folder)
        return ShownReport(f"{folder.name} ({metrics.method or 'run'})", run_summary(metrics), path)
    sweep = read_sweep(folder)
    if sweep is not None:
        if not path.exists():
            write_sweep_report(
                folder, sweep.name, sweep.objective, sweep.direction, sweep.trials,
                sweep.importances, sweep.best,
            )  # fmt: skip
        return ShownReport(f"Sweep {sweep.name}", sweep_summary(sweep), path)
    pipeline = read_pipeline_stages(folder)
    if pipeline is None:
        raise ReportError(
            f"{folder} holds neither a finished run ({METRICS_FILE}) nor a pipeline's stages "
            f"(subfolders with one): pass a run's output folder or a pipeline's outputRoot"
        )
    name, stages = pipeline
    if not path.exists():
        write_pipeline_report(folder, name, stages)
    metrics_by_stage = {s.name: read_metrics(s.output_dir) if s.finished else None for s in stages}
    return ShownReport(f"Pipeline {name}", pipeline_summary(stages, metrics_by_stage), path)
