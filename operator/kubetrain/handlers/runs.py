"""Who visits which TrainingRun when: one queue, a fixed pool of workers, one clock.

kopf gave every run a timer of its own, and ran every event of every run (the operator's own
status writes included) through a per-object worker that held the run's whole body: at a
thousand runs that was most of the operator's memory, and its CPU went to bookkeeping rather
than to runs (tests/bench/test_bench_operator.py). TrainingRuns are therefore not kopf
handlers: an informer (`children.Informer`) follows them, keeping each run without its
managedFields, and `RunController` does what the handlers did, as client-go's controllers do
it:

- a new run, one an operator finds at its start, a spec edit (a new generation) and a
  deletion put the run at the front of the queue (what on.create/on.resume/on.update did);
- a visited run that is not finished is visited again `interval` seconds later (the timer),
  and so is a finished one whose workload ttlSecondsAfterFinished will delete;
- a run is never in two workers at once, and never twice in the queue; an event for a run
  being visited queues it again once that visit is done;
- the operator's own status writes change no generation and cost no visit;
- a visit reads the run from the informer, not the API, once the informer holds the
  operator's last write of it (`RunCache`).

With replicas (kopf peering), only the active one visits: the one no live peer in the
peering object outranks, the rule kopf pauses its own handlers by (`Peering`). Runs that an
operator before this one gave kopf's finalizer have it taken off when they are deleted.
"""

from __future__ import annotations

import collections
import contextvars
import datetime
import heapq
import json
import logging
import math
import threading
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kubetrain import k8s
from kubetrain.api import GROUP, KIND, PLURAL, VERSION
from kubetrain.handlers.children import Informer, Key, Store, name_key, start_informers
from kubetrain.handlers.trainingrun import is_unfinished

log = logging.getLogger(__name__)

RUN_KIND: k8s.Kind = (GROUP, VERSION, PLURAL)
# The finalizer kopf put on runs for its timers (settings.persistence.finalizer).
KOPF_FINALIZER = f"{GROUP}/finalizer"
# How often a replica reads the peering object to know whether it is the active one.
PEERING_POLL_SECONDS = 5.0
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


def run_facts(body: Mapping[str, Any]) -> dict[str, Any]:
    """What the scheduling needs of a run, and the run as a visit reads it (`RunCache`)."""
    meta = body["metadata"]
    return {
        "metadata": {
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta["uid"],
            "generation": meta.get("generation"),
            "resourceVersion": meta.get("resourceVersion"),
            "deletionTimestamp": meta.get("deletionTimestamp"),
            "finalizers": list(meta.get("finalizers") or []),
        },
        "follow": is_unfinished(body.get("spec") or {}, body.get("status") or {}),
        # As compressed JSON: a thousand runs held as parsed dicts would cost more memory
        # than the rest of the operator, and a run's JSON compresses about fourfold.
        "body": zlib.compress(json.dumps(visited(body), separators=(",", ":")).encode(), 1),
    }


def visited(body: Mapping[str, Any]) -> dict[str, Any]:
    """The run without what no visit reads: managedFields and kubectl's last-applied copy
    of the spec are most of a run's bytes. Lists leave kind and apiVersion out of items."""
    meta = {k: v for k, v in body["metadata"].items() if k != "managedFields"}
    annotations = meta.get("annotations") or {}
    if LAST_APPLIED in annotations:
        meta["annotations"] = {k: v for k, v in annotations.items() if k != LAST_APPLIED}
    return {**body, "apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": meta}


def _revision(resource_version: str | None) -> float:
    """A resourceVersion as a number to compare (an etcd revision); one that is not a number
    (an apiserver not backed by etcd) counts as infinitely new, so nothing cached is as new."""
    try:
        return int(resource_version or "")
    except ValueError:
        return math.inf


class RunQueue:
    """Keys to visit, each at most once in the queue and in at most one worker (client-go's
    workqueue), and the clock of the next visits."""

    def __init__(self) -> None:
        self.ready: collections.deque[Key] = collections.deque()
        self.queued: set[Key] = set()
        self.visiting: set[Key] = set()
        self.again: set[Key] = set()  # asked for while being visited
        self.later: list[tuple[float, Key]] = []  # (when, key), a heap
        self.next_visit: dict[Key, float] = {}  # the one entry of `later` that counts
        self.changed = threading.Condition()
        self.closed = False

    def add(self, key: Key, first: bool = False) -> None:
        """Visit `key` as soon as a worker is free (`first`: before the follow-ups)."""
        with self.changed:
            if key in self.visiting:
                self.again.add(key)
            elif key not in self.queued:
                self.queued.add(key)
                if first:
                    self.ready.appendleft(key)
                else:
                    self.ready.append(key)
                self.changed.notify()

    def add_after(self, key: Key, seconds: float) -> None:
        """Visit `key` again in `seconds` (replacing the next visit it had)."""
        with self.changed:
            when = time.monotonic() + seconds
            self.next_visit[key] = when
            heapq.heappush(self.later, (when, key))
            self.changed.notify()

    def forget(self, key: Key) -> None:
        with self.changed:
            self.next_visit.pop(key, None)

    def take(self) -> Key | None:
        """The next key to visit (None once closed); the caller calls `done` after."""
        with self.changed:
            while not self.closed:
                self._move_due()
                if self.ready:
                    key = self.ready.popleft()
                    self.queued.discard(key)
                    self.visiting.add(key)
                    return key
                wait = self.later[0][0] - time.monotonic() if self.later else None
                self.changed.wait(wait)
            return None

    def done(self, key: Key) -> None:
        with self.changed:
            self.visiting.discard(key)
            asked_again = key in self.again
            self.again.discard(key)
        if asked_again:
            self.add(key, first=True)

    def close(self) -> None:
        with self.changed:
            self.closed = True
            self.changed.notify_all()

    def _move_due(self) -> None:
        now = time.monotonic()
        while self.later and self.later[0][0] <= now:
            when, key = heapq.heappop(self.later)
            if self.next_visit.get(key) != when:
                continue  # replaced by a later visit, or the run is gone
            del self.next_visit[key]
            if key not in self.queued and key not in self.visiting:
                self.queued.add(key)
                self.ready.append(key)


class RunStore(Store):
    """The runs' facts by (namespace, name); each change is passed to `on_change`."""

    def __init__(self, on_change: Callable[[str, dict[str, Any] | None, dict[str, Any]], None]):
        super().__init__(name_key, run_facts)
        self.on_change = on_change

    def replace(self, namespace: str | None, items: Sequence[Mapping[str, Any]]) -> None:
        """A fresh list: runs new or changed since the last one, and runs gone meanwhile
        (their DELETED event was missed), are passed on."""
        held = {key: self.one(key) for key in self.held() if namespace in (None, key[0])}
        super().replace(namespace, items)
        listed = set()
        for item in items:
            key = name_key(item)
            listed.add(key)
            self.on_change("LISTED", held.get(key), self.one(key) or run_facts(item))
        for key, gone in held.items():
            if key not in listed and gone is not None:
                self.on_change("DELETED", gone, gone)

    def apply(self, event_type: str, item: Mapping[str, Any]) -> None:
        key = name_key(item)
        before = self.one(key)
        super().apply(event_type, item)
        after = self.one(key) if event_type != "DELETED" else None
        self.on_change(event_type, before, after or run_facts(item))

    def one(self, key: Key) -> dict[str, Any] | None:
        found = self.get(key)
        return found[0] if found else None


class RunCache:
    """The runs as the informer last saw them, for a visit to read instead of a GET.

    client-go's controllers read from their informers too. One rule keeps that safe: a
    visit reads the cached run only once the cache holds the operator's own last write of
    that run (its resourceVersion at least that write's), because planning from a status
    older than one already written could redo or undo what that write recorded. Until the
    watch brings the write back (milliseconds; visits are seconds apart) the visit reads the
    API. Edits by others are caught by the writes themselves: each states the version it was
    planned from, and a 409 (`k8s.Conflict`) makes the visit read the run again.
    """

    def __init__(self, store: RunStore) -> None:
        self.store = store
        self.written: dict[Key, float] = {}
        self.lock = threading.Lock()

    def fresh(self, key: Key) -> dict[str, Any] | None:
        """The cached run, if it is at least as new as the last write; else None."""
        facts = self.store.one(key)
        if facts is None:
            return None
        with self.lock:
            written = self.written.get(key, 0)
        if _revision(facts["metadata"]["resourceVersion"]) < written:
            return None
        body: dict[str, Any] = json.loads(zlib.decompress(facts["body"]))
        return body

    def wrote(self, key: Key, resource_version: str) -> None:
        """The operator wrote the run; it is now at `resource_version`."""
        with self.lock:
            self.written[key] = max(self.written.get(key, 0), _revision(resource_version))

    def forget(self, key: Key) -> None:
        with self.lock:
            self.written.pop(key, None)


class Peering:
    """Whether this replica is the active one of a kopf peering (always, when alone).

    kopf pauses a replica while a live peer of higher priority is in the peering object
    (kopf._core.engines.peering); the runs follow the same rule, read every few seconds.
    """

    def __init__(self, name: str | None, priority: int, namespaces: Sequence[str]) -> None:
        self.name, self.priority = name, priority
        self.scopes: list[str | None] = list(namespaces) or [None]
        self.active = threading.Event()
        self.stopping = threading.Event()
        if name is None:
            self.active.set()

    def start(self) -> None:
        if self.name is not None:
            threading.Thread(target=self._run, name="peering", daemon=True).start()

    def stop(self) -> None:
        self.stopping.set()

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                outranked = any(self._outranked(scope) for scope in self.scopes)
            except Exception as e:  # the API is away: keep the last answer until it is back
                log.warning("cannot read the peering object %s: %s", self.name, e)
            else:
                if outranked and self.active.is_set():
                    log.info("a replica of higher priority is active: runs are left to it")
                    self.active.clear()
                elif not outranked and not self.active.is_set():
                    log.info("this replica is the active one: visiting runs")
                    self.active.set()
            self.stopping.wait(PEERING_POLL_SECONDS)

    def _outranked(self, namespace: str | None) -> bool:
        assert self.name is not None
        peering = k8s.get_peering(self.name, namespace) or {}
        now = datetime.datetime.now(datetime.UTC)
        for peer in (peering.get("status") or {}).values():
            if not isinstance(peer, Mapping) or int(peer.get("priority", 0)) <= self.priority:
                continue
            seen = peer.get("lastseen")
            lastseen = datetime.datetime.fromisoformat(seen) if seen else now
            if lastseen + datetime.timedelta(seconds=int(peer.get("lifetime", 60))) > now:
                return True
        return False


class RunController:
    """Follows the TrainingRuns and visits them with `visit(namespace, name, cache)` (module
    doc)."""

    def __init__(
        self,
        visit: Callable[[str, str, RunCache], None],
        forget: Callable[[str, str], None],
        *,
        interval: float,
        workers: int,
        namespaces: Sequence[str] = (),
        peering: Peering | None = None,
    ) -> None:
        self.visit, self.forget, self.interval = visit, forget, interval
        self.queue = RunQueue()
        self.store = RunStore(self._changed)
        self.cache = RunCache(self.store)
        self.peering = peering or Peering(None, 0, namespaces)
        scopes: list[str | None] = list(namespaces) or [None]
        self.informers = [Informer(RUN_KIND, scope, None, self.store) for scope in scopes]
        # Each worker runs in a copy of the context the controller was made in (kopf's
        # startup handler), as kopf runs its own sync handlers: kopf's settings and logging
        # context stay what they are for the Pipeline and Sweep handlers.
        context = contextvars.copy_context()
        self.workers = [
            threading.Thread(
                target=context.copy().run,
                args=(self._work,),
                name=f"kubetrain-visit-{i}",
                daemon=True,
            )
            for i in range(workers)
        ]

    def start(self, timeout: float) -> None:
        self.peering.start()
        for worker in self.workers:
            worker.start()
        start_informers(self.informers, timeout)

    def stop(self, timeout: float = 60.0) -> None:
        """Stop taking runs; a visit under way finishes first (within `timeout`)."""
        for informer in self.informers:
            informer.stop()
        self.peering.stop()
        self.queue.close()
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            worker.join(max(0.0, deadline - time.monotonic()))

    def _changed(self, event: str, before: dict[str, Any] | None, run: dict[str, Any]) -> None:
        meta = run["metadata"]
        key = (meta["namespace"], meta["name"])
        if event == "DELETED":
            self.queue.forget(key)
            self.cache.forget(key)
            self.forget(*key)
            return
        if meta["deletionTimestamp"] is not None:
            if KOPF_FINALIZER in meta["finalizers"]:
                try:
                    k8s.drop_trainingrun_finalizer(run, KOPF_FINALIZER)
                except Exception as e:  # its next event tries again
                    log.warning("TrainingRun %s/%s: cannot drop %s: %s", *key, KOPF_FINALIZER, e)
            return
        old = (before or {}).get("metadata") or {}
        if old.get("uid") != meta["uid"] or old.get("generation") != meta["generation"]:
            self.queue.add(key, first=True)  # new, found at the start, or its spec edited
        elif run["follow"] and not (before or {}).get("follow"):
            # Unfinished again (an InvalidSpec mended): its last visit, which read the run
            # as finished, scheduled no next one.
            self.queue.add_after(key, self.interval)

    def _work(self) -> None:
        while (key := self.queue.take()) is not None:
            try:
                self._visit(key)
            except Exception:
                log.exception("TrainingRun %s/%s: visit failed; trying again", *key)
            finally:
                self.queue.done(key)

    def _visit(self, key: Key) -> None:
        run = self.store.one(key)
        if run is None or run["metadata"]["deletionTimestamp"] is not None:
            return  # gone, or going (its children go with it)
        # A standby replica keeps each run's turn, and visits once it is the active one.
        if self.peering.active.is_set():
            try:
                self.visit(*key, self.cache)
            finally:
                run = self.store.one(key)
        if run is not None and run["follow"]:
            self.queue.add_after(key, self.interval)
