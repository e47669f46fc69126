"""The trainer/operator contract: spelled once, in kubetrain_trainer/contract.py, torch-free.

Every name both sides rely on (gauge names, metrics.json and the checkpoint marker, the
termination log, exit codes, message prefixes, checkpoint-N folders) must come from the
contract module; these tests read the sources of both packages and fail on a copy.
"""

from __future__ import annotations

import ast
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from kubetrain_trainer import contract
from kubetrain_trainer.contract import EXIT_MEANINGS, ExitCode, TrainerMetricsFile

REPO = Path(__file__).resolve().parents[2]
CONTRACT = REPO / "trainer_image" / "kubetrain_trainer" / "contract.py"
SOURCES = sorted(
    path
    for root in ("operator", "trainer_image")
    for path in (REPO / root).rglob("*.py")
    if path != CONTRACT
)

# Substrings no string outside the contract may contain.
SHARED_NAMES = (
    "kubetrain_trainer_",  # every gauge rank 0 serves
    contract.EVAL_GAUGE_PREFIX,
    contract.METRICS_FILE,
    contract.CHECKPOINT_MARKER,
    contract.TERMINATION_LOG,
    contract.REPORT_FILE,
    contract.TRAINER_STATE_FILE,
)
# How strings that should have been built by the contract's helpers begin.
SHARED_PREFIXES = (
    contract.CONFIG_ERROR_PREFIX,  # any case: the operator matches it so
    f"{contract.PREEMPTED_PREFIX}:",
    f"{contract.OUTPUTS_PREFIX}: ",
    f"{contract.CHECKPOINT_DIR_PREFIX}-",
)
EXIT_CODES = {int(code) for code in ExitCode if code}  # 0 is every program's success
# JobSet reports a worker's code as "... exit code 78"; status.py matches that text.
EXIT_CODE_TEXT = re.compile(rf"exit code ({'|'.join(map(str, sorted(EXIT_CODES)))})\b")


def docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def is_exit_code_position(node: ast.Constant, parents: dict[int, ast.AST]) -> bool:
    """An int compared with, returned, passed to an exit(), or in a tuple compared with."""
    parent = parents.get(id(node))
    if isinstance(parent, (ast.Tuple, ast.List, ast.Set)):
        parent = parents.get(id(parent))
    if isinstance(parent, (ast.Compare, ast.Return)):
        return True
    if isinstance(parent, ast.Call):
        func = parent.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        return name in ("exit", "_exit", "SystemExit")
    return False


def copies_of_the_contract(source: str, where: str) -> list[str]:
    """`where:line: value` for each shared name or exit code `source` spells itself."""
    tree = ast.parse(source, filename=where)
    skip = docstrings(tree)
    parents = {id(child): node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Constant) or id(node) in skip:
            continue
        line = f"{where}:{node.lineno}"
        value = node.value
        if isinstance(value, str):
            if (
                any(name in value for name in SHARED_NAMES)
                or value.lower().startswith(SHARED_PREFIXES)
                or EXIT_CODE_TEXT.search(value)
            ):
                found.append(f"{line}: {value!r}")
        elif type(value) is int and value in EXIT_CODES and is_exit_code_position(node, parents):
            found.append(f"{line}: exit code {value}")
    return found


def test_shared_names_are_spelled_only_in_the_contract():
    assert len(SOURCES) > 20, "the scan found too few sources to mean anything"
    copies = [
        copy
        for path in SOURCES
        for copy in copies_of_the_contract(path.read_text(), str(path.relative_to(REPO)))
    ]
    assert copies == [], "import these from kubetrain_trainer.contract instead:\n" + "\n".join(
        copies
    )


def test_the_scan_finds_a_copy():
    # The scan itself: each kind of copy it must catch, and what it must leave alone.
    sample = (
        '"""Writes metrics.json."""\n'
        'GAUGE = "kubetrain_trainer_step"\n'
        'FILE = "metrics.json"\n'
        'def fail(e):\n    return f"config error: {e}"\n'
        "def code(c):\n    return c == 78\n"
        "def member(c):\n    return c in (75, 1)\n"
        'def folder(step):\n    return f"checkpoint-{step}"\n'
        'SAID = "pod failed: exit code 78"\n'
        "WIDTH = 72\n"
        'REASON = "Preempted"\n'
    )
    copies = copies_of_the_contract(sample, "copy.py")
    assert sorted(c.split(": ", 1)[1] for c in copies) == sorted(
        [
            "'kubetrain_trainer_step'",
            "'metrics.json'",
            "'config error: '",
            "exit code 78",
            "exit code 75",
            "'checkpoint-'",
            "'pod failed: exit code 78'",
        ]
    )


def test_contract_imports_without_torch():
    # The operator's image has no torch: the contract must import with the stdlib and pydantic.
    code = (
        "import sys; import kubetrain_trainer.contract; "
        "heavy = {'torch', 'transformers', 'trl', 'peft', 'prometheus_client', 'kubetrain'}; "
        "print(sorted(heavy & set(sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def test_every_exit_code_has_a_meaning():
    assert set(EXIT_MEANINGS) == set(ExitCode)
    # DESIGN.md's table: 0 done, 75 preempted, 78 config error, 71 device OOM, 72 unstable.
    assert {c.name: int(c) for c in ExitCode} == {
        "OK": 0,
        "DEVICE_OUT_OF_MEMORY": 71,
        "TRAINING_UNSTABLE": 72,
        "PREEMPTED": 75,
        "CONFIG_ERROR": 78,
    }


def test_termination_messages():
    message = contract.config_error_message("data/train.jsonl:4: not JSON")
    assert message == "config error: data/train.jsonl:4: not JSON"
    assert contract.is_config_error_message(message)
    assert contract.is_config_error_message("  Config Error: something")
    assert not contract.is_config_error_message(contract.preempted_message("SIGTERM"))


def test_checkpoint_folder_names():
    assert contract.checkpoint_dir_name(40) == "checkpoint-40"
    assert contract.checkpoint_dir_step("checkpoint-40") == 40
    for other in ("checkpoint-", "checkpoint-4x", "merged", "checkpoint-40.tmp"):
        assert contract.checkpoint_dir_step(other) is None


def test_metric_names_are_distinct_and_prometheus_names():
    assert len(set(contract.TRAINER_METRICS)) == len(contract.TRAINER_METRICS)
    for name in contract.TRAINER_METRICS:
        assert re.fullmatch(r"kubetrain_trainer_[a-z0-9_]+", name), name


def test_metrics_file_keeps_absent_keys_absent_and_nulls_non_finite():
    summary = TrainerMetricsFile(method="dpo", eval_loss=None, perplexity=math.inf)
    summary.rewards_margin = math.nan  # assignments are checked too
    dumped = summary.model_dump(mode="json", exclude_unset=True)
    assert dumped == {
        "method": "dpo",
        "eval_loss": None,
        "perplexity": None,
        "rewards_margin": None,
    }
    json.dumps(dumped, allow_nan=False)


def test_metrics_file_takes_eval_metrics_and_refuses_typos():
    key = contract.eval_metric_key("qa", "exact_match")
    assert key == "qa.exact_match"
    read = TrainerMetricsFile.model_validate({"train_loss": 1.5, key: 0.25})
    assert read.model_dump(exclude_unset=True) == {"train_loss": 1.5, key: 0.25}
    with pytest.raises(ValidationError, match="trian_loss"):
        TrainerMetricsFile.model_validate({"trian_loss": 1.5})


def test_the_outputs_message_carries_the_data_record_beside_the_metrics():
    fingerprint = "sha256:" + "0" * 64
    summary = {"method": "sft", "train_loss": 1.5, "qa.f1": 0.5, "global_step": 9,
               "data_fingerprint": fingerprint, "train_rows": 12, "eval_rows": 0,
               "train_rows_dropped": 2, "eval_rows_dropped": 0}  # fmt: skip
    message = contract.outputs_message(summary)
    assert contract.parse_outputs_message(message) == {"qa.f1": 0.5, "train_loss": 1.5,
                                                       "global_step": 9.0}  # fmt: skip
    assert contract.parse_outputs_data(message) == contract.DataRecord(
        fingerprint=fingerprint, train_rows=12, eval_rows=0, train_rows_dropped=2
    )
    # A trainer from before the dropped-row count: none known dropped.
    older = f'outputs: {{"data":{{"fingerprint":"{fingerprint}","train_rows":5,"eval_rows":1}}}}'
    assert contract.parse_outputs_data(older).train_rows_dropped == 0
    # An evaluate run (no data record), another message, or a torn record: none.
    plain = contract.outputs_message({"qa.f1": 0.5})
    assert contract.parse_outputs_data(plain) is None
    assert contract.parse_outputs_data("config error: x") is None
    assert contract.parse_outputs_data('outputs: {"data": {"fingerprint": 3}}') is None
