"""A Python client for kubetrain objects on a cluster: what `kubetrain submit/get/wait/...` use.

    from kubetrain.client import Client
    client = Client(namespace="ml")                  # the current kube context
    client.submit("examples/cluster/trainingrun-sft-tiny.yaml")
    run = client.wait("sft-tiny", timeout=600, callback=lambda r: print(r.status.progress))
    for line in client.logs("sft-tiny", follow=True):
        print(line)

`Client(backend="local")` runs the same objects on this machine instead, each as `kubetrain
run` in the background (kubetrain.local.background), with the same status shape, so a
notebook moves from laptop to cluster by changing one argument.

Objects come back as the typed API models (TrainingRun, Pipeline, Sweep, status included).
A name may carry its kind as kubectl writes it (`tr/x`, `pipeline/x`, `sweep/x`); a bare
name is looked up as a TrainingRun, then a Pipeline, then a Sweep. Every call goes through
`kubetrain.k8s`; a refusal (no kube context, CRDs not installed, forbidden, not found)
raises `ClientProblem` with one line that says what to do.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from kubetrain import k8s
from kubetrain.api import (
    API_VERSION,
    FINISHED_PHASES,
    KIND,
    LABEL_ATTEMPT,
    PIPELINE_KIND,
    SWEEP_KIND,
    Pipeline,
    Sweep,
    TrainingRun,
    load_documents,
)
from kubetrain.k8s import ClientProblem
from kubetrain.local.background import LocalRuns

Object = TrainingRun | Pipeline | Sweep
MODELS: dict[str, type[BaseModel]] = {KIND: TrainingRun, PIPELINE_KIND: Pipeline, SWEEP_KIND: Sweep}
# How a name may say its kind, as kubectl's short names and singulars do.
KIND_PREFIXES = {
    "tr": KIND, "trainingrun": KIND, "trainingruns": KIND,
    "pipeline": PIPELINE_KIND, "pipelines": PIPELINE_KIND,
    "sweep": SWEEP_KIND, "sweeps": SWEEP_KIND,
}  # fmt: skip
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"

__all__ = ["Client", "ClientProblem", "RunFailed", "WaitTimeout"]


class RunFailed(Exception):
    """The object waited for ended Failed; the message is its reason and message."""


class WaitTimeout(Exception):
    """The object did not reach the phase in time."""


class Client:
    """kubetrain objects in one namespace of the cluster the kube context names, or, with
    backend "local", on this machine: the same calls, the same models and status shape."""

    def __init__(
        self,
        namespace: str | None = None,
        *,
        backend: str = "kubernetes",
        context: str | None = None,
        api_server: str | None = None,
        kubeconfig: str | Path | None = None,
        workdir: str | Path | None = None,
    ) -> None:
        if backend not in ("kubernetes", "local"):
            raise ClientProblem(f"unknown backend {backend!r}: use kubernetes or local")
        self.local: LocalRuns | None = None
        if backend == "local":
            # Runs here as `kubetrain run` does, each in the background (kubetrain.local).
            self.local = LocalRuns(workdir)
            self.namespace = namespace or "local"
            return
        if context or api_server or kubeconfig:
            k8s.configure(api_server, context=context, kubeconfig=kubeconfig and str(kubeconfig))
        self.namespace = namespace or k8s.current_namespace()

    # --- reading --------------------------------------------------------------------------

    def get(self, name: str, kind: str | None = None) -> Object:
        """The object called `name` (`kind/name` works too), status included."""
        kind, name = split_kind(name, kind)
        kinds = [kind] if kind else list(MODELS)
        if self.local is not None:
            found = self.local.get(name)
            if found is not None and found.kind in kinds:
                return found
            kinds = []
        for candidate in kinds:
            body = self._call(
                lambda c=candidate: k8s.get_object(k8s.plural_of(c), self.namespace, name),
                f"{candidate} {self.namespace}/{name}",
            )
            if body is not None:
                return _model(body)
        what = " or ".join([kind] if kind else list(MODELS))
        raise ClientProblem(f"no {what} {name} in namespace {self.namespace}")

    def list(self, kind: str | None = None) -> list[Object]:
        """Every object of `kind` (all three kinds when None) in the namespace."""
        if self.local is not None:
            return [o for o in self.local.list() if kind is None or o.kind == kind]
        found: list[Object] = []
        for candidate in [kind] if kind else list(MODELS):
            items = self._call(
                lambda c=candidate: k8s.list_objects(k8s.plural_of(c), self.namespace),
                f"{candidate}s in {self.namespace}",
            )
            found += [_model(item) for item in items]
        return found

    def events(self, name: str) -> list[dict[str, Any]]:
        if self.local is not None:
            return []  # a local run has no Kubernetes events; its log says what happened
        return self._call(lambda: k8s.list_events(self.namespace, name), f"events of {name}")

    # --- writing --------------------------------------------------------------------------

    def submit(self, source: str | Path | dict[str, Any] | Object) -> list[tuple[Object, str]]:
        """Create or update (server-side apply) the objects of a file, a dict or a model;
        returns each with what happened: created, configured or unchanged."""
        if isinstance(source, str | Path):
            objects = load_documents(Path(source))
        elif isinstance(source, dict):
            objects = [_model(source)]
        else:
            objects = [source]
        done = []
        for obj in objects:
            body = obj.model_dump(mode="json", by_alias=True, exclude_none=True, exclude={"status"})
            body["apiVersion"] = API_VERSION
            meta = body["metadata"]
            meta["namespace"] = meta.get("namespace") or self.namespace
            for key in (
                "uid",
                "resourceVersion",
                "creationTimestamp",
                "generation",
                "managedFields",
            ):
                meta.pop(key, None)
            what = f"{obj.kind} {meta['namespace']}/{meta['name']}"
            if self.local is not None:
                done.append((obj, self.local.submit(obj)))
                continue
            action = self._call(lambda b=body: k8s.apply_object(b), what)
            done.append((obj, action))
        return done

    def suspend(self, name: str) -> Object:
        return self._set_suspend(name, True)

    def resume(self, name: str) -> Object:
        return self._set_suspend(name, False)

    def delete(self, name: str) -> Object:
        obj = self.get(name)
        if self.local is not None:
            self.local.delete(obj.metadata.name)
            return obj
        plural = k8s.plural_of(obj.kind)
        self._call(
            lambda: k8s.delete_object(plural, self.namespace, obj.metadata.name),
            f"{obj.kind} {self.namespace}/{obj.metadata.name}",
        )
        return obj

    def _set_suspend(self, name: str, suspend: bool) -> Object:
        obj = self.get(name)
        if self.local is not None:
            change = self.local.suspend if suspend else self.local.resume
            change(obj.metadata.name)
            return self.get(obj.metadata.name)
        plural = k8s.plural_of(obj.kind)
        self._call(
            lambda: k8s.patch_object(
                plural, self.namespace, obj.metadata.name, {"spec": {"suspend": suspend}}
            ),
            f"{obj.kind} {self.namespace}/{obj.metadata.name}",
        )
        return self.get(obj.metadata.name, obj.kind)

    # --- waiting and following ------------------------------------------------------------

    def wait(
        self,
        name: str,
        *,
        until: str = "Succeeded",
        timeout: float | None = None,
        callback: Callable[[Object], None] | None = None,
        interval: float = 2.0,
    ) -> Object:
        """The object once it is `until` (Succeeded, or Ready: the same for a finished run).

        Calls `callback` with the object each time it is read. Raises RunFailed (its reason
        and message) when it ends Failed, WaitTimeout after `timeout` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            obj = self.get(name)
            if callback is not None:
                callback(obj)
            phase, reason, message = phase_of(obj)
            if phase == "Succeeded" or (until == "Ready" and ready(obj)):
                return obj
            if phase == "Failed":
                raise RunFailed(f"{obj.kind} {obj.metadata.name} failed: {reason}: {message}")
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(
                    f"{obj.kind} {obj.metadata.name} is {phase or 'not started'} after "
                    f"{timeout:g}s (waiting for {until})"
                )
            time.sleep(interval)

    def logs(
        self,
        name: str,
        *,
        follow: bool = False,
        rank: int = 0,
        all_ranks: bool = False,
        attempt: int | None = None,
        interval: float = 1.0,
    ) -> Iterator[str]:
        """A run's pod logs (rank 0 by default; all ranks prefixed `[rank N]`).

        With `follow`, lines come as they are written, and when an attempt's pods end while
        the run goes on (a restart), the next attempt's pods are followed too; a Pipeline's
        logs are those of its current stage's run.
        """
        obj = self.get(name)
        if self.local is not None:
            # One process ran it all: its output is the run's log (a pipeline's stages and a
            # sweep's summary included; each trial's own log is in its trial.log).
            yield from self.local.logs(obj.metadata.name, follow=follow)
            return
        if isinstance(obj, Pipeline | Sweep):
            yield from self._stage_logs(obj, follow=follow, rank=rank, all_ranks=all_ranks)
            return
        run = self.get(obj.metadata.name, KIND)
        current = attempt or (run.status.attempt if run.status else None) or 1
        followed: set[int] = set()
        while True:
            if current not in followed:
                followed.add(current)
                yield from self._attempt_logs(run, current, follow, rank, all_ranks)
            if not follow or attempt is not None:
                return
            run = self.get(obj.metadata.name, KIND)
            phase = run.status.phase if run.status else None
            newest = (run.status.attempt if run.status else None) or current
            if phase in FINISHED_PHASES and newest in followed:
                return
            if newest in followed:
                time.sleep(interval)  # the next attempt has not started yet
            current = newest

    def _attempt_logs(
        self, run: TrainingRun, attempt: int, follow: bool, rank: int, all_ranks: bool
    ) -> Iterator[str]:
        pods = self._wait_for_pods(run.metadata.name, attempt, rank, all_ranks, follow)
        for index, pod in pods:
            prefix = f"[rank {index}] " if all_ranks else ""
            pod_name = pod["metadata"]["name"]
            stream = self._call(
                lambda p=pod_name: k8s.stream_pod_log(self.namespace, p, follow=follow),
                f"the log of pod {self.namespace}/{pod_name}",
            )
            for line in stream:
                yield prefix + line

    def _wait_for_pods(
        self, run: str, attempt: int, rank: int, all_ranks: bool, follow: bool
    ) -> list[tuple[int, dict[str, Any]]]:
        """(node rank, pod) of the attempt whose containers have started, rank order."""
        while True:
            pods = [
                p
                for p in self._call(
                    lambda: k8s.list_run_pods(self.namespace, run), f"pods of {run}"
                )
                if (p["metadata"].get("labels") or {}).get(LABEL_ATTEMPT) == str(attempt)
            ]
            chosen = sorted(
                (int(_index(p)), p)
                for p in pods
                if _index(p).isdigit() and (all_ranks or int(_index(p)) == rank)
            )
            started = [
                (i, p) for i, p in chosen if (p.get("status") or {}).get("phase") != "Pending"
            ]
            if started or not follow:
                return started
            time.sleep(1.0)

    def _stage_logs(
        self, obj: Pipeline | Sweep, *, follow: bool, rank: int, all_ranks: bool
    ) -> Iterator[str]:
        """Follow a pipeline's stages (or a sweep's trials) one run at a time, as each starts."""
        seen: set[str] = set()
        while True:
            current = self.get(obj.metadata.name, obj.kind)
            runs = _running_children(current)
            fresh = [r for r in runs if r not in seen]
            for run in fresh:
                seen.add(run)
                yield f"==> {run}"
                yield from self.logs(run, follow=follow, rank=rank, all_ranks=all_ranks)
            phase = current.status.phase if current.status else None
            if not follow or phase in FINISHED_PHASES:
                return
            if not fresh:
                time.sleep(1.0)

    def _call(self, call: Callable[[], Any], what: str) -> Any:
        try:
            return call()
        except ClientProblem:
            raise
        except Exception as e:
            raise k8s.explain(e, what) from e


def split_kind(name: str, kind: str | None = None) -> tuple[str | None, str]:
    """(kind, name) from `tr/x`, `pipeline/x`, `sweep/x` or a bare `x`."""
    head, slash, rest = name.partition("/")
    if slash:
        if head.lower() not in KIND_PREFIXES:
            raise ClientProblem(f"unknown kind {head!r} in {name!r}: use tr/, pipeline/ or sweep/")
        return KIND_PREFIXES[head.lower()], rest
    return kind, name


def _model(body: dict[str, Any]) -> Object:
    kind = body.get("kind")
    if kind not in MODELS:
        raise ClientProblem(f"not a kubetrain object: kind {kind!r}")
    return MODELS[kind].model_validate(body)  # type: ignore[return-value]


def phase_of(obj: Object) -> tuple[str | None, str, str]:
    """(phase, Ready's reason, Ready's message) of an object's status."""
    status = obj.status
    if status is None:
        return None, "", ""
    ready_condition = next((c for c in status.conditions if c.type == "Ready"), None)
    return (
        status.phase,
        ready_condition.reason if ready_condition else "",
        ready_condition.message if ready_condition else "",
    )


def ready(obj: Object) -> bool:
    status = obj.status
    return bool(status and any(c.type == "Ready" and c.status == "True" for c in status.conditions))


def _index(pod: dict[str, Any]) -> str:
    meta = pod.get("metadata") or {}
    return str(
        (meta.get("annotations") or {}).get(COMPLETION_INDEX)
        or (meta.get("labels") or {}).get(COMPLETION_INDEX)
        or ""
    )


def _running_children(obj: Pipeline | Sweep) -> list[str]:
    """The runs a pipeline's stages (or a sweep's trials) have created, in order."""
    if obj.status is None:
        return []
    if isinstance(obj, Pipeline):
        return [s.run_name for s in obj.status.stages if s.run_name and s.phase != "Pending"]
    return [t.name for t in obj.status.trials]
