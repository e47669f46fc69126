"""The cluster path as a newcomer types it, with real kubectl against the real apiserver.

`kubectl apply -f` the cluster variants of the tiny examples (examples/cluster/, data and
models on the claim `examples`), `kubectl wait` for Ready, `kubectl get tr` with its
printer columns, `kubectl describe` with the events, `kubectl logs -f` of rank 0, and
`kubectl explain`. The CRDs' schemas and CEL rules are judged by the real apiserver: every
case of the unit tests' tables (tests/unit) is sent as a server-side dry run and must be
refused with the same message, or accepted. A CRD upgrade from the CRDs released as 0.1.0
(tests/e2e/crds-0.1.0) keeps a run the operator started under them readable and running,
and the fields the new schema defaults are no spec change (never SpecChangeIgnored).
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from cluster import TestCluster, fill_examples_claim
from e2e_runs import (
    OPERATOR_NAMESPACE,
    OPERATOR_RELEASE,
    Runs,
    api_client,
    helm,
    install_operator,
)
from example_specs import EXAMPLES, REPO
from kubernetes import client as k8s_client
from kubernetes.client.exceptions import ApiException
from polling import wait_for

from kubetrain.api import GROUP, PIPELINE_PLURAL, PLURAL, SWEEP_PLURAL, VERSION, TrainingRunSpec
from kubetrain.trainingruns import STARTED_SPEC_ANNOTATION

sys.path.insert(0, str(REPO / "tests" / "unit"))
from test_crdgen import CROSS_FIELD_CASES, schema_errors, trainingrun
from test_crdgen import SCHEMA as RUN_SCHEMA
from test_pipeline_api import CASES as PIPELINE_CASES
from test_pipeline_api import SCHEMA as PIPELINE_SCHEMA
from test_sweep_api import CASES as SWEEP_CASES
from test_sweep_api import SCHEMA as SWEEP_SCHEMA

pytestmark = pytest.mark.e2e

CLUSTER_EXAMPLES = EXAMPLES / "cluster"


def apply_example(cluster: TestCluster, namespace: str, name: str, *extra: str) -> str:
    return cluster.kubectl(
        "apply", "-n", namespace, *extra, "-f", str(CLUSTER_EXAMPLES / name)
    ).stdout


def test_cluster_examples_train_as_a_newcomer_types_them(
    cluster: TestCluster, namespace: str
) -> None:
    kubectl = cluster.kubectl
    fill_examples_claim(cluster, namespace)
    said = apply_example(cluster, namespace, "trainingrun-from-scratch-tiny.yaml")
    assert "trainingrun.kubetrain.dev/from-scratch-tiny created" in said
    # Follow rank 0 from its start to its end, as `kubectl logs -f` does.
    pod = wait_for(
        lambda: json.loads(
            kubectl(
                "get",
                "pods",
                "-n",
                namespace,
                "-l",
                "batch.kubernetes.io/job-name=from-scratch-tiny-1",
                "-o",
                "json",
            ).stdout
        )["items"][0]["metadata"]["name"],
        "rank 0's pod",
        60,
    )
    wait_for(
        lambda: (
            kubectl("get", "pod", pod, "-n", namespace, "-o", "jsonpath={.status.phase}").stdout
            in ("Running", "Succeeded")
        ),
        "rank 0 to start",
        120,
    )
    followed = kubectl("logs", "-f", "-n", namespace, pod, timeout=600).stdout
    assert "step 5/" in followed and "done step 99/99" in followed, followed[-2000:]
    waited = kubectl(
        "wait",
        "--for=condition=Ready",
        "tr/from-scratch-tiny",
        "-n",
        namespace,
        "--timeout=300s",
        timeout=320,
    )
    assert "condition met" in waited.stdout

    table = kubectl("get", "tr", "-n", namespace).stdout
    header, row = table.splitlines()[:2]
    # The CRD's printer columns (ETA and ATTEMPT only while a run reports them).
    columns = ["NAME", "METHOD", "PHASE", "STEP", "LOSS", "PROGRESS", "READY"]
    assert header.split()[: len(columns)] == columns, table
    cells = row.split()
    assert cells[:3] == ["from-scratch-tiny", "from_scratch", "Succeeded"], table
    assert int(cells[3]) > 0 and float(cells[4]) > 0 and cells[6] == "True", table
    described = kubectl("describe", "tr", "from-scratch-tiny", "-n", namespace).stdout
    assert "Events:" in described and "Succeeded" in described, described

    # sft starts from the model the first run wrote to the claim.
    apply_example(cluster, namespace, "trainingrun-sft-tiny.yaml", "--server-side")
    kubectl(
        "wait",
        "--for=condition=Ready",
        "tr/sft-tiny",
        "-n",
        namespace,
        "--timeout=480s",
        timeout=500,
    )
    shown = kubectl("get", "tr", "sft-tiny", "-n", namespace, "-o", "json", "--show-managed-fields")
    run = json.loads(shown.stdout)
    assert run["status"]["outputs"]["modelUri"] == "pvc://examples/outputs/sft-tiny"
    applied = [(f["manager"], f["operation"]) for f in run["metadata"]["managedFields"]]
    assert ("kubectl", "Apply") in applied, applied
    assert (
        cluster.claim_folder(namespace, "examples") / "outputs" / "sft-tiny" / "metrics.json"
    ).is_file()


def test_explain_prints_the_field_descriptions(cluster: TestCluster) -> None:
    explained = cluster.kubectl("explain", "trainingrun.spec.lora").stdout
    assert "FIELD: lora" in explained and "DESCRIPTION:" in explained
    assert "alpha" in explained and "targetModules" in explained
    pipeline = cluster.kubectl("explain", "pipeline.spec.stages.dependsOn").stdout
    assert "Stages that must succeed before this one starts" in pipeline


def dry_run(
    custom: k8s_client.CustomObjectsApi, namespace: str, plural: str, obj: dict[str, Any]
) -> str | None:
    """The apiserver's refusal of `obj` (a server-side dry run), or None if it accepts it."""
    body = copy.deepcopy(obj)
    body["metadata"] = {**body.get("metadata", {}), "namespace": namespace}
    try:
        custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, plural, body, dry_run="All"
        )
    except ApiException as e:
        if e.status != 422:
            raise
        return json.loads(e.body)["message"]
    return None


def refused_alike(
    doc: dict[str, Any], plural: str, expected: str | None, refusal: str | None
) -> bool:
    """Whether the apiserver judged `doc` as the unit tests' table says.

    A CEL rule's message must come back word for word. Where the table's message is the
    structural schema's (jsonschema words it differently), or a list-map key repeats (the
    apiserver refuses duplicates before CEL runs), any refusal of that field will do.
    """
    if expected is None or refusal is None:
        return expected is None and refusal is None
    if expected in refusal:
        return True
    schema = {PLURAL: RUN_SCHEMA, SWEEP_PLURAL: SWEEP_SCHEMA}.get(plural, PIPELINE_SCHEMA)
    return bool(schema_errors(doc, schema)) or "Duplicate value" in refusal


def test_every_cel_rule_refuses_its_bad_example_through_the_apiserver(
    cluster: TestCluster, namespace: str
) -> None:
    custom = k8s_client.CustomObjectsApi(api_client(cluster))
    disagreements = []
    cases = [
        ("TrainingRun", PLURAL, case_id, trainingrun(**spec), message)
        for case_id, spec, message in CROSS_FIELD_CASES
    ]
    cases += [
        ("Pipeline", PIPELINE_PLURAL, case_id, doc, message)
        for case_id, doc, message, _pydantic in PIPELINE_CASES
    ]
    cases += [
        ("Sweep", SWEEP_PLURAL, case_id, doc, message)
        for case_id, doc, message, _pydantic in SWEEP_CASES
    ]
    for kind, plural, case_id, doc, message in cases:
        refusal = dry_run(custom, namespace, plural, doc)
        if refused_alike(doc, plural, message, refusal):
            continue
        disagreements.append(f"{kind} {case_id}: expected {message!r}, got {refusal!r}")
    assert not disagreements, "\n".join(disagreements)
    assert len(CROSS_FIELD_CASES) + len(PIPELINE_CASES) > 40


def crds_as_chart_0_1_0_left_them(cluster: TestCluster) -> None:
    """The TrainingRun CRD as `helm install` of chart 0.1.0 left it: Helm's ownership marks,
    and its field manager (Helm 4 applies server-side as "helm", so this apply drops every
    field the current chart's install set, and the upgrade's fields are Helm's own again)."""
    for path in sorted((REPO / "tests" / "e2e" / "crds-0.1.0").glob("*trainingruns.yaml")):
        crd = yaml.safe_load(path.read_text())
        crd["metadata"].setdefault("labels", {})["app.kubernetes.io/managed-by"] = "Helm"
        crd["metadata"].setdefault("annotations", {}).update(
            {
                "meta.helm.sh/release-name": OPERATOR_RELEASE,
                "meta.helm.sh/release-namespace": OPERATOR_NAMESPACE,
            }
        )
        cluster.kubectl(
            "apply", "--server-side", "--field-manager=helm", "--force-conflicts", "-f", "-",
            input=json.dumps(crd),
        )  # fmt: skip
    cluster.kubectl("wait", "--for=condition=Established", "crd/trainingruns.kubetrain.dev")


def defaulted_group_by_length(cluster: TestCluster, namespace: str, doc: dict[str, Any]) -> bool:
    """Whether the apiserver defaults data.groupByLength in `doc` (the current schema does,
    0.1.0's does not know the field), asked with a server-side dry run under another name."""
    probe = {**doc, "metadata": {"name": "schema-probe"}}
    created = cluster.kubectl(
        "create", "--dry-run=server", "-n", namespace, "-o", "json", "-f", "-",
        input=json.dumps(probe),
    )  # fmt: skip
    return "groupByLength" in json.loads(created.stdout)["spec"]["data"]


def test_crd_upgrade_from_0_1_0_keeps_runs_readable_and_running(tmp_path: Path) -> None:
    """A cluster of its own: the operator starts a run under the 0.1.0 CRDs, then the chart
    upgrades them while the run trains."""
    upgraded = TestCluster(tmp_path / "cluster").start()
    try:
        operator = install_operator(upgraded)  # the current chart, with the current CRDs
        # The operator runs again once the 0.1.0 CRDs are served, as one of that era ran:
        # watches opened before go on being served with the schema they were opened under
        # until the apiserver retires that storage, and the run must start under 0.1.0.
        operator.scale(0)
        crds_as_chart_0_1_0_left_them(upgraded)
        upgraded.create_namespace("team-a")
        fill_examples_claim(upgraded, "team-a")
        doc = yaml.safe_load((CLUSTER_EXAMPLES / "trainingrun-from-scratch-tiny.yaml").read_text())
        # Long enough to be training still once the chart is upgraded.
        doc["spec"]["training"].update({"maxSteps": 600, "saveSteps": 300, "evalSteps": 300})
        name = doc["metadata"]["name"]
        # The apiserver serves the new schema a moment after the apply: wait for the old one.
        wait_for(
            lambda: not defaulted_group_by_length(upgraded, "team-a", doc),
            "the apiserver to serve the 0.1.0 schema",
            60,
        )
        operator.scale(1)
        runs = Runs(upgraded, "team-a")
        with runs.statuses(name) as seen:
            upgraded.apply(doc, namespace="team-a")
            runs.wait_phase(name, "Running", timeout=240)
            before = upgraded.get("tr", name, "-n", "team-a")
            # The operator recorded the spec it started as 0.1.0 serves it.
            started = json.loads(before["metadata"]["annotations"][STARTED_SPEC_ANNOTATION])
            assert started == before["spec"] and "groupByLength" not in started["data"], started

            helm(
                upgraded, "upgrade", OPERATOR_RELEASE, str(REPO / "charts" / "kubetrain"),
                "--namespace", OPERATOR_NAMESPACE, "--reuse-values", "--wait", "--timeout", "3m",
            )  # fmt: skip
            crd = upgraded.get("crd", "trainingruns.kubetrain.dev")
            current = yaml.safe_load(
                (REPO / "crds" / "kubetrain.dev_trainingruns.yaml").read_text()
            )
            assert crd["spec"]["versions"][0]["schema"] == current["spec"]["versions"][0]["schema"]
            wait_for(
                lambda: defaulted_group_by_length(upgraded, "team-a", doc),
                "the apiserver to serve the current schema",
                60,
            )
            after = upgraded.get("tr", name, "-n", "team-a")
            # The operator follows the run under the new schema: it still trains.
            assert runs.status(name)["phase"] == "Running", runs.status(name)
            assert after["metadata"]["uid"] == before["metadata"]["uid"]
            # The apiserver fills fields the new schema defaults when it reads the run back
            # (data.groupByLength came after 0.1.0); through the model, as the operator
            # compares specs, it is the spec the run started with.
            assert after["spec"] != before["spec"]
            assert TrainingRunSpec.model_validate(after["spec"]) == TrainingRunSpec.model_validate(
                before["spec"]
            )
            status = runs.wait_phase(name, "Succeeded", timeout=300)
        assert status["outputs"]["modelUri"] == "pvc://examples/outputs/from-scratch-tiny"
        # The defaults the upgrade added are no edit of the user's: never SpecChangeIgnored,
        # in any status the run had (a watch saw each) nor in an event.
        ignored = [
            c for s in seen for c in s.get("conditions", []) if c["type"] == "SpecChangeIgnored"
        ]
        assert not ignored, ignored
        assert not runs.events(name, reason="SpecChangeIgnored")
        assert not [e for e in runs.events(name) if "spec changed" in e], runs.events(name)
    finally:
        upgraded.stop()
        shutil.rmtree(tmp_path / "cluster", ignore_errors=True)
