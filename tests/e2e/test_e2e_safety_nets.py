"""Safety nets for long runs, on the real control plane: hangs, deadlines, cleanup, and the
restart policy for out of memory and preemption.

A hang is the test hook in tests/e2e/hooks/stall (the training loop stops at one step while
the process and its metrics endpoint stay up, as with a collective waiting for a lost peer);
out of memory is the kubelet reporting the kernel's OOMKilled; a preemption is a SIGTERM to
the pod's container with the pod left in place (a spot reclaim notice). The operator sees
only what it would see on any cluster: pods, Jobs and rank 0's metrics.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from e2e_runs import Runs, tiny_spec
from polling import wait_for

pytestmark = pytest.mark.e2e

PRETRAIN = "trainingrun-from-scratch-tiny.yaml"
STALL_HOOK = Path(__file__).resolve().parent / "hooks" / "stall"


def tiny_run(run: str, max_steps: int, save_steps: int, **changes) -> dict:
    """The tiny from_scratch run on one pod, `max_steps` long."""
    training = {"maxSteps": max_steps, "saveSteps": save_steps, "loggingSteps": 5,
                "evalStrategy": "no"}  # fmt: skip
    return tiny_spec(PRETRAIN, run, training=training, **changes)


def resumed_from(log: str) -> int | None:
    found = re.search(r"resuming from \S*/checkpoint-(\d+)", log)
    return int(found.group(1)) if found else None


def step_of(runs: Runs, run: str) -> int:
    return (runs.status(run).get("progress") or {}).get("step") or 0


def test_a_trainer_that_stops_stepping_is_restarted_from_its_checkpoint(runs: Runs) -> None:
    env = [{"name": "PYTHONPATH", "value": str(STALL_HOOK)},
           {"name": "KUBETRAIN_TEST_STALL_AT_STEP", "value": "30"}]  # fmt: skip
    spec = tiny_run("hung", 80, 20, env=env, restartPolicy={"stallTimeoutSeconds": 15})
    runs.create("hung", spec)
    status = runs.wait_phase("hung", "Succeeded", timeout=360)
    assert (status["attempt"], status["restarts"]) == (2, 1), status
    (hang,) = status["attempts"]
    assert (hang["attempt"], hang["cause"], hang["counted"]) == (1, "NoProgress", True)
    assert "step 30 has not advanced and the trainer's heartbeat stopped" in hang["message"]
    assert "stallTimeoutSeconds 15s" in hang["message"]
    events = runs.events("hung")
    assert any(e.startswith("attempt 1 failed (NoProgress)") for e in events), events
    assert "test hook: stalling at step 30" in runs.log("hung-1")
    # The pod's deletion ended the hang with SIGTERM: the trainer saved step 31 and the
    # next attempt resumed there, not from scratch.
    assert resumed_from(runs.log("hung-2")) == 31


def test_a_deadline_fails_the_run_and_keeps_its_checkpoint(runs: Runs) -> None:
    runs.create("late", tiny_run("late", 5000, 20, activeDeadlineSeconds=20))
    status = runs.wait_phase("late", "Failed", timeout=180)
    failed = runs.condition("late", "Failed")
    assert failed["reason"] == "DeadlineExceeded", failed
    assert "past spec.activeDeadlineSeconds (20s)" in failed["message"]
    assert status["attempt"] == 1 and status.get("completionTime")
    wait_for(lambda: not runs.pods("late-1"), "the pods to be stopped", 120)
    # Stopped by SIGTERM, the trainer saved where it was; nothing deleted the checkpoints.
    saved = sorted((runs.claim("models") / "late").glob("checkpoint-*"))
    assert saved, "no checkpoint left in the output"
    assert "stopped by SIGTERM" in runs.log("late-1")


def test_ttl_removes_the_workload_but_never_the_run(runs: Runs) -> None:
    runs.create("brief", tiny_run("brief", 10, 100, ttlSecondsAfterFinished=3))
    runs.wait_phase("brief", "Succeeded", timeout=180)
    wait_for(lambda: runs.status("brief").get("cleanedUpTime"), "the cleanup", 120)
    assert runs.jobs() == [] and runs.pods("brief-1") == []
    events = runs.events("brief")
    assert any(e.startswith("Deleted the workload and pods: ttlSeconds") for e in events), events
    # An edit makes the operator look at the run again; it must not re-create anything.
    generation = runs.get("brief")["metadata"]["generation"]
    runs.patch_spec("brief", {"training": {"seed": 7}})
    wait_for(
        lambda: runs.status("brief").get("observedGeneration", 0) > generation,
        "the edit to be acknowledged",
        60,
    )
    status = runs.status("brief")
    assert status["phase"] == "Succeeded" and status["outputs"]["modelUri"]
    assert runs.jobs() == [] and runs.pods("brief-1") == []


def test_an_oom_killed_pod_is_retried_once_then_fails_with_advice(runs: Runs) -> None:
    spec = tiny_run("oom", 5000, 5000, restartPolicy={"maxRestarts": 3})
    spec["training"]["perDeviceTrainBatchSize"] = 4
    runs.create("oom", spec)
    for attempt in (1, 2):
        wait_for(
            lambda a=attempt: runs.status("oom").get("attempt") == a and step_of(runs, "oom"),
            f"attempt {attempt} training",
            180,
        )
        pod = runs.pods(f"oom-{attempt}")[0]["metadata"]["name"]
        runs.cluster.nodes.oom_kill(runs.namespace, pod)
    status = runs.wait_phase("oom", "Failed", timeout=180)
    failed = runs.condition("oom", "Failed")
    assert failed["reason"] == "OutOfMemory", failed
    message = failed["message"]
    assert "was OOM-killed (exit 137); out of memory again after one retry" in message
    # The run's own values, with what to change them to.
    assert "perDeviceTrainBatchSize 4 -> try 2 with gradientAccumulationSteps 2" in message
    assert "gradientCheckpointing is off" in message
    assert [a["cause"] for a in status["attempts"]] == ["OOMKilled", "OOMKilled"]
    assert (status["attempt"], status["restarts"]) == (2, 1)
    # The kubelet said it the kernel's way.
    terminated = runs.pods("oom-2")[0]["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["reason"], terminated["exitCode"]) == ("OOMKilled", 137)


def test_a_preempted_pod_restarts_without_using_the_restart_budget(runs: Runs) -> None:
    # No restart budget at all: only a restart that costs nothing can happen.
    runs.create("spot", tiny_run("spot", 60, 1000, restartPolicy={"maxRestarts": 0}))
    wait_for(lambda: step_of(runs, "spot") >= 10, "ten steps of training", 180)
    pod = runs.pods("spot-1")[0]["metadata"]["name"]
    runs.cluster.nodes.terminate(runs.namespace, pod)  # a reclaim notice: SIGTERM
    status = runs.wait_phase("spot", "Succeeded", timeout=240)
    assert (status["attempt"], status["restarts"]) == (2, 0), status
    (preempted,) = status["attempts"]
    assert (preempted["cause"], preempted["counted"]) == ("Preempted", False), preempted
    assert preempted["exitCode"] in (75, 143)
    saved = resumed_from(runs.log("spot-2"))
    assert saved is not None and saved >= 10
