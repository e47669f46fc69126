"""The one evaluator of the throughput benchmark, run on every side's saved model.

Run as: python evaluate_child.py SETTINGS_JSON   (prints one JSON line)

- chats: the mean loss over assistant tokens of held-out chats, each chat alone (no
  padding, so nothing depends on how a side batched), tokens as the chat template marks
  them (TRL's assistant_only_loss mask);
- pairs: DPO's implicit reward on held-out pairs, beta * (log pi(y|x) - log ref(y|x)):
  how often the chosen answer wins (rewards accuracy) and by how much (margin), prompt and
  completion tokenized as TRL's DPOTrainer does.
A LoRA output is loaded onto its base with PEFT.
"""

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

settings = json.loads(sys.argv[1])
torch.manual_seed(0)


def load(path: str):
    if (Path(path) / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        return AutoPeftModelForCausalLM.from_pretrained(path).eval()
    return AutoModelForCausalLM.from_pretrained(path).eval()


def token_log_probs(model, ids: list[int]) -> torch.Tensor:
    """log p(token t | tokens < t) for t = 1..len-1."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)


rows = [json.loads(line) for line in Path(settings["data"]).read_text().splitlines()]
tokenizer = AutoTokenizer.from_pretrained(settings["tokenizer"])
model = load(settings["model"])
if settings["kind"] == "chats":
    total, count = 0.0, 0
    for row in rows:
        encoded = tokenizer.apply_chat_template(
            row["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids = encoded["input_ids"][: settings["max_length"]]
        mask = torch.tensor(encoded["assistant_masks"][1 : len(ids)], dtype=torch.bool)
        nll = -token_log_probs(model, ids)
        total += nll[mask].sum().item()
        count += int(mask.sum())
    print(json.dumps({"eval_loss": total / count, "eval_tokens": count}))
else:
    reference = load(settings["reference"])
    wins, margins = [], []
    for row in rows:
        prompt = tokenizer(row["prompt"])["input_ids"]
        rewards = []
        for answer in ("chosen", "rejected"):
            ids = tokenizer(row["prompt"] + row[answer])["input_ids"][: settings["max_length"]]
            tail = slice(len(prompt) - 1, None)
            policy = token_log_probs(model, ids)[tail].sum()
            ref = token_log_probs(reference, ids)[tail].sum()
            rewards.append(settings["beta"] * (policy - ref).item())
        wins.append(rewards[0] > rewards[1])
        margins.append(rewards[0] - rewards[1])
    print(
        json.dumps(
            {
                "rewards_accuracy": sum(wins) / len(wins),
                "rewards_margin": sum(margins) / len(margins),
            }
        )
    )
