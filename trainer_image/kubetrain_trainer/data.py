"""Load, check and normalise training data before any model is built.

A data URI names a .jsonl / .json / .parquet file, a folder of such files (read in name
order), or a folder written by `datasets.Dataset.save_to_disk`. Every row is checked
against the format (text, messages, instruction or preference; `auto` detects it from the
first rows) so a bad row fails the run in seconds with `file:line: what is wrong` rather
than hours later inside a tokenizer. JSON is parsed here line by line because the
`datasets` JSON loader forgets line numbers. A location is `file:LINE` for JSON lines
(1-based, as editors count), `file:item N` for a JSON array and `file:row N` for parquet
and saved datasets (0-based, as `jq '.[N]'` and `dataset[N]` count). Valid rows are
normalised into the shapes TRL expects: text -> {text}; messages -> {messages}; instruction
-> conversational {prompt, completion}, so SFT learns the output only; preference ->
{prompt, chosen, rejected}. The trainer reads local paths only: the operator mounts
pvc:// claims into the pod as paths.

Rows stream: each checked row goes straight into an Arrow file in this process's scratch
folder (under $TMPDIR, removed at exit), and the datasets returned are memory-mapped from
it, so a corpus larger than memory loads in bounded memory (a JSON array file is the
exception: it is parsed whole, so give large corpora as JSON lines or parquet). The data's
fingerprint is hashed from the same bytes as they are read, not in a second pass.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import chain, count, islice
from pathlib import Path
from typing import Any, Literal

import datasets
import pyarrow
import pyarrow.parquet
from datasets.arrow_writer import ArrowWriter

from kubetrain_trainer.config import ConfigError, DataFormat, DataSpec

ResolvedFormat = Literal["text", "messages", "instruction", "preference"]

# Enough to show a pattern (one broken exporter usually breaks every row) without burying
# the first error under thousands of copies.
MAX_REPORTED_ERRORS = 5
# Rows sampled by `auto`; each must agree, so a file that mixes formats is caught early.
DETECT_ROWS = 5
DATA_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
CHAT_ROLES = ("system", "user", "assistant")
_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

_ROW_SHAPES: dict[str, str] = {
    "text": '{"%s": "..."}',
    "messages": '{"messages": [{"role": "user", "content": "..."}, '
    '{"role": "assistant", "content": "..."}]}',
    "instruction": '{"instruction": "...", "input": "... (optional)", "output": "..."}',
    "preference": '{"prompt": "...", "chosen": "...", "rejected": "..."}',
    # Evaluation only (suite safety), never a training format.
    "safety": '{"prompt": "...", "should_refuse": true}',
}


@dataclass(frozen=True)
class LoadedData:
    """Checked, normalised data for one run: `format` is never `auto`."""

    train: datasets.Dataset
    eval: datasets.Dataset | None
    format: ResolvedFormat
    fingerprint: str  # data_fingerprint of the files the rows came from


@dataclass(frozen=True)
class _Unreadable:
    """Stands in for a row that could not be parsed, so it is reported in file order."""

    problem: str


@dataclass(frozen=True)
class _Row:
    where: str  # "train.jsonl:12", "train.json:item 3", "shard.parquet:row 7"
    value: Any  # the parsed JSON value or parquet record, or _Unreadable


class _RowError(ValueError):
    """One thing wrong with one row; the caller adds the row's location."""


class _ErrorLog:
    """Collects row errors and raises them together once there are enough to act on."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def add(self, where: str, what: str) -> None:
        self.messages.append(f"{where}: {what}")
        if len(self.messages) >= MAX_REPORTED_ERRORS:
            raise ConfigError(
                "\n".join(
                    [
                        *self.messages,
                        f"(stopped after {MAX_REPORTED_ERRORS} errors; fix these and run again)",
                    ]
                )
            )

    def raise_if_any(self) -> None:
        if self.messages:
            raise ConfigError("\n".join(self.messages))


# --- Public API ----------------------------------------------------------------------


def load_data(spec: DataSpec) -> LoadedData:
    """Load `spec.train` and `spec.eval`; eval must have the format found in train.

    The fingerprint is data_fingerprint(spec), hashed while the rows are read.
    """
    digest = hashlib.sha256()
    train, fmt, read = _load_split(
        spec.train, spec.format, text_field=spec.dataset_text_field, field="data.train"
    )
    _add_files(digest, "train", read)
    evaluation = None
    if spec.eval:
        evaluation, _, read = _load_split(
            spec.eval, fmt, text_field=spec.dataset_text_field, field="data.eval"
        )
        _add_files(digest, "eval", read)
    fingerprint = f"sha256:{digest.hexdigest()}"
    return LoadedData(train=train, eval=evaluation, format=fmt, fingerprint=fingerprint)


def data_fingerprint(spec: DataSpec) -> str:
    """`sha256:<hex>` of the training and evaluation data as stored, which names the data a
    model was trained on: the same bytes give the same fingerprint wherever they live
    (another folder, another claim), a change to any row gives a new one.

    Each data file read (a file, a folder's data files, a saved dataset's arrow files)
    contributes its split, its path inside the folder and the SHA-256 of its bytes.
    """
    digest = hashlib.sha256()
    for split, uri in (("train", spec.train), ("eval", spec.eval)):
        if not uri:
            continue
        root = resolve_data_path(uri, field=f"data.{split}")
        read = _ReadFiles(root)
        for file in _data_files(root):
            read.sha256[file] = _file_sha256(file)
        _add_files(digest, split, read)
    return f"sha256:{digest.hexdigest()}"


@dataclass
class _ReadFiles:
    """The SHA-256 of each data file under `root`, in the order the files were read."""

    root: Path
    sha256: dict[Path, str] = field(default_factory=dict)


def _add_files(digest: Any, split: str, read: _ReadFiles) -> None:
    for file, sha256 in read.sha256.items():
        inside = "" if file == read.root else file.relative_to(read.root).as_posix()
        digest.update(f"{split}\0{inside}\0{sha256}\n".encode())


def _data_files(root: Path) -> list[Path]:
    """The files whose bytes are the data at `root`, in the order they are read."""
    if root.is_file():
        return [root]
    if _is_saved_dataset(root):
        return sorted(root.glob("*.arrow"))
    return _folder_files(root)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def load_split(
    uri: str,
    fmt: DataFormat,
    *,
    text_field: str = "text",
    field: str = "data.train",
) -> tuple[datasets.Dataset, ResolvedFormat]:
    """Read every row of `uri`, check it against `fmt` and return (dataset, format).

    `field` names the config field the URI came from, so errors point at it. Raises
    ConfigError listing up to MAX_REPORTED_ERRORS bad rows as `location: problem`. The
    dataset is memory-mapped from this process's scratch folder (module doc).
    """
    dataset, resolved, _ = _load_split(uri, fmt, text_field=text_field, field=field)
    return dataset, resolved


def _load_split(
    uri: str, fmt: DataFormat, *, text_field: str, field: str
) -> tuple[datasets.Dataset, ResolvedFormat, _ReadFiles]:
    path = resolve_data_path(uri, field=field)
    errors = _ErrorLog()
    read = _ReadFiles(path)
    rows = _read_rows(path, read)
    head = list(islice(rows, DETECT_ROWS))
    first_objects = [row for row in head if isinstance(row.value, dict)]
    if not first_objects:
        # Each file yields at least one row (an empty file yields its own error), so this
        # reports why nothing usable came first; the last line only guards the impossible.
        for row in head:
            errors.add(row.where, _not_an_object(row.value))
        errors.raise_if_any()
        raise ConfigError(f"{path}: no rows ({field} is empty)")
    resolved: ResolvedFormat
    if fmt == "auto":
        resolved = detect_format(
            [row.value for row in first_objects],
            text_field=text_field,
            source=first_objects[0].where,
        )
    else:
        resolved = fmt
        _check_format_fits(first_objects[0], resolved, text_field, field)

    normalise = _NORMALISERS[resolved]
    arrow_file = _scratch_folder() / f"{field}-{next(_scratch_names)}.arrow"
    with ArrowWriter(path=str(arrow_file)) as writer:
        for row in chain(head, rows):
            if not isinstance(row.value, dict):
                errors.add(row.where, _not_an_object(row.value))
                continue
            try:
                writer.write(normalise(row.value, text_field))
            except _RowError as e:
                errors.add(row.where, str(e))
        errors.raise_if_any()
        writer.finalize()
    return datasets.Dataset.from_file(str(arrow_file)), resolved, read


# --- Scratch: this process's Arrow files of checked rows ------------------------------

_scratch: Path | None = None
_scratch_names = count()


def _scratch_folder() -> Path:
    """This process's folder for row files, made on first use and removed at exit."""
    global _scratch
    if _scratch is None or not _scratch.is_dir():
        _scratch = Path(tempfile.mkdtemp(prefix=f"kubetrain-rows-{os.getpid()}-"))
        atexit.register(remove_scratch)
    return _scratch


def remove_scratch() -> None:
    """Delete the scratch folder; `__main__` calls it too, since os._exit skips atexit."""
    global _scratch
    if _scratch is not None:
        shutil.rmtree(_scratch, ignore_errors=True)
        _scratch = None


def load_safety_prompts(uri: str, *, field: str) -> list[dict[str, Any]]:
    """Rows `{"prompt": "...", "should_refuse": true|false}` of a safety suite, checked."""
    path = resolve_data_path(uri, field=field)
    errors = _ErrorLog()
    prompts: list[dict[str, Any]] = []
    for row in _read_rows(path):
        if not isinstance(row.value, dict):
            errors.add(row.where, _not_an_object(row.value))
            continue
        try:
            prompt = _string(row.value, "prompt", "safety")
        except _RowError as e:
            errors.add(row.where, str(e))
            continue
        should_refuse = row.value.get("should_refuse")
        if not isinstance(should_refuse, bool):
            problem = (
                "missing field 'should_refuse'"
                if "should_refuse" not in row.value
                else f"field 'should_refuse' is {_json_type(should_refuse)}, expected true or false"
            )
            errors.add(row.where, f"{problem}; safety rows look like {_ROW_SHAPES['safety']}")
            continue
        prompts.append({"prompt": prompt, "should_refuse": should_refuse})
    errors.raise_if_any()
    if not prompts:
        raise ConfigError(f"{path}: no rows ({field} is empty)")
    return prompts


def detect_format(
    rows: Iterable[Mapping[str, Any]],
    *,
    text_field: str = "text",
    source: str = "data",
) -> ResolvedFormat:
    """Format shared by the first DETECT_ROWS rows, judged by their keys.

    Raises ConfigError naming the keys seen when no format fits or the rows disagree.
    """
    sample = list(islice(rows, DETECT_ROWS))
    # Rows no format claims are left to row validation, which says exactly what is wrong.
    formats = {fmt for row in sample if (fmt := _classify(row, text_field))}
    if len(formats) == 1:
        return formats.pop()
    keys = sorted({str(key) for row in sample for key in row})
    if formats:
        kinds = ", ".join(sorted(formats))
        raise ConfigError(
            f"{source}: the first rows mix formats ({kinds}; keys seen: {keys}); put one "
            "format in a dataset, or set data.format to see which rows do not fit"
        )
    shapes = "; ".join(
        f"{name} {shape % text_field if name == 'text' else shape}"
        for name, shape in _ROW_SHAPES.items()
        if name != "safety"
    )
    raise ConfigError(
        f"{source}: cannot tell the data format from the keys seen in the first rows "
        f"{keys}. Expected one of: {shapes}. Rename the columns or, for text in another "
        "column, set data.datasetTextField"
    )


def resolve_data_path(uri: str, *, field: str = "data.train") -> Path:
    """Local path for a data URI; refuses remote URIs the trainer cannot read itself."""
    if _URI_SCHEME.match(uri):
        raise ConfigError(
            f"{field} is {uri!r}, but the trainer reads local paths only. On a cluster the "
            "operator mounts pvc:// URIs into the pod as paths; s3:// (and other remote) "
            "data is not supported yet, so copy it to a PersistentVolumeClaim. For a local "
            "run, give the path of the file or folder."
        )
    path = Path(uri).expanduser()
    if not path.exists():
        raise ConfigError(f"{field}: {uri!r} does not exist; give a data file or folder path")
    return path


# --- Reading files (yield rows with their locations) --------------------------------


def _not_an_object(value: Any) -> str:
    if isinstance(value, _Unreadable):
        return value.problem
    return f"expected a JSON object, got {_json_type(value)}"


def _read_rows(path: Path, read: _ReadFiles | None = None) -> Iterator[_Row]:
    """Every row under `path`; each file's SHA-256 lands in `read` once it is read whole."""
    read = read or _ReadFiles(path)
    if path.is_dir():
        yield from _read_folder(path, read)
    else:
        yield from _read_file(path, read)


def _read_folder(folder: Path, read: _ReadFiles) -> Iterator[_Row]:
    if (folder / "dataset_dict.json").exists():
        splits = sorted(p.name for p in folder.iterdir() if p.is_dir())
        raise ConfigError(
            f"{folder}: is a saved DatasetDict with splits {splits}; point the data field "
            f"at one split folder, e.g. {folder / (splits[0] if splits else 'train')}"
        )
    if _is_saved_dataset(folder):
        for file in _data_files(folder):
            read.sha256[file] = _file_sha256(file)
        yield from _read_saved_dataset(folder)
        return
    files = _folder_files(folder)
    if not files:
        raise ConfigError(
            f"{folder}: no {', '.join(DATA_FILE_SUFFIXES)} files and not a folder written "
            "by datasets.save_to_disk"
        )
    for file in files:
        yield from _read_file(file, read)


def _folder_files(folder: Path) -> list[Path]:
    """The data files of a plain folder, in the order they are read."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix in DATA_FILE_SUFFIXES and not p.name.startswith(".")
    )


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_info.json").exists() or (folder / "state.json").exists()


def _read_file(path: Path, read: _ReadFiles) -> Iterator[_Row]:
    digest = hashlib.sha256()
    if path.suffix == ".jsonl":
        rows = _read_json_lines(path, digest)
    elif path.suffix == ".json":
        rows = _read_json(path, digest)
    elif path.suffix == ".parquet":
        read.sha256[path] = _file_sha256(path)  # pyarrow reads it by columns, not in order
        digest = None
        rows = _read_parquet(path)
    else:
        raise ConfigError(
            f"{path}: unsupported file type {path.suffix or '(none)'!r}; use "
            f"{', '.join(DATA_FILE_SUFFIXES)} or a folder written by datasets.save_to_disk"
        )
    rows_read = 0
    for row in rows:
        rows_read += 1
        yield row
    if digest is not None:
        read.sha256[path] = digest.hexdigest()
    if rows_read == 0:
        yield _Row(str(path), _Unreadable("no rows (the file is empty); remove it or fill it"))


def _read_json_lines(path: Path, digest: Any) -> Iterator[_Row]:
    # Bytes, split on b"\n" only: str.splitlines would also split on U+2028 inside a JSON
    # string and throw every later line number off.
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            digest.update(raw)
            where = f"{path}:{number}"
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield _Row(where, _Unreadable(f"not UTF-8 text ({e.reason} at byte {e.start})"))
                continue
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                value = _Unreadable(
                    f"invalid JSON: {e.msg} (column {e.colno}); JSON lines files hold one "
                    "object per line"
                )
            yield _Row(where, value)


def _read_json(path: Path, digest: Any) -> Iterator[_Row]:
    """A .json file holds either one JSON array of rows or JSON lines."""
    with path.open("rb") as f:
        start = f.read(4096).decode("utf-8-sig", errors="replace").lstrip()
    if not start.startswith("["):
        yield from _read_json_lines(path, digest)
        return
    whole = path.read_bytes()  # one array is parsed whole anyway
    digest.update(whole)
    try:
        items = json.loads(whole.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from e
    for index, item in enumerate(items):
        yield _Row(f"{path}:item {index}", item)


def _read_parquet(path: Path) -> Iterator[_Row]:
    try:
        batches = pyarrow.parquet.ParquetFile(path).iter_batches(batch_size=1024)
        index = 0
        for batch in batches:
            for record in batch.to_pylist():
                yield _Row(f"{path}:row {index}", record)
                index += 1
    except (pyarrow.ArrowException, OSError) as e:
        raise ConfigError(f"{path}: cannot read parquet: {e}") from e


def _read_saved_dataset(folder: Path) -> Iterator[_Row]:
    try:
        saved = datasets.load_from_disk(str(folder))
    except (FileNotFoundError, ValueError, pyarrow.ArrowException) as e:
        raise ConfigError(f"{folder}: cannot read dataset saved with save_to_disk: {e}") from e
    for index, record in enumerate(saved):
        yield _Row(f"{folder}:row {index}", record)


# --- Checking and normalising rows ---------------------------------------------------


def _classify(row: Mapping[str, Any], text_field: str) -> ResolvedFormat | None:
    """The format a row is meant to be, judged by its distinctive keys (a row that misses
    a required key still classifies, so validation can name the missing key)."""
    if "messages" in row:
        return "messages"
    if "chosen" in row or "rejected" in row:
        return "preference"
    if "instruction" in row:
        return "instruction"
    if text_field in row:
        return "text"
    return None


_REQUIRED_KEYS: dict[str, Callable[[str], set[str]]] = {
    "text": lambda text_field: {text_field},
    "messages": lambda _: {"messages"},
    "instruction": lambda _: {"instruction", "output"},
    "preference": lambda _: {"prompt", "chosen", "rejected"},
}


def _check_format_fits(first: _Row, fmt: ResolvedFormat, text_field: str, field: str) -> None:
    """Fail once, clearly, when a whole file is another format than the one asked for."""
    looks_like = _classify(first.value, text_field)
    missing = _REQUIRED_KEYS[fmt](text_field) - first.value.keys()
    if looks_like is None or looks_like == fmt or not missing:
        return
    wanted = (
        f"data.eval must have the format of data.train ({fmt})"
        if field == "data.eval"
        else f"data.format is {fmt}"
    )
    raise ConfigError(
        f"{first.where}: rows look like {looks_like} data (keys {sorted(first.value)}), but "
        f"{wanted}; convert the file or fix data.format"
    )


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _string(row: Mapping[str, Any], key: str, fmt: str, *, optional: bool = False) -> str:
    """row[key] as a non-blank string (blank allowed, None allowed when optional)."""
    value = row.get(key)
    if value is None:
        if optional:
            return ""
        shape = _ROW_SHAPES[fmt] % key if fmt == "text" else _ROW_SHAPES[fmt]
        raise _RowError(f"missing field {key!r}; {fmt} rows look like {shape}")
    if not isinstance(value, str):
        raise _RowError(f"field {key!r} is {_json_type(value)}, expected a string")
    if not optional and not value.strip():
        raise _RowError(f"field {key!r} is empty")
    return value


def _normalise_text(row: Mapping[str, Any], text_field: str) -> dict[str, Any]:
    # Always "text" afterwards, so the methods never need to know datasetTextField.
    return {"text": _string(row, text_field, "text")}


def _normalise_messages(row: Mapping[str, Any], text_field: str) -> dict[str, Any]:
    messages = row.get("messages")
    if messages is None:
        raise _RowError(
            f"missing field 'messages'; messages rows look like {_ROW_SHAPES['messages']}"
        )
    if not isinstance(messages, list):
        raise _RowError(f"field 'messages' is {_json_type(messages)}, expected an array")
    if not messages:
        raise _RowError("field 'messages' is an empty array")
    turns = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise _RowError(
                f"{where} is {_json_type(message)}, expected an object with role and content"
            )
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise _RowError(f"{where}.role is {role!r}; use one of {', '.join(CHAT_ROLES)}")
        try:
            content = _string(message, "content", "messages")
        except _RowError as e:
            raise _RowError(f"{where}: {e}") from None
        turns.append({"role": role, "content": content})
    if not any(turn["role"] == "assistant" for turn in turns):
        raise _RowError(
            "messages has no assistant turn; SFT learns from assistant replies, so each "
            "chat needs at least one"
        )
    return {"messages": turns}


def _normalise_instruction(row: Mapping[str, Any], text_field: str) -> dict[str, Any]:
    instruction = _string(row, "instruction", "instruction")
    extra_input = _string(row, "input", "instruction", optional=True)
    output = _string(row, "output", "instruction")
    prompt = f"{instruction}\n\n{extra_input}" if extra_input.strip() else instruction
    # Conversational prompt/completion: TRL's SFTTrainer then computes the loss on the
    # completion only, so the model is not trained to reproduce instructions.
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "completion": [{"role": "assistant", "content": output}],
    }


def _normalise_preference(row: Mapping[str, Any], text_field: str) -> dict[str, Any]:
    # Extra fields such as `metadata` are dropped: DPOTrainer needs only these three.
    return {key: _string(row, key, "preference") for key in ("prompt", "chosen", "rejected")}


_NORMALISERS: dict[str, Callable[[Mapping[str, Any], str], dict[str, Any]]] = {
    "text": _normalise_text,
    "messages": _normalise_messages,
    "instruction": _normalise_instruction,
    "preference": _normalise_preference,
}
