"""Sharded training (training.sharding: fsdp|deepspeed): FSDP2 and DeepSpeed ZeRO-3 in
two gloo processes on CPU.

The slow tests run the trainer as pods do (`python -m kubetrain_trainer.launch`), stop it
with SIGTERM (as a pod deletion does) while the stall hook of tests/e2e/hooks holds it at a
step, and resume the sharded checkpoint it saved in ONE process: the world size changes, as
after a node loss, and torch's distributed checkpoint re-shards it. Each run ends with a
consolidated Hugging Face folder. from_scratch also runs under DDP on the same data and
seed: the losses must agree. DeepSpeed's checkpoints resume only on the world size that
wrote them, so its runs resume on 2 processes again.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from example_specs import REPO, example, with_spec
from polling import wait_for
from transformers import AutoModelForCausalLM, TrainingArguments

from kubetrain.api import parse_document, to_trainer_config
from kubetrain.local import run_locally
from kubetrain.local.runner import resolve_local_uri
from kubetrain_trainer.checkpoints import is_complete, resume_checkpoint
from kubetrain_trainer.config import ConfigError, TrainerConfig, Training, dump_trainer_config
from kubetrain_trainer.contract import ExitCode
from kubetrain_trainer.sharding import (
    DEEPSPEED_LATEST,
    SHARDED_MODEL_DIR,
    SHARDED_OPTIMIZER_DIR,
    check_resumable,
    deepspeed_arguments,
    fsdp_arguments,
)

STALL_HOOK = REPO / "tests" / "e2e" / "hooks" / "stall"
EXAMPLES = {
    "from_scratch": "trainingrun-from-scratch-tiny.yaml",
    "sft": "trainingrun-sft-tiny.yaml",
    "lora": "trainingrun-lora-tiny.yaml",
    "dpo": "trainingrun-dpo-tiny.yaml",
}


# ---------------------------------------------------------------- decisions (fast)


@pytest.mark.parametrize(
    ("training", "expected"),
    [
        ({}, {}),
        (
            {"sharding": "fsdp"},
            {
                "fsdp": True,
                "fsdp_config": {
                    "version": 2,
                    "state_dict_type": "SHARDED_STATE_DICT",
                    "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                    "reshard_after_forward": True,
                    "cpu_offload": False,
                    "activation_checkpointing": False,
                },
                "activation_checkpointing": False,
            },
        ),
        (
            {
                "sharding": "fsdp",
                "fsdp_cpu_offload": True,
                "fsdp_reshard_after_forward": False,
                "gradient_checkpointing": True,
            },
            {
                "fsdp": True,
                "fsdp_config": {
                    "version": 2,
                    "state_dict_type": "SHARDED_STATE_DICT",
                    "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                    "reshard_after_forward": False,
                    "cpu_offload": True,
                    # FSDP's own checkpointing replaces the Trainer's (one gather per layer).
                    "activation_checkpointing": True,
                },
                "activation_checkpointing": False,
            },
        ),
    ],
)
def test_fsdp_arguments(training: dict, expected: dict) -> None:
    assert fsdp_arguments(Training(**training)) == expected


def test_an_adapter_keeps_the_trainers_checkpointing() -> None:
    training = Training(sharding="fsdp", gradient_checkpointing=True)
    arguments = fsdp_arguments(training, adapter=True)
    assert arguments["activation_checkpointing"] is True
    assert arguments["fsdp_config"]["activation_checkpointing"] is False


def test_fsdp_arguments_build_accelerates_fsdp2_plugin(tmp_path: Path, monkeypatch) -> None:
    # TrainingArguments exports this for transformers' loading; keep it out of later tests.
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, **fsdp_arguments(Training(sharding="fsdp"))
    )
    plugin = args.fsdp_plugin_args
    assert plugin["fsdp_version"] == 2
    assert plugin["state_dict_type"] == "SHARDED_STATE_DICT"
    assert plugin["reshard_after_forward"] is True


def test_deepspeed_arguments_are_zero3_filled_in_by_transformers() -> None:
    assert deepspeed_arguments(Training()) == {}
    config = deepspeed_arguments(Training(sharding="deepspeed"))["deepspeed"]
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    # transformers' optimizer (training.optimizer), not one DeepSpeed would configure.
    assert "optimizer" not in config
    assert config["bf16"] == config["fp16"] == {"enabled": "auto"}
    assert config["train_micro_batch_size_per_gpu"] == "auto"


def make_checkpoint(folder: Path, written_with: str, ranks: int) -> Path:
    folder.mkdir(parents=True)
    if written_with == "fsdp":
        (folder / SHARDED_MODEL_DIR).mkdir()
    elif written_with == "deepspeed":
        (folder / DEEPSPEED_LATEST).write_text("global_step4")
    else:
        (folder / "model.safetensors").write_bytes(b"")
    for rank in range(ranks):
        (folder / f"rng_state_{rank}.pth").write_bytes(b"")
    return folder


@pytest.mark.parametrize(
    ("written_with", "sharding", "world_size", "refused"),
    [
        ("fsdp", "fsdp", 1, None),  # DCP re-shards onto another world size
        ("none", "none", 1, None),
        ("deepspeed", "deepspeed", 2, None),
        ("fsdp", "none", 1, "written by a sharding fsdp run (torch distributed checkpoint"),
        ("none", "fsdp", 1, "written by a sharding none run (one full copy"),
        ("deepspeed", "fsdp", 2, "written by a sharding deepspeed run (DeepSpeed ZeRO-3"),
        ("fsdp", "deepspeed", 2, "set sharding: fsdp to resume it"),
        ("deepspeed", "deepspeed", 1, "ZeRO-3 partitions for 2 ranks and this run has 1"),
    ],
)
def test_check_resumable(
    tmp_path: Path, written_with: str, sharding: str, world_size: int, refused: str | None
) -> None:
    folder = make_checkpoint(tmp_path / "checkpoint-4", written_with, ranks=2)
    if refused is None:
        check_resumable(folder, sharding, world_size=world_size)
    else:
        with pytest.raises(ConfigError, match=re.escape(refused)) as e:
            check_resumable(folder, sharding, world_size=world_size)
        assert "training.sharding" in str(e.value)


def sharded_config(tmp_path: Path, **training) -> TrainerConfig:
    return TrainerConfig(
        method="sft",
        model={"name": "m"},
        data={"train": "t.jsonl"},
        training={"sharding": "fsdp", **training},
        output_dir=str(tmp_path),
    )


def test_fsdp_needs_a_process_group(tmp_path: Path, monkeypatch) -> None:
    from kubetrain_trainer.session import training_arguments

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(ConfigError, match=re.escape("python -m kubetrain_trainer.launch")):
        training_arguments(sharded_config(tmp_path), TrainingArguments)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without GPUs")
def test_cpu_offload_without_a_gpu_is_refused(tmp_path: Path, monkeypatch) -> None:
    from kubetrain_trainer.session import training_arguments

    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ConfigError, match="without a GPU they are in host memory already"):
        training_arguments(sharded_config(tmp_path, fsdp_cpu_offload=True), TrainingArguments)


# ---------------------------------------------------------------- training (slow)


def spec(method: str, output: Path, base_model: Path | None, **training) -> dict:
    doc = with_spec(
        example(EXAMPLES[method]),
        output=str(output),
        resources={"nodes": 1, "procPerNode": 2},
        training={"maxSteps": 8, "saveSteps": 4, "loggingSteps": 1, "evalSteps": 4, **training},
    )
    if base_model is not None:
        doc["spec"]["model"] = {"name": str(base_model)}
    return doc


def write_config(doc: dict) -> Path:
    run = parse_document(doc, "test")
    cfg = to_trainer_config(run.metadata.name, run.spec, resolve_local_uri, metrics_port=0)
    output = Path(cfg.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    path = output / "config.yaml"
    path.write_text(dump_trainer_config(cfg))
    return path


def launch(config: Path, procs: int, log: Path, **env: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "kubetrain_trainer.launch", "--standalone",
               "--nproc-per-node", str(procs), "--config", str(config)]  # fmt: skip
    with log.open("w") as out:
        return subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env}
        )


def preempt_at(config: Path, step: int, procs: int) -> tuple[int, str]:
    """Run the trainer until the stall hook holds it after `step`, then SIGTERM it."""
    log = config.parent / "preempted.log"
    hook_path = os.pathsep.join(filter(None, [str(STALL_HOOK), os.environ.get("PYTHONPATH")]))
    proc = launch(config, procs, log, PYTHONPATH=hook_path, KUBETRAIN_TEST_STALL_AT_STEP=str(step))
    try:
        stalled = config.parent / ".stalled-once"
        wait_for(lambda: stalled.exists() or proc.poll() is not None, f"step {step}", 240)
        assert proc.poll() is None, log.read_text()
        proc.send_signal(signal.SIGTERM)  # torchrun passes it to every worker
        proc.wait(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, log.read_text()


def resume(config: Path, procs: int) -> str:
    log = config.parent / "resumed.log"
    proc = launch(config, procs, log)
    try:
        proc.wait(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, log.read_text()
    return log.read_text()


def bytes_per_rank(folder: Path) -> dict[str, int]:
    """Tensor bytes each rank's .distcp file holds, from the checkpoint's DCP metadata.

    Weights and optimizer moments only: the pickled extras (param groups) and one-element
    tensors (Adam's step counts), which DCP writes once from one rank, are left out."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(folder)).read_metadata()
    sizes: Counter[str] = Counter()
    for index, info in metadata.storage_data.items():
        entry = metadata.state_dict_metadata[index.fqn]
        if isinstance(entry, TensorStorageMetadata) and entry.size.numel() > 1:
            sizes[info.relative_path] += info.length
    return dict(sizes)


def assert_sharded(checkpoint: Path) -> None:
    """Two ranks each wrote about half the weights and half the optimizer state."""
    assert is_complete(checkpoint)
    names = {p.name for p in checkpoint.iterdir()}
    assert {SHARDED_MODEL_DIR, SHARDED_OPTIMIZER_DIR} <= names, names
    assert not names & {"model.safetensors", "optimizer.pt", "adapter_model.safetensors"}
    for part in (SHARDED_MODEL_DIR, SHARDED_OPTIMIZER_DIR):
        sizes = bytes_per_rank(checkpoint / part)
        assert sorted(sizes) == ["__0_0.distcp", "__1_0.distcp"], sizes
        # No rank holds the whole: each has about half of every weight and moment.
        assert max(sizes.values()) < 0.6 * sum(sizes.values()), (part, sizes)


def logged(output: Path, key: str = "loss") -> dict[int, float]:
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry[key] for entry in history if key in entry}


def preempt_and_resume_on_one_rank(config: Path) -> dict[int, float]:
    """Stop the 2-process run at step 4 with SIGTERM; resume its checkpoint on 1 process.

    Returns the losses the 2 processes logged before they stopped."""
    code, log = preempt_at(config, step=4, procs=2)
    assert code in (ExitCode.PREEMPTED, 128 + signal.SIGTERM), log
    output = config.parent
    checkpoint = Path(resume_checkpoint(output))
    assert checkpoint.name == "checkpoint-5", log  # the step SIGTERM arrived in, saved
    assert not (output / "metrics.json").exists()
    assert_sharded(checkpoint)
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    losses_before_stop = {e["step"]: e["loss"] for e in history if "loss" in e}
    resumed = resume(config, procs=1)
    assert f"resuming from {checkpoint}" in resumed
    assert "was written by 2 ranks; re-sharding it onto 1" in resumed
    summary = json.loads((output / "metrics.json").read_text())
    assert summary["global_step"] == 8
    # The step count went on from the checkpoint (steps 6-8 logged by the resumed run).
    assert sorted(logged(output)) == list(range(1, 9))
    return losses_before_stop


@pytest.fixture(scope="module")
def ddp_output(tmp_path_factory) -> Path:
    """from_scratch on 2 processes without sharding: the run sharding must reproduce."""
    output = tmp_path_factory.mktemp("ddp") / "ddp"
    ddp = run_locally(parse_document(spec("from_scratch", output, None), "t"))
    assert ddp.exit_code == 0
    return output


@pytest.fixture
def ddp_losses(ddp_output: Path) -> dict[int, float]:
    return logged(ddp_output)


@pytest.fixture
def ddp_eval_losses(ddp_output: Path) -> dict[int, float]:
    return logged(ddp_output, "eval_loss")


@pytest.mark.slow
def test_from_scratch_fsdp_equals_ddp_and_resumes_on_fewer_ranks(
    tmp_path: Path, ddp_losses: dict[int, float]
) -> None:
    config = write_config(spec("from_scratch", tmp_path / "fsdp", None, sharding="fsdp"))
    fsdp_losses = preempt_and_resume_on_one_rank(config)

    # Same data, seed and world size: FSDP's losses are DDP's, step by step.
    assert sorted(fsdp_losses) == [1, 2, 3, 4, 5]
    for step, loss in fsdp_losses.items():
        assert loss == pytest.approx(ddp_losses[step], rel=1e-5), (step, loss, ddp_losses)
    losses = logged(tmp_path / "fsdp")
    assert losses[8] < losses[1] * 0.95, losses

    # The consolidated model is a plain folder: transformers loads it, it generates.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output = tmp_path / "fsdp"
    model = AutoModelForCausalLM.from_pretrained(output)
    summary = json.loads((output / "metrics.json").read_text())
    total = sum(p.detach().double().sum().item() for p in model.parameters())
    assert total == pytest.approx(summary["replica_checksums"][0], rel=1e-9)
    tokenizer = AutoTokenizer.from_pretrained(output)
    ids = tokenizer("The model", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] > ids.shape[1]


def assert_learned_and_loads(method: str, output: Path, base_model: Path) -> None:
    """The held-out loss fell from step 4 to 8, and the final model (or a lora run's adapter
    on its base, as PEFT loads it) reads back as a normal Hugging Face folder."""
    # Per-batch losses of chats and pairs of every length are noisy; the held-out loss
    # (steps 4 and 8) is not.
    eval_losses = logged(output, "eval_loss")
    assert eval_losses[8] < eval_losses[4], eval_losses
    if method == "lora":
        from peft import PeftModel

        assert (output / "adapter_model.safetensors").is_file()
        base = AutoModelForCausalLM.from_pretrained(base_model)
        model = PeftModel.from_pretrained(base, output)
        assert any("lora_A" in name for name, _ in model.named_parameters())
    else:
        model = AutoModelForCausalLM.from_pretrained(output)
        assert model.config.num_hidden_layers == 2
    if method == "dpo":
        summary = json.loads((output / "metrics.json").read_text())
        assert summary["rewards_accuracy"] is not None


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "knobs"),
    [
        # The ranks must agree on the best checkpoint: its reload is a collective.
        ("sft", {"loadBestModelAtEnd": True}),
        # FSDP's activation checkpointing around PEFT-wrapped decoder layers.
        ("lora", {"gradientCheckpointing": True}),
        ("dpo", {}),
    ],
)
def test_method_under_fsdp_checkpoints_shards_and_resumes(
    method: str, knobs: dict, base_model: Path, tmp_path: Path
) -> None:
    config = write_config(spec(method, tmp_path / method, base_model, sharding="fsdp", **knobs))
    preempt_and_resume_on_one_rank(config)
    # Steps 4 and 8 lie before and after the resume.
    assert_learned_and_loads(method, config.parent, base_model)


# ---------------------------------------------------------------- DeepSpeed ZeRO-3 (slow)


def assert_zero3_partitioned(checkpoint: Path) -> None:
    """Each of the two ranks wrote its own ZeRO-3 partition files, each about half of the
    fp32 weights and Adam moments (no rank holds the whole optimizer state)."""
    assert is_complete(checkpoint)
    step_dir = checkpoint / (checkpoint / DEEPSPEED_LATEST).read_text().strip()
    files = {p.name: p.stat().st_size for p in step_dir.iterdir()}
    # bf16 runs name the optimizer files bf16_zero_pp_rank_...
    prefix = "bf16_" if any(name.startswith("bf16_") for name in files) else ""
    optim = [f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in (0, 1)]
    model = [f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt" for rank in (0, 1)]
    assert set(files) == {*optim, *model}, files
    sizes = [files[name] for name in optim]
    assert max(sizes) < 0.6 * sum(sizes), sizes
    # The weights gathered for save_model (an adapter alone for LoRA), loadable as saved.
    saved = {"model.safetensors", "adapter_model.safetensors"}
    assert saved & {p.name for p in checkpoint.iterdir()}, list(checkpoint.iterdir())


def preempt_and_resume_deepspeed(config: Path) -> dict[int, float]:
    """Stop the 2-process ZeRO-3 run at step 4 with SIGTERM and resume it on 2 processes;
    returns the losses logged before the stop."""
    code, log = preempt_at(config, step=4, procs=2)
    assert code in (ExitCode.PREEMPTED, 128 + signal.SIGTERM), log
    output = config.parent
    checkpoint = Path(resume_checkpoint(output))
    assert checkpoint.name == "checkpoint-5", log
    assert_zero3_partitioned(checkpoint)
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    resumed = resume(config, procs=2)
    assert f"resuming from {checkpoint}" in resumed
    assert json.loads((output / "metrics.json").read_text())["global_step"] == 8
    assert sorted(logged(output)) == list(range(1, 9))
    return {e["step"]: e["loss"] for e in history if "loss" in e}


@pytest.mark.slow
def test_from_scratch_deepspeed_equals_ddp_and_resumes(
    tmp_path: Path, ddp_losses: dict[int, float], ddp_eval_losses: dict[int, float]
) -> None:
    config = write_config(spec("from_scratch", tmp_path / "ds", None, sharding="deepspeed"))
    ds_losses = preempt_and_resume_deepspeed(config)
    assert sorted(ds_losses) == [1, 2, 3, 4, 5]
    # Same data, seed, world size and schedule. ZeRO-3 builds the model partitioned
    # (deepspeed.zero.Init), which draws the random initial weights in another order, so
    # the losses are not DDP's bit for bit (0.1-0.4% apart over these steps, measured);
    # a wrong batch, schedule or data split would move them by several percent.
    for step, loss in ds_losses.items():
        assert loss == pytest.approx(ddp_losses[step], rel=1e-2), (step, loss, ddp_losses)
    output = tmp_path / "ds"
    assert logged(output, "eval_loss")[8] == pytest.approx(ddp_eval_losses[8], rel=2e-3)

    model = AutoModelForCausalLM.from_pretrained(output)
    summary = json.loads((output / "metrics.json").read_text())
    # The ranks' partition sums add up to the consolidated model's.
    total = sum(p.detach().double().sum().item() for p in model.parameters())
    assert total == pytest.approx(summary["replica_checksums"][0], rel=1e-6)
    assert summary["replica_checksums"][0] == summary["replica_checksums"][1]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "knobs"),
    [
        # The adapter trains and checkpoints alone, with the Trainer's gradient
        # checkpointing and bf16 filled into DeepSpeed's "auto"; lora.merge reloads the
        # base on rank 0 alone. (sft is this trainer without the adapter; it passed this
        # test too, left out for CI time.)
        ("lora", {"gradientCheckpointing": True, "bf16": True}),
        # A full model loaded into ZeRO-3 partitions (from_pretrained under zero.Init);
        # TRL puts the frozen reference model in a DeepSpeed engine of its own.
        ("dpo", {}),
    ],
)
def test_method_under_deepspeed(method: str, knobs: dict, base_model: Path, tmp_path: Path) -> None:
    # One uninterrupted run each (`resume` runs the trainer to the end, here from step 0);
    # stopping and resuming is the from_scratch test's, the same code path for every method.
    config = write_config(
        spec(method, tmp_path / method, base_model, sharding="deepspeed", **knobs)
    )
    resume(config, procs=2)
    output = config.parent
    assert_zero3_partitioned(output / "checkpoint-4")
    assert_learned_and_loads(method, output, base_model)
    if method == "lora":  # lora.merge reloaded the base outside ZeRO-3
        merged = AutoModelForCausalLM.from_pretrained(output / "merged")
        assert merged.config.num_hidden_layers == 2
