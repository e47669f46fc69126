"""Run one TrainingRun on this machine with the same trainer the pods run.

The spec becomes the same TrainerConfig the operator mounts into pods, with URIs resolved to
local paths instead of volume mounts; then the trainer starts as a child process: plain
`python -m kubetrain_trainer` for one process, or the torchrun launcher with
nodes x procPerNode processes on this host. This module never imports torch (the operator
image has none); the trainer's exit code comes back unchanged.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
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
    if ref.kind == "s3":
        raise ValueError(
            f"{ref.field}: s3:// URIs are not supported yet; copy the data to a local path"
        )
    if ref.kind == "hub" and not Path(ref.uri).exists():
        return ref.uri
    # Relative paths are relative to where `kubetrain run` was started, as with any CLI.
    return str(Path(ref.uri).expanduser().resolve())


def local_output_dir(uri: str) -> Path:
    """The folder a stage writes to here; refuses pvc:// and s3:// like the local runner."""
    try:
        return Path(
            resolve_local_uri(UriRef("spec.output", uri, classify_uri(uri, may_be_hub_id=False)))
        )
    except ValueError as e:
        raise ConfigError(str(e)) from e


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


def trainer_command(config_path: Path, processes: int) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "kubetrain_trainer", "--config", str(config_path)]
    return [
        sys.executable, "-m", "kubetrain_trainer.launch",
        "--standalone", "--nproc-per-node", str(processes),
        "--config", str(config_path),
    ]  # fmt: skip


@dataclass
class LocalRun:
    """What a finished local run left behind."""

    name: str
    exit_code: int
    output_dir: Path
    metrics: dict = field(default_factory=dict)

    @property
    def succeeded(self) -> bool:
        return self.exit_code == 0


def run_locally(run: TrainingRun, *, metrics_port: int | None = None) -> LocalRun:
    """Train `run` here; returns once the trainer exits. Raises ConfigError on bad URIs."""
    name, spec = run.metadata.name, run.spec
    try:
        cfg = to_trainer_config(name, spec, resolve_local_uri)
    except ValueError as e:
        raise ConfigError(f"TrainingRun {name}: {e}") from e
    if metrics_port is not None:
        cfg.metrics_port = metrics_port
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config_path = output_dir / CONFIG_FILE
    config_path.write_text(dump_trainer_config(cfg))

    processes = spec.resources.nodes * spec.resources.proc_per_node
    exit_code = subprocess.call(trainer_command(config_path, processes))
    metrics = (finished_metrics(output_dir) if exit_code == 0 else None) or {}
    return LocalRun(name=name, exit_code=exit_code, output_dir=output_dir, metrics=metrics)


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
