"""`kubetrain generate` answers from every output kubetrain writes, greedily and exactly.

The shared memorising runs (conftest.py) learned four sums by heart, so the greedy reply to
each instruction is its output: from the sft model, from the LoRA adapter (on the base its
adapter_config.json names, on one given with --base, or as --adapter on MODEL) and from the
LoRA merged model. One run of the installed `kubetrain` proves the real entry point streams
a reply while it still waits for the next line. A folder without a model, or an adapter
whose base is gone, fails with one line naming the path and the fix, and exit 2.
"""

from __future__ import annotations

import io
import json
import os
import selectors
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kubetrain import cli
from kubetrain_trainer.contract import MERGED_DIR

pytestmark = pytest.mark.slow

KUBETRAIN = Path(sys.executable).parent / "kubetrain"
# Generous: a cold start imports torch and transformers on a busy 2-core machine.
FIRST_REPLY_TIMEOUT_S = 300


def memorised_rows(memorise_data: Path) -> list[dict]:
    return [json.loads(line) for line in memorise_data.read_text().splitlines()]


def generate(capsys, monkeypatch, *argv, stdin: str = "") -> tuple[int, str, str]:
    """`kubetrain generate ARGV` in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = cli.main(["generate", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def model_args(source: str, request) -> list:
    if source == "sft":
        return [request.getfixturevalue("memorised_sft")]
    lora = request.getfixturevalue("memorised_lora")
    return {
        "lora adapter": [lora],
        "lora merged": [lora / MERGED_DIR],
        "base with --adapter": [request.getfixturevalue("base_model"), "--adapter", lora],
    }[source]


@pytest.mark.parametrize("source", ["sft", "lora adapter", "lora merged", "base with --adapter"])
def test_greedy_chat_reply_is_the_memorised_answer(
    source: str, request, capsys, monkeypatch, memorise_data: Path
):
    args = model_args(source, request)
    rows = memorised_rows(memorise_data)
    assert rows[0] == {"instruction": "Add 6 and 19.", "output": "25."}
    for row in rows:
        # A fresh conversation per row, its one turn read from stdin as a person types it.
        code, out, err = generate(capsys, monkeypatch, *args, "--chat", stdin=row["instruction"])
        assert code == 0, err
        # Only the new text: no prompt, no template markers, one line per turn.
        assert out == row["output"] + "\n", (row, out)


def test_a_prompt_is_continued_as_raw_text(capsys, monkeypatch, memorised_sft: Path):
    from transformers import AutoTokenizer

    # The chat template, rendered by hand, reaches the model unchanged only if raw mode adds
    # no template of its own; the reply then stops at ChatML's end-of-turn token.
    rendered = AutoTokenizer.from_pretrained(memorised_sft).apply_chat_template(
        [{"role": "user", "content": "Add 6 and 19."}], add_generation_prompt=True, tokenize=False
    )
    code, out, err = generate(capsys, monkeypatch, memorised_sft, rendered)
    assert code == 0, err
    assert out == "25.\n"


def test_chat_keeps_the_conversation(monkeypatch, memorised_sft: Path):
    from kubetrain_trainer.generate import Sampling, chat, load_for_generation, resolve_sources

    model, tokenizer = load_for_generation(resolve_sources(str(memorised_sft)), chat=True)
    prompts: list[str] = []
    original = model.generate

    def recording_generate(**kwargs):
        prompts.append(tokenizer.decode(kwargs["input_ids"][0]))
        return original(**kwargs)

    monkeypatch.setattr(model, "generate", recording_generate)
    conversation = chat(model, tokenizer, ["Add 6 and 19.\n", "  \n", "Add 3 and 4.\n"], Sampling())
    # The blank line is no turn; the second turn is generated after the whole first exchange.
    assert [m["role"] for m in conversation] == ["user", "assistant", "user", "assistant"]
    assert conversation[1] == {"role": "assistant", "content": "25."}
    first, second = prompts
    assert second.startswith(first + "25.<|im_end|>\n<|im_start|>user\nAdd 3 and 4.")


def test_sampling_replays_with_its_seed(capsys, monkeypatch, memorised_sft: Path):
    def sampled(seed: int) -> str:
        code, out, err = generate(
            capsys, monkeypatch, memorised_sft, "The", "--temperature", "2",
            "--seed", seed, "--max-new-tokens", "24",
        )  # fmt: skip
        assert code == 0, err
        return out

    assert sampled(1) == sampled(1)
    assert sampled(1) != sampled(2)


def test_installed_entry_point_streams_each_reply_before_the_next_turn(memorised_lora: Path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with subprocess.Popen(
        [str(KUBETRAIN), "generate", str(memorised_lora), "--chat"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    ) as proc:
        try:
            proc.stdin.write("Add 6 and 19.\n")
            proc.stdin.flush()
            with selectors.DefaultSelector() as selector:
                selector.register(proc.stdout, selectors.EVENT_READ)
                assert selector.select(FIRST_REPLY_TIMEOUT_S), "no reply within the timeout"
            reply = proc.stdout.readline()
            # Still running, stdin open: the reply was flushed as generated, not at exit.
            assert proc.poll() is None
            assert reply == "25.\n"
            proc.stdin.close()
            assert proc.wait(timeout=60) == 0
            assert proc.stdout.read() == ""
        finally:
            if proc.poll() is None:
                proc.kill()


def test_folder_without_a_model_fails_with_the_path_and_the_fix(
    capsys, monkeypatch, tmp_path: Path
):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    code, out, err = generate(capsys, monkeypatch, empty, "hello")
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and err.startswith(f"error: MODEL: '{empty}' ")
    assert "holds no saved model" in err and "save_pretrained" in err


def test_adapter_whose_base_is_gone_names_it_and_takes_base(
    capsys, monkeypatch, tmp_path: Path, memorised_lora: Path
):
    moved = tmp_path / "adapter"
    moved.mkdir()
    for item in memorised_lora.iterdir():
        if item.is_file():
            shutil.copy(item, moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    base = config["base_model_name_or_path"]
    gone = tmp_path / "deleted-base"
    config["base_model_name_or_path"] = str(gone)
    (moved / "adapter_config.json").write_text(json.dumps(config))

    code, out, err = generate(capsys, monkeypatch, moved, "--chat", "Add 6 and 19.")
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and err.startswith(f"error: {moved}: its base model '{gone}'")
    assert "pass --base" in err and "Traceback" not in err

    # --base is that fix: the adapter answers on the base it was trained on.
    code, out, err = generate(capsys, monkeypatch, moved, "--base", base, "--chat", "Add 6 and 19.")
    assert code == 0, err
    assert out == "25.\n"


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["some-model"], "give a PROMPT to continue, or --chat"),
        (["m", "--adapter", "a", "--base", "b", "hi"], "with --adapter, MODEL is the base"),
        (["some-model", "hi", "--max-new-tokens", "0"], "--max-new-tokens is 0; give 1 or more"),
        (["some-model", "hi", "--temperature", "-1"], "--temperature is -1.0; give 0"),
    ],
)
def test_usage_errors_exit_2_before_loading_anything(capsys, monkeypatch, argv, says):
    code, out, err = generate(capsys, monkeypatch, *argv)
    assert (code, out) == (2, "")
    assert err.startswith("error: ") and says in err and err.count("\n") == 1


def test_base_on_a_full_model_is_refused(capsys, monkeypatch, memorised_sft: Path):
    code, out, err = generate(capsys, monkeypatch, memorised_sft, "--base", "x", "hi")
    assert (code, out) == (2, "")
    assert f"MODEL '{memorised_sft}' is not a LoRA adapter folder" in err


def test_a_terminal_gets_a_cue_before_each_line_on_stderr(capsys):
    from kubetrain_trainer.generate import cued_lines

    assert list(cued_lines(io.StringIO("Add 6 and 19.\nAdd 3 and 4.\n"))) == [
        "Add 6 and 19.\n",
        "Add 3 and 4.\n",
    ]
    out, err = capsys.readouterr()
    # One cue per line read, and one more before the end of input is seen.
    assert (out, err) == ("", "> > > ")
