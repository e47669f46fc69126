"""The tokenized-data cache: tokenize once per data, tokenizer and settings, then reuse it.

Tokenizing (and packing) a corpus costs minutes to hours, and without a cache every rank of
every attempt repeats it. `tokenized` keeps the result under `<output>/.cache/<key>/`, one
`datasets.save_to_disk` folder per split, memory-mapped when read back, so a restarted
attempt, a resumed run and `kubetrain run` again all start training at once, and a gang
shares one copy: the first process of each node builds it while the other ranks wait at a
barrier, then every rank reads it. On a shared output (a ReadWriteMany claim) the nodes'
builders take a file lock on the entry, so one builds and the others find its marker; on a
node's own disk (an s3:// output is worked on in the pod's cache volume) each node builds
its own copy. The key (`cache_key`) is a SHA-256 of everything the tokens depend on:
the data's fingerprint (data.data_fingerprint), the tokenizer itself (its vocabulary,
merges, special tokens and chat template) and the method's settings (maxLength, packing,
the recipe's version), so a change of any of them makes a new entry rather than a wrong
reuse. An entry counts only once its marker is written, after every split is on disk; a
crash mid-write leaves nothing that is ever read. Old entries stay until the output is
removed (delete `<output>/.cache` to reclaim the space).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase, TrainingArguments

from kubetrain_trainer.config import ConfigError

log = logging.getLogger(__name__)

CACHE_DIR = ".cache"
MARKER = "kubetrain-cache.json"  # written last: the entry is whole

Splits = dict[str, datasets.Dataset | None]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """SHA-256 of what decides a tokenizer's output: its whole definition and template."""
    if getattr(tokenizer, "is_fast", False):
        definition = tokenizer.backend_tokenizer.to_str()
    else:
        definition = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    parts = [
        type(tokenizer).__name__,
        definition,
        tokenizer.chat_template or "",
        json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def cache_key(data_fingerprint: str, tokenizer: PreTrainedTokenizerBase, **settings: Any) -> str:
    """The entry's name: 32 hex digits of SHA-256 over the data, tokenizer and settings."""
    material = json.dumps(
        {"data": data_fingerprint, "tokenizer": tokenizer_fingerprint(tokenizer), **settings},
        sort_keys=True,
    )
    return hashlib.sha256(material.encode()).hexdigest()[:32]


def tokenized(
    output_dir: str | Path, key: str, build: Callable[[], Splits], args: TrainingArguments
) -> Splits:
    """The splits `build` makes, from the cache entry `key` when it is there (module doc)."""
    entry = Path(output_dir) / CACHE_DIR / key
    with args.main_process_first(local=True, desc="tokenizing the data"):
        if args.local_process_index == 0:
            entry.parent.mkdir(parents=True, exist_ok=True)
            with open(f"{entry}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # another node's builder, on a shared disk
                if not (entry / MARKER).is_file():
                    _write_entry(entry, build())
    if not (entry / MARKER).is_file():  # the node's first process failed and said why
        raise ConfigError(
            f"the first process of this node did not tokenize the data into {entry}; its "
            "log says why"
        )
    marker = json.loads((entry / MARKER).read_text())
    splits: Splits = {
        split: datasets.load_from_disk(str(entry / split)) if present else None
        for split, present in marker["splits"].items()
    }
    log.info(
        "tokenized data from cache %s (%s)",
        entry,
        ", ".join(f"{s}: {len(d)} rows" for s, d in splits.items() if d is not None),
    )
    return splits


def _write_entry(entry: Path, splits: Splits) -> None:
    """Write every split, then the marker, into a scratch folder renamed into place."""
    scratch = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    for split, dataset in splits.items():
        if dataset is not None:
            dataset.save_to_disk(str(scratch / split))
    marker = {"splits": {s: d is not None for s, d in splits.items()}}
    (scratch / MARKER).write_text(json.dumps(marker))
    if entry.exists():  # a torn entry of a crashed writer (no marker): replace it
        shutil.rmtree(entry)
    os.replace(scratch, entry)
    log.info("tokenized data cached in %s", entry)
