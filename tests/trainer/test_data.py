"""Tests for kubetrain_trainer.data: every source and format loads and normalises, and
every malformed row is reported as `file:line: problem` before any training starts."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import datasets
import pyarrow
import pyarrow.parquet
import pytest

from kubetrain_trainer.config import ConfigError, DataSpec
from kubetrain_trainer.data import (
    MAX_REPORTED_ERRORS,
    LoadedData,
    data_fingerprint,
    detect_format,
    load_data,
    load_split,
)

EXAMPLES_DATA = Path(__file__).resolve().parents[2] / "examples" / "data"

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 plus 2?"},
    {"role": "assistant", "content": "4."},
]
ROWS = {
    "text": {"text": "The fox lives in the forest."},
    "messages": {"messages": CHAT},
    "instruction": {"instruction": "Add the numbers.", "input": "2 and 2", "output": "4"},
    "preference": {"prompt": "What is 2 plus 2?", "chosen": "4.", "rejected": "Maybe 5?"},
}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def config_error(uri: Path | str, fmt: str = "auto", **kwargs) -> str:
    with pytest.raises(ConfigError) as caught:
        load_split(str(uri), fmt, **kwargs)
    return str(caught.value)


# --- Formats ---------------------------------------------------------------------------


def test_text_rows_keep_only_the_text_column_named_text(tmp_path):
    path = write_jsonl(
        tmp_path / "t.jsonl",
        [{"body": "First document.", "source": "web"}, {"body": "Second one."}],
    )
    dataset, fmt = load_split(str(path), "auto", text_field="body")
    assert fmt == "text"
    assert dataset.column_names == ["text"]
    assert dataset["text"] == ["First document.", "Second one."]


def test_messages_keep_role_and_content_only(tmp_path):
    chat = [{**CHAT[0], "name": "sys"}, CHAT[1], {**CHAT[2], "weight": 1}]
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": chat, "id": 7}])
    dataset, fmt = load_split(str(path), "auto")
    assert fmt == "messages"
    assert dataset.column_names == ["messages"]
    assert dataset[0]["messages"] == CHAT


def test_messages_need_not_alternate(tmp_path):
    chat = [
        {"role": "user", "content": "Hi."},
        {"role": "user", "content": "Still there?"},
        {"role": "assistant", "content": "Yes."},
        {"role": "assistant", "content": "How can I help?"},
    ]
    dataset, _ = load_split(
        str(write_jsonl(tmp_path / "m.jsonl", [{"messages": chat}])), "messages"
    )
    assert dataset[0]["messages"] == chat


def test_instruction_becomes_conversational_prompt_completion(tmp_path):
    path = write_jsonl(
        tmp_path / "i.jsonl",
        [
            {"instruction": "Summarise.", "input": "A long text.", "output": "Short."},
            {"instruction": "Say hi.", "input": "", "output": "Hi!"},
            {"instruction": "Say bye.", "output": "Bye!"},
            {"instruction": "Count.", "input": None, "output": "3"},
        ],
    )
    dataset, fmt = load_split(str(path), "auto")
    assert fmt == "instruction"
    assert dataset.column_names == ["prompt", "completion"]
    assert dataset[0] == {
        "prompt": [{"role": "user", "content": "Summarise.\n\nA long text."}],
        "completion": [{"role": "assistant", "content": "Short."}],
    }
    assert [row[0]["content"] for row in dataset["prompt"][1:]] == ["Say hi.", "Say bye.", "Count."]


def test_preference_drops_metadata(tmp_path):
    row = {**ROWS["preference"], "metadata": {"preference_strength": 0.9}}
    dataset, fmt = load_split(str(write_jsonl(tmp_path / "p.jsonl", [row])), "auto")
    assert fmt == "preference"
    assert dataset.column_names == ["prompt", "chosen", "rejected"]
    assert dataset[0] == ROWS["preference"]


@pytest.mark.parametrize("fmt", sorted(ROWS))
def test_detect_format_from_keys(fmt):
    assert detect_format([ROWS[fmt], ROWS[fmt]]) == fmt


def test_detect_format_uses_the_text_field():
    assert detect_format([{"content": "x"}], text_field="content") == "text"


def test_detect_format_names_the_keys_it_saw():
    with pytest.raises(ConfigError, match=r"src:1: cannot tell.*\['answer', 'question'\]"):
        detect_format([{"question": "q", "answer": "a"}], source="src:1")


def test_detect_format_refuses_mixed_rows():
    with pytest.raises(ConfigError, match="mix formats"):
        detect_format([ROWS["text"], ROWS["messages"]])


def test_detect_format_leaves_unclaimed_rows_to_validation():
    assert detect_format([ROWS["preference"], {"chosen": "c"}, {"other": 1}]) == "preference"


def test_explicit_format_that_does_not_fit_says_what_the_rows_look_like(tmp_path):
    path = write_jsonl(tmp_path / "i.jsonl", [ROWS["instruction"]])
    message = config_error(path, "messages")
    assert message.startswith(f"{path}:1: rows look like instruction data")
    assert "data.format is messages" in message


# --- Malformed rows: file:line: problem ----------------------------------------------

GOOD_TEXT = json.dumps(ROWS["text"])
GOOD_CHAT = json.dumps(ROWS["messages"])
GOOD_INSTRUCTION = json.dumps(ROWS["instruction"])


@pytest.mark.parametrize(
    ("lines", "fmt", "line", "problem"),
    [
        ([GOOD_TEXT, GOOD_TEXT, '{"text": "unterminated}'], "auto", 3, "invalid JSON"),
        ([GOOD_TEXT, '["a", "list"]'], "auto", 2, "expected a JSON object, got an array"),
        ([GOOD_TEXT, '"just a string"'], "text", 2, "expected a JSON object, got a string"),
        ([GOOD_INSTRUCTION, '{"instruction": "Do it."}'], "auto", 2, "missing field 'output'"),
        ([GOOD_INSTRUCTION, '{"instruction": " ", "output": "x"}'], "instruction", 2,
         "field 'instruction' is empty"),
        ([GOOD_TEXT, '{"text": 5}'], "text", 2, "field 'text' is a number, expected a string"),
        ([GOOD_TEXT, '{"text": null}'], "text", 2, "missing field 'text'"),
        ([GOOD_INSTRUCTION, '{"instruction": "a", "input": 3, "output": "b"}'], "instruction",
         2, "field 'input' is a number"),
        ([GOOD_CHAT, '{"messages": [{"role": "bot", "content": "hi"}]}'], "auto", 2,
         "messages[0].role is 'bot'; use one of system, user, assistant"),
        ([GOOD_CHAT, '{"messages": [{"role": "user", "content": "hi"}]}'], "messages", 2,
         "messages has no assistant turn"),
        ([GOOD_CHAT, '{"messages": "hello"}'], "messages", 2,
         "field 'messages' is a string, expected an array"),
        ([GOOD_CHAT, '{"messages": []}'], "messages", 2, "field 'messages' is an empty array"),
        ([GOOD_CHAT, '{"messages": [{"role": "assistant", "content": ["part"]}]}'],
         "messages", 2, "messages[0]: field 'content' is an array"),
        ([GOOD_CHAT, '{"messages": [{"role": "assistant"}]}'], "messages", 2,
         "messages[0]: missing field 'content'"),
        ([GOOD_CHAT, '{"messages": ["hi"]}'], "messages", 2, "messages[0] is a string"),
        ([json.dumps(ROWS["preference"]), '{"prompt": "p", "chosen": "c", "rejected": ""}'],
         "preference", 2, "field 'rejected' is empty"),
        # Blank lines are skipped but still counted, so the number matches the editor's.
        ([GOOD_TEXT, "", "", '{"text": ""}'], "auto", 4, "field 'text' is empty"),
    ],
)  # fmt: skip
def test_malformed_row_names_file_and_line(tmp_path, lines, fmt, line, problem):
    path = write_lines(tmp_path / "bad.jsonl", lines)
    message = config_error(path, fmt)
    assert message.startswith(f"{path}:{line}: {problem}")
    assert "\n" not in message  # the good rows around it are not reported


def test_line_numbers_ignore_unicode_line_separators_inside_strings(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", ['{"text": "a\u2028b\u2029c"}', '{"text": 1}'])
    assert config_error(path).startswith(f"{path}:2: field 'text' is a number")


def test_byte_order_mark_and_invalid_utf8(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD_TEXT.encode() + b"\n" + b'{"text": "\xff"}\n')
    assert config_error(path).startswith(f"{path}:2: not UTF-8 text")


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    assert config_error(path) == f"{path}: no rows (the file is empty); remove it or fill it"


def test_errors_are_collected_then_reporting_stops(tmp_path):
    lines = [GOOD_TEXT] + ['{"text": 1}'] * 10
    message = config_error(write_lines(tmp_path / "bad.jsonl", lines))
    reported = message.splitlines()
    assert [line.split(":")[1] for line in reported[:-1]] == ["2", "3", "4", "5", "6"]
    assert len(reported) == MAX_REPORTED_ERRORS + 1
    assert "stopped after 5 errors" in reported[-1]


def test_fewer_errors_are_all_reported_in_file_order(tmp_path):
    lines = [GOOD_TEXT, '{"text": []}', GOOD_TEXT, "{oops", '{"tex": "typo"}']
    path = write_lines(tmp_path / "bad.jsonl", lines)
    reported = config_error(path).splitlines()
    assert [line.removeprefix(f"{path}:").split(":")[0] for line in reported] == ["2", "4", "5"]
    assert "invalid JSON" in reported[1]


def test_auto_with_no_objects_in_the_first_rows_reports_them(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", ["1", "2"])
    assert config_error(path).splitlines() == [
        f"{path}:1: expected a JSON object, got a number",
        f"{path}:2: expected a JSON object, got a number",
    ]


# --- Sources ---------------------------------------------------------------------------


def test_json_array_reports_item_index(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([ROWS["text"], ROWS["text"], {"text": 3}], indent=2))
    assert config_error(path) == f"{path}:item 2: field 'text' is a number, expected a string"
    path.write_text(json.dumps([ROWS["text"]]))
    dataset, fmt = load_split(str(path), "auto")
    assert (fmt, dataset["text"]) == ("text", [ROWS["text"]["text"]])


def test_json_array_with_a_syntax_error_reports_the_line(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b",}\n]\n')
    assert config_error(path).startswith(f"{path}:3: invalid JSON")


def test_json_file_may_hold_json_lines(tmp_path):
    path = write_jsonl(tmp_path / "rows.json", [ROWS["messages"], ROWS["messages"]])
    dataset, fmt = load_split(str(path), "auto")
    assert (fmt, len(dataset)) == ("messages", 2)


def test_parquet_file(tmp_path):
    path = tmp_path / "rows.parquet"
    rows = [ROWS["preference"], {"prompt": "p", "chosen": "c", "rejected": None}]
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    assert config_error(path) == f"{path}:row 1: missing field 'rejected'; " + (
        'preference rows look like {"prompt": "...", "chosen": "...", "rejected": "..."}'
    )
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows[:1]), path)
    dataset, fmt = load_split(str(path), "auto")
    assert (fmt, dataset[0]) == ("preference", ROWS["preference"])


def test_dataset_saved_to_disk(tmp_path):
    good = ROWS["messages"]
    bad = {"messages": [{"role": "tool", "content": "x"}]}
    datasets.Dataset.from_list([good, good, bad]).save_to_disk(tmp_path / "bad")
    assert config_error(tmp_path / "bad").startswith(f"{tmp_path / 'bad'}:row 2: messages[0].role")
    datasets.Dataset.from_list([good, good]).save_to_disk(tmp_path / "good")
    dataset, fmt = load_split(str(tmp_path / "good"), "auto")
    assert (fmt, dataset["messages"]) == ("messages", [CHAT, CHAT])


def test_saved_dataset_dict_asks_for_one_split(tmp_path):
    split = datasets.Dataset.from_list([ROWS["text"]])
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(tmp_path / "dd")
    assert "point the data field at one split folder" in config_error(tmp_path / "dd")


def test_folder_of_files_is_read_in_name_order(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    write_jsonl(folder / "b.jsonl", [{"text": "second"}])
    write_jsonl(folder / "a.json", [{"text": "first"}])
    pyarrow.parquet.write_table(
        pyarrow.Table.from_pylist([{"text": "third"}]), folder / "c.parquet"
    )
    (folder / "README.md").write_text("not data")
    dataset, fmt = load_split(str(folder), "auto")
    assert (fmt, dataset["text"]) == ("text", ["first", "second", "third"])
    write_lines(folder / "d.jsonl", [GOOD_TEXT, '{"text": false}'])
    assert config_error(folder).startswith(f"{folder / 'd.jsonl'}:2: field 'text' is a boolean")


def test_folder_without_data_files(tmp_path):
    assert "no .jsonl, .json, .parquet files" in config_error(tmp_path)


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("text\nhello\n")
    assert "unsupported file type '.csv'" in config_error(path)


@pytest.mark.parametrize("uri", ["pvc://claim/data/train.jsonl", "s3://bucket/train.jsonl"])
def test_remote_uris_are_refused_with_the_reason(uri):
    message = config_error(uri)
    assert message.startswith(f"data.train is {uri!r}")
    assert "operator mounts pvc:// URIs into the pod as paths" in message
    assert "s3:// (and other remote) data is not supported yet" in message
    assert "give the path" in message


def test_missing_path(tmp_path):
    assert config_error(tmp_path / "nope.jsonl", field="data.eval").startswith("data.eval: '")


# --- load_data -------------------------------------------------------------------------


def test_load_data_reads_eval_with_the_format_of_train(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [ROWS["instruction"]] * 3)
    evaluation = write_jsonl(tmp_path / "eval.jsonl", [ROWS["instruction"]])
    loaded = load_data(DataSpec(train=str(train), eval=str(evaluation)))
    assert isinstance(loaded, LoadedData)
    assert loaded.format == "instruction"
    assert (len(loaded.train), len(loaded.eval)) == (3, 1)
    assert loaded.eval.column_names == ["prompt", "completion"]


def test_load_data_without_eval(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [ROWS["text"]])
    loaded = load_data(DataSpec(train=str(train), format="text"))
    assert (loaded.format, loaded.eval) == ("text", None)


def test_load_data_refuses_eval_in_another_format(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [ROWS["messages"]])
    evaluation = write_jsonl(tmp_path / "eval.jsonl", [ROWS["instruction"]])
    with pytest.raises(ConfigError) as caught:
        load_data(DataSpec(train=str(train), eval=str(evaluation)))
    assert str(caught.value).startswith(f"{evaluation}:1: rows look like instruction data")
    assert "data.eval must have the format of data.train (messages)" in str(caught.value)


def test_load_data_uses_dataset_text_field(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"body": "x"}])
    loaded = load_data(DataSpec(train=str(train), dataset_text_field="body"))
    assert (loaded.format, loaded.train["text"]) == ("text", ["x"])


# --- Bundled datasets ------------------------------------------------------------------

BUNDLED = {
    "pretrain": "text",
    "sft-messages": "messages",
    "sft-instruction": "instruction",
    "preference": "preference",
}


@pytest.mark.parametrize(("name", "fmt"), sorted(BUNDLED.items()))
def test_bundled_datasets_load_cleanly(name, fmt):
    train = EXAMPLES_DATA / f"{name}.jsonl"
    evaluation = EXAMPLES_DATA / f"{name}-eval.jsonl"
    loaded = load_data(DataSpec(train=str(train), eval=str(evaluation)))
    assert loaded.format == fmt
    assert len(loaded.train) == len(train.read_text().splitlines()) >= 300
    assert len(loaded.eval) == len(evaluation.read_text().splitlines()) >= 30
    for path in (train, evaluation):
        assert path.stat().st_size < 150_000


def test_bundled_preference_pairs_differ_and_keep_metadata_in_the_file():
    rows = [json.loads(line) for line in (EXAMPLES_DATA / "preference.jsonl").open()]
    assert all(row["chosen"] != row["rejected"] for row in rows)
    assert all(set(row["metadata"]) == {"preference_strength", "annotator_id", "task_category"}
               for row in rows)  # fmt: skip


def test_bundled_files_are_what_the_generator_writes(tmp_path):
    spec = importlib.util.spec_from_file_location("generate", EXAMPLES_DATA / "generate.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    written = generator.generate(tmp_path)
    assert {p.name for p in written} == {p.name for p in EXAMPLES_DATA.glob("*.jsonl")}
    for path in written:
        assert path.read_bytes() == (EXAMPLES_DATA / path.name).read_bytes(), path.name


# --- Fingerprints ----------------------------------------------------------------------


def test_the_fingerprint_follows_the_bytes_not_the_place(tmp_path):
    """Same bytes elsewhere: same fingerprint; one row changed, or eval added: a new one."""
    rows = [ROWS["text"], {"text": "A second row."}]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    here = write_jsonl(tmp_path / "a" / "train.jsonl", rows)
    there = write_jsonl(tmp_path / "b" / "copy.jsonl", rows)
    first = data_fingerprint(DataSpec(train=str(here)))
    assert first.startswith("sha256:") and len(first) == len("sha256:") + 64
    assert data_fingerprint(DataSpec(train=str(there))) == first
    assert data_fingerprint(DataSpec(train=str(tmp_path / "a"))) != first  # a folder names files
    write_jsonl(there, [ROWS["text"], {"text": "A changed row."}])
    assert data_fingerprint(DataSpec(train=str(there))) != first
    assert data_fingerprint(DataSpec(train=str(here), eval=str(here))) != first


def test_a_folder_and_a_saved_dataset_fingerprint_the_files_read(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    write_jsonl(folder / "0.jsonl", [ROWS["text"]])
    write_jsonl(folder / "1.jsonl", [{"text": "Another."}])
    before = data_fingerprint(DataSpec(train=str(folder)))
    (folder / ".lock").write_text("not data")
    (folder / "notes.txt").write_text("not data either")
    assert data_fingerprint(DataSpec(train=str(folder))) == before
    saved = tmp_path / "saved"
    datasets.Dataset.from_list([ROWS["text"]]).save_to_disk(str(saved))
    fingerprint = data_fingerprint(DataSpec(train=str(saved)))
    assert load_data(DataSpec(train=str(saved))).fingerprint == fingerprint
    datasets.Dataset.from_list([{"text": "Different."}]).save_to_disk(str(tmp_path / "other"))
    assert data_fingerprint(DataSpec(train=str(tmp_path / "other"))) != fingerprint


def write_source(tmp_path: Path, kind: str) -> Path:
    """The same three text rows as one kind of data source."""
    rows = [ROWS["text"], {"text": "Another."}, {"text": "A third."}]
    if kind == "jsonl":
        return write_jsonl(tmp_path / "t.jsonl", rows)
    if kind == "json array":
        path = tmp_path / "t.json"
        path.write_text(json.dumps(rows, indent=1))
        return path
    if kind == "parquet":
        path = tmp_path / "t.parquet"
        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
        return path
    if kind == "folder":
        (tmp_path / "f").mkdir()
        write_jsonl(tmp_path / "f" / "0.jsonl", rows[:1])
        write_jsonl(tmp_path / "f" / "1.jsonl", rows[1:])
        return tmp_path / "f"
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    return tmp_path / "saved"


@pytest.mark.parametrize("kind", ["jsonl", "json array", "parquet", "folder", "saved dataset"])
def test_load_data_hashes_the_bytes_it_reads_and_keeps_rows_on_disk(tmp_path, kind):
    """One pass: the fingerprint hashed while reading equals data_fingerprint's, and the
    rows are memory-mapped from an Arrow file rather than held in memory."""
    source = write_source(tmp_path, kind)
    spec = DataSpec(train=str(source), eval=str(source))
    loaded = load_data(spec)
    assert loaded.fingerprint == data_fingerprint(spec)
    assert loaded.train["text"] == ["The fox lives in the forest.", "Another.", "A third."]
    for split in (loaded.train, loaded.eval):
        (arrow,) = split.cache_files
        assert Path(arrow["filename"]).is_file()
