"""Small builders for the CEL rules the CRD carries beside the pydantic validators.

The API server applies schema defaults before it evaluates `x-kubernetes-validations`, but
the same rules are also evaluated in tests and by tools that see a CR as written, so every
rule reads optional fields through `has()` and falls back to the pydantic default. Taking
those defaults from the pydantic field (never retyping them) keeps the CEL and Python
versions of a rule in step; a unit test checks that they accept and reject the same specs.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel


def present(path: str) -> str:
    """CEL that is true when every step of `a.b.c` under `self` is set."""
    parts = path.split(".")
    return " && ".join(f"has(self.{'.'.join(parts[: i + 1])})" for i in range(len(parts)))


def literal(value: Any) -> str:
    """A Python default as a CEL literal (strings single-quoted, booleans lowercase)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, int | float):
        return json.dumps(value)
    raise TypeError(f"no CEL literal for {value!r}")


def value_or_default(path: str, model: type[BaseModel], field: str) -> str:
    """CEL for `self.<path>`, or the pydantic default of `model.field` when it is unset."""
    default = model.model_fields[field].default
    return f"({present(path)} ? self.{path} : {literal(default)})"


def flag(path: str) -> str:
    """CEL that is true only when the boolean at `path` is set and true (defaults false)."""
    return f"({present(path)} && self.{path})"


def rule(
    expression: str, message: str, *, field_path: str | None = None, reason: str | None = None
) -> dict[str, str]:
    """One `x-kubernetes-validations` entry (reason: FieldValueInvalid/Forbidden/Required)."""
    entry = {"rule": expression, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    if reason:
        entry["reason"] = reason
    return entry
