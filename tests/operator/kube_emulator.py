"""An emulated Kubernetes API server: kmock's emulator plus the gaps it leaves.

kmock 0.8's `KubernetesEmulator` (by kopf's author) serves discovery, create (409 on a
duplicate), JSON merge and JSON patches, status patches, delete, list and watch, from memory.
A real API server does more, and the operator leans on some of it, so `FaithfulEmulator`
below adds exactly these, each as a real API server does it:

- 201 Created for a create (kmock answers 200, which the official client reads as None);
- metadata: `uid`, `resourceVersion` (one counter for all objects), `generation` (1 on
  create, +1 when anything outside metadata and status changes), `creationTimestamp`, and
  names from `generateName` (kopf posts its events that way);
- status subresource: where a resource has one, create and patches of the main resource
  drop `status`, and patches of `/status` change nothing but `status`;
- optimistic concurrency: a merge patch naming an old `metadata.resourceVersion` is a 409,
  a JSON patch whose `test` op fails is a 422 (kopf relies on both);
- strategic merge patches of custom resources are refused with 415 (kubectl and the
  official client send them for built-ins only; kmock then merges like a JSON merge patch,
  so lists are replaced whole, never merged by key: send whole lists in tests);
- label selectors on list and watch (`=`, `==`, `!=`, `in`, `notin`, `key`, `!key`);
- owner-reference garbage collection: deleting an object with `propagationPolicy`
  Background or Foreground (the default for everything but batch/v1 Jobs, whose default is
  Orphan, as in Kubernetes) deletes its dependents once no live owner is left; Orphan
  removes the owner reference instead. Real GC is asynchronous; here it is done before the
  DELETE returns (Foreground: dependents first), so tests never see an owner lingering
  while its pods terminate; the operator waits for that case rather than assuming it.

kmock 0.8 also cannot parse `/api/v1/namespaces` and `/api/v1/namespaces/<name>` (it
takes `namespaces` for the namespace prefix of a namespaced path and fails), which kopf's
namespace observer lists; `parse_path_with_namespaces` fixes that while the server runs.

Still missing, and not needed by these tests: server-side apply, PUT (replace), field
selectors, admission (OpenAPI/CEL validation: tests/unit checks the CRD schema instead),
`deletecollection`, watch bookmarks, resuming a watch from a resourceVersion (a watch
starts with every object as ADDED, having joined the events first, so nothing falls
between a list and the watch after it), and a DELETED watch event when an object's labels
stop matching a watch's selector.

`serve_emulator()` starts it on a free localhost port in a thread of its own (so the sync
tests, the kopf operator thread and the official client all talk to it over HTTP, as to a
cluster), installs the CRDs shipped in crds/ (served as their YAML declares, status
subresource included) and yields a `Cluster` with a ready `kubernetes` ApiClient. The
`k8s_api` fixture in conftest.py is that, one fresh API server per test.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import pathlib
import secrets
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import attrs
import kmock
import yaml
from kmock._internal import dicts as kmock_dicts
from kmock._internal import parsing as kmock_parsing
from kubernetes import client as k8s_client

REPO = pathlib.Path(__file__).resolve().parents[2]

CREATE, UPDATE, DELETE = kmock.action.CREATE, kmock.action.UPDATE, kmock.action.DELETE

# Resources whose REST default for propagationPolicy is Orphan (legacy behaviour kept by
# Kubernetes for batch/v1 Jobs and the like): deleting them without a policy leaves pods.
ORPHAN_BY_DEFAULT = {kmock.resource("batch", "v1", "jobs")}

STRATEGIC_MERGE = "application/strategic-merge-patch+json"


def parse_path_with_namespaces(path: str) -> kmock_parsing.ParsedPath:
    """kmock's URL parser, plus the cluster-scoped Namespace resource it cannot parse."""
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and len(parts) <= 4:
        name = parts[3] if len(parts) == 4 else None
        return kmock_parsing.ParsedPath("", "v1", "namespaces", None, name, None)
    return _kmock_parse_path(path)


_kmock_parse_path = kmock_parsing.parse_path


def rfc3339_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_label_selector(selector: str) -> list[tuple[str, str, set[str]]]:
    """Split a label selector into (key, operator, values) requirements."""
    requirements: list[tuple[str, str, set[str]]] = []
    depth, start, parts = 0, 0, []
    for i, char in enumerate(selector):  # split on commas outside `in (a, b)` sets
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(selector[start:i])
            start = i + 1
    parts.append(selector[start:])
    for part in (p.strip() for p in parts):
        if not part:
            continue
        words = part.split(None, 1)
        if len(words) == 2 and words[1].split("(", 1)[0].strip() in ("in", "notin"):
            op, _, values = words[1].partition("(")
            requirements.append(
                (words[0], op.strip(), {v.strip() for v in values.rstrip(")").split(",")})
            )
        elif "!=" in part:
            key, value = part.split("!=", 1)
            requirements.append((key.strip(), "!=", {value.strip()}))
        elif "=" in part:
            key, value = part.replace("==", "=").split("=", 1)
            requirements.append((key.strip(), "=", {value.strip()}))
        elif part.startswith("!"):
            requirements.append((part[1:].strip(), "!exists", set()))
        else:
            requirements.append((part, "exists", set()))
    return requirements


def labels_match(labels: dict[str, str], selector: str) -> bool:
    """Whether labels satisfy a Kubernetes label selector string."""
    for key, op, values in parse_label_selector(selector):
        present = key in labels
        if op == "exists" and not present:
            return False
        if op == "!exists" and present:
            return False
        if op in ("=", "in") and labels.get(key) not in values:
            return False
        if op in ("!=", "notin") and present and labels[key] in values:
            return False
    return True


def _labels_of(obj: dict[str, Any]) -> dict[str, str]:
    return (obj.get("metadata") or {}).get("labels") or {}


@attrs.define(kw_only=True)
class FaithfulEmulator(kmock.KubernetesEmulator):
    """kmock's KubernetesEmulator plus the API-server behaviours listed in the module doc."""

    custom_resources: set[kmock.resource] = attrs.field(factory=set)
    _revision: int = attrs.field(default=0, init=False)

    def next_revision(self) -> str:
        self._revision += 1
        return str(self._revision)

    def has_status_subresource(self, resource: kmock.resource) -> bool:
        return resource in self.resources and "status" in self.resources[resource].subresources

    def live(self, key: tuple[Any, ...]) -> dict[str, Any] | None:
        if key in self.objects and not self.objects[key].deleted:
            return self.objects[key].raw
        return None

    async def _handle(self, request: kmock.Request) -> Any:
        resource = request.resource
        if resource is None or request.action not in (CREATE, UPDATE, DELETE):
            return await super()._handle(request)
        content_type = request.headers.get("Content-Type", "")
        if resource in self.custom_resources and content_type.startswith(STRATEGIC_MERGE):
            raise kmock.KubernetesError(
                status=415,
                reason="UnsupportedMediaType",
                message="strategic merge patch is not supported for custom resources",
            )
        if request.action == CREATE:
            self._prepare_create(request)
            response = await super()._handle(request)
            if response.status == 200:  # the API says 201 Created (clients look for it)
                response.set_status(201)
            return response
        key = (resource, request.namespace, request.name)
        before = self.live(key)
        if request.action == UPDATE:
            if before is not None:
                self._prepare_update(request, before)
            response = await super()._handle(request)
            if before is not None and self.live(key) is None:  # last finalizer removed
                await self._collect_garbage({before["metadata"].get("uid")}, "Background")
            return response
        policy = self._propagation_policy(request)
        if before is not None and policy == "Foreground":
            await self._collect_garbage({before["metadata"].get("uid")}, policy)
        response = await super()._handle(request)
        if before is not None and self.live(key) is None:
            await self._collect_garbage({before["metadata"].get("uid")}, policy)
        return response

    def _prepare_create(self, request: kmock.Request) -> None:
        body = request.data
        meta = body.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
        if request.namespace and not meta.get("namespace"):
            meta["namespace"] = request.namespace
        for server_owned in ("deletionTimestamp", "deletionGracePeriodSeconds"):
            meta.pop(server_owned, None)
        meta.update(
            uid=str(uuid.uuid4()),
            resourceVersion=self.next_revision(),
            generation=1,
            creationTimestamp=rfc3339_now(),
        )
        if self.has_status_subresource(request.resource):
            body.pop("status", None)

    def _prepare_update(self, request: kmock.Request, before: dict[str, Any]) -> None:
        patch = request.data
        status_only = request.subresource == "status"
        drop_status = request.subresource is None and self.has_status_subresource(request.resource)
        if isinstance(patch, list):  # JSON patch: keep ops on the paths this endpoint owns

            def owned(op: dict[str, Any]) -> bool:
                on_status = op["path"] == "/status" or op["path"].startswith("/status/")
                if op["op"] == "test" or not (status_only or drop_status):
                    return True
                return on_status if status_only else not on_status

            patch[:] = [op for op in patch if owned(op)]
        elif isinstance(patch, dict):
            stated_version = (patch.get("metadata") or {}).get("resourceVersion")
            if stated_version and stated_version != before["metadata"]["resourceVersion"]:
                raise kmock.KubernetesError(
                    status=409,
                    reason="Conflict",
                    message="the object has been modified; please apply your changes "
                    "to the latest version and try again",
                )
            if status_only:
                for key in [k for k in patch if k != "status"]:
                    del patch[key]
            elif drop_status:
                patch.pop("status", None)
            for immutable in ("uid", "name", "namespace", "creationTimestamp", "generation"):
                (patch.get("metadata") or {}).pop(immutable, None)
        try:
            after = kmock_dicts.patch_dict(copy.deepcopy(before), patch)
        except Exception as e:  # a failed JSON-patch `test` op or a malformed patch
            raise kmock.KubernetesError(status=422, reason="Invalid", message=str(e)) from e
        generation = before["metadata"].get("generation", 1)
        changed = {k: v for k, v in after.items() if k not in ("metadata", "status")} != {
            k: v for k, v in before.items() if k not in ("metadata", "status")
        }
        bump = {"resourceVersion": self.next_revision()}
        if changed:
            bump["generation"] = generation + 1
        if isinstance(patch, list):
            patch.extend(
                {"op": "add", "path": f"/metadata/{k}", "value": v} for k, v in bump.items()
            )
        else:
            if not isinstance(patch.get("metadata"), dict):
                patch["metadata"] = {}
            patch["metadata"].update(bump)

    @staticmethod
    def _propagation_policy(request: kmock.Request) -> str:
        body = request.data if isinstance(request.data, dict) else {}
        policy = request.params.get("propagationPolicy") or body.get("propagationPolicy")
        if policy:
            return policy
        if body.get("orphanDependents") is True or request.params.get("orphanDependents") == "true":
            return "Orphan"
        return "Orphan" if request.resource in ORPHAN_BY_DEFAULT else "Background"

    async def _collect_garbage(self, dead_uids: set[str | None], policy: str) -> None:
        """Delete (or, for Orphan, release) the dependents of objects that are gone."""
        dead_uids = {uid for uid in dead_uids if uid}
        while dead_uids:
            async with self._lock:
                live_uids = {
                    obj.raw["metadata"].get("uid")
                    for obj in self.objects.values()
                    if not obj.deleted
                } - dead_uids
                next_dead: set[str] = set()
                for (resource, _, _), obj in list(self.objects.items()):
                    if obj.deleted:
                        continue
                    meta = obj.raw.get("metadata", {})
                    refs = meta.get("ownerReferences") or []
                    if not any(ref.get("uid") in dead_uids for ref in refs):
                        continue
                    if policy == "Orphan":
                        kept = [ref for ref in refs if ref.get("uid") not in dead_uids]
                        obj.patch(
                            {
                                "metadata": {
                                    "ownerReferences": kept,
                                    "resourceVersion": self.next_revision(),
                                }
                            }
                        )
                        event = {"type": "MODIFIED", "object": obj.raw}
                    elif any(ref.get("uid") in live_uids for ref in refs):
                        continue  # another owner still lives
                    elif meta.get("finalizers"):
                        if not meta.get("deletionTimestamp"):
                            obj.patch(
                                {
                                    "metadata": {
                                        "deletionTimestamp": rfc3339_now(),
                                        "resourceVersion": self.next_revision(),
                                    }
                                }
                            )
                        event = {"type": "MODIFIED", "object": obj.raw}
                    else:
                        raw = obj.raw
                        obj.delete()
                        next_dead.add(meta.get("uid"))
                        event = {"type": "DELETED", "object": raw}
                    await self._buses[resource].put(event)
            dead_uids = next_dead
            policy = "Background"  # dependents of dependents go the ordinary way

    async def _serve_list(self, request: kmock.Request) -> Any:
        listing = await super()._serve_list(request)
        selector = request.params.get("labelSelector")
        if selector:
            listing["items"] = [
                o for o in listing["items"] if labels_match(_labels_of(o), selector)
            ]
        listing["metadata"]["resourceVersion"] = str(self._revision)
        return listing

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        """kmock's watch, joining the event bus before it takes its snapshot of the objects.

        kmock's own takes the snapshot, streams it, and only then joins the bus, so an object
        created while the snapshot streams was never sent: an informer that had just listed
        missed it for good (a real apiserver resumes a watch from the list's version).
        """
        yield b""  # the headers: the stream is open
        bus = self._buses[request.resource]
        async with self._lock:  # where every change is put on the bus
            joined = await bus.mark()
            snapshot = [
                {"type": "ADDED", "object": obj.raw}
                for obj in self._KubernetesEmulator__get_objs(request, strict=False)
                if not obj.deleted
            ]
        selector = request.params.get("labelSelector") or ""
        for event in snapshot:
            if labels_match(_labels_of(event["object"]), selector):
                yield event
        async for event in bus.stream(since=joined):
            meta = (event.get("object") or {}).get("metadata") or {}
            if self._KubernetesEmulator__check(
                request, request.resource, meta.get("namespace"), meta.get("name"), strict=False
            ) and labels_match(_labels_of(event.get("object") or {}), selector):
                yield event


@dataclass
class Cluster:
    """A running emulated API server, as the tests see it."""

    url: str
    emulator: FaithfulEmulator
    api: k8s_client.ApiClient

    @property
    def core(self) -> k8s_client.CoreV1Api:
        return k8s_client.CoreV1Api(self.api)

    @property
    def batch(self) -> k8s_client.BatchV1Api:
        return k8s_client.BatchV1Api(self.api)

    @property
    def custom(self) -> k8s_client.CustomObjectsApi:
        return k8s_client.CustomObjectsApi(self.api)

    def register_custom_resource(
        self,
        group: str,
        version: str,
        plural: str,
        *,
        kind: str,
        namespaced: bool = True,
        shortnames: tuple[str, ...] = (),
        categories: tuple[str, ...] = (),
    ) -> None:
        """Serve a custom resource with a status subresource (as a CRD would declare it)."""
        res = kmock.resource(group, version, plural)
        self.emulator.resources[res] = kmock.ResourceInfo(
            kind=kind,
            singular=kind.lower(),
            namespaced=namespaced,
            verbs={"create", "delete", "get", "list", "patch", "update", "watch"},
            shortnames=set(shortnames),
            categories=set(categories),
            subresources={"status"},
        )
        self.emulator.custom_resources.add(res)


def install_crds(cluster: Cluster, crd_dir: pathlib.Path = REPO / "crds") -> None:
    """Serve every CRD in crd_dir, as the API server would once it is applied."""
    for path in sorted(crd_dir.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        spec = crd["spec"]
        for version in spec["versions"]:
            if not version.get("served", True):
                continue
            res = kmock.resource(spec["group"], version["name"], spec["names"]["plural"])
            cluster.emulator.resources[res] = kmock.ResourceInfo(
                kind=spec["names"]["kind"],
                singular=spec["names"].get("singular"),
                namespaced=spec["scope"] == "Namespaced",
                verbs={"create", "delete", "get", "list", "patch", "update", "watch"},
                shortnames=set(spec["names"].get("shortNames", [])),
                categories=set(spec["names"].get("categories", [])),
                subresources=set(version.get("subresources", {})),
            )
            cluster.emulator.custom_resources.add(res)
        k8s_client.ApiextensionsV1Api(cluster.api).create_custom_resource_definition(
            crd, _preload_content=False
        )


def _new_api_client(url: str) -> k8s_client.ApiClient:
    configuration = k8s_client.Configuration(host=url)
    configuration.verify_ssl = False
    return k8s_client.ApiClient(configuration)


@contextlib.contextmanager
def serve_emulator(namespaces: tuple[str, ...] = ("default",)) -> Iterator[Cluster]:
    """A fresh emulated API server on a free port, served from a thread of its own."""
    started = threading.Event()
    state: dict[str, Any] = {}

    async def serve() -> None:
        stop = asyncio.Event()
        async with FaithfulEmulator() as emulator, kmock.Server(emulator) as server:
            emulator.resources.load_bundled()  # discovery of the built-in resources
            state.update(emulator=emulator, url=str(server.url).rstrip("/"), stop=stop)
            state["loop"] = asyncio.get_running_loop()
            started.set()
            await stop.wait()

    def run() -> None:
        try:
            asyncio.run(serve())
        except BaseException as e:  # surface start-up failures to the test
            state["error"] = e
            started.set()

    kmock_parsing.parse_path = parse_path_with_namespaces
    thread = threading.Thread(target=run, name="k8s-emulator", daemon=True)
    thread.start()
    try:
        if not started.wait(10) or "error" in state:
            raise RuntimeError("the emulated API server did not start") from state.get("error")
        with _new_api_client(state["url"]) as api:
            cluster = Cluster(url=state["url"], emulator=state["emulator"], api=api)
            # The JobSet API is no built-in; the operator's jobset backend creates JobSets.
            cluster.register_custom_resource(
                "jobset.x-k8s.io", "v1alpha2", "jobsets", kind="JobSet"
            )
            install_crds(cluster)
            # kopf serves a namespace only once its Namespace object exists.
            for namespace in namespaces:
                cluster.core.create_namespace({"metadata": {"name": namespace}})
            yield cluster
    finally:
        if "stop" in state:
            state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(10)
        kmock_parsing.parse_path = _kmock_parse_path
