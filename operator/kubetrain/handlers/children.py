"""What the operator watches besides its own kinds: the children of runs, and claims.

kopf indexes (in-memory, fed by one watch per resource kind) replace per-run list calls:
with a thousand runs, following each one every interval would cost several API requests
per run (list Jobs, JobSets and pods; get its ConfigMap, Service and claims); from the
indexes it costs none. kopf starts no handler before every index holds its initial list,
so a freshly started operator never mistakes an existing child for a missing one.
Only the fields the plans read are kept, to bound the operator's memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import kopf

from kubetrain.api import LABEL_RUN

JOBSET_GROUP, JOBSET_VERSION = "jobset.x-k8s.io", "v1alpha2"

# index id -> (group, version, plural) of the children indexed by (namespace, run name).
CHILD_KINDS = {
    "run_jobs": ("batch", "v1", "jobs"),
    "run_jobsets": (JOBSET_GROUP, JOBSET_VERSION, "jobsets"),
    "run_pods": ("", "v1", "pods"),
    "run_config_maps": ("", "v1", "configmaps"),
    "run_services": ("", "v1", "services"),
}
CLAIMS_INDEX = "claims"
INDEX_IDS = (*CHILD_KINDS, CLAIMS_INDEX)
_KIND = {
    "jobs": "Job",
    "jobsets": "JobSet",
    "pods": "Pod",
    "configmaps": "ConfigMap",
    "services": "Service",
}
_METADATA_KEPT = (
    "name",
    "namespace",
    "uid",
    "labels",
    "annotations",
    "ownerReferences",
    "deletionTimestamp",
)
_POD_STATUS_KEPT = ("phase", "reason", "message", "podIP", "conditions", "containerStatuses")


def plain(value: Any) -> Any:
    """kopf's views as plain dicts and lists (they outlive the event that carried them)."""
    if isinstance(value, Mapping):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    return value


def trimmed(plural: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a child the plans read (pods carry the most; keep what matters)."""
    meta = body.get("metadata") or {}
    out: dict[str, Any] = {
        "apiVersion": body.get("apiVersion", ""),
        "kind": body.get("kind") or _KIND[plural],
        "metadata": {k: plain(meta[k]) for k in _METADATA_KEPT if k in meta},
    }
    if plural == "pods":
        spec, status = body.get("spec") or {}, body.get("status") or {}
        out["spec"] = {k: spec[k] for k in ("nodeName", "hostname", "subdomain") if k in spec}
        out["status"] = {k: plain(status[k]) for k in _POD_STATUS_KEPT if k in status}
    elif plural == "configmaps":
        out["data"] = plain(body.get("data") or {})
    elif plural in ("jobs", "jobsets"):
        out["spec"] = {"suspend": (body.get("spec") or {}).get("suspend")}
        out["status"] = plain(body.get("status") or {})
    return out


def register_indexes(registry: kopf.OperatorRegistry) -> None:
    """Index every child labelled with a run, and every claim, in `registry`."""
    for index_id, (group, version, plural) in CHILD_KINDS.items():

        def index_child(
            namespace: str, labels: Mapping[str, str], body: kopf.Body, plural=plural, **_: Any
        ) -> dict[tuple[str, str], dict[str, Any]]:
            return {(namespace, labels[LABEL_RUN]): trimmed(plural, body)}

        kopf.index(
            group, version, plural, id=index_id, labels={LABEL_RUN: kopf.PRESENT}, registry=registry
        )(index_child)

    @kopf.index("", "v1", "persistentvolumeclaims", id=CLAIMS_INDEX, registry=registry)
    def index_claim(
        namespace: str, name: str, spec: kopf.Spec, **_: Any
    ) -> dict[tuple[str, str], dict[str, Any]]:
        return {(namespace, name): {"spec": {"accessModes": list(spec.get("accessModes") or [])}}}


def watch_only_children(settings: kopf.OperatorSettings) -> None:
    """Ask the API server for labelled children only (kopf filters on its side otherwise)."""
    for group, version, plural in CHILD_KINDS.values():
        settings.watching.label_selectors[group, version, plural] = LABEL_RUN


@dataclass(frozen=True)
class Children:
    """The indexes as kopf hands them to a handler, read for one run."""

    indexes: Mapping[str, kopf.Index]

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> Children:
        return cls({index_id: kwargs[index_id] for index_id in INDEX_IDS})

    def _of(self, index_id: str, namespace: str, run: str) -> list[dict[str, Any]]:
        return list(self.indexes[index_id].get((namespace, run), ()))

    def workloads(self, namespace: str, run: str) -> list[dict[str, Any]]:
        return self._of("run_jobs", namespace, run) + self._of("run_jobsets", namespace, run)

    def pods(self, namespace: str, run: str) -> list[dict[str, Any]]:
        return self._of("run_pods", namespace, run)

    def named(self, index_id: str, namespace: str, run: str, name: str) -> dict[str, Any] | None:
        """The labelled child of that name (an unlabelled one shows up as a 409 on create)."""
        found = [c for c in self._of(index_id, namespace, run) if c["metadata"]["name"] == name]
        return found[0] if found else None

    def claims(self, namespace: str) -> Mapping[str, dict[str, Any] | None]:
        """The namespace's claims by name, looked up in the index only when asked (a run
        that is not starting asks for none)."""
        return _Claims(self.indexes[CLAIMS_INDEX], namespace)


@dataclass(frozen=True)
class _Claims(Mapping[str, Any]):
    index: kopf.Index
    namespace: str

    def __getitem__(self, name: str) -> dict[str, Any]:
        found = list(self.index.get((self.namespace, name), ()))
        if not found:
            raise KeyError(name)
        return found[0]

    def __iter__(self) -> Any:
        return (name for namespace, name in self.index if namespace == self.namespace)

    def __len__(self) -> int:
        return sum(1 for _ in self)
