"""charts/kubetrain rendered by the real helm: lint, schema-valid manifests, CRDs, wiring.

Every value set (defaults, every optional feature, a namespaced operator) must lint and
render, and every rendered object must validate against the Kubernetes 1.33 schemas
(kubernetes-validate, strict: unknown fields fail). prometheus-operator's and kopf's
custom kinds have no schema there: the first get the structural check in
prometheus_operator_schemas.py, the second are compared with the CRDs the chart ships.
The chart's CRDs must be the generated ones byte for byte, and the pieces must fit
together: monitors select the Services and pods that exist, the trainer selectors match
the pods `kubetrain.render` makes, and the operator's args are ones the CLI accepts.
"""

from __future__ import annotations

import json

import jsonschema
import kubernetes_validate
import pytest
import yaml
from chart_render import (
    CHART,
    FULLNAME,
    K8S_VERSION,
    NAMESPACE,
    REPO,
    VALUE_SETS,
    find,
    helm,
    load_script,
    one,
    operator_container,
    parse_operator_args,
    render,
    render_error,
    value_set_overrides,
)
from prometheus_operator_schemas import SCHEMAS

from kubetrain.api import load_documents
from kubetrain.render import render_trainingrun

# Kinds kubernetes-validate has no schema for, and who checks them instead.
CUSTOM_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "prometheus_operator_schemas",
    ("monitoring.coreos.com/v1", "PodMonitor"): "prometheus_operator_schemas",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheus_operator_schemas",
    ("kopf.dev/v1", "ClusterKopfPeering"): "the chart's kopf peering CRDs",
    ("kopf.dev/v1", "KopfPeering"): "the chart's kopf peering CRDs",
}


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_helm_lint_passes(value_set):
    args = ["lint", "--strict", str(CHART)]
    for path in VALUE_SETS[value_set]:
        args += ["--values", str(path)]
    result = helm(*args)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_manifest_validates(value_set):
    objects = render(value_set, include_crds=True)
    for obj in objects:
        what = f"{obj['kind']} {obj['metadata'].get('name')}"
        key = (obj["apiVersion"], obj["kind"])
        if key in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{value_set}: {what} is not a valid {K8S_VERSION} object: {e}")


def test_all_features_render_every_custom_kind():
    kinds = {(o["apiVersion"], o["kind"]) for o in render("all-features") + render("namespaced")}
    assert set(CUSTOM_KINDS) <= kinds


@pytest.mark.parametrize("value_set", ["all-features", "namespaced"])
def test_monitoring_objects_have_prometheus_operator_structure(value_set):
    for obj in render(value_set):
        schema = SCHEMAS.get(obj["kind"])
        if schema is not None:
            jsonschema.validate(obj, schema)


def test_structural_check_catches_a_misspelt_field():
    monitor = one(render("all-features"), "ServiceMonitor")
    broken = json.loads(json.dumps(monitor))
    broken["spec"]["endpoints"][0]["scrapeInterval"] = "30s"
    with pytest.raises(jsonschema.ValidationError, match="scrapeInterval"):
        jsonschema.validate(broken, SCHEMAS["ServiceMonitor"])


@pytest.mark.parametrize("value_set", ["all-features", "namespaced"])
def test_kopf_peering_objects_match_the_shipped_peering_crds(value_set):
    crds = {
        (crd["spec"]["group"], crd["spec"]["names"]["kind"]): crd["spec"]["scope"]
        for crd in yaml.safe_load_all((CHART / "crds" / "kopf-peering.yaml").read_text())
    }
    peerings = [o for o in render(value_set) if o["apiVersion"] == "kopf.dev/v1"]
    assert peerings
    for peering in peerings:
        scope = crds[("kopf.dev", peering["kind"])]
        assert ("namespace" in peering["metadata"]) == (scope == "Namespaced")
        assert peering["metadata"]["name"] == FULLNAME


# --- CRDs ------------------------------------------------------------------------------


def test_chart_crd_copy_is_identical_to_crds():
    drift = load_script("sync_chart").crd_drift()
    assert not drift, "\n".join(drift) + "\nrun: .venv/bin/python scripts/sync_chart.py"


def test_rendered_crds_are_the_generated_ones_plus_labels_and_keep_policy():
    rendered = {crd["metadata"]["name"]: crd for crd in find(render(), "CustomResourceDefinition")}
    generated = [yaml.safe_load(p.read_text()) for p in sorted((REPO / "crds").glob("*.yaml"))]
    assert generated, "crds/ is empty"
    assert set(rendered) == {crd["metadata"]["name"] for crd in generated}
    for crd in generated:
        ours = json.loads(json.dumps(rendered[crd["metadata"]["name"]]))
        metadata = ours["metadata"]
        assert metadata.pop("annotations") == {
            "helm.sh/resource-policy": "keep",
            "argocd.argoproj.io/sync-options": "Delete=false,Prune=false",
        }
        assert metadata.pop("labels")["app.kubernetes.io/managed-by"] == "Helm"
        assert ours == crd


def test_crds_toggle_and_keep_policy():
    assert not find(render(values={"crds.install": False}), "CustomResourceDefinition")
    for crd in find(render(values={"crds.keep": False}), "CustomResourceDefinition"):
        assert "annotations" not in crd["metadata"]


# --- The operator Deployment -----------------------------------------------------------


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_operator_pod_is_hardened(value_set):
    objects = render(value_set)
    pod = one(objects, "Deployment", FULLNAME)["spec"]["template"]["spec"]
    container = operator_container(objects)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    # A read-only root needs a writable /tmp (HOME points there).
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_operator_args_are_what_the_cli_accepts(value_set):
    objects = render(value_set)
    container = operator_container(objects)
    args = parse_operator_args(container["args"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert args.metrics_port == ports["metrics"]
    assert args.liveness_port == ports["healthz"]
    watched = value_set_overrides(value_set).get("watchNamespaces", [])
    assert (args.namespace or []) == watched


def test_one_replica_is_never_two_operators_at_once():
    objects = render()
    deployment = one(objects, "Deployment", FULLNAME)
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert not any(a.startswith("--peering") for a in operator_container(objects)["args"])
    assert not [o for o in objects if o["apiVersion"] == "kopf.dev/v1"]


@pytest.mark.parametrize(
    ("value_set", "peering_kind"),
    [("all-features", "ClusterKopfPeering"), ("namespaced", "KopfPeering")],
)
def test_more_replicas_peer_through_kopf(value_set, peering_kind):
    objects = render(value_set)
    deployment = one(objects, "Deployment", FULLNAME)
    assert deployment["spec"]["replicas"] > 1
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    args = parse_operator_args(operator_container(objects)["args"])
    assert args.peering == FULLNAME
    assert {o["metadata"]["name"] for o in find(objects, peering_kind)} == {FULLNAME}
    env = {e["name"]: e for e in operator_container(objects)["env"]}
    assert env["POD_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"replicaCount": -1}, "/replicaCount"),
        ({"image.pullPolicy": "Sometimes"}, "/image/pullPolicy"),
        ({"peering.name": "default"}, "/peering/name"),
        ({"metrics.serviceMonitor.interval": "30 seconds"}, "/metrics/serviceMonitor/interval"),
        ({"watchNamespaces": ["Team_A"]}, "/watchNamespaces/0"),
        ({"prometheusRule.runStaled": {"minutes": 5}}, "runStaled"),
    ],
)
def test_values_schema_refuses_bad_values(values, complaint):
    assert complaint in render_error(values)


def test_service_monitor_without_service_is_refused():
    error = render_error({"metrics.serviceMonitor.enabled": True, "metrics.service.enabled": False})
    assert "metrics.service.enabled" in error


# --- Selectors fit what exists ---------------------------------------------------------


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


@pytest.fixture(scope="module")
def trainer_pod_template() -> dict:
    """The pod template of a Job the operator renders for the bundled SFT example."""
    (run,) = load_documents(REPO / "examples" / "trainingrun-sft.yaml")
    job = next(o for o in render_trainingrun(run, 1, backend="job") if o["kind"] == "Job")
    return job["spec"]["template"]


def test_metrics_service_and_service_monitor_select_the_operator():
    objects = render("all-features")
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    service = one(objects, "Service", f"{FULLNAME}-metrics")
    assert _matches(service["spec"]["selector"], pod_labels)
    monitor = one(objects, "ServiceMonitor")
    assert _matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    # The per-run series keep their own namespace label rather than the operator's.
    assert endpoint["honorLabels"] is True


def test_operator_selector_never_matches_trainer_pods(trainer_pod_template):
    deployment = one(render(), "Deployment")
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert not _matches(selector, trainer_pod_template["metadata"]["labels"])


def test_pod_monitor_scrapes_rank_0_of_rendered_trainers(trainer_pod_template):
    monitor = one(render("all-features"), "PodMonitor")
    selector = dict(monitor["spec"]["selector"]["matchLabels"])
    # The Job controller labels each pod with its completion index; index 0 is rank 0.
    assert selector.pop("batch.kubernetes.io/job-completion-index") == "0"
    assert _matches(selector, trainer_pod_template["metadata"]["labels"])
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    ports = {p["name"]: p["containerPort"] for c in trainer_pod_template["spec"]["containers"]
             for p in c.get("ports", [])}  # fmt: skip
    assert ports[endpoint["port"]] == 9400
    targets = {r["targetLabel"]: r["sourceLabels"] for r in endpoint["relabelings"]}
    assert targets["run"] == ["__meta_kubernetes_pod_label_kubetrain_dev_run"]
    assert "kubetrain.dev/run" in trainer_pod_template["metadata"]["labels"]


def test_network_policy_admits_the_gang_the_operator_and_prometheus(trainer_pod_template):
    objects = render("namespaced")
    policies = find(objects, "NetworkPolicy")
    assert {p["metadata"]["namespace"] for p in policies} == {"team-a", "team-b"}
    policy = policies[0]["spec"]
    trainer_labels = trainer_pod_template["metadata"]["labels"]
    assert _matches(policy["podSelector"]["matchLabels"], trainer_labels)
    gang, metrics = policy["ingress"]
    assert _matches(gang["from"][0]["podSelector"]["matchLabels"], trainer_labels)
    assert "ports" not in gang  # rendezvous and NCCL/gloo use ports of their choosing
    assert metrics["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    operator_peer, prometheus_peer = metrics["from"]
    operator_pod = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert _matches(operator_peer["podSelector"]["matchLabels"], operator_pod)
    assert operator_peer["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": NAMESPACE
    }
    assert prometheus_peer["podSelector"] == {
        "matchLabels": {"app.kubernetes.io/name": "prometheus"}
    }


def test_network_policy_defaults_to_the_release_namespace_cluster_wide():
    (policy,) = find(render(values={"networkPolicy.enabled": True}), "NetworkPolicy")
    assert policy["metadata"]["namespace"] == NAMESPACE


def test_dashboard_config_map_carries_the_dashboard_file():
    config_map = one(render("all-features"), "ConfigMap", f"{FULLNAME}-dashboard")
    assert config_map["metadata"]["namespace"] == "monitoring"
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = (CHART / "files" / "dashboards" / "kubetrain.json").read_text()
    assert json.loads(config_map["data"]["kubetrain.json"]) == json.loads(shipped)


def test_notes_name_the_commands_of_the_cluster_path():
    result = helm("install", "kubetrain", str(CHART), "--dry-run=client", "-n", NAMESPACE)
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    for command in ("kubectl get tr -w", "svc/kubetrain-metrics 8080", "helm uninstall"):
        assert command in notes
    # The CRDs stay on uninstall: the notes' `kubectl delete crd` names every one of them.
    (delete_crds,) = [line for line in notes.splitlines() if "kubectl delete crd" in line]
    named = {word.strip("`.") for word in delete_crds.split()}
    for path in (REPO / "crds").glob("*.yaml"):
        assert yaml.safe_load(path.read_text())["metadata"]["name"] in named, path.name
