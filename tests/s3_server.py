"""A real S3 server for the storage tests: versitygw, on loopback, with a data folder of its own.

versitygw (github.com/versity/versitygw, Apache-2.0) is built from tests/cluster/s3/go.mod by
scripts/build_cluster.py (`make cluster-tools`) into .tools/. Its posix backend keeps each
bucket as a folder under the data folder, and it checks SigV4 signatures against the one
account it is started with, so a wrong secret is refused as AWS refuses it
(SignatureDoesNotMatch) and a bucket that was never made is NoSuchBucket. Not MinIO: its
server is AGPL.

Pods of the test cluster reach it too when it is started with the pod network's gateway:
each pod of the process kubelet has a network namespace of its own, wired by a veth pair to
the bridge `ktbr<n>` (10.250.<n>.0/24) whose host side, the gateway 10.250.<n>.1, is this
machine's address in the pod network and the pods' default route (the apiserver listens there
too). The server then listens on 127.0.0.1 and on that gateway, never on 0.0.0.0.

A test that needs it skips when the binary is not built, but fails under .ci/run
(KUBETRAIN_CI=1), so CI never passes by skipping.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from polling import stop_process, wait_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import build_cluster

S3_SERVER_BINARY = build_cluster.s3_server_binary()
# Not us-east-1: s3fs names the client's region as the LocationConstraint of every bucket it
# makes, and S3 refuses us-east-1 there (InvalidLocationConstraint), as versitygw does.
REGION = "eu-central-1"
ACCESS_KEY = "kubetrain-tests"


def require_s3_server() -> Path:
    """The built binary; skips the test without it, or fails it under KUBETRAIN_CI."""
    if not S3_SERVER_BINARY.is_file():
        message = f"needs the S3 server {S3_SERVER_BINARY} (`make cluster-tools` builds it)"
        if os.environ.get("KUBETRAIN_CI"):
            pytest.fail(message)
        pytest.skip(message)
    return S3_SERVER_BINARY


def free_port(hosts: tuple[str, ...]) -> int:
    """A TCP port free on every one of `hosts` (bound there in turn, never on 0.0.0.0)."""
    for _ in range(20):
        probes = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in hosts]
        try:
            probes[0].bind((hosts[0], 0))
            port = probes[0].getsockname()[1]
            try:
                for probe, host in zip(probes[1:], hosts[1:], strict=True):
                    probe.bind((host, port))
            except OSError:
                continue  # taken on another address: draw again
            return port
        finally:
            for probe in probes:
                probe.close()
    raise RuntimeError(f"no TCP port free on all of {hosts} in 20 draws")


class S3Server:
    """versitygw serving `workdir/data` on 127.0.0.1 (and `pod_gateway`, where given).

    One root account: `access_key` and a `secret_key` drawn fresh for each server, so a test
    that looks for the secret in logs, events or status finds only a real leak.
    """

    def __init__(
        self, workdir: Path, pod_gateway: str | None = None, timeout: float = 60.0
    ) -> None:
        binary = require_s3_server()
        self.hosts = ("127.0.0.1", pod_gateway) if pod_gateway else ("127.0.0.1",)
        self.port = free_port(self.hosts)
        self.data = workdir / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        # An (empty) account store of its own: with none, versitygw answers an unknown access
        # key with its admin API's 404 XAdminUserNotFound instead of S3's InvalidAccessKeyId.
        accounts = workdir / "accounts"
        accounts.mkdir(exist_ok=True)
        self.access_key = ACCESS_KEY
        self.secret_key = f"kt-secret-{secrets.token_hex(12)}"
        self.region = REGION
        self.log_path = workdir / "versitygw.log"
        self._log = self.log_path.open("wb")
        # The account goes in through the environment: argv is readable by anyone (ps).
        env = {
            **os.environ,
            "ROOT_ACCESS_KEY_ID": self.access_key,
            "ROOT_SECRET_ACCESS_KEY": self.secret_key,
        }
        listen = [argument for host in self.hosts for argument in ("--port", f"{host}:{self.port}")]
        self.process = subprocess.Popen(
            [str(binary), *listen, "--region", self.region, "--iam-dir", str(accounts),
             "posix", str(self.data)],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_for(self._answers, f"versitygw to answer on {self.endpoint_url}", timeout)
        except BaseException:
            self.stop()
            raise

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def endpoint_for_pods(self) -> str:
        """The endpoint a pod of the test cluster dials: the pod network's gateway."""
        if len(self.hosts) < 2:
            raise RuntimeError(
                "this S3 server listens on loopback only, which a pod's network namespace does "
                "not share: start it with pod_gateway=cluster.network.gateway"
            )
        return f"http://{self.hosts[1]}:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"versitygw exited {self.process.returncode}:\n{self.log()}")
        try:
            urllib.request.urlopen(self.endpoint_url, timeout=2).close()
        except urllib.error.HTTPError:
            return True  # an S3 error (anonymous access is denied) is an answer
        except OSError:
            return False
        return True

    def storage_options(self, **overrides: Any) -> dict[str, Any]:
        """What s3fs.S3FileSystem (and fsspec's storage_options) take to reach this server."""
        return {
            "key": self.access_key,
            "secret": self.secret_key,
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": self.region},
            **overrides,
        }

    def filesystem(self, **overrides: Any):  # -> s3fs.S3FileSystem; s3fs imports lazily
        """A fresh s3fs filesystem on this server (no instance cache, no stale listings)."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options(**overrides))

    def make_bucket(self, name: str) -> str:
        """Create bucket `name`; returns its s3:// URL."""
        self.filesystem().mkdir(name)
        return f"s3://{name}"

    def stop(self) -> None:
        stop_process(self.process)
        self._log.close()
