"""How TrainingRuns are scheduled (kubetrain.handlers.runs): the queue, the events that
call for a visit, and which replica of a peering visits.

The operator tests beside this one drive the whole controller against an API; these pin
the rules a thousand runs lean on: a run is never in two workers nor twice in the queue,
an event during a visit is not lost, a run's next visit replaces the one it had (no chains
of timers), the operator's own status writes cost no visit, a replica outranked by a live
peer leaves the runs alone, and the operator process keeps glibc to two malloc arenas.
"""

from __future__ import annotations

import datetime
import threading
from typing import Any

import pytest

from kubetrain import handlers, k8s
from kubetrain.handlers import runs as runs_module
from kubetrain.handlers.runs import KOPF_FINALIZER, Peering, RunCache, RunController, RunQueue

A, B = ("team", "a"), ("team", "b")


def test_a_key_is_queued_once_and_taken_by_one_worker_at_a_time() -> None:
    queue = RunQueue()
    queue.add(A)
    queue.add(A)
    queue.add(B, first=True)  # a new run goes before the follow-ups
    assert queue.take() == B and queue.take() == A
    queue.add(A)  # while A is visited: once it is done, not before
    assert A not in queue.queued and A in queue.again
    queue.done(A)
    assert queue.take() == A


def test_a_runs_next_visit_replaces_the_one_it_had() -> None:
    queue = RunQueue()
    queue.add_after(A, 0.0)
    queue.add_after(A, 0.0)  # replaces the first: one visit, not two
    queue.add_after(B, 3600.0)
    assert queue.take() == A
    queue.done(A)
    queue._move_due()
    assert not queue.ready  # B is an hour away; A's first entry was dropped
    queue.forget(B)
    queue.close()
    assert queue.take() is None


def run(name: str, generation: int = 1, **meta: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": "team",
            "uid": f"uid-{name}",
            "generation": generation,
            "resourceVersion": "1",
            **meta,
        },
        "spec": {},
        "status": {"phase": "Running"},
    }


def controller() -> tuple[RunController, list[tuple[str, str]]]:
    forgotten: list[tuple[str, str]] = []
    made = RunController(
        lambda namespace, name, cache: None,
        lambda namespace, name: forgotten.append((namespace, name)),
        interval=10.0,
        workers=0,
        namespaces=["team"],
    )
    return made, forgotten


def queued(made: RunController) -> list[tuple[str, str]]:
    return list(made.queue.ready)


def test_events_that_call_for_a_visit_and_those_that_do_not() -> None:
    made, forgotten = controller()
    made.store.replace("team", [run("a"), run("b")])  # the operator's start: visit all
    assert sorted(queued(made)) == [A, B]
    made.queue.ready.clear()
    made.queue.queued.clear()
    made.store.apply("MODIFIED", {**run("a"), "status": {"phase": "Running", "step": 5}})
    assert queued(made) == []  # a status write (ours): the clock brings the next visit
    made.store.apply("MODIFIED", run("a", generation=2))  # a spec edit: at once
    assert queued(made) == [A]
    failed = {**run("a", generation=2), "status": {"phase": "Failed"}}
    made.store.apply("MODIFIED", failed)  # finished: no clock
    made.queue.next_visit.clear()
    made.store.apply("MODIFIED", {**failed, "status": {"phase": "Pending"}})
    assert A in made.queue.next_visit  # unfinished again: followed again
    made.store.replace("team", [run("a", generation=2)])  # a relist: b was deleted meanwhile
    assert forgotten == [B] and queued(made) == [A]
    made.store.apply("DELETED", run("a", generation=2))
    assert forgotten == [B, A]


def test_a_deleted_run_loses_the_finalizer_an_older_operator_gave_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dropped: list[str] = []
    monkeypatch.setattr(
        k8s, "drop_trainingrun_finalizer", lambda body, f: dropped.append(body["metadata"]["name"])
    )
    made, _ = controller()
    made.store.apply(
        "MODIFIED",
        run("a", deletionTimestamp="2026-12-07T10:00:00Z", finalizers=[KOPF_FINALIZER]),
    )
    made.store.apply("MODIFIED", run("b", deletionTimestamp="2026-12-07T10:00:00Z"))
    assert dropped == ["a"] and queued(made) == []


def peer(priority: int, seconds_ago: float, lifetime: int = 60) -> dict[str, Any]:
    seen = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=seconds_ago)
    return {"priority": priority, "lifetime": lifetime, "lastseen": seen.isoformat()}


@pytest.mark.parametrize(
    ("others", "outranked"),
    [
        ([], False),
        ([(10, 1)], False),  # lower: we work
        ([(90, 1)], True),  # higher and alive: it works
        ([(90, 120)], False),  # higher but silent past its lifetime: we work
    ],
)
def test_a_replica_visits_runs_unless_a_live_peer_outranks_it(
    monkeypatch: pytest.MonkeyPatch, others: list[tuple[int, float]], outranked: bool
) -> None:
    # (priority, seconds since last seen) of the other peers, stamped when the test runs.
    peers = {"me": peer(50, 1)} | {f"other-{i}": peer(*o) for i, o in enumerate(others)}
    monkeypatch.setattr(k8s, "get_peering", lambda name, namespace: {"status": peers})
    assert Peering("kubetrain", 50, [])._outranked(None) is outranked


def test_a_standby_keeps_each_runs_turn_and_visits_once_active(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    visits: list[str] = []
    peering = Peering("kubetrain", 50, ["team"])
    made = RunController(
        lambda namespace, name, cache: visits.append(name),
        lambda namespace, name: None,
        interval=0.0,
        workers=0,
        namespaces=["team"],
        peering=peering,
    )
    made.store.replace("team", [run("a")])
    made._visit(A)
    assert visits == [] and A in made.queue.next_visit  # outranked: its turn is kept
    peering.active.set()
    made._visit(A)
    assert visits == ["a"]


def test_workers_stop_after_the_visit_under_way(monkeypatch: pytest.MonkeyPatch) -> None:
    started, release = threading.Event(), threading.Event()

    def visit(namespace: str, name: str, cache: RunCache) -> None:
        started.set()
        release.wait(10)

    made = RunController(visit, lambda n, m: None, interval=10.0, workers=1, namespaces=["team"])
    monkeypatch.setattr(runs_module.Informer, "start", lambda self: self.synced.set())
    made.start(timeout=5)
    made.store.replace("team", [run("a")])
    assert started.wait(10)
    stopper = threading.Thread(target=made.stop)
    stopper.start()
    release.set()
    stopper.join(10)
    assert not stopper.is_alive() and not made.workers[0].is_alive()


def test_the_operator_process_keeps_glibc_to_two_malloc_arenas(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[int, int]] = []

    class Libc:
        def mallopt(self, option: int, value: int) -> int:
            calls.append((option, value))
            return 1

    monkeypatch.setattr(handlers.ctypes, "CDLL", lambda name: Libc())
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    handlers.limit_malloc_arenas()
    assert calls == [(handlers.M_ARENA_MAX, 2)]
    monkeypatch.setenv("MALLOC_ARENA_MAX", "8")  # the environment's word goes
    handlers.limit_malloc_arenas()
    assert calls == [(handlers.M_ARENA_MAX, 2)]

    def not_glibc(name: str) -> Any:
        raise OSError("no libc")

    monkeypatch.delenv("MALLOC_ARENA_MAX")
    monkeypatch.setattr(handlers.ctypes, "CDLL", not_glibc)
    handlers.limit_malloc_arenas()  # nothing to do, no error
