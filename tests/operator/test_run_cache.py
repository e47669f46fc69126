"""A visit reads its run from the informer (`RunCache`), and stays right when that copy is old.

The rule: the cached run is read only once it holds the operator's own last write of it;
an edit by someone else that the cache has not seen yet is caught by the write, which
states the version it was planned from (409), and the visit reads the run again.
"""

from __future__ import annotations

from typing import Any

import kopf
from kube_emulator import Cluster
from operator_harness import NAMESPACE, create_shared_claims
from test_operator_trainingrun import RUN, Runs

from kubetrain import k8s
from kubetrain.api import GROUP, VERSION
from kubetrain.handlers.children import Children
from kubetrain.handlers.runs import LAST_APPLIED, RunCache, RunStore
from kubetrain.handlers.trainingrun import reconcile
from kubetrain.trainingruns import STARTED_SPEC_ANNOTATION

KEY = (NAMESPACE, RUN)


def stored(resource_version: str, **annotations: str) -> dict[str, Any]:
    return {
        "metadata": {
            "name": RUN,
            "namespace": NAMESPACE,
            "uid": "uid-1",
            "generation": 1,
            "resourceVersion": resource_version,
            "annotations": annotations,
            "managedFields": [{"manager": "kubectl", "fieldsV1": {}}],
        },
        "spec": {"method": "sft"},
    }


def test_the_cached_run_is_read_only_once_it_holds_the_operators_last_write() -> None:
    store = RunStore(lambda event, before, after: None)
    cache = RunCache(store)
    store.apply("ADDED", stored("5", **{LAST_APPLIED: "{...}", "team": "nlp"}))
    read = cache.fresh(KEY)
    assert read is not None  # a new run: nothing written yet
    assert "managedFields" not in read["metadata"]
    assert read["metadata"]["annotations"] == {"team": "nlp"}
    assert (read["apiVersion"], read["kind"]) == (f"{GROUP}/{VERSION}", "TrainingRun")

    cache.wrote(KEY, "7")
    assert cache.fresh(KEY) is None  # version 5 does not have the write yet: read the API
    store.apply("MODIFIED", stored("7"))
    assert cache.fresh(KEY) is not None
    store.apply("MODIFIED", stored("9"))  # someone else's edit after it
    assert cache.fresh(KEY) is not None

    cache.wrote(KEY, "not-a-number")  # not an etcd revision: nothing cached is known as new
    store.apply("MODIFIED", stored("12"))
    assert cache.fresh(KEY) is None
    cache.forget(KEY)
    assert cache.fresh(KEY) is not None
    assert cache.fresh((NAMESPACE, "other")) is None


def test_a_run_suspended_after_the_cache_read_is_read_again_not_started(k8s_api: Cluster) -> None:
    create_shared_claims(k8s_api)
    runs = Runs(k8s_api)
    created = runs.create()
    store = RunStore(lambda event, before, after: None)
    cache = RunCache(store)
    store.apply("ADDED", created)
    # Suspended before the informer heard of it: the cache still holds the run as created.
    runs.patch_spec({"suspend": True})
    assert cache.fresh(KEY) is not None

    k8s.configure(k8s_api.url)
    children = Children([NAMESPACE])
    children.start()
    try:
        reconcile(NAMESPACE, RUN, kopf.Memo(), children, cache)
    finally:
        children.stop()
        k8s.configure(None)

    # Planned from the cached copy, the visit would have started attempt 1. Its first write
    # (the started spec) was refused as stale; the run read again is suspended.
    run = runs.get()
    assert run["status"]["phase"] == "Suspended"
    assert STARTED_SPEC_ANNOTATION not in (run["metadata"].get("annotations") or {})
    assert runs.jobs() == []
    assert cache.fresh(KEY) is None  # the status write is newer than the cached copy
