"""Completion markers, resume_checkpoint, and checkpoint-then-stop on SIGTERM.

A tiny Qwen2 (hidden 32, 2 layers, vocab 128) trains a few steps on CPU with the real
transformers Trainer; SIGTERM is sent to this very process mid-training. A two-process gloo
group checks that ranks agree on stopping and that the marker waits for every rank.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_models import tiny_model
from transformers import (
    Trainer,
    TrainerCallback,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from kubetrain_trainer import checkpoints
from kubetrain_trainer.checkpoints import (
    CompleteMarkerCallback,
    PreemptionCallback,
    install_sigterm_handler,
    is_complete,
    mark_complete,
    reset_sigterm,
    resume_checkpoint,
    write_json_atomic,
)
from kubetrain_trainer.contract import CHECKPOINT_DIR_PREFIX, CHECKPOINT_MARKER

SEQ = 16


def tiny_rows(count: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(count):
        ids = torch.randint(1, 128, (SEQ,), generator=gen)
        rows.append({"input_ids": ids, "attention_mask": torch.ones(SEQ), "labels": ids})
    return rows


def tiny_trainer(out: Path, callbacks: list, max_steps: int = 6, **args) -> Trainer:
    model = tiny_model(SEQ)
    settings = {
        "output_dir": str(out),
        "max_steps": max_steps,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_steps": 2,
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "dataloader_pin_memory": False,
        **args,
    }
    return Trainer(
        model=model,
        args=TrainingArguments(**settings),
        train_dataset=tiny_rows(2 * max_steps),
        eval_dataset=tiny_rows(2),
        callbacks=callbacks,
    )


class StepRecorder(TrainerCallback):
    """Remembers the global step at every step end and every save."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.saves: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)

    def on_save(self, args, state, control, **kwargs):
        self.saves.append(state.global_step)


class SigtermAt(TrainerCallback):
    """Sends SIGTERM to this process at the start of optimizer step `step`."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.fixture
def sigterm_handler():
    """Install the trainer's SIGTERM handler for one test, then put the old one back."""
    reset_sigterm()
    previous = install_sigterm_handler()
    yield
    signal.signal(signal.SIGTERM, previous)
    reset_sigterm()


@pytest.mark.slow
def test_contract_names_the_folders_transformers_saves():
    # The operator builds status.latestCheckpoint from the contract's name, without torch.
    assert CHECKPOINT_DIR_PREFIX == PREFIX_CHECKPOINT_DIR


def test_every_checkpoint_gets_a_marker(tmp_path):
    tiny_trainer(tmp_path, [CompleteMarkerCallback()]).train()
    folders = sorted(tmp_path.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert [p.name for p in folders] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    for folder in folders:
        marker = json.loads((folder / CHECKPOINT_MARKER).read_text())
        assert marker["step"] == int(folder.name.split("-")[1])
        assert marker["time"].endswith("+00:00")
        # The marker is the last word: the Trainer's own files were there before it.
        assert (folder / "trainer_state.json").stat().st_mtime <= (
            folder / CHECKPOINT_MARKER
        ).stat().st_mtime
    assert resume_checkpoint(tmp_path) == str(tmp_path / "checkpoint-6")


def make_checkpoint(output_dir: Path, step: int, complete: bool) -> Path:
    folder = output_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if complete:
        mark_complete(folder, step)
    return folder


def test_resume_skips_incomplete_checkpoints(tmp_path, caplog):
    make_checkpoint(tmp_path, 5, complete=True)
    make_checkpoint(tmp_path, 10, complete=True)
    interrupted = make_checkpoint(tmp_path, 15, complete=False)
    (tmp_path / "checkpoint-notastep").mkdir()
    (tmp_path / "metrics.json").write_text("{}")
    assert resume_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    assert str(interrupted) in caplog.text and "incomplete" in caplog.text


def test_marker_must_name_its_own_step(tmp_path):
    folder = make_checkpoint(tmp_path, 8, complete=False)
    write_json_atomic(folder / CHECKPOINT_MARKER, {"step": 4})
    assert not is_complete(folder)
    (folder / CHECKPOINT_MARKER).write_text("{not json")
    assert not is_complete(folder)
    assert resume_checkpoint(tmp_path) is None


def test_no_checkpoints_means_start_fresh(tmp_path):
    assert resume_checkpoint(tmp_path / "missing") is None
    assert resume_checkpoint(tmp_path) is None


def test_atomic_json_leaves_no_temp_files_and_refuses_nan(tmp_path):
    target = tmp_path / "state.json"
    write_json_atomic(target, {"a": 1})
    write_json_atomic(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    with pytest.raises(ValueError):
        write_json_atomic(target, {"a": float("nan")})
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


@pytest.mark.slow
def test_sigterm_saves_current_step_and_resume_continues(tmp_path, sigterm_handler):
    preemption, recorder = PreemptionCallback(), StepRecorder()
    # Step 3 is not a save step (save_steps=2), so the save must come from the callback.
    trainer = tiny_trainer(
        tmp_path, [CompleteMarkerCallback(), preemption, recorder, SigtermAt(step=3)]
    )
    trainer.train()
    assert preemption.preempted
    assert trainer.state.global_step == 3
    assert recorder.saves == [2, 3]
    assert is_complete(tmp_path / "checkpoint-3")
    assert resume_checkpoint(tmp_path) == str(tmp_path / "checkpoint-3")

    reset_sigterm()  # the pod restarted: a new process has seen no SIGTERM
    resumed, recorder = PreemptionCallback(), StepRecorder()
    trainer = tiny_trainer(tmp_path, [CompleteMarkerCallback(), resumed, recorder])
    output = trainer.train(resume_from_checkpoint=resume_checkpoint(tmp_path))
    assert not resumed.preempted
    assert recorder.steps == [4, 5, 6]
    assert output.global_step == trainer.state.global_step == 6
    assert resume_checkpoint(tmp_path) == str(tmp_path / "checkpoint-6")


@pytest.mark.slow
def test_sigterm_with_epoch_saves_writes_the_checkpoint_once(tmp_path, sigterm_handler):
    preemption, recorder = PreemptionCallback(), StepRecorder()
    trainer = tiny_trainer(
        tmp_path,
        [CompleteMarkerCallback(), preemption, recorder, SigtermAt(step=2)],
        save_strategy="epoch",
        eval_strategy="epoch",
    )
    trainer.train()
    # The epoch-end save that follows the stop would rewrite the folder just marked
    # complete; the callback cancels it (and the epoch-end evaluation).
    assert preemption.preempted and recorder.saves == [2]
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-2"]
    assert is_complete(tmp_path / "checkpoint-2")


def test_handler_only_sets_a_flag(sigterm_handler):
    assert not checkpoints.sigterm_received()
    os.kill(os.getpid(), signal.SIGTERM)
    assert checkpoints.sigterm_received()
    # Without torch.distributed the local flag decides alone.
    assert PreemptionCallback()._agreed_stop(SimpleNamespace(device="cpu"))


def _rank_main(rank: int, store: str, output_dir: str, results) -> None:
    """One of two gloo ranks: only rank 1 got SIGTERM; both must decide to stop."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        checkpoints.reset_sigterm()
        if rank == 1:
            checkpoints._on_sigterm(signal.SIGTERM, None)
        args = SimpleNamespace(device=torch.device("cpu"), output_dir=output_dir)
        stop = PreemptionCallback()._agreed_stop(args)
        folder = Path(output_dir) / "checkpoint-7"
        if rank == 1:
            # Rank 1 is slow to write its own file; rank 0 must not mark before it lands.
            time.sleep(1.0)
            (folder / "rng_state_1.pth").write_text("rank 1")
        else:
            folder.mkdir()
            (folder / "rng_state_0.pth").write_text("rank 0")
        state = TrainerState(global_step=7, is_world_process_zero=rank == 0)
        CompleteMarkerCallback().on_save(args, state, None)
        results.put((rank, stop, sorted(p.name for p in folder.iterdir())))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_agree_to_stop_and_marker_waits_for_all(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_rank_main, args=(r, str(tmp_path / "store"), str(tmp_path), results))
        for r in range(2)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    assert [proc.exitcode for proc in procs] == [0, 0]
    by_rank = dict((rank, (stop, files)) for rank, stop, files in (results.get() for _ in procs))
    assert by_rank[0][0] and by_rank[1][0], "rank 0 had no SIGTERM but must stop with rank 1"
    # Rank 0 wrote the marker after the barrier, so rank 1's file was already there.
    assert by_rank[0][1] == [CHECKPOINT_MARKER, "rng_state_0.pth", "rng_state_1.pth"]
    assert is_complete(tmp_path / "checkpoint-7")
