"""Every method trains for real on a tiny model, on CPU, through `kubetrain run`'s runner.

One session-scoped from_scratch run (`base_model`, in conftest.py) provides the base model
the other methods start from, as in `make demo`. Each test asserts what the method is for:
the loss went down, the adapter loads in PEFT, DPO logged its rewards, the chat mask covered
assistant tokens only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from example_specs import example, with_spec

from kubetrain.api import parse_document
from kubetrain.local import run_locally
from kubetrain_trainer.config import DataSpec
from kubetrain_trainer.data import data_fingerprint
from kubetrain_trainer.datacache import CACHE_DIR, MARKER

pytestmark = pytest.mark.slow


def train(doc: dict, output: Path) -> dict:
    doc = with_spec(doc, output=str(output))
    result = run_locally(parse_document(doc, "test"), metrics_port=0)
    assert result.exit_code == 0, f"trainer exited {result.exit_code}"
    return result.metrics


def went_down(losses: list[float]) -> bool:
    """The last logged loss is below the first two (step 1 alone is a one-batch sample)."""
    return losses[-1] < sum(losses[:2]) / 2


def logged_losses(output: Path, key: str = "loss") -> list[float]:
    """Training losses in step order, from the newest checkpoint's trainer_state.json."""
    newest = max(output.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    history = json.loads((newest / "trainer_state.json").read_text())["log_history"]
    return [entry[key] for entry in history if key in entry]


def test_from_scratch_learns_and_saves_tokenizer_and_model(base_model: Path):
    losses = logged_losses(base_model)
    assert losses[-1] < losses[0] * 0.8, losses
    metrics = json.loads((base_model / "metrics.json").read_text())
    assert metrics["method"] == "from_scratch"
    assert metrics["perplexity"] == pytest.approx(2.718281828 ** metrics["eval_loss"], rel=1e-6)
    assert metrics["tokens_total"] > 0 and metrics["tokens_per_second"] > 0
    # Which data made the model: the example's files, by their bytes and rows.
    data = example("trainingrun-from-scratch-tiny.yaml")["spec"]["data"]
    assert metrics["data_fingerprint"] == data_fingerprint(
        DataSpec(train=data["train"], eval=data["eval"])
    )
    lines = [len(Path(data[split]).read_text().splitlines()) for split in ("train", "eval")]
    assert [metrics["train_rows"], metrics["eval_rows"]] == lines
    assert [metrics["train_rows_dropped"], metrics["eval_rows_dropped"]] == [0, 0]  # packed
    # The trained tokenizer and the model load back, with ChatML ready for the next stage.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model = AutoModelForCausalLM.from_pretrained(base_model)
    assert "<|im_start|>" in tokenizer.get_vocab()
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64


def test_sft_on_messages_learns_assistant_turns_only(base_model: Path, tmp_path: Path):
    doc = with_spec(
        example("trainingrun-sft-tiny.yaml"),
        model={"name": str(base_model)},
        training={"numTrainEpochs": 1, "maxSteps": 30, "evalSteps": 15, "saveSteps": 15},
    )
    output = tmp_path / "sft"
    metrics = train(doc, output)
    losses = logged_losses(output)
    assert went_down(losses), losses
    assert metrics["eval_loss"] is not None

    # The labels TRL trained on: only assistant content (and its end marker) is learned.
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from kubetrain_trainer.data import load_split

    rows, _ = load_split(doc["spec"]["data"]["train"], "messages")
    tokenizer = AutoTokenizer.from_pretrained(output)
    from transformers import AutoModelForCausalLM

    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(output),
        args=SFTConfig(
            str(tmp_path / "probe"),
            assistant_only_loss=True,
            max_length=192,
            report_to="none",
            use_cpu=True,
        ),
        train_dataset=rows.select(range(3)),
        processing_class=tokenizer,
    )
    row = trainer.train_dataset[0]
    learned = tokenizer.decode(
        [t for t, lab in zip(row["input_ids"], row["labels"], strict=False) if lab != -100]
    )
    assistant = [m["content"] for m in rows[0]["messages"] if m["role"] == "assistant"]
    assert all(a in learned for a in assistant)
    assert "user" not in learned and rows[0]["messages"][1]["content"] not in learned


def test_rows_left_nothing_to_learn_by_truncation_are_dropped_and_counted(
    base_model: Path, tmp_path: Path
):
    """An instruction whose prompt alone fills maxLength loses its whole output: TRL drops
    the row, and metrics.json and the report count it."""
    long_prompt = " ".join(["the fox lives in the forest"] * 40)
    rows = [{"instruction": f"Add {i} and {i}.", "output": f"{2 * i}."} for i in range(6)]
    rows[1]["instruction"] = rows[4]["instruction"] = long_prompt
    rows_file = tmp_path / "train.jsonl"
    rows_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    doc = with_spec(
        example("trainingrun-sft-tiny.yaml"),
        model={"name": str(base_model)},
        data={"train": str(rows_file), "format": "instruction", "maxLength": 64},
        training={"maxSteps": 2, "evalStrategy": "no", "saveSteps": 100},
    )
    doc["spec"]["data"].pop("eval")
    output = tmp_path / "sft"
    metrics = train(doc, output)
    assert (metrics["train_rows"], metrics["train_rows_dropped"]) == (6, 2), metrics
    assert metrics["eval_rows_dropped"] == 0
    report = (output / "report.html").read_text()
    assert "training rows dropped by truncation" in report


def test_lora_writes_an_adapter_peft_loads_and_a_merged_model(base_model: Path, tmp_path: Path):
    doc = with_spec(example("trainingrun-lora-tiny.yaml"), model={"name": str(base_model)})
    output = tmp_path / "lora"
    metrics = train(doc, output)
    losses = logged_losses(output)
    assert went_down(losses), losses
    assert metrics["merged_dir"] == str(output / "merged")

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_model)
    adapted = PeftModel.from_pretrained(base, output)
    assert adapted.peft_config["default"].r == 8
    trainable = [n for n, _ in adapted.named_parameters() if "lora_" in n]
    assert trainable, "adapter has no LoRA weights"
    merged = AutoModelForCausalLM.from_pretrained(output / "merged")
    assert not any("lora_" in n for n, _ in merged.named_parameters())


def test_dpo_logs_rewards_accuracy_and_margin(base_model: Path, tmp_path: Path):
    doc = with_spec(
        example("trainingrun-dpo-tiny.yaml"),
        model={"name": str(base_model)},
        training={"maxSteps": 20, "evalSteps": 10, "saveSteps": 10},
    )
    output = tmp_path / "dpo"
    metrics = train(doc, output)
    assert 0.0 <= metrics["rewards_accuracy"] <= 1.0
    assert metrics["rewards_margin"] is not None
    accuracies = logged_losses(output, "rewards/accuracies")
    margins = logged_losses(output, "rewards/margins")
    assert accuracies and margins
    # Preferences are learnable by construction: the chosen answer ends up ahead.
    assert metrics["rewards_accuracy"] > 0.5 and metrics["rewards_margin"] > 0
    losses = logged_losses(output)
    assert went_down(losses), losses
    # TRL's preparation (prompts clipped to maxPromptLength first) ran once, into the cache.
    cache = output / CACHE_DIR
    assert len([entry for entry in cache.iterdir() if (entry / MARKER).is_file()]) == 2
