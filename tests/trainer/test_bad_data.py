"""Bad data and model folders that pass `kubetrain validate` (the spec is fine) and must
still fail `kubetrain run` clearly: exit 78, no traceback, the field or `file:line` named.

Each row is a change to a tiny dpo or sft spec. The trainer runs in this process (as
`python -m kubetrain_trainer` would in the pod) on a one-layer model built once, so a
row costs a data load and, at worst, a model load; none of them reaches training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubetrain.api import parse_document, to_trainer_config
from kubetrain.local.runner import resolve_local_uri
from kubetrain_trainer.__main__ import main as trainer_main
from kubetrain_trainer.config import Architecture, dump_trainer_config
from kubetrain_trainer.contract import ExitCode

pytestmark = pytest.mark.slow

DATA = Path(__file__).resolve().parents[2] / "examples" / "data"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved one-layer qwen2 and its BPE tokenizer, as a finished from_scratch run leaves."""
    from kubetrain_trainer.models import build_model, train_bpe_tokenizer

    folder = tmp_path_factory.mktemp("tiny-model")
    lines = (DATA / "pretrain.jsonl").read_text().splitlines()[:100]
    tokenizer = train_bpe_tokenizer(
        (json.loads(line)["text"] for line in lines), vocab_size=300, min_frequency=2
    )
    arch = Architecture(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=256,
    )
    build_model(arch, tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_spec(spec: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the trainer on `spec` here; assert it refused the config; return its message."""
    doc = {
        "apiVersion": "kubetrain.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "bad-data"},
        "spec": {"output": str(tmp_path / "out"), "training": {"maxSteps": 1}, **spec},
    }
    run = parse_document(doc, "test")  # the spec itself is valid: only the data is bad
    cfg = to_trainer_config(run.metadata.name, run.spec, resolve_local_uri)
    cfg.metrics_port = 0
    config = tmp_path / "config.yaml"
    config.write_text(dump_trainer_config(cfg))
    termination = tmp_path / "termination-log"
    monkeypatch.setenv("KUBETRAIN_TERMINATION_LOG", str(termination))
    assert trainer_main(["--config", str(config)]) == ExitCode.CONFIG_ERROR
    return termination.read_text()


def jsonl(tmp_path: Path, rows: list[Any], name: str = "train.jsonl") -> str:
    path = tmp_path / name
    path.write_text(
        "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)
    )
    return str(path)


PAIR = {"prompt": "Is snow white?", "chosen": "Yes.", "rejected": "No."}
CHAT = {
    "messages": [
        {"role": "user", "content": "Is snow white?"},
        {"role": "assistant", "content": "Yes."},
    ]
}


# (case id, method, spec change given (model folder, tmp folder), text the error contains).
CASES: list[tuple[str, str, Any, str]] = [
    (
        "dpo-on-text-with-format-auto",
        "dpo",
        lambda m, t: {"data": {"train": str(DATA / "pretrain.jsonl"), "format": "auto"}},
        "data.train: ",
    ),
    (
        "dpo-on-chats-with-format-auto",
        "dpo",
        lambda m, t: {"data": {"train": jsonl(t, [CHAT] * 3), "format": "auto"}},
        "method dpo needs preference pairs",
    ),
    (
        "dpo-max-length-below-every-prompt",
        "dpo",
        lambda m, t: {"data": {"train": jsonl(t, [PAIR] * 4), "maxLength": 8}},
        "no preference pair is left to train on after data.maxLength=8",
    ),
    (
        "model-folder-without-a-model",
        "sft",
        lambda m, t: {"model": {"name": str(t)}},
        "model.name: ",
    ),
    (
        "model-path-missing",
        "sft",
        lambda m, t: {"model": {"name": str(t / "no-such-model")}},
        "does not exist",
    ),
    (
        "reference-model-missing",
        "dpo",
        lambda m, t: {"dpo": {"referenceModel": {"name": str(t / "no-such-ref")}}},
        "dpo.referenceModel.name: ",
    ),
    (
        "reference-folder-without-a-model",
        "dpo",
        lambda m, t: {"dpo": {"referenceModel": {"name": str(t)}}},
        "dpo.referenceModel.name: ",
    ),
    (
        "sft-on-preference-pairs",
        "sft",
        lambda m, t: {"data": {"train": jsonl(t, [PAIR] * 3)}},
        "holds preference pairs",
    ),
    (
        "train-file-missing",
        "sft",
        lambda m, t: {"data": {"train": str(t / "nope.jsonl")}},
        "data.train: ",
    ),
    (
        "bad-json-line",
        "sft",
        lambda m, t: {"data": {"train": jsonl(t, [CHAT, "{not json"])}},
        "train.jsonl:2: invalid JSON",
    ),
    (
        "chat-without-assistant",
        "sft",
        lambda m, t: {
            "data": {"train": jsonl(t, [CHAT, {"messages": [{"role": "user", "content": "x"}]}])}
        },
        "train.jsonl:2: messages has no assistant turn",
    ),
    (
        "eval-in-another-format",
        "sft",
        lambda m, t: {
            "data": {"train": jsonl(t, [CHAT] * 2), "eval": jsonl(t, [PAIR], "eval.jsonl")}
        },
        "eval.jsonl:1",
    ),
]


@pytest.mark.parametrize(
    ("method", "change", "expected"),
    [(method, change, expected) for _, method, change, expected in CASES],
    ids=[case_id for case_id, *_ in CASES],
)
def test_bad_data_is_refused_naming_the_field_or_line(
    method: str,
    change: Any,
    expected: str,
    tiny_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base = {
        "method": method,
        "model": {"name": str(tiny_model)},
        "data": (
            {"train": str(DATA / "preference.jsonl"), "format": "preference", "maxLength": 64}
            if method == "dpo"
            else {"train": str(DATA / "sft-messages.jsonl"), "maxLength": 64}
        ),
    }
    folder = tmp_path / "case"
    folder.mkdir()
    for key, value in change(tiny_model, folder).items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    message = run_spec(base, tmp_path, monkeypatch)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert expected in message, message


def test_corpus_of_data_mistakes_keeps_its_breadth() -> None:
    assert len(CASES) >= 12
