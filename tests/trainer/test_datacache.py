"""The tokenized-data cache: rank 0 tokenizes once, every rank, resume and rerun read it.

The tiny from_scratch example trains three times into one output folder: on 2 processes
(rank 0 builds the entry while rank 1 waits, then both read it), resumed for more steps
(read, not rebuilt: its marker is untouched), and with another maxLength (a new entry).
sft (TRL's preparation, kubetrain_trainer.prepared) does the same with its train and eval
splits (test_methods checks dpo's two entries). The key is tested on its own too: data,
tokenizer and settings each change it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from example_specs import example, with_spec

from kubetrain_trainer.datacache import CACHE_DIR, MARKER, cache_key
from kubetrain_trainer.models import train_bpe_tokenizer

pytestmark = pytest.mark.slow

KUBETRAIN = str(Path(sys.executable).parent / "kubetrain")


def run(
    tmp_path: Path,
    output: Path,
    steps: int,
    max_length: int = 128,
    procs: int = 1,
    spec: str = "trainingrun-from-scratch-tiny.yaml",
    **changes,
) -> str:
    doc = with_spec(
        example(spec),
        output=str(output),
        data={"maxLength": max_length},
        training={"maxSteps": steps, "saveSteps": 10, "loggingSteps": 5, "evalStrategy": "no"},
        resources={"procPerNode": procs},
        **changes,
    )
    spec = tmp_path / "run.yaml"
    spec.write_text(yaml.safe_dump(doc))
    done = subprocess.run(
        [KUBETRAIN, "run", str(spec), "--metrics-port", "0"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def entries(output: Path) -> list[Path]:
    return sorted(p for p in (output / CACHE_DIR).iterdir() if (p / MARKER).is_file())


def test_rank_0_tokenizes_once_and_resume_and_rerun_read_it(tmp_path: Path) -> None:
    output = tmp_path / "out"
    first = run(tmp_path, output, steps=10, procs=2)
    assert len(re.findall(r"\] INFO .*tokenized data cached in ", first)) == 1, first[-3000:]
    assert re.search(r"\[rank 0\] INFO .*tokenized data cached in ", first)
    for rank in (0, 1):
        assert re.search(rf"\[rank {rank}\] INFO .*tokenized data from cache ", first)
    (entry,) = entries(output)
    written = (entry / MARKER).stat().st_mtime_ns

    resumed = run(tmp_path, output, steps=20)
    assert "resuming from" in resumed and "tokenized data cached in" not in resumed
    assert f"tokenized data from cache {entry}" in resumed
    assert (entry / MARKER).stat().st_mtime_ns == written and entries(output) == [entry]

    shorter = run(tmp_path, output, steps=30, max_length=64)
    assert "tokenized data cached in" in shorter
    assert len(entries(output)) == 2 and entry in entries(output)


def tiny_tokenizer():
    texts = ["the fox lives in the forest", "a second line of text"] * 10
    return train_bpe_tokenizer(texts, vocab_size=300, min_frequency=1)


def test_the_key_follows_the_data_the_tokenizer_and_the_settings() -> None:
    tokenizer = tiny_tokenizer()
    key = cache_key("sha256:a", tokenizer, recipe="r", block=128)
    assert re.fullmatch(r"[0-9a-f]{32}", key)
    assert cache_key("sha256:a", tiny_tokenizer(), recipe="r", block=128) == key
    assert cache_key("sha256:b", tokenizer, recipe="r", block=128) != key
    assert cache_key("sha256:a", tokenizer, recipe="r", block=64) != key
    assert cache_key("sha256:a", tokenizer, recipe="r2", block=128) != key
    other = tiny_tokenizer()
    other.add_tokens(["<|new|>"])
    assert cache_key("sha256:a", other, recipe="r", block=128) != key
    templated = tiny_tokenizer()
    templated.chat_template = "{{ messages }}"
    assert cache_key("sha256:a", templated, recipe="r", block=128) != key


def test_sft_prepares_once_and_resume_and_rerun_read_it(tmp_path: Path, base_model: Path) -> None:
    output = tmp_path / "sft"
    sft = {"spec": "trainingrun-sft-tiny.yaml", "model": {"name": str(base_model)}}
    first = run(tmp_path, output, steps=10, max_length=192, procs=2, **sft)
    built = re.findall(r"\[rank (\d)\] INFO .*tokenized data cached in ", first)
    assert built == ["0", "0"], first[-3000:]  # train and eval, by rank 0 alone
    for rank in (0, 1):
        assert len(re.findall(rf"\[rank {rank}\] INFO .*tokenized data from cache ", first)) == 2
    assert "Tokenizing train dataset" not in first  # TRL's own bar: nobody tokenized twice
    written = {entry: (entry / MARKER).stat().st_mtime_ns for entry in entries(output)}
    assert len(written) == 2

    resumed = run(tmp_path, output, steps=20, max_length=192, **sft)
    assert "resuming from" in resumed and "tokenized data cached in" not in resumed
    assert {entry: (entry / MARKER).stat().st_mtime_ns for entry in entries(output)} == written

    shorter = run(tmp_path, output, steps=30, max_length=96, **sft)
    assert len(re.findall(r"tokenized data cached in ", shorter)) == 2
    assert len(entries(output)) == 4
