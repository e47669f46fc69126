"""A pod of the test cluster reaches the tests' S3 server (tests/s3_server.py) at
`endpoint_for_pods`, the pod network's gateway, with credentials from a Secret: what s3://
data, models and outputs need on the cluster tier.

Run as: sudo .venv/bin/pytest -m e2e tests/e2e/test_s3_reachable.py
"""

from __future__ import annotations

import pytest
from cluster import TestCluster
from polling import wait_for
from s3_server import S3Server

pytestmark = pytest.mark.e2e

# Credentials and endpoint come from the environment, as botocore reads them.
COPY_THROUGH_THE_POD = """
import os, s3fs
fs = s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"])
text = fs.cat(os.environ["SOURCE"])
fs.pipe(os.environ["TARGET"], text.upper())
print("copied", len(text), "bytes")
"""


def test_a_pod_reads_and_writes_the_s3_server_at_the_pod_network_gateway(
    cluster: TestCluster, namespace: str, s3_server: S3Server
) -> None:
    bucket = s3_server.make_bucket(f"{namespace}-pod"[:63])
    s3_server.filesystem().pipe(f"{bucket}/in/corpus.txt", b"tokens from the host")
    cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "s3"},
            "stringData": {
                "AWS_ACCESS_KEY_ID": s3_server.access_key,
                "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
            },
        },
        namespace,
    )
    cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "s3-copy"},
            "spec": {
                "restartPolicy": "Never",
                "securityContext": {
                    "runAsNonRoot": True,
                    "runAsUser": 1000,
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
                "containers": [
                    {
                        "name": "copy",
                        "image": "ghcr.io/kubetrain/trainer:latest",
                        "command": ["python", "-c", COPY_THROUGH_THE_POD],
                        "envFrom": [{"secretRef": {"name": "s3"}}],
                        "env": [
                            {"name": "AWS_ENDPOINT_URL", "value": s3_server.endpoint_for_pods},
                            {"name": "AWS_DEFAULT_REGION", "value": s3_server.region},
                            {"name": "SOURCE", "value": f"{bucket}/in/corpus.txt"},
                            {"name": "TARGET", "value": f"{bucket}/out/corpus.txt"},
                        ],
                        "securityContext": {
                            "allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]},
                        },
                    }
                ],
            },
        },
        namespace,
    )

    def finished() -> str | None:
        phase = cluster.get("pod", "s3-copy", "-n", namespace)["status"].get("phase")
        return phase if phase in ("Succeeded", "Failed") else None

    try:
        phase = wait_for(finished, "pod s3-copy to finish", timeout=90)
        log = cluster.kubectl("logs", "s3-copy", "-n", namespace).stdout
    finally:  # a bare pod: no run deletes it, and the namespace waits for its pods to go
        cluster.kubectl("delete", "pod", "s3-copy", "-n", namespace)
    assert phase == "Succeeded", log
    assert "copied 20 bytes" in log
    assert s3_server.filesystem().cat(f"{bucket}/out/corpus.txt") == b"TOKENS FROM THE HOST"
    assert s3_server.secret_key not in log
