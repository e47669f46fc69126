"""The informers behind the operator's view of runs' children (kubetrain.handlers.children).

Their list-then-watch life against an API is exercised by every operator test here; these
tests pin what an API under load does to them: a watch that can no longer be resumed (410
Gone as an ERROR event) is listed afresh, a list of one namespace replaces only that
namespace's objects, and a child deleted is gone from its run's view.
"""

from __future__ import annotations

from typing import Any

import pytest

from kubetrain import k8s
from kubetrain.api import LABEL_RUN
from kubetrain.handlers import children as children_module
from kubetrain.handlers.children import Children, Informer, Store, trimmed


def pod(namespace: str, run: str, name: str, uid: str, phase: str = "Running") -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": uid,
            "labels": {LABEL_RUN: run},
            "resourceVersion": uid,
            "managedFields": [{"manager": "kubelet"}],
        },
        "spec": {"nodeName": "node-a", "containers": [{"name": "trainer"}]},
        "status": {"phase": phase, "podIP": "10.0.0.1", "hostIP": "192.168.0.1"},
    }


def pod_store() -> Store:
    return Store(children_module._run_key, lambda body: trimmed("pods", body))


def test_a_child_keeps_only_what_the_plans_read() -> None:
    kept = trimmed("pods", pod("a", "r", "r-1-0", "u1"))
    assert kept["kind"] == "Pod" and kept["apiVersion"] == "v1"  # lists leave both out
    assert "managedFields" not in kept["metadata"] and "containers" not in kept["spec"]
    assert kept["status"] == {"phase": "Running", "podIP": "10.0.0.1"}


def test_a_list_of_one_namespace_replaces_only_that_namespaces_children() -> None:
    store = pod_store()
    store.replace(None, [pod("a", "r", "r-1-0", "u1"), pod("b", "r", "r-1-0", "u2")])
    store.replace("a", [pod("a", "s", "s-1-0", "u3")])
    assert store.get(("a", "r")) == []
    assert [p["metadata"]["uid"] for p in store.get(("a", "s"))] == ["u3"]
    assert [p["metadata"]["uid"] for p in store.get(("b", "r"))] == ["u2"]


def test_events_update_and_delete_a_runs_children() -> None:
    store = pod_store()
    store.apply("ADDED", pod("a", "r", "r-1-0", "u1", phase="Pending"))
    store.apply("ADDED", pod("a", "r", "r-1-1", "u2"))
    store.apply("MODIFIED", pod("a", "r", "r-1-0", "u1", phase="Failed"))
    assert sorted(p["status"]["phase"] for p in store.get(("a", "r"))) == ["Failed", "Running"]
    store.apply("DELETED", pod("a", "r", "r-1-0", "u1"))
    store.apply("DELETED", pod("a", "r", "r-1-1", "u2"))
    assert store.get(("a", "r")) == [] and store.held() == []


class FakeWatch:
    """k8s.Watch's stand-in: each watch opened replays the next script of events."""

    scripts: list[list[dict[str, Any]]] = []
    opened: list[str] = []
    informer: Informer | None = None  # stopped once the scripts are played

    def __init__(self, kind: Any, namespace: Any, selector: Any, since: str) -> None:
        self.opened.append(since)
        self.events = self.scripts.pop(0) if self.scripts else []
        if not self.scripts and not self.events and self.informer is not None:
            self.informer.stop()

    def __iter__(self):
        return iter(self.events)

    def close(self) -> None:
        pass


def test_a_watch_too_old_to_resume_is_listed_afresh(monkeypatch: pytest.MonkeyPatch) -> None:
    lists = [
        ([pod("a", "r", "r-1-0", "u1")], "10"),
        ([pod("a", "r", "r-2-0", "u3")], "30"),  # the second list: after the 410
    ]
    listed: list[str] = []

    def list_kind(kind: Any, namespace: Any, selector: Any) -> tuple[list[dict], str]:
        listed.append(namespace)
        return lists.pop(0)

    store = pod_store()
    informer = Informer(("", "v1", "pods"), "a", LABEL_RUN, store)
    FakeWatch.opened, FakeWatch.informer = [], informer
    FakeWatch.scripts = [
        [  # a watch that ends normally after an event and a bookmark: resumed from there
            {"type": "ADDED", "object": pod("a", "r", "r-1-1", "u2")},
            {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "20"}}},
        ],
        [{"type": "ERROR", "object": {"code": 410, "message": "too old resource version"}}],
    ]
    monkeypatch.setattr(k8s, "list_kind", list_kind)
    monkeypatch.setattr(k8s, "Watch", FakeWatch)
    monkeypatch.setattr(children_module, "RETRY_SECONDS", 0.0)
    informer._run()  # in this thread: returns once stopped
    assert FakeWatch.opened[:3] == ["10", "20", "30"]
    assert listed == ["a", "a"]
    assert [p["metadata"]["uid"] for p in store.get(("a", "r"))] == ["u3"]
    assert informer.synced.is_set()


def test_a_kind_that_is_not_installed_counts_as_listed_and_empty(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def list_kind(kind: Any, namespace: Any, selector: Any) -> tuple[list[dict], str]:
        raise k8s.ApiException(status=404, reason="Not Found")

    monkeypatch.setattr(k8s, "list_kind", list_kind)
    monkeypatch.setattr(children_module, "RETRY_SECONDS", 60.0)
    following = Children(["a"])
    following.informers = [i for i in following.informers if i.kind[2] == "jobsets"]
    following.start(timeout=30)  # a JobSet CRD absent must not hold the operator's start
    try:
        assert following.workloads("a", "r") == []
    finally:
        following.stop()
