"""Sharded training (training.sharding: fsdp) through the operator, on the real control plane.

Two pods (one torchrun node each, gloo on CPU) shard one model with FSDP2: the operator
needs nothing new, the rendered config carries the sharding. A pod is killed after the
first sharded checkpoint; the operator restarts the gang, which resumes from it (each node
reads its shards back from the claim) and ends with one consolidated model folder.
"""

from __future__ import annotations

import json
import re

import pytest
from e2e_runs import Runs, tiny_spec
from polling import wait_for

pytestmark = pytest.mark.e2e


def logged_steps(log: str) -> list[int]:
    return [int(step) for step in re.findall(r"^step (\d+)/\d+", log, re.MULTILINE)]


def test_two_nodes_shard_a_model_survive_a_killed_pod_and_save_it_whole(runs: Runs) -> None:
    save_steps = 20
    spec = tiny_spec(
        "trainingrun-from-scratch-tiny.yaml",
        "sharded",
        training={
            "maxSteps": 120,
            "saveSteps": save_steps,
            "evalSteps": save_steps,
            "loggingSteps": 5,
            "sharding": "fsdp",
        },
        resources={"nodes": 2},
        restartPolicy={"maxRestarts": 2},
    )
    runs.create("sharded", spec)
    wait_for(
        lambda: runs.status("sharded").get("latestCheckpoint"), "a checkpoint in the status", 120
    )
    runs.kill("sharded-1", 1)  # node rank 1's container dies, every process in it

    status = runs.wait_phase("sharded", "Succeeded", timeout=300)
    assert (status["attempt"], status["restarts"]) == (2, 1)
    log = runs.log("sharded-2", 0)
    resumed = re.search(r"resuming from \S*/checkpoint-(\d+)", log)
    assert resumed is not None, log
    steps_after = logged_steps(log)
    assert steps_after[0] > int(resumed.group(1)) and steps_after[-1] == 120
    assert "[rank 1]" in runs.log("sharded-2", 1)

    output = runs.claim("models") / "sharded"
    # Both nodes wrote into one folder on the claim: one DCP shard file per rank.
    last = output / "checkpoint-120"
    shards = sorted(p.name for p in (last / "pytorch_model_fsdp_0").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]
    assert sorted(p.name for p in (last / "optimizer_0").glob("*.distcp")) == shards
    summary = json.loads((output / "metrics.json").read_text())
    assert summary["global_step"] == 120
    checksums = summary["replica_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    # The whole model, consolidated once: transformers loads it as it is.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(output)
    total = sum(p.detach().double().sum().item() for p in model.parameters())
    assert total == pytest.approx(checksums[0], rel=1e-9)
