"""A hyperparameter sweep's report: its trials' table, the plots' plans, report.html and PNGs.

The plans (what each plot shows, the parallel-coordinates normalisation included) are pure
functions, tested on known trials without matplotlib; the page is read back by the trial
and column each cell names (`data-trial`, `data-column`).
"""

from __future__ import annotations

import base64
import json
import math
import re
import subprocess
import sys
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import pytest

from kubetrain_trainer.contract import REPORT_FILE, REPORT_PLOTS_DIR
from kubetrain_trainer.report import (
    SWEEP_IMPORTANCES_PLOT,
    SWEEP_INTERMEDIATE_PLOT,
    SWEEP_OBJECTIVE_PLOT,
    SWEEP_PARALLEL_PLOT,
    BarPlot,
    LinePlot,
    ObjectivePlot,
    ParallelCoordinatesPlot,
    SweepTrial,
    parallel_axis,
    plan_importance_plot,
    plan_intermediate_plot,
    plan_objective_plot,
    plan_parallel_coordinates,
    plan_sweep_plots,
    sweep_notes,
    sweep_table,
    write_sweep_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LR, RANK, OPTIMIZER = "training.learningRate", "lora.r", "training.optimizer"


def trials() -> list[SweepTrial]:
    """A minimizing sweep of five trials, listed out of number order as a store may return them."""
    return [
        SweepTrial("lr-sweep-3", 3, "Complete", {LR: 1e-2, RANK: 16, OPTIMIZER: "sgd"}, 2.25,
                   [(10, 2.9), (20, 2.25)]),
        SweepTrial("lr-sweep-0", 0, "Complete", {LR: 1e-5, RANK: 8, OPTIMIZER: "adamw"}, 2.5,
                   [(10, 3.0), (20, 2.5)]),
        SweepTrial("lr-sweep-1", 1, "Complete", {LR: 3e-4, RANK: 4, OPTIMIZER: "adamw"}, 1.75,
                   [(20, 1.75), (10, 2.5)]),
        SweepTrial("lr-sweep-2", 2, "Pruned", {LR: 1e-1, RANK: 8, OPTIMIZER: "sgd"}, None,
                   [(10, 3.5), (20, 3.25)], pruned_at_step=20),
        SweepTrial("lr-sweep-4", 4, "Running", {LR: 5e-5, RANK: 4, OPTIMIZER: "adamw"}, None, []),
    ]  # fmt: skip


IMPORTANCES = {RANK: 0.25, LR: 0.625, OPTIMIZER: 0.125}


class SweepPage(HTMLParser):
    """What a sweep's report.html shows: cells by (trial, column), best rows, images, links."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.cells: dict[tuple[str, str], str] = {}
        self.best: list[str] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self.notes: list[str] = []
        self._open: tuple[str, str] | str | None = None
        self._row_best = False
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "tr":
            self._row_best = a.get("class") == "best"
        elif tag == "th" and a.get("data-trial") and self._row_best:
            self.best.append(a["data-trial"] or "")
        elif tag == "td" and a.get("data-column"):
            self._open = (a["data-trial"] or "", a["data-column"] or "")
            self.cells[self._open] = ""
        elif tag == "p" and a.get("class") == "note":
            self._open = "note"
            self.notes.append("")
        elif tag == "img":
            self.images.append(a["src"] or "")
        elif tag == "a":
            self.links.append(a["href"] or "")

    def handle_data(self, data: str) -> None:
        if self._open == "note":
            self.notes[-1] += data
        elif isinstance(self._open, tuple):
            self.cells[self._open] += data

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "p"):
            self._open = None


def write(
    folder: Path,
    sweep: list[SweepTrial],
    importances: dict[str, float] | None = None,
    best: str | None = "lr-sweep-1",
    name: str = "lr-sweep",
) -> tuple[Path, SweepPage]:
    importances = IMPORTANCES if importances is None else importances
    path = write_sweep_report(folder, name, "eval_loss", "minimize", sweep, importances, best)
    return path, SweepPage(path.read_text())


def plot_files(folder: Path) -> list[str]:
    plots = folder / REPORT_PLOTS_DIR
    return sorted(p.name for p in plots.iterdir()) if plots.is_dir() else []


# -- Parallel coordinates: the normalisation --------------------------------------------------


@pytest.mark.parametrize(
    ("values", "scale", "positions", "ticks"),
    [
        # Linear between the smallest and the largest; at most 5 distinct values: each a tick.
        ([4, 8, 16], "linear", [0.0, 1 / 3, 1.0], [(0.0, "4"), (1 / 3, "8"), (1.0, "16")]),
        # Positive and over 2 decades: by logarithm (the real values on the ticks).
        ([1e-5, 1e-3, 1e-2], "log", [0.0, 2 / 3, 1.0],
         [(0.0, "1e-05"), (2 / 3, "0.001"), (1.0, "0.01")]),
        # Exactly 2 decades is not more than 2: linear.
        ([1e-4, 1e-2], "linear", [0.0, 1.0], [(0.0, "0.0001"), (1.0, "0.01")]),
        # Over 2 decades but not all > 0: linear.
        ([0.0, 1e-3, 1.0], "linear", [0.0, 0.001, 1.0],
         [(0.0, "0"), (0.001, "0.001"), (1.0, "1")]),
        # One value sits in the middle.
        ([0.5, 0.5], "linear", [0.5, 0.5], [(0.5, "0.5")]),
        # A trial without the parameter has no position; the range is the others'.
        ([2.0, None, 4.0], "linear", [0.0, None, 1.0], [(0.0, "2"), (1.0, "4")]),
        # Text: sorted categories, evenly spaced, each labelled.
        (["sgd", "adamw", "lion", "adamw"], "categorical", [1.0, 0.0, 0.5, 0.0],
         [(0.0, "adamw"), (0.5, "lion"), (1.0, "sgd")]),
        (["only"], "categorical", [0.5], [(0.5, "only")]),
        ([True, False], "categorical", [1.0, 0.0], [(0.0, "false"), (1.0, "true")]),
        # Numbers mixed with text are categories too.
        ([8, "auto"], "categorical", [0.0, 1.0], [(0.0, "8"), (1.0, "auto")]),
    ],
)  # fmt: skip
def test_parallel_axis_places_values_in_0_1(values, scale, positions, ticks):
    axis, placed = parallel_axis("p", values)
    assert axis.label == "p" and axis.scale == scale
    assert placed == [None if p is None else pytest.approx(p) for p in positions]
    assert [(pytest.approx(p), text) for p, text in axis.ticks] == ticks


def test_parallel_axis_with_many_values_gets_evenly_spaced_real_ticks():
    axis, _ = parallel_axis("training.maxSteps", [100, 200, 300, 400, 500, 600, 700, 900])
    assert axis.ticks == [(0.0, "100"), (0.25, "300"), (0.5, "500"), (0.75, "700"), (1.0, "900")]
    log, placed = parallel_axis("lr", [1e-6, 1e-5, 2e-5, 1e-4, 3e-4, 1e-3, 1e-2])
    assert log.scale == "log" and placed[1] == pytest.approx(0.25)
    assert [text for _, text in log.ticks] == ["1e-06", "1e-05", "0.0001", "0.001", "0.01"]


def test_parallel_coordinates_plan_has_one_line_per_complete_trial():
    plot = plan_parallel_coordinates(trials(), "eval_loss", "minimize", "lr-sweep-1")
    assert isinstance(plot, ParallelCoordinatesPlot)
    assert [(a.label, a.scale) for a in plot.axes] == [
        (LR, "log"), (RANK, "linear"), (OPTIMIZER, "categorical"), ("eval_loss", "linear"),
    ]  # fmt: skip
    # Only complete trials, by number: the pruned and running ones have no objective.
    assert [(line.trial, line.value) for line in plot.lines] == [
        ("lr-sweep-0", 2.5), ("lr-sweep-1", 1.75), ("lr-sweep-3", 2.25),
    ]  # fmt: skip
    best = plot.lines[1]
    lr = (math.log10(3e-4) + 5) / 3  # 1e-5 .. 1e-2, by logarithm
    assert best.positions == [pytest.approx(lr), 0.0, 0.0, 0.0]
    assert plot.lines[0].positions == [0.0, pytest.approx(1 / 3), 0.0, 1.0]
    assert plot.best == "lr-sweep-1" and plot.direction == "minimize"
    assert plot.file_name == SWEEP_PARALLEL_PLOT


def test_a_parameter_only_some_trials_have_leaves_a_gap():
    sweep = [
        SweepTrial("a", 0, "Complete", {"lora.r": 8}, 1.0, []),
        SweepTrial("b", 1, "Complete", {"lora.r": 16, "lora.alpha": 32}, 2.0, []),
    ]
    plot = plan_parallel_coordinates(sweep, "loss", "minimize", None)
    assert plot is not None
    assert [line.positions for line in plot.lines] == [[0.0, None, 0.0], [1.0, 0.5, 1.0]]


def test_no_complete_trial_no_parallel_coordinates():
    sweep = [t for t in trials() if t.state != "Complete"]
    assert plan_parallel_coordinates(sweep, "eval_loss", "minimize", None) is None
    no_parameters = [SweepTrial("a", 0, "Complete", {}, 1.0, [])]
    assert plan_parallel_coordinates(no_parameters, "eval_loss", "minimize", "a") is None


# -- The other plans -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("direction", "best", "best_point", "best_so_far"),
    [
        ("minimize", "lr-sweep-1", (1, 1.75), [(0, 2.5), (1, 1.75), (3, 1.75)]),
        ("maximize", "lr-sweep-0", (0, 2.5), [(0, 2.5), (1, 2.5), (3, 2.5)]),
        ("minimize", None, None, [(0, 2.5), (1, 1.75), (3, 1.75)]),
    ],
)
def test_objective_plot_plan(direction, best, best_point, best_so_far):
    plot = plan_objective_plot(trials(), "eval_loss", direction, best)
    assert isinstance(plot, ObjectivePlot) and plot.file_name == SWEEP_OBJECTIVE_PLOT
    assert plot.complete == [(0, 2.5), (1, 1.75), (3, 2.25)]
    assert plot.pruned == [(2, 3.25)]  # the value it last reported, at step 20
    assert plot.best == best_point
    assert plot.best_so_far == best_so_far
    assert plot.y_label == "eval_loss"


def test_objective_plot_plan_without_values():
    running = [SweepTrial("r", 0, "Running", {"lora.r": 8}, None, [])]
    assert plan_objective_plot(running, "eval_loss", "minimize", None) is None
    # A pruned trial alone still shows where it was stopped.
    pruned = [SweepTrial("p", 0, "Pruned", {}, None, [(5, 4.0)], pruned_at_step=5)]
    plot = plan_objective_plot(pruned, "eval_loss", "minimize", None)
    assert plot is not None and plot.pruned == [(0, 4.0)] and plot.complete == []
    assert plot.best_so_far == [] and plot.best is None


def test_a_direction_is_minimize_or_maximize(tmp_path: Path):
    with pytest.raises(ValueError, match="minimize"):
        plan_objective_plot(trials(), "eval_loss", "lower", None)
    with pytest.raises(ValueError, match="'up'"):
        write_sweep_report(tmp_path, "s", "eval_loss", "up", trials(), {}, None)
    assert not (tmp_path / REPORT_FILE).exists()


@pytest.mark.parametrize(
    ("importances", "bars"),
    [
        (IMPORTANCES, {LR: 0.625, RANK: 0.25, OPTIMIZER: 0.125}),  # most important first
        ({"b": 0.5, "a": 0.5, "c": math.nan}, {"a": 0.5, "b": 0.5}),  # ties by name, no NaN
        ({}, None),
    ],
)
def test_importance_plot_plan(importances, bars):
    plot = plan_importance_plot(importances)
    if bars is None:
        assert plot is None
    else:
        assert isinstance(plot, BarPlot) and plot.file_name == SWEEP_IMPORTANCES_PLOT
        assert plot.bars == bars and list(plot.bars) == list(bars)


def test_intermediate_plot_plan():
    plot = plan_intermediate_plot(trials(), "eval_loss")
    assert isinstance(plot, LinePlot) and plot.file_name == SWEEP_INTERMEDIATE_PLOT
    assert plot.lines == {
        "lr-sweep-0": [(10, 3.0), (20, 2.5)],
        "lr-sweep-1": [(10, 2.5), (20, 1.75)],  # by step, however reported
        "lr-sweep-2": [(10, 3.5), (20, 3.25)],
        "lr-sweep-3": [(10, 2.9), (20, 2.25)],
    }  # the running trial reported nothing yet
    assert plot.dashed == {"lr-sweep-2"}
    assert "pruned trials dashed" in plot.title
    quiet = [SweepTrial("a", 0, "Complete", {"lora.r": 8}, 1.0, [])]
    assert plan_intermediate_plot(quiet, "eval_loss") is None


def test_plots_in_page_order_and_only_with_data():
    names = [
        p.file_name
        for p in plan_sweep_plots(trials(), "eval_loss", "minimize", IMPORTANCES, "lr-sweep-1")
    ]
    assert names == [
        SWEEP_OBJECTIVE_PLOT,
        SWEEP_IMPORTANCES_PLOT,
        SWEEP_PARALLEL_PLOT,
        SWEEP_INTERMEDIATE_PLOT,
    ]
    one = [SweepTrial("a", 0, "Complete", {"lora.r": 8}, 1.0, [])]
    names = [p.file_name for p in plan_sweep_plots(one, "eval_loss", "minimize", {}, "a")]
    assert names == [SWEEP_OBJECTIVE_PLOT, SWEEP_PARALLEL_PLOT]
    assert plan_sweep_plots([], "eval_loss", "minimize", {}, None) == []


@pytest.mark.parametrize(
    ("states", "importances", "says"),
    [
        (["Complete", "Complete"], IMPORTANCES, []),
        (["Complete"], {}, ["at least 2 complete trials and this sweep has 1"]),
        (["Complete", "Complete"], {}, ["No parameter importances were computed"]),
        (["Running", "Failed"], {}, ["No trial has completed yet", "this sweep has 0"]),
        ([], {}, ["no trials yet"]),
    ],
)
def test_notes_say_why_a_part_is_missing(states, importances, says):
    sweep = [SweepTrial(f"t{i}", i, s, {"lora.r": i}, 1.0 + i, []) for i, s in enumerate(states)]
    notes = sweep_notes(sweep, importances)
    assert len(notes) == len(says)
    for note, said in zip(notes, says, strict=True):
        assert said in note


def test_sweep_table_plan():
    table = sweep_table(trials(), "eval_loss", "lr-sweep-1", {"lr-sweep-0": "lr-sweep-0/r"})
    assert table.columns == [
        ("number", "#"), ("state", "state"), (LR, LR), (RANK, RANK), (OPTIMIZER, OPTIMIZER),
        ("value", "eval_loss"), ("pruned_at_step", "pruned at step"),
    ]  # fmt: skip
    rows = {row.name: row for row in table.rows}
    assert [row.name for row in table.rows] == [f"lr-sweep-{n}" for n in range(5)]
    assert rows["lr-sweep-1"].cells == ["1", "Complete", "0.0003", "4", "adamw", "1.75", ""]
    assert rows["lr-sweep-2"].cells == ["2", "Pruned", "0.1", "8", "sgd", "-", "20"]
    assert [row.name for row in table.rows if row.best] == ["lr-sweep-1"]
    assert rows["lr-sweep-0"].report == "lr-sweep-0/r" and rows["lr-sweep-1"].report is None


# -- The page and its files ------------------------------------------------------------------


def test_the_sweep_report_shows_the_trials_and_its_plots(tmp_path: Path):
    folder = tmp_path / "sweep"
    sweep = trials()
    # Trial 0 finished and has its own report; trial 3's output has none (yet).
    for trial_dir in ("lr-sweep-0", "lr-sweep-3"):
        (folder / trial_dir).mkdir(parents=True)
    (folder / "lr-sweep-0" / REPORT_FILE).write_text("<html></html>")
    sweep = [replace(t, output_dir=folder / t.name) if t.number in (0, 3) else t for t in sweep]
    path, page = write(folder, sweep)
    assert path == folder / REPORT_FILE
    assert page.cells[("lr-sweep-1", "value")] == "1.75"
    assert page.cells[("lr-sweep-1", LR)] == "0.0003"
    assert page.cells[("lr-sweep-2", "state")] == "Pruned"
    assert page.cells[("lr-sweep-2", "pruned_at_step")] == "20"
    assert page.cells[("lr-sweep-4", "value")] == "-"
    assert page.best == ["lr-sweep-1"]
    text = path.read_text()
    assert "<h1>Sweep lr-sweep</h1>" in text
    assert "5 trials: 3 complete, 1 pruned, 1 running; best: lr-sweep-1" in text
    # The trial with a report is linked to it, relatively; the one without is not.
    trial_links = [link for link in page.links if not link.startswith(REPORT_PLOTS_DIR)]
    assert trial_links == [f"lr-sweep-0/{REPORT_FILE}"]
    assert page.notes == []

    # The plots as PNG files, and the same bytes embedded: the page needs nothing beside it.
    names = [
        SWEEP_IMPORTANCES_PLOT,
        SWEEP_INTERMEDIATE_PLOT,
        SWEEP_OBJECTIVE_PLOT,
        SWEEP_PARALLEL_PLOT,
    ]
    assert plot_files(folder) == names
    files = {name: (folder / REPORT_PLOTS_DIR / name).read_bytes() for name in names}
    assert all(data.startswith(PNG_MAGIC) and len(data) > 1000 for data in files.values())
    assert all(src.startswith("data:image/png;base64,") for src in page.images)
    embedded = [base64.b64decode(src.removeprefix("data:image/png;base64,")) for src in page.images]
    assert sorted(embedded) == sorted(files.values())
    assert "<script" not in text and not re.search(r"(src|href)=\"(https?:)?//", text)


def test_parts_without_data_are_left_out(tmp_path: Path):
    sweep = [
        SweepTrial("a", 0, "Running", {"lora.r": 8}, None, []),
        SweepTrial("b", 1, "Failed", {"lora.r": 16}, None, []),
    ]
    _, page = write(tmp_path, sweep, importances={}, best=None)
    assert page.images == [] and not (tmp_path / REPORT_PLOTS_DIR).exists()
    assert any("No trial has completed yet" in note for note in page.notes)
    assert any("no importance plot" in note for note in page.notes)
    assert page.best == [] and page.cells[("b", "state")] == "Failed"

    # One complete trial: its objective and parallel coordinates, and still no importances.
    sweep.append(SweepTrial("c", 2, "Complete", {"lora.r": 4}, 1.5, []))
    _, page = write(tmp_path, sweep, importances={}, best="c")
    assert plot_files(tmp_path) == [SWEEP_OBJECTIVE_PLOT, SWEEP_PARALLEL_PLOT]
    assert len(page.images) == 2
    assert [note for note in page.notes if "importance" in note] == [
        "No parameter importances: they are computed from at least 2 complete trials and "
        "this sweep has 1, so there is no importance plot."
    ]


def test_a_rewritten_report_drops_only_its_own_stale_plots(tmp_path: Path):
    write(tmp_path, trials())
    other = tmp_path / REPORT_PLOTS_DIR / "loss.png"  # not the sweep's: left alone
    other.write_bytes(PNG_MAGIC)
    quiet = [replace(t, intermediate=[]) for t in trials()]
    write(tmp_path, quiet, importances={})
    assert plot_files(tmp_path) == ["loss.png", SWEEP_OBJECTIVE_PLOT, SWEEP_PARALLEL_PLOT]


def test_user_names_are_escaped(tmp_path: Path):
    hostile = '<script>alert("sweep")</script>&'
    sweep = [
        SweepTrial("<b>", 0, "Complete", {"<i>$x$": "<u>", "lora.r": 8}, 1.0, [(5, 1.5)]),
        SweepTrial("ok", 1, "Complete", {"<i>$x$": "v", "lora.r": 16}, 2.0, [(5, 2.5)]),
    ]
    path, page = write(tmp_path, sweep, importances={"<i>$x$": 1.0}, best="<b>", name=hostile)
    text = path.read_text()
    assert "<b>" not in text and "<i>" not in text and "<u>" not in text
    assert "<script" not in text
    assert "&lt;script&gt;alert(&quot;sweep&quot;)&lt;/script&gt;&amp;" in text
    assert page.cells[("<b>", "<i>$x$")] == "<u>"  # as typed, once the HTML is read
    assert page.best == ["<b>"]
    # matplotlib would read $x$ as math; the labels are drawn as typed, no error.
    assert len(plot_files(tmp_path)) == 4


def test_the_report_module_imports_no_optuna_torch_or_matplotlib():
    code = (
        "import sys, json; import kubetrain_trainer.report; "
        "heavy = {'optuna', 'torch', 'transformers', 'matplotlib'}; "
        "print(json.dumps(sorted(heavy & {m.split('.')[0] for m in sys.modules})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert json.loads(done.stdout) == [], done.stderr


def test_kubetrain_report_reads_a_sweep_folder_and_rewrites_a_missing_page(tmp_path: Path):
    from kubetrain_trainer.report import ensure_report, read_sweep

    path, _page = write(tmp_path, trials())
    record = read_sweep(tmp_path)
    assert record is not None and record.name == "lr-sweep"
    assert [t.name for t in record.trials] == [t.name for t in trials()]
    assert record.trials == [replace(t, output_dir=record.trials[i].output_dir)
                             for i, t in enumerate(trials())]  # fmt: skip
    path.unlink()
    shown = ensure_report(tmp_path)
    assert shown.title == "Sweep lr-sweep" and path.is_file()
    assert shown.table.columns[:3] == ["trial", "#", "state"]
    labels = [row.label for row in shown.table.rows]
    assert "lr-sweep-1 (best)" in labels
