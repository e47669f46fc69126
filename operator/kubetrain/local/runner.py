"""Run one TrainingRun on this machine with the same trainer the pods run.

The spec becomes the same TrainerConfig the operator mounts into pods, with URIs resolved to
local paths instead of volume mounts; then the trainer starts as a child process: plain
`python -m kubetrain_trainer` for one process, or the torchrun launcher with
nodes x procPerNode processes on this host. This module never imports torch (the operator
image has none); the trainer's exit code comes back unchanged.

Signals. The trainer runs in a process group of its own, so a terminal's Ctrl-C reaches
only this runner, which hands SIGINT, SIGTERM and SIGHUP on to the whole group as SIGTERM:
every trainer process (the torchrun tree included) saves a checkpoint at the next step
boundary and exits 75. The runner then says where the checkpoint is in one line and exits
128 + the signal (130 for Ctrl-C, 143 for SIGTERM). A second Ctrl-C within
FORCE_STOP_SECONDS kills the group at once; a checkpoint it interrupts has no completion
marker, so it is never resumed from. No trainer process outlives the runner.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from kubetrain.api import MERGED_SUBDIR, TrainingRun, UriRef, classify_uri, to_trainer_config
from kubetrain_trainer.config import ConfigError, dump_trainer_config
from kubetrain_trainer.contract import (
    CHECKPOINT_DIR_PREFIX,
    METRICS_FILE,
    REPORT_FILE,
    REPORT_PLOTS_DIR,
    TRAINER_STATE_FILE,
    TrainerMetricsFile,
    checkpoint_dir_step,
    newest_complete_checkpoint,
    staged_output_dir,
)

CONFIG_FILE = "kubetrain-trainer-config.yaml"


def finished_metrics(output_dir: Path) -> dict | None:
    """The metrics.json of a finished run in `output_dir`, or None when there is none.

    The trainer writes it last, so it means the final model is complete. The keys are the
    ones the file holds (contract.TrainerMetricsFile's fields, absent ones left out).
    """
    path = output_dir / METRICS_FILE
    if not path.is_file():
        return None
    try:
        summary = TrainerMetricsFile.model_validate_json(path.read_bytes())
    except (OSError, ValidationError):
        return None  # a torn or foreign file: the run is not known to be finished
    return summary.model_dump(mode="json", exclude_unset=True)


def resolve_local_uri(ref: UriRef) -> str:
    """A path this machine can open; hub ids stay as they are unless such a folder exists."""
    if ref.kind == "pvc":
        raise ValueError(
            f"{ref.field}: {ref.uri} names a PersistentVolumeClaim, which only exists on a "
            "cluster (the operator mounts it). On this machine use a local path."
        )
    if ref.kind in ("s3", "hf"):
        # The trainer fetches these itself (and works on an s3:// output in a local copy),
        # with this machine's credentials (AWS_* variables, ~/.aws, HF_TOKEN).
        return ref.uri
    if ref.kind == "hub" and not Path(ref.uri).exists():
        return ref.uri
    # Relative paths are relative to where `kubetrain run` was started, as with any CLI.
    return str(Path(ref.uri).expanduser().resolve())


def local_output_dir(uri: str) -> Path:
    """The folder a run writes to here: the path itself, or for an s3:// output the local
    copy the trainer works in (it publishes to the bucket); refuses pvc:// URIs."""
    kind = classify_uri(uri, may_be_hub_id=False)
    try:
        resolved = resolve_local_uri(UriRef("spec.output", uri, kind))
    except ValueError as e:
        raise ConfigError(str(e)) from e
    return staged_output_dir(resolved) if kind == "s3" else Path(resolved)


def clearable_output_dir(uri: str, why: str) -> Path:
    """The local folder of an output this runner may clear for `why`; an s3:// output is
    refused, since clearing the local copy would leave the bucket's checkpoints to resume."""
    if classify_uri(uri, may_be_hub_id=False) == "s3":
        raise ConfigError(
            f"{why} starts over, which this machine cannot do for {uri}: delete its "
            f"{CHECKPOINT_DIR_PREFIX}-* prefixes and {METRICS_FILE} from the bucket first, or "
            "use a local output"
        )
    return local_output_dir(uri)


def clear_previous_run(output_dir: Path) -> bool:
    """Remove what would make the trainer resume, or the stage look finished; True if any.

    Only the trainer's own artifacts go: checkpoint-N folders, metrics.json, the merged
    model and the report of the old model. The final model files are overwritten by the new
    run.
    """
    found = [p for p in output_dir.glob(f"{CHECKPOINT_DIR_PREFIX}-*") if p.is_dir()]
    previous = (METRICS_FILE, MERGED_SUBDIR, REPORT_FILE, REPORT_PLOTS_DIR, TRAINER_STATE_FILE)
    found += [output_dir / name for name in previous if (output_dir / name).exists()]
    for path in found:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return bool(found)


def trainer_command(config_path: Path, processes: int, sharded: bool = False) -> list[str]:
    """The trainer alone for one process; the torchrun launcher for several, and for a
    sharded run (FSDP and DeepSpeed shard over a torchrun process group, even one of one)."""
    if processes == 1 and not sharded:
        return [sys.executable, "-m", "kubetrain_trainer", "--config", str(config_path)]
    return [
        sys.executable, "-m", "kubetrain_trainer.launch",
        "--standalone", "--nproc-per-node", str(processes),
        "--config", str(config_path),
    ]  # fmt: skip


FORCE_STOP_SECONDS = 5  # a second Ctrl-C this soon after the first stops at once
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass
class LocalRun:
    """What a finished local run left behind; `interrupted_by` the signal that stopped it."""

    name: str
    exit_code: int
    output_dir: Path
    metrics: dict = field(default_factory=dict)
    interrupted_by: int | None = None

    @property
    def succeeded(self) -> bool:
        return self.exit_code == 0


class ForwardSignals:
    """While active, SIGINT, SIGTERM and SIGHUP to this runner stop its trainers (module doc).

    Each trainer runs in a process group of its own (`start_new_session=True`), added with
    `add`; a signal becomes SIGTERM to every group, and a second Ctrl-C within
    FORCE_STOP_SECONDS SIGKILL. `first` is the first signal received, or None. Outside the
    main thread signal handlers cannot be set; the trainers then just run. On leaving, every
    group is killed whatever is left of it, so no trainer outlives the runner.
    """

    def __init__(self) -> None:
        self.first: int | None = None
        self._processes: list[subprocess.Popen] = []
        self._last_at: float | None = None
        self._previous: dict[int, object] = {}

    def add(self, process: subprocess.Popen) -> None:
        self._processes.append(process)
        if self.first is not None:  # signalled while it was starting
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGTERM)

    def _forward(self, signum: int, _frame: object) -> None:
        now = time.monotonic()
        again = signum == signal.SIGINT and self._last_at is not None
        again = again and now - self._last_at < FORCE_STOP_SECONDS
        self.first = signum if self.first is None else self.first
        self._last_at = now
        for process in self._processes:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL if again else signal.SIGTERM)

    def __enter__(self) -> ForwardSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._forward) for s in FORWARDED_SIGNALS}
        return self

    def __exit__(self, *_exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        for process in self._processes:
            _stop_group(process)


def run_trainer(command: list[str]) -> tuple[int, int | None]:
    """Run the trainer in a process group of its own, forwarding signals (module doc).

    Returns (exit code, the first signal this runner received or None).
    """
    with ForwardSignals() as signals:
        process = subprocess.Popen(command, start_new_session=True)
        signals.add(process)
        code = process.wait()
    return code, signals.first


def _stop_group(process: subprocess.Popen) -> None:
    """Kill whatever of the trainer's process group is left (a worker torchrun left behind,
    or all of it if this runner is leaving on an exception)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return
    if process.poll() is None:
        process.wait()


def interrupted_message(output_dir: Path) -> str:
    """The one line a person reads after stopping a run here."""
    checkpoint = newest_complete_checkpoint(output_dir)
    if checkpoint is None:
        return (
            f"interrupted before the first checkpoint; nothing saved in {output_dir}; run the "
            "same command again to start over"
        )
    step = checkpoint_dir_step(checkpoint.name)
    return (
        f"interrupted at step {step}; checkpoint saved in {checkpoint}; run the same command "
        "again to resume"
    )


def run_locally(run: TrainingRun, *, metrics_port: int | None = None) -> LocalRun:
    """Train `run` here; returns once the trainer exits. Raises ConfigError on bad URIs."""
    name, spec = run.metadata.name, run.spec
    try:
        cfg = to_trainer_config(name, spec, resolve_local_uri)
    except ValueError as e:
        raise ConfigError(f"TrainingRun {name}: {e}") from e
    if metrics_port is not None:
        cfg.metrics_port = metrics_port
    output_dir = local_output_dir(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config_path = output_dir / CONFIG_FILE
    config_path.write_text(dump_trainer_config(cfg))

    processes = spec.resources.nodes * spec.resources.proc_per_node
    sharded = spec.training.sharding != "none"
    exit_code, interrupted_by = run_trainer(trainer_command(config_path, processes, sharded))
    if interrupted_by is not None:
        print(interrupted_message(output_dir), file=sys.stderr, flush=True)
        exit_code = 128 + interrupted_by
    metrics = (finished_metrics(output_dir) if exit_code == 0 else None) or {}
    return LocalRun(
        name=name,
        exit_code=exit_code,
        output_dir=output_dir,
        metrics=metrics,
        interrupted_by=interrupted_by,
    )


def free_port() -> int:
    """A TCP port nothing listens on now (each local trainer serves its metrics on its own)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_local_metrics(port: int) -> str | None:
    """GET http://127.0.0.1:port/metrics; None while nothing answers there."""
    import requests

    try:
        response = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2)
        response.raise_for_status()
    except requests.RequestException:
        return None
    return response.text
