"""Argo CD health checks (charts/kubetrain/argocd) run for real, in Lua 5.1 as Argo CD does.

Argo CD evaluates `health.lua` with gopher-lua (Lua 5.1) and the live object as the table
`obj`; lupa's Lua 5.1 runtime does the same here. Each kind's `health_test.yaml` (Argo CD's
own test format) must come out exactly, its samples must be valid objects of the CRD, and
the statuses `kubetrain.status.next_status` really writes, for every phase, must map to
Progressing / Healthy / Degraded / Suspended. The argocd-cm snippet users apply must carry
the same Lua.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from chart_render import CHART, K8S_VERSION, REPO, load_script
from lupa import lua51

from kubetrain.api import (
    PHASE_FAILED,
    PHASE_PENDING,
    PHASE_RUNNING,
    PHASE_SUCCEEDED,
    PHASE_SUSPENDED,
)
from kubetrain.status import next_status

ARGOCD = CHART / "argocd"
KINDS = sorted(path.parent.name for path in ARGOCD.glob("kubetrain.dev/*/health.lua"))
ARGO_STATUS_OF_PHASE = {
    PHASE_PENDING: "Progressing",
    PHASE_RUNNING: "Progressing",
    PHASE_SUCCEEDED: "Healthy",
    PHASE_FAILED: "Degraded",
    PHASE_SUSPENDED: "Suspended",
}


def health(kind: str, obj: dict[str, Any]) -> dict[str, str]:
    """What Argo CD would show for `obj`: {"status": ..., "message": ...}."""
    runtime = lua51.LuaRuntime()
    runtime.globals().obj = runtime.table_from(obj, recursive=True)
    result = runtime.execute((ARGOCD / "kubetrain.dev" / kind / "health.lua").read_text())
    return {"status": result["status"], "message": result["message"]}


def crd_schema(kind: str) -> dict[str, Any]:
    for path in (REPO / "crds").glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["names"]["kind"] == kind:
            return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    raise AssertionError(f"no CRD for {kind} in crds/")


def cases(kind: str) -> list[tuple[str, dict[str, Any], dict[str, str]]]:
    folder = ARGOCD / "kubetrain.dev" / kind
    tests = yaml.safe_load((folder / "health_test.yaml").read_text())["tests"]
    return [
        (t["inputPath"], yaml.safe_load((folder / t["inputPath"]).read_text()), t["healthStatus"])
        for t in tests
    ]


def test_every_crd_kind_has_a_health_check():
    crds = [yaml.safe_load(path.read_text()) for path in (REPO / "crds").glob("*.yaml")]
    kinds = {crd["spec"]["names"]["kind"] for crd in crds}
    assert set(KINDS) == kinds


@pytest.mark.parametrize("kind", KINDS)
def test_health_test_cases_come_out_as_written(kind):
    results = {path: (health(kind, obj), expected) for path, obj, expected in cases(kind)}
    assert {expected["status"] for _, expected in results.values()} == {
        "Progressing",
        "Healthy",
        "Degraded",
        "Suspended",
    }
    for path, (got, expected) in results.items():
        assert got == expected, f"{kind} {path}"


@pytest.mark.parametrize("kind", KINDS)
def test_samples_are_valid_objects_of_the_crd(kind):
    # The CRD schema is OpenAPI 3.0 (draft 4 semantics: boolean exclusiveMinimum).
    validator = jsonschema.Draft4Validator(crd_schema(kind))
    for path, obj, _ in cases(kind):
        errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(obj)]
        assert not errors, f"{kind} {path}: {errors}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("phase", sorted(ARGO_STATUS_OF_PHASE))
def test_statuses_the_operator_writes_map_to_argo_health(kind, phase):
    status = next_status(
        None,
        phase=phase,
        reason="Testing",
        message=f"the run is {phase}",
        now="2025-06-01T10:00:00Z",
        generation=4,
    )
    obj = {"kind": kind, "metadata": {"name": "r", "generation": 4}, "status": status}
    got = health(kind, obj)
    assert got["status"] == ARGO_STATUS_OF_PHASE[phase]
    assert f"the run is {phase}" in got["message"]
    # A spec edit the operator has not seen yet is never reported healthy or failed.
    obj["metadata"]["generation"] = 5
    assert health(kind, obj) == {
        "status": "Progressing",
        "message": "Waiting for the operator to observe generation 5",
    }


def test_argocd_cm_snippet_carries_the_health_checks():
    snippet_path = ARGOCD / "argocd-cm.yaml"
    text = snippet_path.read_text()
    assert text == load_script("sync_chart").argocd_cm_text(), (
        f"{snippet_path} is stale: run .venv/bin/python scripts/sync_chart.py"
    )
    config_map = yaml.safe_load(text)
    kubernetes_validate.validate(config_map, K8S_VERSION, strict=True)
    for kind in KINDS:
        key = f"resource.customizations.health.kubetrain.dev_{kind}"
        lua = Path(ARGOCD / "kubetrain.dev" / kind / "health.lua").read_text()
        assert config_map["data"][key] == lua
