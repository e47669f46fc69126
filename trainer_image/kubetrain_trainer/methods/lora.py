"""LoRA fine-tuning: SFT that trains a small low-rank adapter instead of every weight.

Run as: kubetrain run examples/trainingrun-lora-tiny.yaml

The data handling and loss masks are exactly SFT's (see sft.py); this file adds the PEFT
adapter, QLoRA's 4-bit base model when asked (CUDA only), and the outputs:
- <output>/adapter_model.safetensors + adapter_config.json: load with
  `PeftModel.from_pretrained(base_model, output)`;
- <output>/merged (lora.merge: true): the base model with the adapter folded in, for serving
  without PEFT.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from peft import LoraConfig, prepare_model_for_kbit_training
from trl import SFTTrainer

from kubetrain_trainer.config import ConfigError, Lora, TrainerConfig
from kubetrain_trainer.contract import MERGED_DIR
from kubetrain_trainer.methods import sft
from kubetrain_trainer.models import load_model, load_tokenizer
from kubetrain_trainer.session import FitResult, Session
from kubetrain_trainer.sharding import outside_zero3

log = logging.getLogger(__name__)


def peft_config(lora: Lora) -> LoraConfig:
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=lora.target_modules,
        bias=lora.bias,
        task_type=lora.task_type,
        inference_mode=False,
    )


def quantized_base(cfg: TrainerConfig):
    """QLoRA: the base model in 4-bit NF4, prepared for training."""
    if not torch.cuda.is_available():
        raise ConfigError(
            "lora.loadIn4bit: QLoRA needs a CUDA GPU (bitsandbytes 4-bit kernels); set it "
            "to false on CPU or request nvidia.com/gpu in spec.resources"
        )
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as e:
        raise ConfigError("lora.loadIn4bit: the trainer image lacks bitsandbytes") from e
    compute_dtype = torch.bfloat16 if cfg.training.bf16 else torch.float16
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    model = load_model(cfg.model, quantization_config=quantization)
    return prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=cfg.training.gradient_checkpointing
    )


def save_merged(cfg: TrainerConfig, trainer: SFTTrainer) -> Path:
    """Fold the adapter into a fresh full-precision base and save it beside the adapter."""
    from peft import AutoPeftModelForCausalLM

    merged_dir = Path(cfg.output_dir) / MERGED_DIR
    if trainer.is_world_process_zero():
        # Reload rather than merge the training copy: a 4-bit base cannot be merged exactly.
        with outside_zero3():  # rank 0 loads alone
            model = AutoPeftModelForCausalLM.from_pretrained(cfg.output_dir, dtype=torch.float32)
        model.merge_and_unload().save_pretrained(merged_dir)
        load_tokenizer(cfg.model).save_pretrained(merged_dir)
        log.info("merged model written to %s", merged_dir)
    trainer.accelerator.wait_for_everyone()
    return merged_dir


def train(cfg: TrainerConfig, session: Session) -> FitResult:
    lora = cfg.lora or Lora()
    base = quantized_base(cfg) if lora.load_in_4bit else None
    trainer = sft.build_trainer(cfg, session, peft_config=peft_config(lora), model=base)
    result = session.fit(trainer)
    if lora.merge:
        result.merged_dir = str(save_merged(cfg, result.trainer))
    return result
