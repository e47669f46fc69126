"""The throughput levers are exact: same loss, same gradients, same steps as TRL's way.

- The labelled-positions LM head gives TRL's fused head's per-token log-probabilities,
  entropy, top-1 hits, mean logits and loss, and the same gradients, on padded batches
  with prompt tokens masked (both of its paths: logits in memory, and TRL's chunked kernel).
- The length-grouped sampler visits every row once per epoch, in an order fixed by seed and
  epoch, with far less padding than random batches, longest batch first.
- Padded and padding-free batches of the same rows train exactly alike; grouped batches take
  the same number of steps to about the same loss; two processes stay in step.
- A packed row gives each of its sequences the logits it has alone.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch
from tiny_models import VOCAB, tiny_model
from trl.trainer.utils import add_fused_lm_head

from kubetrain.api import parse_document
from kubetrain.local import run_locally
from kubetrain_trainer import throughput
from kubetrain_trainer.config import Architecture
from kubetrain_trainer.models import build_model, train_bpe_tokenizer
from kubetrain_trainer.throughput import LengthGroupedSampler, labelled_positions_head

DATA = Path(__file__).resolve().parents[2] / "examples" / "data"
FIELDS = ("log_probs", "entropy", "is_top1", "mean_logits", "log_sum_sq_probs")


def padded_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three rows of different lengths, right-padded, prompts masked out of the labels."""
    generator = torch.Generator().manual_seed(1)
    lengths, prompts = [12, 5, 9], [4, 2, 9]  # the last row has no label at all
    width = max(lengths)
    ids = torch.randint(0, VOCAB, (3, width), generator=generator)
    attention = torch.zeros(3, width, dtype=torch.long)
    labels = torch.full((3, width), -100)
    for row, (length, prompt) in enumerate(zip(lengths, prompts, strict=True)):
        attention[row, :length] = 1
        labels[row, prompt:length] = ids[row, prompt:length]
    return ids, attention, labels


def fused_outputs(model, batch):
    ids, attention, labels = batch
    model.zero_grad()
    out = model(
        input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True, use_cache=False
    )
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return out, grads


score = throughput._score


@pytest.mark.parametrize("path", ["logits", "chunked"])
def test_labelled_head_matches_trls_fused_head(path: str, monkeypatch):
    if path == "chunked":
        monkeypatch.setattr(throughput, "LOGITS_BUDGET", 0)
    trl_model = tiny_model(64)
    ours = copy.deepcopy(trl_model)
    add_fused_lm_head(trl_model, outputs=("log_probs", *FIELDS[1:]))
    add_fused_lm_head(ours, outputs=("log_probs", *FIELDS[1:]))
    labelled_positions_head(ours)
    batch = padded_batch()
    scored = []
    monkeypatch.setattr(throughput, "_score", lambda *a: scored.append(a) or score(*a))

    expected, expected_grads = fused_outputs(trl_model, batch)
    got, got_grads = fused_outputs(ours, batch)
    assert [len(hidden) for _, hidden, _ in scored] == [int((batch[2][:, 1:] != -100).sum())]

    mask = expected.label_mask
    assert torch.equal(got.label_mask, mask)
    assert mask[2].sum() == 0 and mask.sum() > 0  # the all-prompt row adds nothing
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-6)
    for field in FIELDS:
        mine, theirs = getattr(got, field), getattr(expected, field)
        if field == "is_top1":
            assert torch.equal(mine[mask], theirs[mask])
        else:
            torch.testing.assert_close(mine[mask], theirs[mask], rtol=1e-5, atol=1e-5)
        assert not mine[~mask].any(), f"{field} must be zero where there is no label"
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_labelled_head_leaves_plain_calls_and_generation_alone():
    model = tiny_model(64)
    reference = copy.deepcopy(model)
    add_fused_lm_head(model)
    labelled_positions_head(model)
    ids, attention, labels = padded_batch()
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=attention, labels=labels)
        expected = reference(input_ids=ids, attention_mask=attention, labels=labels)
    torch.testing.assert_close(plain.logits, expected.logits)
    torch.testing.assert_close(plain.loss, expected.loss)
    generated = model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert torch.equal(
        generated, reference.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
    )


def long_tailed_lengths(count: int) -> list[int]:
    rng = random.Random(7)
    return [max(4, min(1024, round(rng.lognormvariate(4.5, 1.1)))) for _ in range(count)]


def padded_tokens(lengths: list[int], batches: list[list[int]]) -> int:
    return sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)


def test_length_grouped_sampler_visits_each_row_once_in_a_seeded_order():
    lengths = long_tailed_lengths(1000)
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(1000)) and len(sampler) == 1000
    assert list(LengthGroupedSampler(lengths, batch_size=8, seed=3)) == first
    assert list(LengthGroupedSampler(lengths, batch_size=8, seed=4)) != first
    sampler.set_epoch(1)
    assert list(sampler) != first and sorted(sampler) == list(range(1000))

    batches = [first[i : i + 8] for i in range(0, 1000, 8)]
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # an OOM shows at step 1
    randomly = torch.randperm(1000, generator=torch.Generator().manual_seed(3)).tolist()
    random_batches = [randomly[i : i + 8] for i in range(0, 1000, 8)]
    grouped, unsorted = padded_tokens(lengths, batches), padded_tokens(lengths, random_batches)
    assert sum(lengths) / grouped > 0.9 > 0.6 > sum(lengths) / unsorted
    # Batches are shuffled, not run from longest to shortest (no length curriculum).
    maxima = [max(lengths[i] for i in batch) for batch in batches[1:]]
    assert maxima != sorted(maxima, reverse=True) and maxima != sorted(maxima)


def test_sequence_lengths_of_sft_and_dpo_rows():
    from datasets import Dataset

    sft = Dataset.from_dict({"input_ids": [[1, 2, 3], [4]]})
    dpo = Dataset.from_dict(
        {
            "prompt_ids": [[1, 2], [3]],
            "chosen_ids": [[4], [5, 6, 7]],
            "rejected_ids": [[8, 9, 9], [1]],
        }
    )
    assert throughput.sequence_lengths(sft) == [3, 1]
    assert throughput.sequence_lengths(dpo) == [5, 4]


def test_a_packed_row_gives_each_sequence_the_logits_it_has_alone():
    """Padding-free rows: positions restart per sequence and nothing attends across
    (transformers builds the block-diagonal mask from the positions when, as in training,
    there is no cache)."""
    model = tiny_model(64).eval()
    generator = torch.Generator().manual_seed(2)
    sequences = [torch.randint(0, VOCAB, (n,), generator=generator) for n in (7, 3, 11)]
    packed = torch.cat(sequences)[None]
    positions = torch.cat([torch.arange(len(s)) for s in sequences])[None]
    with torch.no_grad():
        together = model(input_ids=packed, position_ids=positions, use_cache=False).logits[0]
        alone = torch.cat([model(input_ids=s[None]).logits[0] for s in sequences])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved two-layer qwen2 and a BPE trained on the example chats."""
    folder = tmp_path_factory.mktemp("chat-model")
    rows = [json.loads(line) for line in (DATA / "sft-messages.jsonl").read_text().splitlines()]
    texts = [m["content"] for row in rows for m in row["messages"]]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=400, min_frequency=2)
    arch = Architecture(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    build_model(arch, tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def sft_run(model: Path, output: Path, resources: dict | None = None, **data) -> dict:
    doc = {
        "apiVersion": "kubetrain.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": output.name},
        "spec": {
            "method": "sft",
            "model": {"name": str(model)},
            "data": {
                "train": str(DATA / "sft-messages.jsonl"),
                "eval": str(DATA / "sft-messages-eval.jsonl"),
                "format": "messages",
                "maxLength": 128,
                **data,
            },
            "training": {
                "maxSteps": 12,
                "perDeviceTrainBatchSize": 4,
                "learningRate": 3e-3,
                "seed": 5,
                "saveSteps": 1000,
                "loggingSteps": 4,
            },
            "output": str(output),
            **({"resources": resources} if resources else {}),
        },
    }
    result = run_locally(parse_document(doc, "test"), metrics_port=0)
    assert result.exit_code == 0
    return result.metrics


@pytest.mark.slow
def test_batching_modes_take_the_same_steps_to_the_same_loss(chat_model: Path, tmp_path: Path):
    padded = sft_run(chat_model, tmp_path / "padded", groupByLength=False)
    padding_free = sft_run(chat_model, tmp_path / "padding-free", groupByLength=False, packing=True)
    grouped = sft_run(chat_model, tmp_path / "grouped")
    assert padded["global_step"] == padding_free["global_step"] == grouped["global_step"] == 12
    # The same rows in the same batches, padded or joined: the same training, exactly.
    assert padding_free["eval_loss"] == pytest.approx(padded["eval_loss"], rel=1e-4)
    assert padding_free["train_loss"] == pytest.approx(padded["train_loss"], rel=1e-4)
    # Grouped batches hold other rows, in another order: the same learning, not the same bits.
    assert grouped["eval_loss"] == pytest.approx(padded["eval_loss"], rel=0.05)


@pytest.mark.slow
def test_two_processes_share_grouped_batches_and_stay_in_step(chat_model: Path, tmp_path: Path):
    """Under DDP each rank takes its slice of every grouped global batch, and the head's
    gradients are averaged like any other (equal weights on both ranks at the end)."""
    metrics = sft_run(chat_model, tmp_path / "ddp", resources={"nodes": 2, "procPerNode": 1})
    assert metrics["global_step"] == 12
    checksums = metrics["replica_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
