"""One TRL training run for the throughput benchmark (a child process of it).

Run as: python trl_child.py SETTINGS_JSON   (the bench writes the JSON)

The settings name the method (sft or dpo), the model, data, output and batch settings
kubetrain gets, plus the TRL knobs of the row being measured (precision, gradient
checkpointing, packing, padding-free, a LoRA adapter). Writes <output>/bench.json with the
trainer's train_runtime and global_step; the model is saved for the bench's evaluator.
"""

import json
import sys

from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

settings = json.loads(sys.argv[1])
common = dict(
    output_dir=settings["output"],
    num_train_epochs=settings["epochs"],
    per_device_train_batch_size=settings["batch"],
    learning_rate=settings["learning_rate"],
    lr_scheduler_type="cosine",
    max_length=settings["max_length"],
    seed=settings["seed"],
    data_seed=settings["seed"],
    save_strategy="no",
    report_to="none",
    use_cpu=True,
    logging_steps=10,
    disable_tqdm=True,
    **settings["trl"],
)
tokenizer = AutoTokenizer.from_pretrained(settings["model"])
model = AutoModelForCausalLM.from_pretrained(settings["model"])
rows = load_dataset("json", data_files=settings["train"], split="train")
lora = settings.get("lora")
peft_config = LoraConfig(task_type="CAUSAL_LM", **lora) if lora else None
if settings["method"] == "sft":
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(assistant_only_loss=True, **common),
        train_dataset=rows,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
else:
    trainer = DPOTrainer(
        model=model,
        args=DPOConfig(beta=settings["beta"], **common),
        train_dataset=rows,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
result = trainer.train()
trainer.save_model(settings["output"])
history = [entry for entry in trainer.state.log_history if "loss" in entry]
bench = {
    "train_runtime": result.metrics["train_runtime"],
    "global_step": trainer.state.global_step,
    "train_loss": history[-1]["loss"] if history else None,
}
with open(f"{settings['output']}/bench.json", "w") as f:
    json.dump(bench, f)
