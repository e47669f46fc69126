"""The client's local backend: each submitted object runs as `kubetrain run` in the background.

`Client(backend="local")` hands objects here. Each one is written to a file and run by
the CLI's own `kubetrain run` in a child process (so a TrainingRun, a Pipeline and a Sweep
run exactly as they do from a terminal), its output going to a log file the client's
`logs()` reads and follows. The status is built in the shape the operator writes:
phase and kstatus conditions (`kubetrain.status.next_status`), for a TrainingRun its
progress from the trainer's own metrics endpoint (a free port of its own) and, once done,
its outputs from metrics.json; a failure carries the trainer's termination message (a
configuration error: reason ConfigError), as a pod's does on a cluster. Suspending sends
SIGTERM (the trainer saves a checkpoint and stops); resuming starts it again, which
resumes from that checkpoint.
"""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kubetrain.api import (
    PHASE_FAILED,
    PHASE_PENDING,
    PHASE_RUNNING,
    PHASE_SUCCEEDED,
    PHASE_SUSPENDED,
    REASON_COMPLETED,
    REASON_CONFIG_ERROR,
    REASON_INSTABILITY_DETECTED,
    REASON_OUT_OF_MEMORY,
    REASON_SUSPENDED,
    REASON_TRAINING,
    Pipeline,
    Sweep,
    TrainingRun,
)
from kubetrain.local.runner import (
    finished_metrics,
    free_port,
    local_output_dir,
    read_local_metrics,
)
from kubetrain.status import next_status, parse_trainer_metrics, progress_status
from kubetrain_trainer.contract import ExitCode, output_metrics

Object = TrainingRun | Pipeline | Sweep
LOG_FILE = "kubetrain-run.log"
TERMINATION_FILE = "termination-log"
REASON_EXITED = "Exited"  # the process ended with an exit code none of these name
# The reasons the operator gives the same exit codes (it does not retry any of them here).
EXIT_REASONS = {
    ExitCode.CONFIG_ERROR: REASON_CONFIG_ERROR,
    ExitCode.TRAINING_UNSTABLE: REASON_INSTABILITY_DETECTED,
    ExitCode.DEVICE_OUT_OF_MEMORY: REASON_OUT_OF_MEMORY,
}


@dataclass
class LocalObject:
    """One submitted object, its process and what it has shown so far."""

    obj: Object
    folder: Path
    metrics_port: int
    process: subprocess.Popen[bytes] | None = None
    status: dict[str, Any] = field(default_factory=dict)
    suspended: bool = False

    @property
    def log_path(self) -> Path:
        return self.folder / LOG_FILE


class LocalRuns:
    """The objects this process submitted with backend "local", by name."""

    def __init__(self, workdir: str | Path | None = None) -> None:
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="kubetrain-local-"))
        self.objects: dict[str, LocalObject] = {}

    def submit(self, obj: Object) -> str:
        name = obj.metadata.name
        if name in self.objects and self._running(self.objects[name]):
            return "unchanged"
        folder = self.workdir / name
        folder.mkdir(parents=True, exist_ok=True)
        action = "configured" if name in self.objects else "created"
        local = LocalObject(obj=obj, folder=folder, metrics_port=free_port())
        self.objects[name] = local
        self._start(local)
        return action

    def get(self, name: str) -> Object | None:
        local = self.objects.get(name)
        if local is None:
            return None
        self._observe(local)
        return type(local.obj).model_validate({**_body(local.obj), "status": local.status or None})

    def list(self) -> list[Object]:
        return [obj for name in self.objects if (obj := self.get(name)) is not None]

    def suspend(self, name: str) -> None:
        local = self.objects[name]
        local.suspended = True
        if self._running(local):
            local.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            local.process.wait()  # type: ignore[union-attr]

    def resume(self, name: str) -> None:
        local = self.objects[name]
        if local.suspended and not self._running(local):
            local.suspended = False
            self._start(local)

    def delete(self, name: str) -> None:
        local = self.objects.pop(name)
        if self._running(local):
            local.process.terminate()  # type: ignore[union-attr]
            local.process.wait()  # type: ignore[union-attr]

    def logs(self, name: str, *, follow: bool, interval: float = 0.2) -> Iterator[str]:
        """The object's output lines; with `follow`, as written until its process ends."""
        local = self.objects[name]
        while not local.log_path.exists():
            time.sleep(interval)
        with local.log_path.open("rb") as log:
            pending = b""
            while True:
                chunk = log.read(65536)
                if chunk:
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        yield line.decode("utf-8", "replace")
                    continue
                if not follow or not self._running(local):
                    if pending:
                        yield pending.decode("utf-8", "replace")
                    return
                time.sleep(interval)

    # --- the process and its status ------------------------------------------------------

    def _start(self, local: LocalObject) -> None:
        spec_file = local.folder / f"{local.obj.kind.lower()}.yaml"
        spec_file.write_text(yaml.safe_dump(_body(local.obj), sort_keys=False))
        (local.folder / TERMINATION_FILE).unlink(missing_ok=True)
        command = [sys.executable, "-m", "kubetrain.cli", "run", str(spec_file)]
        command += ["--metrics-port", str(local.metrics_port)]
        env = {**os.environ, "KUBETRAIN_TERMINATION_LOG": str(local.folder / TERMINATION_FILE)}
        with local.log_path.open("ab") as log:
            local.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        local.status = self._next(local, PHASE_PENDING, REASON_TRAINING, "starting")

    def _running(self, local: LocalObject) -> bool:
        return local.process is not None and local.process.poll() is None

    def _observe(self, local: LocalObject) -> None:
        """Bring the status up to what the process and its trainer show now."""
        if local.process is None:
            return
        code = local.process.poll()
        if code is None:
            fields: dict[str, Any] = {}
            if isinstance(local.obj, TrainingRun):
                metrics = _read_metrics(local.metrics_port)
                if metrics is not None and metrics.step is not None:
                    fields["progress"] = progress_status(metrics, None)
            local.status = self._next(local, PHASE_RUNNING, REASON_TRAINING, "running", **fields)
            return
        if local.suspended:
            message = "suspended: stopped with a checkpoint; resume to go on"
            local.status = self._next(local, PHASE_SUSPENDED, REASON_SUSPENDED, message)
        elif code == 0:
            fields = {}
            if isinstance(local.obj, TrainingRun):
                output = local_output_dir(local.obj.spec.output)
                summary = finished_metrics(output) or {}
                fields["outputs"] = {"modelUri": str(output), "metrics": output_metrics(summary)}
            local.status = self._next(
                local, PHASE_SUCCEEDED, REASON_COMPLETED, "completed", **fields
            )
        else:
            reason = EXIT_REASONS.get(code, REASON_EXITED)
            said = _last_words(local)
            local.status = self._next(local, PHASE_FAILED, reason, f"exit {code}: {said}")

    def _next(self, local: LocalObject, phase: str, reason: str, message: str, **fields: Any):
        return next_status(
            local.status,
            phase=phase,  # type: ignore[arg-type]
            reason=reason,
            message=message,
            now=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            generation=None,
            **fields,
        )


def _body(obj: Object) -> dict[str, Any]:
    return obj.model_dump(mode="json", by_alias=True, exclude_none=True, exclude={"status"})


def _read_metrics(port: int) -> Any:
    text = read_local_metrics(port)
    if not text:
        return None
    try:
        return parse_trainer_metrics(text)
    except ValueError:
        return None


def _last_words(local: LocalObject) -> str:
    """The trainer's termination message, else the last line of the log."""
    termination = local.folder / TERMINATION_FILE
    if termination.is_file() and termination.read_text().strip():
        return termination.read_text().strip()
    lines = local.log_path.read_text(errors="replace").strip().splitlines()
    return lines[-1] if lines else "(no output)"
