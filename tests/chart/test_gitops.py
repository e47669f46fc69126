"""GitOps: the examples in examples/gitops, and how Flux and kstatus read our statuses.

Flux (kustomize-controller >= 2.5) judges custom resources with the CEL `healthCheckExprs`
of examples/gitops/flux-kubetrain.yaml; `flux_health` below is Flux's StatusEvaluator
(fluxcd/pkg runtime/cel, RFC-0009) ported line by line, evaluated with cel-python. kstatus
(cli-utils, what Flux and kapp use without expressions) is ported the same way in
`kstatus_compute`, for the generic rules that apply to a custom resource. Both run on the
statuses `kubetrain.status.next_status` writes. The examples themselves must point at
paths that exist, and what they deploy must render and validate.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml
from chart_render import CHART, REPO, helm, load_script

from kubetrain.api import (
    KIND_MODELS,
    PHASE_FAILED,
    PHASE_PENDING,
    PHASE_RUNNING,
    PHASE_SUCCEEDED,
    PHASE_SUSPENDED,
    load_documents,
)
from kubetrain.status import next_status

GITOPS = REPO / "examples" / "gitops"
# Every kind kubetrain serves, from its CRDs: each needs a Flux health expression.
CRD_KINDS = sorted(
    yaml.safe_load(path.read_text())["spec"]["names"]["kind"]
    for path in (REPO / "crds").glob("*.yaml")
)
PHASES = (PHASE_PENDING, PHASE_RUNNING, PHASE_SUCCEEDED, PHASE_FAILED, PHASE_SUSPENDED)
FLUX_STATUS_OF_PHASE = {
    PHASE_PENDING: "InProgress",
    PHASE_RUNNING: "InProgress",
    PHASE_SUSPENDED: "InProgress",
    PHASE_SUCCEEDED: "Current",
    PHASE_FAILED: "Failed",
}


def documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((GITOPS / name).read_text()) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def status_object(kind: str, phase: str, generation: int = 3, observed: int = 3) -> dict:
    status = next_status(
        None, phase=phase, reason="Testing", message=phase, now="2025-06-01T10:00:00Z",
        generation=observed,
    )  # fmt: skip
    return {
        "apiVersion": "kubetrain.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": "r", "namespace": "ml-team", "generation": generation},
        "spec": {},
        "status": status,
    }


# --- Flux -------------------------------------------------------------------------------


def flux_health(exprs: dict[str, str], obj: dict[str, Any]) -> str:
    """Flux's StatusEvaluator.Evaluate: InProgress, Failed or Current (raises on CEL errors)."""
    observed = (obj.get("status") or {}).get("observedGeneration")
    generation = obj["metadata"].get("generation")
    if observed is not None and generation is not None and observed != generation:
        return "InProgress"
    env = celpy.Environment()
    activation = {key: celpy.json_to_cel(value) for key, value in obj.items()}
    order = (("inProgress", "InProgress"), ("failed", "Failed"), ("current", "Current"))
    for field, result in order:  # RFC-0009's order
        if exprs.get(field):
            value = env.program(env.compile(exprs[field])).evaluate(activation)
            if isinstance(value, Exception):
                raise value
            if value:
                return result
    return "InProgress"


def flux_exprs(kind: str) -> dict[str, str]:
    kustomization = by_kind(documents("flux-kubetrain.yaml"), "Kustomization")
    (exprs,) = [e for e in kustomization["spec"]["healthCheckExprs"] if e["kind"] == kind]
    assert exprs["apiVersion"] == "kubetrain.dev/v1alpha1"
    return exprs


@pytest.mark.parametrize("kind", CRD_KINDS)
@pytest.mark.parametrize("phase", PHASES)
def test_flux_health_expressions_read_our_statuses(kind, phase):
    exprs = flux_exprs(kind)
    assert flux_health(exprs, status_object(kind, phase)) == FLUX_STATUS_OF_PHASE[phase]
    # Flux waits while the operator has not observed the latest spec.
    assert flux_health(exprs, status_object(kind, phase, generation=4)) == "InProgress"


def test_flux_waits_until_the_operator_writes_a_status():
    # Without a status the expressions cannot evaluate; Flux reports the error and polls
    # again, and the operator writes a status on its first reconcile.
    obj = status_object("TrainingRun", PHASE_PENDING)
    del obj["status"]
    with pytest.raises(celpy.CELEvalError):
        flux_health(flux_exprs("TrainingRun"), obj)


def test_flux_health_expressions_agree_with_the_argocd_samples():
    expected = {"Healthy": "Current", "Degraded": "Failed", "Progressing": "InProgress",
                "Suspended": "InProgress"}  # fmt: skip
    for test_file in (CHART / "argocd").glob("kubetrain.dev/*/health_test.yaml"):
        kind = test_file.parent.name
        for case in yaml.safe_load(test_file.read_text())["tests"]:
            obj = yaml.safe_load((test_file.parent / case["inputPath"]).read_text())
            if "status" in obj:
                got = flux_health(flux_exprs(kind), obj)
                assert got == expected[case["healthStatus"]["status"]], case["inputPath"]


# --- kstatus ----------------------------------------------------------------------------


def kstatus_compute(obj: dict[str, Any]) -> str:
    """cli-utils kstatus Compute for a custom resource (checkGenericProperties, then Current)."""
    if obj["metadata"].get("deletionTimestamp"):
        return "Terminating"
    generation = obj["metadata"].get("generation")
    observed = (obj.get("status") or {}).get("observedGeneration")
    if generation is not None and observed is not None and observed != generation:
        return "InProgress"
    for condition in (obj.get("status") or {}).get("conditions") or []:
        if condition["type"] == "Reconciling" and condition["status"] == "True":
            return "InProgress"
        if condition["type"] == "Stalled" and condition["status"] == "True":
            return "Failed"
    return "Current"


@pytest.mark.parametrize("phase", PHASES)
def test_kstatus_sees_the_latest_generation_observed(phase):
    obj = status_object("TrainingRun", phase)
    status = obj["status"]
    assert isinstance(status["observedGeneration"], int)
    for condition in status["conditions"]:
        assert condition["status"] in ("True", "False")
        assert condition["observedGeneration"] == status["observedGeneration"]
    # Generic kstatus reads the Reconciling and Stalled conditions: in progress while
    # pending or training, failed once failed, current when done or deliberately suspended.
    expected = {"Pending": "InProgress", "Running": "InProgress", "Failed": "Failed"}
    assert kstatus_compute(obj) == expected.get(phase, "Current")
    assert kstatus_compute(status_object("TrainingRun", phase, generation=4)) == "InProgress"
    # Ready is the condition `kubectl wait --for=condition=Ready` and Flux users read.
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"] == "True") == (phase == PHASE_SUCCEEDED)


# --- The examples -----------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(GITOPS.rglob("*.yaml")), ids=lambda p: p.name)
def test_every_gitops_example_says_how_to_run_it(path):
    assert path.read_text().startswith("# Run as: "), path


def _chart_renders_with(values: dict[str, Any], tmp_path: Path) -> None:
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    result = helm("lint", "--strict", str(CHART), "--values", str(values_file))
    assert result.returncode == 0, result.stdout + result.stderr


def test_argocd_applications_point_at_the_chart_and_the_runs(tmp_path):
    chart_app = by_kind(documents("argocd-kubetrain.yaml"), "Application")
    source = chart_app["spec"]["source"]
    assert (REPO / source["path"] / "Chart.yaml").is_file()
    _chart_renders_with(source["helm"]["valuesObject"], tmp_path)
    assert "ServerSideApply=true" in chart_app["spec"]["syncPolicy"]["syncOptions"]
    runs_app = by_kind(documents("argocd-trainingruns.yaml"), "Application")
    assert (REPO / runs_app["spec"]["source"]["path"] / "kustomization.yaml").is_file()
    assert runs_app["spec"]["source"]["repoURL"] == source["repoURL"]


def test_flux_objects_point_at_the_chart_and_the_runs(tmp_path):
    docs = documents("flux-kubetrain.yaml")
    repository = by_kind(docs, "GitRepository")
    release = by_kind(docs, "HelmRelease")
    kustomization = by_kind(docs, "Kustomization")
    chart = release["spec"]["chart"]["spec"]
    assert chart["sourceRef"] == {"kind": "GitRepository", "name": repository["metadata"]["name"]}
    assert (REPO / chart["chart"] / "Chart.yaml").is_file()
    _chart_renders_with(release["spec"]["values"], tmp_path)
    assert kustomization["spec"]["sourceRef"]["name"] == repository["metadata"]["name"]
    assert (REPO / kustomization["spec"]["path"] / "kustomization.yaml").is_file()
    kinds = [e["kind"] for e in kustomization["spec"]["healthCheckExprs"]]
    assert sorted(kinds) == CRD_KINDS  # each kind once, none forgotten


def test_gitops_runs_build_with_kustomize_and_are_valid(tmp_path):
    kubectl = load_script("fetch_k8s_tools").tool_path("kubectl")
    built = subprocess.run(
        [str(kubectl), "kustomize", str(GITOPS / "runs")],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    manifest = tmp_path / "runs.yaml"
    manifest.write_text(built)
    runs = load_documents(manifest)  # the API's own validation (field names, CEL rules)
    assert runs and {run.kind for run in runs} <= set(KIND_MODELS)


def test_chart_values_in_the_examples_match():
    # Both GitOps tools install the same thing.
    argo = by_kind(documents("argocd-kubetrain.yaml"), "Application")
    flux = by_kind(documents("flux-kubetrain.yaml"), "HelmRelease")
    assert json.dumps(argo["spec"]["source"]["helm"]["valuesObject"], sort_keys=True) == (
        json.dumps(flux["spec"]["values"], sort_keys=True)
    )
