"""TrainingRuns end to end: the operator's own pods train for real, and survive faults.

Each test creates a TrainingRun through the real apiserver; the operator (the chart's pod)
renders it into Jobs, kube-controller-manager's Job controller creates their pods, the
scheduler binds them and the process kubelets run them: torchrun with gloo on CPU, two
pods in their own network namespaces where the spec says `nodes: 2`. Nothing here calls the
operator or the trainer directly; the tests act as a user and as a cluster's faults would
(a killed container, an operator restart, suspend), and judge by the run's status, the
workloads in the API, the pods' logs and the files on the claims.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from e2e_runs import Operator, Runs, tiny_spec
from polling import hold, wait_for

pytestmark = pytest.mark.e2e

PRETRAIN = "trainingrun-from-scratch-tiny.yaml"


def pretraining(run: str, max_steps: int, save_steps: int, nodes: int = 2, **changes):
    """The tiny from_scratch run, `max_steps` long, on `nodes` pods."""
    return tiny_spec(
        PRETRAIN,
        run,
        training={
            "maxSteps": max_steps,
            "saveSteps": save_steps,
            "evalSteps": save_steps,
            "loggingSteps": 5,
        },
        resources={"nodes": nodes},
        **changes,
    )


def logged_steps(log: str) -> list[int]:
    """The training steps a pod's log reports, in order ("step 25/300 ...")."""
    return [int(step) for step in re.findall(r"^step (\d+)/\d+", log, re.MULTILINE)]


def resumed_from(log: str) -> int | None:
    """The checkpoint step the trainer says it resumed from, if any."""
    found = re.search(r"resuming from \S*/checkpoint-(\d+)", log)
    return int(found.group(1)) if found else None


@pytest.mark.parametrize("backend", ["job", "jobset"])
def test_two_nodes_train_from_the_operators_pods(runs: Runs, backend: str) -> None:
    spec = pretraining("pretrain", max_steps=150, save_steps=50, backend=backend)
    runs.create("pretrain", spec)
    runs.wait_phase("pretrain", "Running", timeout=60)
    progress = wait_for(
        lambda: (runs.status("pretrain").get("progress") or {}).get("step"),
        "status.progress.step from rank 0's metrics",
        60,
    )
    status = runs.status("pretrain")
    assert status["phase"] == "Running" and 0 < progress < 150
    assert status["progress"]["totalSteps"] == 150
    assert status["progress"]["loss"] > 0

    status = runs.wait_phase("pretrain", "Succeeded")
    assert status["outputs"]["modelUri"] == "pvc://models/pretrain"
    assert (status["attempt"], status["restarts"]) == (1, 0)
    # Two torchrun nodes, one process each, trained one model in step.
    job = "pretrain-1" if backend == "job" else "pretrain-1-node-0"
    assert "[rank 1]" in runs.log(job, 1)
    output = runs.claim("models") / "pretrain"
    summary = json.loads((output / "metrics.json").read_text())
    assert summary["global_step"] == 150
    # The data the model was trained on, in its status as in its metrics.json.
    assert status["data"] == {
        "fingerprint": summary["data_fingerprint"],
        "trainRows": summary["train_rows"],
        "evalRows": summary["eval_rows"],
        "trainRowsDropped": summary["train_rows_dropped"],
        "evalRowsDropped": summary["eval_rows_dropped"],
    }
    assert status["data"]["fingerprint"].startswith("sha256:") and status["data"]["trainRows"] > 0
    checksums = summary["replica_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(output)
    tokenizer = AutoTokenizer.from_pretrained(output)
    ids = tokenizer("The model", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] > ids.shape[1]


def test_killed_pod_restarts_the_gang_from_the_last_checkpoint(runs: Runs) -> None:
    save_steps = 20
    spec = pretraining("crash", max_steps=150, save_steps=save_steps)
    runs.create("crash", {**spec, "restartPolicy": {"maxRestarts": 2}})
    wait_for(
        lambda: runs.status("crash").get("latestCheckpoint"), "a checkpoint in the status", 120
    )
    runs.kill("crash-1", 1)  # node rank 1's container dies, every process in it

    status = runs.wait_phase("crash", "Succeeded", timeout=240)
    assert (status["attempt"], status["restarts"]) == (2, 1)
    wait_for(lambda: runs.jobs() == ["crash-2"], "attempt 1's Job to be gone")
    restarted = [e for e in runs.events("crash") if "starting attempt 2" in e]
    assert restarted and "attempt 1 failed" in restarted[0], runs.events("crash")
    # Attempt 2 resumed from attempt 1's newest checkpoint and went on counting from it.
    done_before_kill = max(logged_steps(runs.log("crash-1", 0)))
    resumed = resumed_from(runs.log("crash-2", 0))
    assert resumed is not None and resumed >= done_before_kill - save_steps
    steps_after = logged_steps(runs.log("crash-2", 0))
    assert steps_after[0] > resumed and steps_after[-1] == 150
    summary = json.loads((runs.claim("models") / "crash" / "metrics.json").read_text())
    assert summary["global_step"] == 150
    # Attempt 1 tokenized the corpus once into the shared output (the first node to take
    # the entry's lock); attempt 2's ranks on both nodes read it back instead.
    attempt_1 = runs.log("crash-1", 0) + runs.log("crash-1", 1)
    built = re.findall(r"tokenized data cached in (\S+)", attempt_1)
    assert len(built) == 1, attempt_1[-3000:]
    for node in (0, 1):
        log = runs.log("crash-2", node)
        assert f"tokenized data from cache {built[0]}" in log, log[-3000:]
        assert "tokenized data cached in" not in log
    # Another maxLength on the same output (a rerun with a changed setting) is another key:
    # a new entry is tokenized beside the first, which stays.
    rerun = pretraining("crash-64", max_steps=160, save_steps=20, data={"maxLength": 64})
    runs.create("crash-64", {**rerun, "output": "pvc://models/crash"})
    runs.wait_phase("crash-64", "Succeeded", timeout=240)
    rerun_log = runs.log("crash-64-1", 0) + runs.log("crash-64-1", 1)
    rebuilt = re.findall(r"tokenized data cached in (\S+)", rerun_log)
    assert len(rebuilt) == 1 and rebuilt[0] != built[0], rerun_log[-3000:]
    entries = runs.claim("models") / "crash" / ".cache"
    assert {p.name for p in entries.iterdir() if p.is_dir()} == {
        Path(built[0]).name,
        Path(rebuilt[0]).name,
    }


def test_operator_restart_mid_run_creates_nothing_twice_and_catches_up(
    runs: Runs, operator: Operator
) -> None:
    runs.create("steady", pretraining("steady", max_steps=200, save_steps=100))
    seen = wait_for(
        lambda: (runs.status("steady").get("progress") or {}).get("step"), "progress", 120
    )
    operator.scale(0)
    # Training goes on without anyone watching.
    wait_for(lambda: max(logged_steps(runs.log("steady-1")), default=0) > seen + 10,
             "ten more steps while the operator is away", 120)  # fmt: skip
    operator.scale(1)
    wait_for(
        lambda: (
            (runs.status("steady").get("progress") or {}).get("step", 0) > seen + 10
            or runs.status("steady").get("phase") == "Succeeded"
        ),
        "the status to catch up with training",
        60,
    )
    status = runs.wait_phase("steady", "Succeeded", timeout=180)
    assert (status["attempt"], status["restarts"]) == (1, 0)
    assert runs.jobs() == ["steady-1"]


def test_suspend_then_resume_continues_from_the_checkpoint_saved_on_sigterm(runs: Runs) -> None:
    runs.create("pause", pretraining("pause", max_steps=150, save_steps=1000))
    wait_for(
        lambda: (runs.status("pause").get("progress") or {}).get("step", 0) >= 20,
        "20 steps of training",
        60,
    )
    runs.patch_spec("pause", {"suspend": True})
    runs.wait_phase("pause", "Suspended", timeout=60)
    wait_for(lambda: runs.jobs() == [] and not runs.pods("pause-1"),
             "attempt 1's Job and pods to be gone", 60)  # fmt: skip
    # The pods were deleted; on SIGTERM the trainer saved the step it had reached.
    saved = sorted((runs.claim("models") / "pause").glob("checkpoint-*"))
    assert len(saved) == 1
    saved_step = int(saved[0].name.split("-")[1])
    assert saved_step >= max(logged_steps(runs.log("pause-1", 0)))

    runs.patch_spec("pause", {"suspend": False})
    status = runs.wait_phase("pause", "Succeeded", timeout=180)
    assert status["attempt"] == 2
    assert resumed_from(runs.log("pause-2", 0)) == saved_step


def test_config_error_fails_at_once_with_the_trainers_message(runs: Runs) -> None:
    # Chats cannot pretrain a model from scratch; only the trainer finds out, reading them.
    spec = pretraining("chats", max_steps=10, save_steps=10)
    spec["data"] = {"train": "pvc://datasets/sft-messages.jsonl", "format": "messages"}
    spec["training"]["evalStrategy"] = "no"
    runs.create("chats", spec)
    status = runs.wait_phase("chats", "Failed", timeout=120)
    failed = runs.condition("chats", "Failed")
    assert failed["reason"] == "ConfigError"
    assert "from_scratch pretrains on raw text" in failed["message"]
    assert (status["attempt"], status["restarts"]) == (1, 0)
    hold(lambda: runs.jobs() == ["chats-1"], "no attempt 2 after a config error", seconds=5)


def test_malformed_dataset_line_fails_the_run_naming_file_and_line(runs: Runs) -> None:
    lines = (runs.claim("datasets") / "pretrain.jsonl").read_text().splitlines()
    broken = [*lines[:6], '{"text": "an unfinished line', *lines[6:]]
    (runs.claim("datasets") / "broken.jsonl").write_text("\n".join(broken) + "\n")
    spec = pretraining("broken", max_steps=10, save_steps=10, nodes=1)
    spec["data"]["train"] = "pvc://datasets/broken.jsonl"
    runs.create("broken", spec)
    runs.wait_phase("broken", "Failed", timeout=120)
    failed = runs.condition("broken", "Failed")
    assert failed["reason"] == "ConfigError"
    # The pod's own path, as the trainer inside it wrote it.
    assert "/mnt/pvc/datasets/broken.jsonl:7: invalid JSON" in failed["message"]
    assert runs.status("broken")["restarts"] == 0


def test_missing_claim_is_named_until_it_exists(runs: Runs) -> None:
    spec = pretraining("waits", max_steps=10, save_steps=10, nodes=1)
    spec["data"] = {**spec["data"], "train": "pvc://corpus/pretrain.jsonl"}
    runs.create("waits", spec)
    ready = runs.wait_reason("waits", "Ready", "WaitingForDependencies")
    assert f"PersistentVolumeClaim {runs.namespace}/corpus" in ready["message"]
    assert "spec.data.train" in ready["message"]
    assert runs.status("waits")["phase"] == "Pending" and runs.jobs() == []

    corpus = runs.claim("corpus")  # the admin fills the volume, then makes the claim
    corpus.mkdir(parents=True)
    (corpus / "pretrain.jsonl").write_text((runs.claim("datasets") / "pretrain.jsonl").read_text())
    runs.create_claim("corpus")
    runs.wait_phase("waits", "Succeeded", timeout=120)
