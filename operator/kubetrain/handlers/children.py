"""What the operator follows besides its own kinds: the children of runs, and claims.

Informers (as client-go calls them) replace per-run list calls: with a thousand runs,
following each one every interval would cost several API requests per run (list Jobs,
JobSets and pods; get its ConfigMap, Service and claims); from the informers it costs none.
Each kind is listed once, then watched from the list's resourceVersion by a thread of its
own (one per namespace when the operator serves named namespaces), and kept in memory
keyed by (namespace, run): only the fields the plans read, to bound the operator's memory.
The apiserver selects the labelled children (a label selector on the list and the watch),
and a watch it ends is opened again from the last version seen; one it can no longer
resume (410 Gone) or that fails is listed afresh. The operator starts no handler before
every informer has its first list (`Children.start` waits), so a freshly started operator
never mistakes an existing child for a missing one.

Not kopf indexes: kopf runs every event of every watched object through a per-object worker
of its own, which at a thousand runs (four thousand children) held most of the operator's
memory and CPU (tests/bench/test_bench_operator.py).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client.exceptions import ApiException

from kubetrain import k8s
from kubetrain.api import LABEL_RUN

log = logging.getLogger(__name__)

JOBSET_GROUP, JOBSET_VERSION = "jobset.x-k8s.io", "v1alpha2"

# store id -> the kind of the children it holds, by (namespace, run name).
CHILD_KINDS: dict[str, k8s.Kind] = {
    "run_jobs": ("batch", "v1", "jobs"),
    "run_jobsets": (JOBSET_GROUP, JOBSET_VERSION, "jobsets"),
    "run_pods": ("", "v1", "pods"),
    "run_config_maps": ("", "v1", "configmaps"),
    "run_services": ("", "v1", "services"),
}
CLAIMS = "claims"
CLAIM_KIND: k8s.Kind = ("", "v1", "persistentvolumeclaims")
_KIND = {
    "jobs": "Job",
    "jobsets": "JobSet",
    "pods": "Pod",
    "configmaps": "ConfigMap",
    "services": "Service",
}
_API_VERSION = {"jobs": "batch/v1", "jobsets": f"{JOBSET_GROUP}/{JOBSET_VERSION}"}
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
# A list or watch that failed (an apiserver restarting, a kind not installed) is tried again
# after this many seconds.
RETRY_SECONDS = 5.0
# How long the operator's start waits for the first lists before it gives up (and kopf
# retries the start).
SYNC_TIMEOUT_SECONDS = 120.0

Key = tuple[str, str]  # (namespace, run name) or, for claims, (namespace, claim name)


def trimmed(plural: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a child the plans read (pods carry the most; keep what matters)."""
    meta = body.get("metadata") or {}
    out: dict[str, Any] = {
        # Lists and watches leave kind and apiVersion out of their items.
        "apiVersion": body.get("apiVersion") or _API_VERSION.get(plural, "v1"),
        "kind": body.get("kind") or _KIND[plural],
        "metadata": {k: meta[k] for k in _METADATA_KEPT if k in meta},
    }
    if plural == "pods":
        spec, status = body.get("spec") or {}, body.get("status") or {}
        out["spec"] = {k: spec[k] for k in ("nodeName", "hostname", "subdomain") if k in spec}
        out["status"] = {k: status[k] for k in _POD_STATUS_KEPT if k in status}
    elif plural == "configmaps":
        out["data"] = body.get("data") or {}
    elif plural in ("jobs", "jobsets"):
        out["spec"] = {"suspend": (body.get("spec") or {}).get("suspend")}
        out["status"] = body.get("status") or {}
    return out


def _claim(body: Mapping[str, Any]) -> dict[str, Any]:
    return {"spec": {"accessModes": list((body.get("spec") or {}).get("accessModes") or [])}}


@dataclass
class Store:
    """Objects of one kind by key, then by uid, as the informers feeding it last saw them."""

    key_of: Callable[[Mapping[str, Any]], Key]
    trim: Callable[[Mapping[str, Any]], dict[str, Any]]
    objects: dict[Key, dict[str, dict[str, Any]]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self, key: Key) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.objects.get(key, {}).values())

    def held(self) -> list[Key]:
        with self.lock:
            return list(self.objects)

    def replace(self, namespace: str | None, items: Sequence[Mapping[str, Any]]) -> None:
        """A fresh list of `namespace` (None: all) replaces what was held of it."""
        fresh: dict[Key, dict[str, dict[str, Any]]] = {}
        for item in items:
            fresh.setdefault(self.key_of(item), {})[item["metadata"]["uid"]] = self.trim(item)
        with self.lock:
            for key in [k for k in self.objects if namespace is None or k[0] == namespace]:
                del self.objects[key]
            self.objects.update(fresh)

    def apply(self, event_type: str, item: Mapping[str, Any]) -> None:
        key, uid = self.key_of(item), item["metadata"]["uid"]
        with self.lock:
            if event_type == "DELETED":
                held = self.objects.get(key, {})
                held.pop(uid, None)
                if not held:
                    self.objects.pop(key, None)
            else:
                self.objects.setdefault(key, {})[uid] = self.trim(item)


class Informer:
    """A thread that lists `kind` in one namespace (or all), then follows it into `store`."""

    def __init__(
        self, kind: k8s.Kind, namespace: str | None, selector: str | None, store: Store
    ) -> None:
        self.kind, self.namespace, self.selector, self.store = kind, namespace, selector, store
        self.synced = threading.Event()
        self.stopping = threading.Event()
        self.watch: k8s.Watch | None = None
        where = f" in {namespace}" if namespace else ""
        self.thread = threading.Thread(
            target=self._run, name=f"informer-{kind[2]}{where}", daemon=True
        )

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        watch = self.watch
        if watch is not None:
            watch.close()  # unblocks the thread's read

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                since = self._list()
                while since and not self.stopping.is_set():
                    since = self._follow(since)  # "": list again
            except ApiException as e:
                if e.status in (403, 404):  # not granted, or the kind is not installed
                    self.store.replace(self.namespace, [])
                    self.synced.set()
                log.warning("cannot follow %s: %s %s", self._what(), e.status, e.reason)
            except Exception as e:  # the apiserver went away or cut the stream: list again
                if not self.stopping.is_set():
                    log.warning("following %s failed, listing again: %s", self._what(), e)
            self.stopping.wait(RETRY_SECONDS)

    def _list(self) -> str:
        items, version = k8s.list_kind(self.kind, self.namespace, self.selector)
        self.store.replace(self.namespace, items)
        self.synced.set()
        return version

    def _follow(self, since: str) -> str:
        """Watch from `since`; the version to go on from, or "" when it must list again."""
        self.watch = k8s.Watch(self.kind, self.namespace, self.selector, since)
        try:
            for event in self.watch:
                kind, item = event.get("type"), event.get("object") or {}
                if kind == "ERROR":  # 410 Gone: the version is too old to resume from
                    log.info("watch of %s ended: %s", self._what(), item.get("message"))
                    return ""
                since = (item.get("metadata") or {}).get("resourceVersion") or since
                if kind != "BOOKMARK":
                    self.store.apply(kind, item)
        finally:
            self.watch = None
        return since

    def _what(self) -> str:
        return self.kind[2] + (f" in {self.namespace}" if self.namespace else "")


def start_informers(informers: Sequence[Informer], timeout: float) -> None:
    """Start `informers`; return once each has its first list (TimeoutError if not)."""
    for informer in informers:
        informer.start()
    for informer in informers:
        if not informer.synced.wait(timeout):
            raise TimeoutError(f"no list of {informer._what()} within {timeout:.0f}s")


class Children:
    """The informers' stores, read for one run (or one namespace's claims)."""

    def __init__(self, namespaces: Sequence[str] = ()) -> None:
        self.stores = {
            store_id: Store(_run_key, lambda body, plural=kind[2]: trimmed(plural, body))
            for store_id, kind in CHILD_KINDS.items()
        }
        self.stores[CLAIMS] = Store(name_key, _claim)
        scopes: list[str | None] = list(namespaces) or [None]
        self.informers = [
            Informer(kind, namespace, LABEL_RUN, self.stores[store_id])
            for store_id, kind in CHILD_KINDS.items()
            for namespace in scopes
        ] + [Informer(CLAIM_KIND, namespace, None, self.stores[CLAIMS]) for namespace in scopes]

    def start(self, timeout: float = SYNC_TIMEOUT_SECONDS) -> None:
        """Start following; return once every kind has been listed (TimeoutError if not)."""
        try:
            start_informers(self.informers, timeout)
        except TimeoutError:
            self.stop()
            raise

    def stop(self) -> None:
        for informer in self.informers:
            informer.stop()

    def workloads(self, namespace: str, run: str) -> list[dict[str, Any]]:
        key = (namespace, run)
        return self.stores["run_jobs"].get(key) + self.stores["run_jobsets"].get(key)

    def pods(self, namespace: str, run: str) -> list[dict[str, Any]]:
        return self.stores["run_pods"].get((namespace, run))

    def named(self, store_id: str, namespace: str, run: str, name: str) -> dict[str, Any] | None:
        """The labelled child of that name (an unlabelled one shows up as a 409 on create)."""
        found = [c for c in self.stores[store_id].get((namespace, run)) if _name(c) == name]
        return found[0] if found else None

    def claims(self, namespace: str) -> Mapping[str, dict[str, Any]]:
        """The namespace's claims by name, looked up only when asked (a run that is not
        starting asks for none)."""
        return _Claims(self.stores[CLAIMS], namespace)


def _name(body: Mapping[str, Any]) -> str:
    return body["metadata"]["name"]


def _run_key(body: Mapping[str, Any]) -> Key:
    meta = body["metadata"]
    return meta["namespace"], meta["labels"][LABEL_RUN]


def name_key(body: Mapping[str, Any]) -> Key:
    meta = body["metadata"]
    return meta["namespace"], meta["name"]


@dataclass(frozen=True)
class _Claims(Mapping[str, Any]):
    store: Store
    namespace: str

    def __getitem__(self, name: str) -> dict[str, Any]:
        found = self.store.get((self.namespace, name))
        if not found:
            raise KeyError(name)
        return found[0]

    def __iter__(self) -> Iterator[str]:
        return (name for namespace, name in self.store.held() if namespace == self.namespace)

    def __len__(self) -> int:
        return sum(1 for _ in self)
