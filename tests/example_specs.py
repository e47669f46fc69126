"""Tiny TrainingRun specs built from the bundled examples, for any test to import.

Tests train for real on CPU with the tiny examples' model shape and data, shortened with
maxSteps so each run takes seconds. Nothing downloads from a model hub.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


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
