"""The one module that talks to the Kubernetes API (and to rank 0's metrics endpoint).

Everything goes through the official `kubernetes` client and comes back as plain
camelCase dicts, exactly as the API serves them (`_preload_content=False`), so the pure
modules (`status`, `render`) read the same shapes as YAML. How the client reaches the API
is decided in one place, `configure`: an explicit server (argument or
$KUBETRAIN_API_SERVER, e.g. `kubectl proxy` or a test's emulated API), else the pod's
service account, else the local kubeconfig. Creation says whether it created (an object
that exists is left as it is; a refusal raises `Refused` with the apiserver's message),
deletion names its propagation policy (batch/v1 Jobs orphan their pods by default), and a
404 reads as "absent" rather than as an error.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import requests
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from kubetrain.api import (
    GROUP,
    KIND,
    LABEL_PIPELINE,
    LABEL_RUN,
    LABEL_SWEEP,
    METRICS_PORT,
    PIPELINE_KIND,
    PIPELINE_PLURAL,
    PLURAL,
    SWEEP_KIND,
    SWEEP_PLURAL,
    VERSION,
)
from kubetrain_trainer.config import ConfigError

log = logging.getLogger(__name__)

API_SERVER_ENV = "KUBETRAIN_API_SERVER"
JOBSET_GROUP, JOBSET_VERSION, JOBSET_PLURAL = "jobset.x-k8s.io", "v1alpha2", "jobsets"
METRICS_TIMEOUT_SECONDS = 2.0

_lock = threading.Lock()
_api_client: client.ApiClient | None = None
_api_server: str | None = None
_context: str | None = None
_kubeconfig: str | None = None


def configure(
    api_server: str | None = None, context: str | None = None, kubeconfig: str | None = None
) -> None:
    """Choose how to reach the API server; the next call builds a client that way.

    Order: `api_server`, then $KUBETRAIN_API_SERVER (both: a URL such as
    http://127.0.0.1:8001, TLS unverified), then a kubeconfig file or context when one is
    named, then the in-cluster service account, then kubeconfig ($KUBECONFIG or
    ~/.kube/config, current context).
    """
    global _api_client, _api_server, _context, _kubeconfig
    with _lock:
        if _api_client is not None:
            _api_client.close()
        _api_client = None
        _api_server = api_server
        _context = context
        _kubeconfig = kubeconfig


def api_server_override() -> str | None:
    """The explicit API server URL, if one was configured; None means the usual discovery."""
    return _api_server or os.environ.get(API_SERVER_ENV) or None


# Connections kept open to the API server: one per thread that calls it at once (the runs'
# workers, informers, kopf's executor). With fewer, a busy operator opens and closes TLS
# connections all the time, which cost it more CPU than the requests themselves.
CONNECTION_POOL_SIZE = 64


def _client_configuration() -> client.Configuration:
    configuration = client.Configuration()
    configuration.connection_pool_maxsize = CONNECTION_POOL_SIZE
    server = api_server_override()
    if server:
        configuration.host = server.rstrip("/")
        configuration.verify_ssl = False
        return configuration
    if _context or _kubeconfig:
        config.load_kube_config(
            config_file=_kubeconfig, context=_context, client_configuration=configuration
        )
        return configuration
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)
    return configuration


def current_namespace() -> str:
    """The namespace of kubeconfig's context (the one `configure` chose), else default."""
    try:
        _contexts, active = config.list_kube_config_contexts(config_file=_kubeconfig)
        if _context:
            active = next(c for c in _contexts if c["name"] == _context)
        return str((active.get("context") or {}).get("namespace") or "default")
    except (config.ConfigException, StopIteration, OSError, TypeError):
        return "default"


def api_client() -> client.ApiClient:
    """The process's API client, built on first use as `configure` decided."""
    global _api_client
    with _lock:
        if _api_client is None:
            _api_client = client.ApiClient(_client_configuration())
        return _api_client


def _body(response: Any) -> dict[str, Any]:
    return json.loads(response.data)


def _absent_on_404(call: Callable[[], Any]) -> dict[str, Any] | None:
    try:
        return _body(call())
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def _core() -> client.CoreV1Api:
    return client.CoreV1Api(api_client())


def _batch() -> client.BatchV1Api:
    return client.BatchV1Api(api_client())


def _custom() -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api_client())


# --- kubetrain's own kinds, as the operator reads and writes them ------------------------
# One helper per verb, the plural a parameter; the named calls below are what handlers use.


def _get(plural: str, namespace: str, name: str) -> dict[str, Any] | None:
    return _absent_on_404(
        lambda: _custom().get_namespaced_custom_object(
            GROUP, VERSION, namespace, plural, name, _preload_content=False
        )
    )


def _patch_status(
    plural: str, namespace: str, name: str, patch: dict[str, Any], at: str | None = None
) -> str:
    """Merge `patch` into the status (only if the object is still at version `at`, when
    given); the object's new resourceVersion."""
    body: dict[str, Any] = {"status": patch}
    if at is not None:
        body["metadata"] = {"resourceVersion": at}
    return _resource_version(
        _custom().patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, plural, name, body, _preload_content=False
        )
    )


def _patch(plural: str, namespace: str, name: str, patch: dict[str, Any]) -> str:
    """Merge `patch` into the object; its new resourceVersion."""
    return _resource_version(
        _custom().patch_namespaced_custom_object(
            GROUP, VERSION, namespace, plural, name, patch, _preload_content=False
        )
    )


def _resource_version(response: Any) -> str:
    return str(_body(response)["metadata"]["resourceVersion"])


def _create_unless_exists(plural: str, body: dict[str, Any]) -> bool:
    try:
        _custom().create_namespaced_custom_object(
            GROUP, VERSION, body["metadata"]["namespace"], plural, body, _preload_content=False
        )
    except ApiException as e:
        if e.status == 409:
            return False
        raise
    log.info("Created %s", describe(body))
    return True


def _list_labelled(namespace: str, plural: str, kind: str, selector: str) -> list[dict[str, Any]]:
    items = _body(
        _custom().list_namespaced_custom_object(
            GROUP, VERSION, namespace, plural, label_selector=selector, _preload_content=False
        )
    )["items"]
    return _with_kind(items, kind)


def _with_kind(items: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    for item in items:  # lists leave kind and apiVersion out of their items
        item.setdefault("apiVersion", f"{GROUP}/{VERSION}")
        item.setdefault("kind", kind)
    return items


def get_trainingrun(namespace: str, name: str) -> dict[str, Any] | None:
    """The TrainingRun as stored now, or None once it is gone."""
    return _get(PLURAL, namespace, name)


def patch_trainingrun_status(
    namespace: str, name: str, patch: dict[str, Any], resource_version: str
) -> str:
    """JSON-merge-patch the status subresource with `patch` (the status, not {status: ...})
    if the run is still at `resource_version` (else `Conflict`); the run's new version."""
    return _conflict_on_409(
        lambda: _patch_status(PLURAL, namespace, name, patch, at=resource_version)
    )


def annotate_trainingrun(
    namespace: str, name: str, annotations: dict[str, str | None], resource_version: str
) -> str:
    """Set (or, with None, remove) annotations on a TrainingRun still at `resource_version`
    (else `Conflict`); the run's new version."""
    patch = {"metadata": {"annotations": annotations, "resourceVersion": resource_version}}
    return _conflict_on_409(lambda: _patch(PLURAL, namespace, name, patch))


class Conflict(Exception):
    """The object changed since the version a write was based on (409): read it again."""


def _conflict_on_409(call: Callable[[], str]) -> str:
    try:
        return call()
    except ApiException as e:
        if e.status == 409:
            raise Conflict(_api_message(e)) from e
        raise


def patch_trainingrun(namespace: str, name: str, patch: dict[str, Any]) -> None:
    """JSON-merge-patch a TrainingRun (spec and metadata; the status has its own call)."""
    _patch(PLURAL, namespace, name, patch)


def drop_trainingrun_finalizer(body: dict[str, Any], finalizer: str) -> None:
    """Take `finalizer` off a run (one an older operator put there), if it is still the
    version read: a 409 means it changed, and its next event brings it back."""
    meta = body["metadata"]
    remaining = [f for f in meta.get("finalizers") or [] if f != finalizer]
    patch = {"metadata": {"finalizers": remaining, "resourceVersion": meta["resourceVersion"]}}
    try:
        _patch(PLURAL, meta["namespace"], meta["name"], patch)
    except ApiException as e:
        if e.status not in (404, 409):
            raise


def get_peering(name: str, namespace: str | None) -> dict[str, Any] | None:
    """kopf's peering object (a ClusterKopfPeering, or a KopfPeering in `namespace`)."""
    if namespace is None:
        return _absent_on_404(
            lambda: _custom().get_cluster_custom_object(
                "kopf.dev", "v1", "clusterkopfpeerings", name, _preload_content=False
            )
        )
    return _absent_on_404(
        lambda: _custom().get_namespaced_custom_object(
            "kopf.dev", "v1", namespace, "kopfpeerings", name, _preload_content=False
        )
    )


# What `kubectl describe` shows as the events' source ("From").
EVENT_COMPONENT = "kubetrain-operator"
MAX_EVENT_MESSAGE = 1024  # longer messages are cut in the middle, as kopf cuts them


def post_event(obj: dict[str, Any], event_type: str, reason: str, message: str) -> None:
    """A core/v1 Event on `obj` (`kubectl describe`); a refused one is logged, not raised:
    an event is worth less than the visit that announces it."""
    if len(message) > MAX_EVENT_MESSAGE:
        half = MAX_EVENT_MESSAGE // 2 - 2
        message = f"{message[:half]} … {message[-half:]}"
    meta = obj["metadata"]
    now = datetime.datetime.now(datetime.UTC).isoformat()
    body = {
        "metadata": {"namespace": meta["namespace"], "generateName": "kubetrain-event-"},
        "type": event_type,
        "reason": reason,
        "message": message,
        "action": reason,
        "reportingComponent": EVENT_COMPONENT,
        "reportingInstance": os.environ.get("POD_ID") or socket.gethostname(),
        "source": {"component": EVENT_COMPONENT},
        "involvedObject": {
            "apiVersion": obj.get("apiVersion", ""),
            "kind": obj.get("kind", ""),
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta.get("uid", ""),
        },
        "firstTimestamp": now,
        "lastTimestamp": now,
        "eventTime": now,
    }
    try:
        _core().create_namespaced_event(meta["namespace"], body, _preload_content=False)
    except ApiException as e:
        log.warning(
            "cannot post the event %s on %s: %s %s", reason, describe(obj), e.status, e.reason
        )


def create_trainingrun(body: dict[str, Any]) -> bool:
    """Create a TrainingRun unless one of that name exists; True if this call created it."""
    return _create_unless_exists(PLURAL, body)


def list_pipeline_runs(namespace: str, pipeline: str) -> list[dict[str, Any]]:
    """The TrainingRuns labelled as stages of `pipeline` (whoever owns them)."""
    return _list_labelled(namespace, PLURAL, KIND, f"{LABEL_PIPELINE}={pipeline}")


def list_pipeline_sweeps(namespace: str, pipeline: str) -> list[dict[str, Any]]:
    """The Sweeps labelled as stages of `pipeline` (whoever owns them)."""
    return _list_labelled(namespace, SWEEP_PLURAL, SWEEP_KIND, f"{LABEL_PIPELINE}={pipeline}")


def list_sweep_trials(namespace: str, sweep: str) -> list[dict[str, Any]]:
    """The TrainingRuns labelled as trials of `sweep` (whoever owns them)."""
    return _list_labelled(namespace, PLURAL, KIND, f"{LABEL_SWEEP}={sweep}")


def get_pipeline(namespace: str, name: str) -> dict[str, Any] | None:
    """The Pipeline as stored now, or None once it is gone."""
    return _get(PIPELINE_PLURAL, namespace, name)


def patch_pipeline_status(namespace: str, name: str, patch: dict[str, Any]) -> None:
    """JSON-merge-patch a Pipeline's status subresource with `patch` (the status itself)."""
    _patch_status(PIPELINE_PLURAL, namespace, name, patch)


def get_sweep(namespace: str, name: str) -> dict[str, Any] | None:
    """The Sweep as stored now, or None once it is gone."""
    return _get(SWEEP_PLURAL, namespace, name)


def patch_sweep_status(namespace: str, name: str, patch: dict[str, Any]) -> None:
    """JSON-merge-patch a Sweep's status subresource with `patch` (the status itself)."""
    _patch_status(SWEEP_PLURAL, namespace, name, patch)


def patch_sweep(namespace: str, name: str, patch: dict[str, Any]) -> None:
    """JSON-merge-patch a Sweep (spec and metadata)."""
    _patch(SWEEP_PLURAL, namespace, name, patch)


def create_sweep(body: dict[str, Any]) -> bool:
    """Create a Sweep unless one of that name exists; True if this call created it."""
    return _create_unless_exists(SWEEP_PLURAL, body)


# --- Any kubetrain object (the client: kubetrain submit/get/wait/...) ---------------------

FIELD_MANAGER = "kubetrain"  # server-side apply's manager for `kubetrain submit`
# The calls a person's `kubetrain` (kubetrain.client) makes with their own credentials: the
# chart's kubetrain-edit/-view roles and Kubernetes' edit/view (pods/log, events) cover them.
# The operator never makes them, so tests/chart/test_rbac.py leaves them out of its grants.
# The calls of the operator's informers and of its peering check: list and watch of the
# kinds it follows (kubetrain.handlers.children, .runs) and get of kopf's peering object;
# the chart's RBAC test grants those from the followed kinds and the peering layout.
FOLLOWING_CALLS = ("_list_function", "get_peering")
CLIENT_CALLS = (
    "apply_object", "get_object", "list_objects", "patch_object", "delete_object",
    "list_events", "list_run_pods", "stream_pod_log",
)  # fmt: skip


class ClientProblem(ConfigError):
    """Why a client call cannot be done, in one line that says what to do (a ConfigError:
    the CLI prints it as one line and exits 2)."""


def plural_of(kind: str) -> str:
    return {KIND: PLURAL, PIPELINE_KIND: PIPELINE_PLURAL, SWEEP_KIND: SWEEP_PLURAL}[kind]


def status_of(e: ApiException) -> dict[str, Any]:
    """The apiserver's Status object in an error, {} when the body is none (a group it does
    not serve answers with the plain text `404 page not found`)."""
    try:
        body = json.loads(e.body or "{}")
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def explain(e: Exception, what: str) -> ClientProblem:
    """The one line a person reads for a failed call about `what` (e.g. TrainingRun ns/x)."""
    if isinstance(e, config.ConfigException):
        return ClientProblem(
            "no Kubernetes cluster is configured (no kubeconfig or context): set KUBECONFIG, "
            "pass --context, or train on this machine with `kubetrain run FILE`"
        )
    if isinstance(e, ApiException):
        body = status_of(e)
        message = body.get("message") or str(e.reason)
        if e.status == 404 and not (body.get("details") or {}).get("name"):
            return ClientProblem(
                "the kubetrain CRDs are not installed in this cluster: helm install kubetrain "
                "charts/kubetrain (or kubectl apply -f crds/)"
            )
        if e.status == 404:
            return ClientProblem(f"{what} not found")
        if e.status == 403:
            return ClientProblem(
                f"forbidden: {message}; ask an admin to bind you the chart's kubetrain-edit "
                "ClusterRole (or -view to read) in that namespace"
            )
        if e.status == 422:
            return ClientProblem(f"{what} is invalid: {message}")
        return ClientProblem(f"{what}: the API server answered {e.status}: {message}")
    if isinstance(e, requests.RequestException | OSError) or "MaxRetryError" in type(e).__name__:
        return ClientProblem(f"cannot reach the Kubernetes API server: {e}")
    raise e


def apply_object(body: dict[str, Any]) -> str:
    """Server-side apply `body` as field manager kubetrain: created, configured or unchanged."""
    meta = body["metadata"]
    plural = plural_of(body["kind"])
    before = get_object(plural, meta["namespace"], meta["name"])
    applied = _body(
        _custom().patch_namespaced_custom_object(
            GROUP, VERSION, meta["namespace"], plural, meta["name"], body,
            field_manager=FIELD_MANAGER, force=True,
            _content_type="application/apply-patch+yaml", _preload_content=False,
        )
    )  # fmt: skip
    if before is None:
        return "created"
    # Not resourceVersion: the operator writes status and annotations all the time. The spec
    # moves the generation; labels and annotations are compared as applied.
    old, new = before["metadata"], applied["metadata"]
    same = old.get("generation") == new.get("generation") and all(
        (old.get(key) or {}).get(k) == v
        for key in ("labels", "annotations")
        for k, v in (meta.get(key) or {}).items()
    )
    return "unchanged" if same else "configured"


def get_object(plural: str, namespace: str, name: str) -> dict[str, Any] | None:
    """A kubetrain object as stored now, or None (raises ApiException if the kind is unknown)."""
    try:
        return _body(
            _custom().get_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, name, _preload_content=False
            )
        )
    except ApiException as e:
        if e.status == 404 and (status_of(e).get("details") or {}).get("name"):
            return None
        raise


def list_objects(plural: str, namespace: str) -> list[dict[str, Any]]:
    kind = {PLURAL: KIND, PIPELINE_PLURAL: PIPELINE_KIND, SWEEP_PLURAL: SWEEP_KIND}[plural]
    items = _body(
        _custom().list_namespaced_custom_object(
            GROUP, VERSION, namespace, plural, _preload_content=False
        )
    )["items"]
    return _with_kind(items, kind)


def patch_object(plural: str, namespace: str, name: str, patch: dict[str, Any]) -> None:
    _custom().patch_namespaced_custom_object(
        GROUP, VERSION, namespace, plural, name, patch, _preload_content=False
    )


def delete_object(plural: str, namespace: str, name: str) -> None:
    """Delete a kubetrain object; its children go by garbage collection (Background)."""
    _custom().delete_namespaced_custom_object(
        GROUP, VERSION, namespace, plural, name, propagation_policy="Background",
        _preload_content=False,
    )  # fmt: skip


def list_events(namespace: str, name: str) -> list[dict[str, Any]]:
    """The events about objects called `name` in `namespace`, oldest first."""
    events = _body(
        _core().list_namespaced_event(
            namespace, field_selector=f"involvedObject.name={name}", _preload_content=False
        )
    )["items"]
    return sorted(events, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")


def list_run_pods(namespace: str, run: str) -> list[dict[str, Any]]:
    """The pods of every attempt of a run (labelled kubetrain.dev/run)."""
    return _body(
        _core().list_namespaced_pod(
            namespace, label_selector=f"{LABEL_RUN}={run}", _preload_content=False
        )
    )["items"]


def stream_pod_log(namespace: str, pod: str, *, follow: bool) -> Iterator[str]:
    """A pod's log lines; with `follow`, as they are written until the container ends."""
    response = _core().read_namespaced_pod_log(
        pod, namespace, follow=follow, _preload_content=False
    )
    for line in _lines(response):
        yield line.decode("utf-8", "replace")


def _lines(response: Any) -> Iterator[bytes]:
    """A streamed response's lines, as they arrive (logs, watch events)."""
    try:
        pending = b""
        for chunk in response.stream(4096):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            yield from lines
        if pending:
            yield pending
    finally:
        response.release_conn()


# --- Following a kind: list once, then watch the changes ---------------------------------

# (group, version, plural) of a kind the operator follows; group "" is the core API.
Kind = tuple[str, str, str]
# The apiserver ends a watch after this long; it is opened again from where it stopped.
WATCH_SECONDS = 300


def _list_function(kind: Kind, namespace: str | None) -> Callable[..., Any]:
    """The official client's list (and watch) call of `kind`, in one namespace or all."""
    group, version, plural = kind
    core_calls = {
        "pods": "pod",
        "configmaps": "config_map",
        "services": "service",
        "persistentvolumeclaims": "persistent_volume_claim",
    }
    if (group, version) == ("", "v1") and plural in core_calls:
        api, noun = _core(), core_calls[plural]
    elif (group, version, plural) == ("batch", "v1", "jobs"):
        api, noun = _batch(), "job"
    elif namespace is None:
        return lambda **kw: _custom().list_cluster_custom_object(group, version, plural, **kw)
    else:
        return lambda **kw: _custom().list_namespaced_custom_object(
            group, version, namespace, plural, **kw
        )
    if namespace is None:
        return getattr(api, f"list_{noun}_for_all_namespaces")
    call = getattr(api, f"list_namespaced_{noun}")
    return lambda **kw: call(namespace, **kw)


def list_kind(
    kind: Kind, namespace: str | None, label_selector: str | None
) -> tuple[list[dict[str, Any]], str]:
    """Every object of `kind` (namespace None: cluster-wide) and the list's resourceVersion."""
    listed = _body(
        _list_function(kind, namespace)(label_selector=label_selector, _preload_content=False)
    )
    return listed["items"], listed["metadata"]["resourceVersion"]


class Watch:
    """One watch of `kind` from a resourceVersion: its events as dicts, until the apiserver
    ends it or `close` (from another thread) cuts it."""

    def __init__(
        self, kind: Kind, namespace: str | None, label_selector: str | None, since: str
    ) -> None:
        self.response = _list_function(kind, namespace)(
            label_selector=label_selector,
            watch=True,
            resource_version=since,
            allow_watch_bookmarks=True,
            timeout_seconds=WATCH_SECONDS,
            _preload_content=False,
            _request_timeout=(30, WATCH_SECONDS + 60),
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for line in _lines(self.response):
            if line.strip():
                yield json.loads(line)

    def close(self) -> None:
        """Shut the connection's socket: a read blocked in another thread returns at once
        (closing the response would wait for that read to finish)."""
        raw = getattr(self.response, "response", self.response)  # urllib3's response
        sock = getattr(getattr(raw, "connection", None), "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


# --- Children ---------------------------------------------------------------------------


def _create(obj: dict[str, Any]) -> Any:
    namespace = obj["metadata"]["namespace"]
    kind = (obj["apiVersion"], obj["kind"])
    if kind == ("v1", "ConfigMap"):
        return _core().create_namespaced_config_map(namespace, obj, _preload_content=False)
    if kind == ("v1", "Service"):
        return _core().create_namespaced_service(namespace, obj, _preload_content=False)
    if kind == ("batch/v1", "Job"):
        return _batch().create_namespaced_job(namespace, obj, _preload_content=False)
    if kind == (f"{JOBSET_GROUP}/{JOBSET_VERSION}", "JobSet"):
        return _custom().create_namespaced_custom_object(
            JOBSET_GROUP, JOBSET_VERSION, namespace, JOBSET_PLURAL, obj, _preload_content=False
        )
    raise ValueError(f"cannot create {obj['apiVersion']} {obj['kind']}: not a kind kubetrain makes")


def describe(obj: dict[str, Any]) -> str:
    """`Kind namespace/name`, the way log lines and events name an object."""
    meta = obj.get("metadata") or {}
    return f"{obj.get('kind')} {meta.get('namespace')}/{meta.get('name')}"


class Refused(Exception):
    """The apiserver refused to create an object (400, 403, 404 or 422), with its message."""

    def __init__(self, obj: dict[str, Any], code: int, message: str) -> None:
        self.object = describe(obj)
        self.api_version = obj.get("apiVersion", "")
        self.code = code
        self.message = message
        super().__init__(f"{self.object}: {code} {message}")


def _api_message(e: ApiException) -> str:
    """The apiserver's own message (its Status object), else the HTTP reason."""
    return status_of(e).get("message") or str(e.reason)


def create(obj: dict[str, Any]) -> bool:
    """Create `obj`; False if one of that name exists (409), Refused if the API says no."""
    try:
        _create(obj)
    except ApiException as e:
        if e.status == 409:
            return False
        if e.status in (400, 403, 404, 422):
            raise Refused(obj, e.status, _api_message(e)) from e
        raise
    log.info("Created %s", describe(obj))
    return True


def update_config_map(obj: dict[str, Any]) -> None:
    """Bring an existing ConfigMap's data to `obj`'s."""
    meta = obj["metadata"]
    _core().patch_namespaced_config_map(
        meta["name"], meta["namespace"], {"data": obj.get("data") or {}}, _preload_content=False
    )


def delete_job(namespace: str, name: str, propagation: str = "Foreground") -> bool:
    """Delete a Job and (Foreground: first) its pods; False if it was already gone.

    The policy is always named: the API's default for batch/v1 Jobs orphans the pods.
    """
    try:
        _batch().delete_namespaced_job(
            name, namespace, propagation_policy=propagation, _preload_content=False
        )
    except ApiException as e:
        if e.status == 404:
            return False
        raise
    return True


def delete_jobset(namespace: str, name: str, propagation: str = "Foreground") -> bool:
    """Delete a JobSet and its Jobs and pods; False if it was already gone."""
    try:
        _custom().delete_namespaced_custom_object(
            JOBSET_GROUP,
            JOBSET_VERSION,
            namespace,
            JOBSET_PLURAL,
            name,
            propagation_policy=propagation,
            _preload_content=False,
        )
    except ApiException as e:
        if e.status == 404:
            return False
        raise
    return True


def delete_workload(workload: dict[str, Any], propagation: str = "Foreground") -> bool:
    """Delete a Job or JobSet as returned by `list_workloads`."""
    meta = workload["metadata"]
    if workload.get("kind") == "JobSet":
        return delete_jobset(meta["namespace"], meta["name"], propagation)
    return delete_job(meta["namespace"], meta["name"], propagation)


def get_config_map(namespace: str, name: str) -> dict[str, Any] | None:
    return _absent_on_404(
        lambda: _core().read_namespaced_config_map(name, namespace, _preload_content=False)
    )


def get_service(namespace: str, name: str) -> dict[str, Any] | None:
    return _absent_on_404(
        lambda: _core().read_namespaced_service(name, namespace, _preload_content=False)
    )


def force_delete_pod(namespace: str, name: str) -> bool:
    """Delete a pod at once (grace period 0), as `kubectl delete --force`; False if gone."""
    try:
        _core().delete_namespaced_pod(
            name, namespace, grace_period_seconds=0, _preload_content=False
        )
    except ApiException as e:
        if e.status == 404:
            return False
        raise
    return True


# --- Rank 0's metrics -------------------------------------------------------------------


def pod_metrics_address(pod: dict[str, Any], port: int = METRICS_PORT) -> tuple[str, int]:
    """Where a trainer pod serves /metrics: its IP, else its DNS name under the Service."""
    status = pod.get("status") or {}
    if status.get("podIP"):
        return status["podIP"], port
    meta, spec = pod["metadata"], pod.get("spec") or {}
    hostname = spec.get("hostname") or meta["name"]
    subdomain = spec.get("subdomain")
    host = f"{hostname}.{subdomain}.{meta['namespace']}.svc" if subdomain else hostname
    return host, port


def read_pod_metrics(host: str, port: int = METRICS_PORT) -> str | None:
    """GET http://host:port/metrics (Prometheus text); None while the trainer does not answer.

    Rank 0 serves metrics only once its process is up, so failures are expected and quiet.
    """
    url = metrics_url(host, port)
    try:
        response = requests.get(url, timeout=METRICS_TIMEOUT_SECONDS)
        response.raise_for_status()
    except requests.RequestException as e:
        log.debug("no metrics from %s: %s", url, e)
        return None
    return response.text


def metrics_url(host: str, port: int) -> str:
    """`http://host:port/metrics`, an IPv6 pod IP in brackets (RFC 3986): `[fd00::7]:9400`."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}/metrics"
