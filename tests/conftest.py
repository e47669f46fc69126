"""Shared fixtures: tiny TrainingRun specs built from the bundled examples.

Tests train for real on CPU with the tiny examples' model shape and data, shortened with
maxSteps so each run takes seconds. Nothing downloads from a model hub.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"

# Keep test runs quiet and independent of the user's caches.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def example(name: str) -> dict:
    """An example CR as a dict, data paths made absolute so tests may run anywhere."""
    doc = yaml.safe_load((EXAMPLES / name).read_text())
    data = doc["spec"]["data"]
    for key in ("train", "eval"):
        if key in data:
            data[key] = str(REPO / data[key])
    return doc


def with_spec(doc: dict, **changes) -> dict:
    """A copy of `doc` with spec fields replaced (nested dicts merged one level)."""
    doc = copy.deepcopy(doc)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(doc["spec"].get(key), dict):
            doc["spec"][key].update(value)
        else:
            doc["spec"][key] = value
    return doc


@pytest.fixture(scope="session")
def examples_dir() -> Path:
    return EXAMPLES
