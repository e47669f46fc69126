"""The cluster commands of `kubetrain`: submit, get, describe, logs, wait, suspend, resume, delete.

    kubetrain submit examples/cluster/trainingrun-sft-tiny.yaml --wait
    kubetrain get                      every run, pipeline and sweep: phase, progress, loss, ETA
    kubetrain get runs --watch         redrawn until Ctrl-C
    kubetrain describe sft-tiny        status, conditions, outputs, eval metrics, events
    kubetrain logs sft-tiny -f         rank 0's log as it is written, into the next attempt
    kubetrain wait sft-tiny --timeout 600   0 Succeeded, 1 Failed (the reason printed), 2 timeout

Each works on the current kube context (`--context`, `--namespace`), through
`kubetrain.client.Client`. A terminal gets rich tables and progress bars; a pipe gets the
same tables as plain text. Refusals print one line (`error: ...`) and exit 2; Ctrl-C stops
following, never the run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from typing import Any

import yaml
from rich.console import Console, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from kubetrain.api import KIND, PIPELINE_KIND, SWEEP_KIND, Pipeline, Sweep, TrainingRun
from kubetrain.client import Client, ClientProblem, Object, RunFailed, WaitTimeout, phase_of

EXIT_FAILED = 1
EXIT_USAGE = 2  # also: a wait that timed out
KIND_ARGUMENTS = {
    "runs": KIND, "tr": KIND, "trainingruns": KIND,
    "pipelines": PIPELINE_KIND, "pipeline": PIPELINE_KIND,
    "sweeps": SWEEP_KIND, "sweep": SWEEP_KIND,
}  # fmt: skip


def client_of(args: argparse.Namespace) -> Client:
    return Client(args.namespace, context=args.context)


def cmd_submit(args: argparse.Namespace) -> int:
    client = client_of(args)
    done = client.submit(args.file)
    for obj, action in done:
        print(f"{obj.kind.lower()}.kubetrain.dev/{obj.metadata.name} {action}", flush=True)
    if args.follow:
        for obj, _action in done:
            for line in client.logs(obj.metadata.name, follow=True):
                print(line, flush=True)
    if args.wait or args.follow:
        for obj, _action in done:
            code = _wait(client, f"{obj.kind}/{obj.metadata.name}", "Succeeded", args.timeout)
            if code:
                return code
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    client = client_of(args)
    kind = KIND_ARGUMENTS.get(args.kind) if args.kind else None
    if args.kind and kind is None:
        raise ClientProblem(f"unknown kind {args.kind!r}: use runs, pipelines or sweeps")

    def objects() -> list[Object]:
        return [client.get(args.name, kind)] if args.name else client.list(kind)

    if args.output in ("yaml", "json"):
        bodies = [_body(o) for o in objects()]
        shown = bodies[0] if args.name else {"apiVersion": "v1", "kind": "List", "items": bodies}
        print(json.dumps(shown, indent=2) if args.output == "json" else yaml.safe_dump(shown))
        return 0
    console = _console()
    if not args.watch:
        console.print(objects_table(objects(), now=time.time(), terminal=console.is_terminal))
        return 0
    try:
        if console.is_terminal:
            with Live(console=console, auto_refresh=False) as live:
                while True:
                    table = objects_table(objects(), now=time.time(), terminal=True)
                    live.update(table, refresh=True)
                    time.sleep(args.interval)
        # A pipe gets a new table whenever something other than the age changed.
        shown = None
        while True:
            found = objects()
            seen = [row_cells(o, 0)[:-1] for o in found]
            if seen != shown:
                console.print(objects_table(found, now=time.time()))
                sys.stdout.flush()
                shown = seen
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


def cmd_describe(args: argparse.Namespace) -> int:
    client = client_of(args)
    obj = client.get(args.name)
    console = _console()
    for line in describe_lines(obj, client.events(obj.metadata.name)):
        console.print(Text(line))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    client = client_of(args)
    try:
        for line in client.logs(
            args.name,
            follow=args.follow,
            rank=args.rank,
            all_ranks=args.all_ranks,
            attempt=args.attempt,
        ):
            print(line, flush=True)
    except KeyboardInterrupt:
        return 0  # stops following; the run goes on
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    return _wait(client_of(args), args.name, args.until, args.timeout)


def _wait(client: Client, name: str, until: str, timeout: float | None) -> int:
    try:
        obj = client.wait(name, until=until, timeout=timeout)
    except RunFailed as e:
        print(str(e), file=sys.stderr)
        return EXIT_FAILED
    except WaitTimeout as e:
        print(f"timed out: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    phase, _reason, message = phase_of(obj)
    print(f"{obj.kind.lower()}/{obj.metadata.name} {phase}: {message}", flush=True)
    return 0


def cmd_set_suspend(args: argparse.Namespace) -> int:
    client = client_of(args)
    obj = client.suspend(args.name) if args.command == "suspend" else client.resume(args.name)
    verb = "suspended" if args.command == "suspend" else "resumed"
    print(f"{obj.kind.lower()}.kubetrain.dev/{obj.metadata.name} {verb}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    obj = client_of(args).delete(args.name)
    print(f"{obj.kind.lower()}.kubetrain.dev/{obj.metadata.name} deleted")
    return 0


# --- what the commands print (pure) ----------------------------------------------------------


def objects_table(objects: list[Object], *, now: float, terminal: bool = False) -> Table:
    """NAME, KIND, PHASE, PROGRESS (a bar), STEP, LOSS, ETA, RESTARTS, AGE: one row each.

    On a terminal the bar is rich's own (coloured, redrawn by --watch); a pipe gets the same
    bar drawn in characters, so that a log or grep reads it."""
    table = Table(box=None, pad_edge=False)
    for column in ("NAME", "KIND", "PHASE", "PROGRESS", "STEP", "LOSS", "ETA", "RESTARTS", "AGE"):
        table.add_column(column, no_wrap=True)
    for obj in objects:
        cells = row_cells(obj, now)
        percent = progress_percent(obj)
        if terminal and percent is not None:
            cells[3] = terminal_bar(percent)
        table.add_row(*cells)
    return table


def progress_percent(obj: Object) -> int | None:
    if isinstance(obj, TrainingRun) and obj.status is not None and obj.status.progress:
        return obj.status.progress.percent
    return None


def terminal_bar(percent: int, width: int = 20) -> RenderableType:
    grid = Table.grid(padding=(0, 1))
    grid.add_row(ProgressBar(total=100, completed=percent, width=width), f"{percent}%")
    return grid


def row_cells(obj: Object, now: float) -> list[Any]:
    phase, _reason, _message = phase_of(obj)
    step = loss = eta = restarts = "-"
    progress: Any = "-"
    if isinstance(obj, TrainingRun) and obj.status is not None:
        p = obj.status.progress
        if p is not None:
            step = f"{p.step}/{p.total_steps}" if p.step is not None and p.total_steps else "-"
            loss = f"{p.loss:.4g}" if p.loss is not None else "-"
            eta = p.eta or "-"
            if p.percent is not None:
                progress = progress_bar(p.percent)
        restarts = str(obj.status.restarts or 0)
    elif isinstance(obj, Pipeline | Sweep) and obj.status is not None:
        progress = obj.status.progress or "-"
    return [
        obj.metadata.name,
        obj.kind,
        phase or "-",
        progress,
        step,
        loss,
        eta,
        restarts,
        _age(obj, now),
    ]


def progress_bar(percent: int, width: int = 20) -> str:
    """`██████░░░░ 60%`: the same on a terminal and in a pipe."""
    filled = round(width * percent / 100)
    return f"{'█' * filled}{'░' * (width - filled)} {percent}%"


def describe_lines(obj: Object, events: list[dict[str, Any]]) -> list[str]:
    """What `kubetrain describe` prints: spec summary, status, conditions, outputs, events."""
    lines = [f"Name:       {obj.metadata.name}", f"Kind:       {obj.kind}"]
    if isinstance(obj, TrainingRun):
        lines += [f"Method:     {obj.spec.method}", f"Output:     {obj.spec.output}"]
    status = obj.status
    if status is None:
        return [*lines, "Status:     (not reconciled yet)", *_event_lines(events)]
    lines.append(f"Phase:      {status.phase}")
    if isinstance(obj, TrainingRun):
        lines.append(f"Attempt:    {status.attempt or '-'} (restarts {status.restarts or 0})")
        if status.progress is not None:
            p = status.progress
            lines.append(
                f"Progress:   step {p.step}/{p.total_steps}, loss {p.loss}, eval loss "
                f"{p.eval_loss}, tokens/s {p.tokens_per_second}, eta {p.eta}"
            )
        if status.latest_checkpoint:
            lines.append(f"Checkpoint: {status.latest_checkpoint}")
        if status.outputs is not None:
            lines.append(f"Model:      {status.outputs.model_uri}")
            for key, value in (status.outputs.metrics or {}).items():
                lines.append(f"  {key}: {value:.6g}")
    elif isinstance(obj, Pipeline):
        lines.append(f"Stages:     {status.progress}")
        for stage in status.stages:
            lines.append(f"  {stage.name}: {stage.phase} {stage.message or ''}".rstrip())
    else:
        lines.append(f"Trials:     {status.progress}")
        if status.best_trial is not None:
            best = status.best_trial
            lines.append(f"Best:       {best.name} {best.value:.6g} {json.dumps(best.parameters)}")
        for trial in status.trials:
            lines.append(f"  {trial.name}: {trial.state} {trial.value or ''}".rstrip())
    lines.append("Conditions:")
    for c in status.conditions:
        lines.append(f"  {c.type}={c.status} {c.reason}: {c.message}")
    return lines + _event_lines(events)


def _event_lines(events: list[dict[str, Any]]) -> list[str]:
    lines = ["Events:"]
    for event in events[-20:]:
        lines.append(f"  {event.get('type')} {event.get('reason')}: {event.get('message')}")
    return lines if events else [*lines, "  (none)"]


def _console() -> Console:
    """A terminal's own width; a pipe gets wide lines rather than tables cut at 80."""
    return Console() if sys.stdout.isatty() else Console(width=200)


def _body(obj: Object) -> dict[str, Any]:
    return obj.model_dump(mode="json", by_alias=True, exclude_none=True)


def _age(obj: Object, now: float) -> str:
    created = getattr(obj.metadata, "creationTimestamp", None) or (
        obj.metadata.model_extra or {}
    ).get("creationTimestamp")
    if not created:
        return "-"
    start = datetime.datetime.fromisoformat(str(created).replace("Z", "+00:00")).timestamp()
    seconds = max(0, int(now - start))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def add_parsers(sub: Any) -> None:
    """The cluster commands, each with --namespace and --context."""

    def command(name: str, help_text: str, func: Any) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("-n", "--namespace", default=None, help="default: the context's")
        p.add_argument("--context", default=None, help="kubeconfig context (default: current)")
        p.set_defaults(func=func, cluster_command=True)
        return p

    submit = command("submit", "create or update the objects in FILE on the cluster", cmd_submit)
    submit.add_argument("file")
    submit.add_argument("--wait", action="store_true", help="then wait until each succeeds")
    submit.add_argument("--follow", action="store_true", help="then stream rank 0's log")
    submit.add_argument("--timeout", type=float, default=None, help="seconds, with --wait")

    get = command("get", "list runs, pipelines and sweeps with their progress", cmd_get)
    get.add_argument("kind", nargs="?", help="runs, pipelines or sweeps (default: all)")
    get.add_argument("name", nargs="?")
    get.add_argument("-o", "--output", choices=("table", "yaml", "json"), default="table")
    get.add_argument("-w", "--watch", action="store_true", help="redraw until Ctrl-C")
    get.add_argument("--interval", type=float, default=2.0, help="seconds between redraws")

    describe = command("describe", "status, conditions, outputs and events", cmd_describe)
    describe.add_argument("name")

    logs = command("logs", "a run's pod logs (rank 0 by default)", cmd_logs)
    logs.add_argument("name")
    logs.add_argument("-f", "--follow", action="store_true", help="stream, across restarts")
    logs.add_argument("--rank", type=int, default=0, help="the node rank whose pod to read")
    logs.add_argument("--all-ranks", action="store_true", help="every rank, lines prefixed")
    logs.add_argument("--attempt", type=int, default=None, help="an earlier attempt's pods")

    wait = command("wait", "wait until it succeeds: exit 0; failed 1; timeout 2", cmd_wait)
    wait.add_argument("name")
    wait.add_argument("--for", dest="until", choices=("Succeeded", "Ready"), default="Succeeded")
    wait.add_argument("--timeout", type=float, default=None, help="seconds (default: forever)")

    for name, help_text in (
        ("suspend", "hold a run, pipeline or sweep"),
        ("resume", "let it go on"),
    ):
        command(name, help_text, cmd_set_suspend).add_argument("name")
    command("delete", "delete it (its children go with it)", cmd_delete).add_argument("name")
