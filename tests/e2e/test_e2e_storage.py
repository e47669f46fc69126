"""s3:// on the real control plane: the operator's pods read their data from a bucket and
publish the model to one, with credentials from a Secret that never shows up anywhere else.

The S3 server (tests/s3_server.py) listens on the pod network's gateway, where the pods'
network namespaces reach it; the run's spec names that endpoint in storage.s3.

Run as: sudo .venv/bin/pytest -m e2e tests/e2e/test_e2e_storage.py
"""

from __future__ import annotations

import json

import pytest
from e2e_runs import Operator, Runs, tiny_spec
from s3_server import S3Server

pytestmark = pytest.mark.e2e

PRETRAIN = "trainingrun-from-scratch-tiny.yaml"
DATA = ("pretrain.jsonl", "pretrain-eval.jsonl")


def s3_run(runs: Runs, s3_server: S3Server, run: str, secret: str, **changes) -> dict:
    """The tiny from_scratch run on 2 pods, data from and model to the bucket named after
    the namespace, credentials from Secret `s3-keys` holding `secret`."""
    bucket = runs.namespace[:63]
    fs = s3_server.filesystem()
    if not fs.exists(bucket):
        fs.mkdir(bucket)
        for name in DATA:
            fs.pipe_file(f"{bucket}/data/{name}", (runs.claim("datasets") / name).read_bytes())
    runs.cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "s3-keys"},
            "stringData": {
                "AWS_ACCESS_KEY_ID": s3_server.access_key,
                "AWS_SECRET_ACCESS_KEY": secret,
            },
        },
        runs.namespace,
    )
    spec = tiny_spec(
        PRETRAIN,
        run,
        data={"train": f"s3://{bucket}/data/{DATA[0]}", "eval": f"s3://{bucket}/data/{DATA[1]}"},
        storage={
            "s3": {
                "endpoint": s3_server.endpoint_for_pods,
                "region": s3_server.region,
                "credentialsSecretRef": {"name": "s3-keys"},
            }
        },
        training={"maxSteps": 40, "saveSteps": 20, "evalSteps": 20, "loggingSteps": 5},
        resources={"nodes": 2},
        **changes,
    )
    return {**spec, "output": f"s3://{bucket}/models/{run}"}


def everything_a_user_sees(runs: Runs, operator: Operator, run: str, jobs: list[str]) -> str:
    """The run as stored, its events, its pods' logs and the operator's log, as one text."""
    texts = [json.dumps(runs.get(run)), *runs.events(run), operator.log()]
    texts += [runs.log(job, index) for job in jobs for index in (0, 1)]
    return "\n".join(texts)


def test_a_run_trains_from_a_bucket_into_a_bucket(
    runs: Runs, s3_server: S3Server, operator: Operator
) -> None:
    runs.create("s3-run", s3_run(runs, s3_server, "s3-run", s3_server.secret_key))
    status = runs.wait_phase("s3-run", "Succeeded", timeout=240)
    bucket = runs.namespace[:63]
    assert status["outputs"]["modelUri"] == f"s3://{bucket}/models/s3-run"
    fs = s3_server.filesystem()
    summary = json.loads(fs.cat(f"{bucket}/models/s3-run/metrics.json"))
    assert summary["global_step"] == 40
    assert status["data"]["fingerprint"] == summary["data_fingerprint"]
    final = {p.rsplit("/", 1)[1] for p in fs.ls(f"{bucket}/models/s3-run")}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= final
    # Each checkpoint is complete in the bucket, with both nodes' files (rank 1's RNG state
    # was written on the other pod's cache volume and published from there).
    checkpoint = {p.rsplit("/", 1)[1] for p in fs.ls(f"{bucket}/models/s3-run/checkpoint-40")}
    assert {"kubetrain-complete.json", "rng_state_0.pth", "rng_state_1.pth"} <= checkpoint
    log = runs.log("s3-run-1", 0)
    assert f"data.train: downloaded s3://{bucket}/data/{DATA[0]}" in log
    seen = everything_a_user_sees(runs, operator, "s3-run", ["s3-run-1"])
    assert s3_server.secret_key not in seen


@pytest.mark.parametrize("mistake", ["wrong secret", "missing bucket"])
def test_a_store_that_refuses_fails_the_run_with_a_clear_condition(
    runs: Runs, s3_server: S3Server, operator: Operator, mistake: str
) -> None:
    wrong = "wrong-" + s3_server.secret_key
    secret = wrong if mistake == "wrong secret" else s3_server.secret_key
    spec = s3_run(runs, s3_server, "s3-refused", secret)
    if mistake == "missing bucket":
        spec["output"] = "s3://no-such-bucket/models/s3-refused"
    runs.create("s3-refused", spec)
    runs.wait_phase("s3-refused", "Failed", timeout=180)
    failed = runs.condition("s3-refused", "Failed")
    assert failed["reason"] == "ConfigError", failed
    if mistake == "wrong secret":
        assert "the store refused the credentials" in failed["message"], failed
        assert "storage.s3.credentialsSecretRef" in failed["message"]
    else:
        assert (
            "output: s3://no-such-bucket/models/s3-refused: bucket 'no-such-bucket' does not "
            "exist" in failed["message"]
        ), failed
    assert runs.status("s3-refused")["restarts"] == 0  # a configuration error is not retried
    seen = everything_a_user_sees(runs, operator, "s3-refused", ["s3-refused-1"])
    assert wrong not in seen and s3_server.secret_key not in seen
