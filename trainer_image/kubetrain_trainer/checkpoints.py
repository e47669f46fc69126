"""Checkpoints the trainer can trust: completion markers, resume, and saving on SIGTERM.

Checkpoints are the `checkpoint-<step>` folders transformers' Trainer writes under the
output dir. transformers 5 writes them in place: `Trainer._save_checkpoint` saves the model,
optimizer, scheduler, RNG state (one file per rank) and `trainer_state.json` straight into
the final folder, with no temporary folder and no rename, then rotates old folders
(`save_total_limit`, oldest by mtime first, always keeping the newest and the best). A pod
killed mid-save therefore leaves a folder that looks like a checkpoint but is not one. Only
after `_save_checkpoint` has returned does the Trainer call `on_save`; there
`CompleteMarkerCallback` waits for every rank (each writes its own files), flushes the
folder to disk and atomically writes its marker (contract.CHECKPOINT_MARKER,
`kubetrain-complete.json`). A folder is complete only with that marker, so
`resume_checkpoint` never picks a half-written one. (Rotation runs before `on_save`: with
save_total_limit 1 a kill in that instant leaves no complete folder and the run restarts
from scratch; a limit of 2 or more always keeps one.) On SIGTERM (pod deletion, preemption,
node drain) `PreemptionCallback` saves the current step and stops; the caller then exits
with ExitCode.PREEMPTED so the operator restarts and resumes.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from kubetrain_trainer.contract import (
    CHECKPOINT_MARKER,
    checkpoint_dir_name,
    checkpoint_dir_step,
    is_complete,
    list_checkpoints,
)

log = logging.getLogger(__name__)


def write_json_atomic(path: str | Path, data: dict[str, Any]) -> None:
    """Write JSON so readers see the old file or the whole new one, even after a crash.

    The text goes to a temporary file in the same folder (same filesystem, so the rename is
    atomic), is fsynced, replaces the target with os.replace, and the folder is fsynced so
    the rename itself survives a power loss. NaN and infinity are refused: they are not JSON.
    """
    path = Path(path)
    text = json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Flush every file the Trainer wrote, so the marker never outlives the data on disk."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def checkpoint_step(folder: str | Path) -> int | None:
    """The step in a `checkpoint-<step>` folder name, or None for any other name."""
    return checkpoint_dir_step(Path(folder).name)


def mark_complete(folder: str | Path, step: int, epoch: float | None = None) -> Path:
    """Flush a finished checkpoint folder to disk and write its completion marker."""
    folder = Path(folder)
    _fsync_tree(folder)
    marker = folder / CHECKPOINT_MARKER
    write_json_atomic(
        marker,
        {
            "step": step,
            "epoch": epoch,
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    )
    return marker


def resume_checkpoint(output_dir: str | Path) -> str | None:
    """The newest complete checkpoint under output_dir, or None to start from scratch.

    Incomplete folders (no marker: the pod died while saving) are skipped with a warning
    naming them; they are left in place for a person to inspect, and the Trainer's own
    rotation deletes them in time.
    """
    complete, incomplete = [], []
    for _, path in list_checkpoints(output_dir):
        (complete if is_complete(path) else incomplete).append(str(path))
    if incomplete:
        log.warning(
            "ignoring incomplete checkpoints (no %s, the save was interrupted): %s",
            CHECKPOINT_MARKER,
            ", ".join(incomplete),
        )
    return complete[-1] if complete else None


def is_distributed() -> bool:
    """Whether this process is one rank of an initialised torch.distributed group."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


class CompleteMarkerCallback(TrainerCallback):
    """Marks each checkpoint complete once every rank has finished writing it.

    Add it before PrometheusCallback so the checkpoint-step gauge (which the operator turns
    into status.latestCheckpoint) never names a folder that has no marker yet.
    """

    def on_save(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        if is_distributed():
            # Every rank writes its own RNG state (and, under FSDP/DeepSpeed, its shards);
            # all ranks reach on_save, so this barrier cannot strand one of them.
            import torch.distributed as dist

            dist.barrier()
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / checkpoint_dir_name(state.global_step)
        if not folder.is_dir():
            log.warning("no %s after a save; not marking it complete", folder)
            return
        mark_complete(folder, state.global_step, state.epoch)
        log.info("checkpoint %s complete", folder)


# Set by the SIGTERM handler, read at step boundaries. A plain module global: the handler
# runs between bytecodes of the main thread, so it must not take locks or do I/O.
_sigterm_received = False


def _on_sigterm(signum: int, frame: object) -> None:
    global _sigterm_received
    _sigterm_received = True


def install_sigterm_handler() -> Any:
    """Catch SIGTERM so training can checkpoint and stop; returns the previous handler.

    Must be called from the main thread (a Python rule for signal handlers). torchrun
    forwards SIGTERM to its workers and kills them with SIGKILL after --shutdown-timeout
    (PET_SHUTDOWN_TIMEOUT, default 30 s), so the save has to fit in that window and in the
    pod's terminationGracePeriodSeconds.
    """
    return signal.signal(signal.SIGTERM, _on_sigterm)


def sigterm_received() -> bool:
    """Whether SIGTERM arrived since the handler was installed (or last reset)."""
    return _sigterm_received


def reset_sigterm() -> None:
    """Forget an earlier SIGTERM, for a process that trains again after being preempted."""
    global _sigterm_received
    _sigterm_received = False


class PreemptionCallback(TrainerCallback):
    """Turns a SIGTERM into "save this step, then stop" on every rank at the same step.

    The flag is checked at each optimizer-step end. Under torch.distributed the ranks
    all_reduce it with MAX first: pods get SIGTERM at slightly different times, and a rank
    that stopped alone would leave the others hanging in the next collective. That is one
    one-element all_reduce per step, negligible next to the gradient all_reduce.

    With transformers 5.23 setting `should_save` in on_step_end is enough for a save at any
    step, save step or not (`_maybe_log_save_evaluate` saves whenever the flag is set,
    whatever `should_training_stop` says); tests/trainer/test_checkpoints.py checks it. The
    epoch-end save and evaluation that follow the break are cancelled: they would rewrite
    the folder just marked complete, or spend the grace period on evaluation.
    `preempted` tells the caller to exit with ExitCode.PREEMPTED instead of saving a final
    model.
    """

    def __init__(self) -> None:
        self.preempted = False

    def _agreed_stop(self, args: TrainingArguments) -> bool:
        stop = sigterm_received()
        if is_distributed():
            import torch
            import torch.distributed as dist

            flag = torch.tensor([int(stop)], device=args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        return stop

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> TrainerControl:
        if self.preempted or not self._agreed_stop(args):
            return control
        self.preempted = True
        log.warning(
            "SIGTERM received: saving %s and stopping", checkpoint_dir_name(state.global_step)
        )
        control.should_save = True
        control.should_training_stop = True
        control.should_evaluate = False
        # Log the loss of the partial logging window so metrics show where training stopped.
        control.should_log = True
        return control

    def on_epoch_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> TrainerControl:
        if self.preempted:
            control.should_save = False
            control.should_evaluate = False
        return control
