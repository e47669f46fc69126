"""The training-methods guide's configs, written as TrainingRuns, mean what the guide says.

The real-size examples mirror the guide's from_scratch, sft, lora and dpo YAML. Each is
rendered for a cluster, read back as the pods' TrainerConfig, and turned into the
transformers/TRL arguments the trainer would build, and the guide's values are checked at
that far end. Knobs the guide shows that cannot apply are refused with the reason.
"""

from __future__ import annotations

import pytest
import yaml
from example_specs import EXAMPLES

from kubetrain.api import load_documents
from kubetrain.render import render_trainer_config
from kubetrain_trainer.config import ConfigError, TrainerConfig, load_trainer_config
from kubetrain_trainer.session import training_arguments


def pod_config(example: str) -> TrainerConfig:
    (run,) = load_documents(EXAMPLES / example)
    return TrainerConfig.model_validate(yaml.safe_load(render_trainer_config(run)))


def test_from_scratch_guide_config():
    from transformers import TrainingArguments

    cfg = pod_config("trainingrun-from-scratch.yaml")
    arch = cfg.model.architecture
    assert (arch.model_type, arch.vocab_size, arch.hidden_size, arch.num_hidden_layers) == (
        "qwen2", 32000, 2048, 24,
    )  # fmt: skip
    assert (arch.num_attention_heads, arch.intermediate_size) == (16, 8192)
    assert arch.max_position_embeddings == cfg.data.max_length == 2048
    args = training_arguments(cfg, TrainingArguments)
    assert args.num_train_epochs == 3 and args.per_device_train_batch_size == 4
    assert args.gradient_accumulation_steps == 16 and args.learning_rate == 1e-4
    assert args.warmup_steps == 10000 and args.lr_scheduler_type == "cosine"
    assert args.weight_decay == 0.01 and args.max_grad_norm == 1.0
    assert args.eval_steps == 1000 and args.save_steps == 5000 and args.save_total_limit == 3
    assert args.load_best_model_at_end and args.metric_for_best_model == "eval_loss"
    assert args.greater_is_better is False and args.logging_steps == 100
    assert cfg.training.report_to == ["wandb", "tensorboard"]
    assert cfg.training.gradient_checkpointing and cfg.training.dataloader_num_workers == 4
    assert cfg.output_dir == "/mnt/pvc/models/from-scratch-1b"


def test_sft_guide_config():
    from trl import SFTConfig

    cfg = pod_config("trainingrun-sft.yaml")
    assert cfg.model.name == "Qwen/Qwen2.5-3B" and cfg.model.torch_dtype == "bfloat16"
    args = training_arguments(cfg, SFTConfig, max_length=2048)
    assert args.num_train_epochs == 3 and args.per_device_train_batch_size == 8
    assert args.per_device_eval_batch_size == 8 and args.gradient_accumulation_steps == 2
    assert args.learning_rate == 2e-5 and args.lr_scheduler_type == "cosine"
    assert args.warmup_steps == pytest.approx(0.1)  # transformers 5: a float < 1 is a ratio
    assert args.eval_steps == 500 and args.save_steps == 1000 and args.logging_steps == 10
    assert args.remove_unused_columns is False
    assert cfg.training.early_stopping_patience == 3 and cfg.data.packing is False
    assert cfg.data.max_length == 2048


def test_lora_guide_config():
    from kubetrain_trainer.methods.lora import peft_config

    cfg = pod_config("trainingrun-lora.yaml")
    lora = peft_config(cfg.lora)
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, lora.bias) == (16, 32, 0.1, "none")
    assert set(lora.target_modules) == {
        "q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    }  # fmt: skip
    assert lora.task_type == "CAUSAL_LM" and lora.inference_mode is False
    assert cfg.training.num_train_epochs == 5 and cfg.training.warmup_steps == 100
    assert cfg.training.optimizer == "adamw_torch"


def test_dpo_guide_config():
    from trl import DPOConfig

    cfg = pod_config("trainingrun-dpo.yaml")
    assert cfg.dpo.beta == 0.1 and cfg.dpo.loss_type == "sigmoid"
    assert cfg.dpo.label_smoothing == 0.0 and cfg.dpo.reference_model.name is None
    assert cfg.data.max_length == 1024 and cfg.data.max_prompt_length == 512
    assert cfg.model.name == "/mnt/pvc/models/sft-qwen2.5-3b"
    args = training_arguments(cfg, DPOConfig, beta=cfg.dpo.beta)
    assert args.learning_rate == 1e-6 and args.gradient_accumulation_steps == 16
    assert args.per_device_train_batch_size == 2 and args.eval_steps == 100


def test_max_prompt_length_keeps_the_end_of_the_prompt():
    from datasets import Dataset

    from kubetrain_trainer.methods.dpo import clip_prompts
    from kubetrain_trainer.models import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(["alpha beta gamma delta epsilon " * 20], 300, 1)
    prompt = "alpha beta gamma delta epsilon"
    rows = Dataset.from_list([{"prompt": prompt, "chosen": "a", "rejected": "b"}])
    clipped = clip_prompts(rows, tokenizer, limit=2)[0]["prompt"]
    assert clipped.endswith("epsilon") and "alpha" not in clipped
    assert len(tokenizer(clipped, add_special_tokens=False)["input_ids"]) <= 2


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        ("data: {train: t.jsonl, mlmProbability: 0.15}", "masked language models"),
        ("data: {train: t.jsonl, maxPromptLength: 512}", "applies to method dpo only"),
        ("data: {train: t.jsonl}\nlora: {inferenceMode: true}", "lora.inferenceMode"),
        ("data: {train: t.jsonl}\ntraining: {bf16: true, fp16: true}", "exclusive"),
        ("data: {train: t.jsonl}\ntraining: {evalStrategy: steps}", "data.eval is empty"),
        ("data: {train: t.jsonl}\ntraining: {earlyStoppingPatience: 3}", "loadBestModelAtEnd"),
        ("data: {train: t.jsonl}\ntraining: {learningRat: 0.1}", "unknown field"),
    ],
)
def test_knobs_that_cannot_apply_are_refused_with_the_reason(tmp_path, block, expected):
    method = "lora" if "lora:" in block else "sft"
    path = tmp_path / "cfg.yaml"
    path.write_text(f"method: {method}\nmodel: {{name: m}}\noutputDir: out\n{block}\n")
    with pytest.raises(ConfigError) as refused:
        load_trainer_config(path)
    assert expected in str(refused.value)
    assert str(path) in str(refused.value)
