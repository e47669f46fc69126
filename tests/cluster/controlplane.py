"""A real Kubernetes control plane on this machine: etcd, kube-apiserver, the controllers,
the scheduler and the JobSet controller, started from the binaries scripts/build_cluster.py
builds, on loopback and the pod network's gateway address.

`ControlPlane(root, host_ip).start()` generates a CA and the certificates (apiserver serving
cert with the IPs pods and this machine use, an admin client cert in system:masters, the
apiserver's kubelet client cert, the ServiceAccount signing key, the JobSet webhook's serving
cert), starts each component with the flags a kubeadm-style cluster uses and waits for its
health endpoint, installs JobSet's CRD and webhooks (pointed at the controller on loopback),
and writes `root/kubeconfig`. The apiserver runs with Node,RBAC authorization, ServiceAccount
tokens, PodSecurity and OwnerReferencesPermissionEnforcement; the controller manager runs
every controller (`--controllers=*`), each with its own ServiceAccount's credentials.
Component logs are in `root/logs/`. `stop()` ends them all, newest first.
`audit=("user", ...)` (benchmarks) makes the apiserver write an audit event of every request
of those users at level Metadata (who, verb, resource, when; no bodies) to `audit_log`, one
JSON object a line. Only theirs: the log is written in the request's path, and auditing the
controllers, kubelets and the benchmark's own client too would slow the apiserver measured.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import build_cluster  # noqa: E402

SERVICE_CIDR = "10.96.0.0/16"
API_SERVER_SERVICE_IP = "10.96.0.1"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
ADMISSION_PLUGINS = "NodeRestriction,OwnerReferencesPermissionEnforcement,PodSecurity"
JOBSET_NAMESPACE = "jobset-system"
START_TIMEOUT_SECONDS = 180.0
# util-linux: the kernel kills the process when the one that started it dies.
DIE_WITH_PARENT = ("setpriv", "--pdeathsig", "KILL")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(check: Callable[[], Any], what: str, timeout: float, process=None) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what` on timeout or
    when `process` (a component) exits first."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            result = check()
            if result:
                return result
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what}: the process exited {process.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout:.0f}s")
        time.sleep(0.2)


# --- certificates ----------------------------------------------------------------------


@dataclass
class Authority:
    """A CA that signs every certificate of the cluster (kubeadm uses a few; one will do)."""

    folder: Path
    key: rsa.RSAPrivateKey = field(init=False)
    cert: x509.Certificate = field(init=False)

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubetrain-test-ca")])
        self.cert = (
            self._builder(name, self.key.public_key(), days=3650)
            .issuer_name(name)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        self._write("ca", self.key, self.cert)

    @staticmethod
    def _builder(subject: x509.Name, public_key: Any, days: int) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.timezone.utc)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
        )

    def _write(self, name: str, key: rsa.RSAPrivateKey, cert: x509.Certificate) -> None:
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        (self.folder / f"{name}.key").write_bytes(key_pem)
        (self.folder / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self,
        name: str,
        common_name: str,
        *,
        organizations: tuple[str, ...] = (),
        hosts: tuple[str, ...] = (),
        server: bool = False,
    ) -> tuple[Path, Path]:
        """A key and certificate `name.key`/`name.crt`; hosts become DNS or IP SANs."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        subject = x509.Name(
            [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
            + [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
        )
        usage = x509.oid.ExtendedKeyUsageOID
        builder = (
            self._builder(subject, key.public_key(), days=365)
            .issuer_name(self.cert.subject)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([usage.SERVER_AUTH if server else usage.CLIENT_AUTH]),
                critical=False,
            )
        )
        if hosts:
            names: list[x509.GeneralName] = []
            for host in hosts:
                try:
                    names.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    names.append(x509.DNSName(host))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        self._write(name, key, builder.sign(self.key, hashes.SHA256()))
        return self.folder / f"{name}.crt", self.folder / f"{name}.key"

    @property
    def cert_file(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def key_file(self) -> Path:
        return self.folder / "ca.key"

    def pem(self) -> bytes:
        return self.cert_file.read_bytes()


# --- the components --------------------------------------------------------------------


@dataclass
class Ports:
    etcd_client: int = field(default_factory=free_port)
    etcd_peer: int = field(default_factory=free_port)
    apiserver: int = field(default_factory=free_port)
    controller_manager: int = field(default_factory=free_port)
    scheduler: int = field(default_factory=free_port)
    jobset_webhook: int = field(default_factory=free_port)
    jobset_health: int = field(default_factory=free_port)


class ControlPlane:
    """etcd, kube-apiserver, kube-controller-manager, kube-scheduler and JobSet (module doc).

    host_ip: an address of this machine that pods reach the apiserver at (the pod network's
    gateway); the apiserver listens there and its certificate names it and 127.0.0.1.
    """

    def __init__(self, root: Path, host_ip: str = "127.0.0.1", audit: Sequence[str] = ()) -> None:
        self.root = root
        self.host_ip = host_ip
        self.audit = tuple(audit)
        self.audit_log = root / "logs" / "audit.jsonl"
        self.bin = build_cluster.tools_dir()
        self.version = build_cluster.kubernetes_version()
        self.ports = Ports()
        self.processes: list[tuple[str, subprocess.Popen]] = []
        self.pki = root / "pki"
        self.logs = root / "logs"
        self.kubeconfig = root / "kubeconfig"

    @property
    def server(self) -> str:
        return f"https://{self.host_ip}:{self.ports.apiserver}"

    # --- start and stop ----------------------------------------------------------------

    def start(self) -> ControlPlane:
        build_cluster.build()
        self.logs.mkdir(parents=True, exist_ok=True)
        try:
            self._certificates()
            self._start_etcd()
            self._start_apiserver()
            self._start_controllers()
            self._start_jobset()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for _name, process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for _name, process in reversed(self.processes):
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        self.processes.clear()

    def check_alive(self) -> None:
        """Fail naming the component that died (its log is in root/logs)."""
        for name, process in self.processes:
            if process.poll() is not None:
                raise RuntimeError(
                    f"{name} exited {process.returncode}; see {self.logs / name}.log"
                )

    def _run(self, name: str, args: list[str], binary_name: str | None = None) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("ab")
        binary = self.bin / (binary_name or ("jobset-controller" if name == "jobset" else name))
        # setpriv: the component dies with the test session, however the session ends.
        process = subprocess.Popen(
            [*DIE_WITH_PARENT, str(binary), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self.processes.append((name, process))
        return process

    # --- pieces ------------------------------------------------------------------------

    def _certificates(self) -> None:
        self.ca = Authority(self.pki)
        hosts = (
            "127.0.0.1",
            self.host_ip,
            API_SERVER_SERVICE_IP,
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        )
        self.ca.issue("apiserver", "kube-apiserver", hosts=hosts, server=True)
        self.admin = self.ca.issue("admin", "kubetrain-admin", organizations=("system:masters",))
        self.ca.issue(
            "apiserver-kubelet-client",
            "kube-apiserver-kubelet-client",
            organizations=("system:masters",),
        )
        self.ca.issue("controller-manager", "system:kube-controller-manager")
        self.ca.issue("scheduler", "system:kube-scheduler")
        self.ca.issue("jobset-webhook", "jobset-webhook", hosts=("127.0.0.1",), server=True)
        self.ca.issue("kubelet", "kubelet", hosts=("127.0.0.1", self.host_ip), server=True)
        signer = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        (self.pki / "sa.key").write_bytes(
            signer.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
        (self.pki / "sa.pub").write_bytes(
            signer.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        self._write_kubeconfig(self.kubeconfig, "admin")
        self._write_kubeconfig(self.root / "controller-manager.kubeconfig", "controller-manager")
        self._write_kubeconfig(self.root / "scheduler.kubeconfig", "scheduler")

    def node_kubeconfig(self, node: str) -> Path:
        """A kubeconfig with the node identity system:node:<node> (Node authorizer)."""
        user = f"node-{node}"
        self.ca.issue(user, f"system:node:{node}", organizations=("system:nodes",))
        path = self.root / f"{user}.kubeconfig"
        self._write_kubeconfig(path, user)
        return path

    def _write_kubeconfig(self, path: Path, user: str, server: str | None = None) -> None:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "kubetrain",
                    "cluster": {
                        "server": server or self.server,
                        "certificate-authority": str(self.ca.cert_file),
                    },
                }
            ],
            "users": [
                {
                    "name": user,
                    "user": {
                        "client-certificate": str(self.pki / f"{user}.crt"),
                        "client-key": str(self.pki / f"{user}.key"),
                    },
                }
            ],
            "contexts": [{"name": "kubetrain", "context": {"cluster": "kubetrain", "user": user}}],
            "current-context": "kubetrain",
        }
        path.write_text(yaml.safe_dump(config, sort_keys=False))

    def _start_etcd(self) -> None:
        client = f"http://127.0.0.1:{self.ports.etcd_client}"
        peer = f"http://127.0.0.1:{self.ports.etcd_peer}"
        process = self._run(
            "etcd",
            [
                "--name=etcd0",
                f"--data-dir={self.root / 'etcd'}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=etcd0={peer}",
                # Tests throw the data away: never wait on fsync (envtest does the same).
                "--unsafe-no-fsync=true",
                "--auto-compaction-retention=1",
                "--quota-backend-bytes=2147483648",
                "--log-level=warn",
            ],
        )
        wait_until(
            lambda: (
                json.loads(urllib.request.urlopen(f"{client}/health", timeout=2).read())["health"]
                == "true"
            ),
            "etcd /health",
            START_TIMEOUT_SECONDS,
            process,
        )

    def _start_apiserver(
        self, name: str = "kube-apiserver", port: int | None = None, etcd_prefix: str = "/registry"
    ) -> None:
        pki = self.pki
        port = port or self.ports.apiserver
        server = f"https://{self.host_ip}:{port}"
        process = self._run(
            name,
            [
                f"--etcd-servers=http://127.0.0.1:{self.ports.etcd_client}",
                f"--etcd-prefix={etcd_prefix}",
                f"--bind-address={self.host_ip}",
                f"--advertise-address={self.host_ip}",
                f"--secure-port={port}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={self.ca.cert_file}",
                f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
                f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
                "--kubelet-preferred-address-types=InternalIP,Hostname",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--authorization-mode=Node,RBAC",
                f"--enable-admission-plugins={ADMISSION_PLUGINS}",
                "--allow-privileged=false",
                "--profiling=false",
                "--event-ttl=1h",
                *(self._audit_flags() if name == "kube-apiserver" else []),
            ],
            binary_name="kube-apiserver",
        )
        context = self.ssl_context()
        wait_until(
            lambda: (
                urllib.request.urlopen(f"{server}/readyz", context=context, timeout=5)
                .read()
                .strip()
                == b"ok"
            ),
            "kube-apiserver /readyz",
            START_TIMEOUT_SECONDS,
            process,
        )

    @contextlib.contextmanager
    def bare_apiserver(self) -> Iterator[Path]:
        """A second kube-apiserver over the same etcd under a key prefix of its own: a cluster
        with nothing installed (no CRDs, no controllers), for what a user meets there. Yields
        its admin kubeconfig; it stops when the block ends."""
        port = free_port()
        self._start_apiserver("kube-apiserver-bare", port, etcd_prefix="/bare")
        name, process = self.processes[-1]
        try:
            path = self.root / "bare.kubeconfig"
            self._write_kubeconfig(path, "admin", server=f"https://{self.host_ip}:{port}")
            yield path
        finally:
            self.processes.remove((name, process))
            process.terminate()
            process.wait(30)

    def _audit_flags(self) -> list[str]:
        if not self.audit:
            return []
        policy = self.root / "audit-policy.yaml"
        policy.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "audit.k8s.io/v1",
                    "kind": "Policy",
                    "omitStages": ["RequestReceived"],
                    "rules": [
                        {"level": "Metadata", "users": list(self.audit)},
                        {"level": "None"},
                    ],
                }
            )
        )
        return [
            f"--audit-policy-file={policy}",
            f"--audit-log-path={self.audit_log}",
            "--audit-log-format=json",
            "--audit-log-maxsize=0",  # one file, never rotated
        ]

    def _start_controllers(self) -> None:
        pki = self.pki
        serving = [
            "--bind-address=127.0.0.1",
            "--authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics",
        ]
        manager = self._run(
            "kube-controller-manager",
            [
                f"--kubeconfig={self.root / 'controller-manager.kubeconfig'}",
                f"--authentication-kubeconfig={self.root / 'controller-manager.kubeconfig'}",
                f"--authorization-kubeconfig={self.root / 'controller-manager.kubeconfig'}",
                f"--secure-port={self.ports.controller_manager}",
                *serving,
                "--controllers=*",
                # Each controller acts as its own ServiceAccount, bound to its own role.
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={self.ca.cert_file}",
                f"--cluster-signing-cert-file={self.ca.cert_file}",
                f"--cluster-signing-key-file={self.ca.key_file}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--leader-elect=false",
                "--profiling=false",
            ],
        )
        scheduler = self._run(
            "kube-scheduler",
            [
                f"--kubeconfig={self.root / 'scheduler.kubeconfig'}",
                f"--authentication-kubeconfig={self.root / 'scheduler.kubeconfig'}",
                f"--authorization-kubeconfig={self.root / 'scheduler.kubeconfig'}",
                f"--secure-port={self.ports.scheduler}",
                *serving,
                "--leader-elect=false",
                "--profiling=false",
            ],
        )
        for name, process, port in (
            ("kube-controller-manager", manager, self.ports.controller_manager),
            ("kube-scheduler", scheduler, self.ports.scheduler),
        ):
            insecure = ssl._create_unverified_context()  # their self-signed serving certs
            wait_until(
                lambda port=port, insecure=insecure: (
                    urllib.request.urlopen(
                        f"https://127.0.0.1:{port}/healthz", context=insecure, timeout=5
                    ).read()
                    == b"ok"
                ),
                f"{name} /healthz",
                START_TIMEOUT_SECONDS,
                process,
            )
        # The ServiceAccount controllers are working once `default` has its account.
        wait_until(
            lambda: self.request("GET", "/api/v1/namespaces/default/serviceaccounts/default"),
            "ServiceAccount default/default (the serviceaccount controller)",
            START_TIMEOUT_SECONDS,
            manager,
        )

    def _start_jobset(self) -> None:
        """JobSet's CRD, its webhooks on loopback, then its controller (kwok does the same)."""
        manifests = build_cluster.jobset_manifests()
        for document in manifests["crds"]:
            self.apply(document)
        folder = self.root / "jobset"
        certs = folder / "certs"
        certs.mkdir(parents=True, exist_ok=True)
        (certs / "tls.crt").write_bytes((self.pki / "jobset-webhook.crt").read_bytes())
        (certs / "tls.key").write_bytes((self.pki / "jobset-webhook.key").read_bytes())
        config = {
            "apiVersion": "config.jobset.x-k8s.io/v1alpha1",
            "kind": "Configuration",
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {"enable": False},
            "webhook": {
                "host": "127.0.0.1",
                "port": self.ports.jobset_webhook,
                "certDir": str(certs),
            },
            "metrics": {"bindAddress": "0"},
            "health": {"healthProbeBindAddress": f"127.0.0.1:{self.ports.jobset_health}"},
        }
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
        process = self._run(
            "jobset", [f"--config={folder / 'config.yaml'}", f"--kubeconfig={self.kubeconfig}"]
        )
        wait_until(
            lambda: (
                urllib.request.urlopen(
                    f"http://127.0.0.1:{self.ports.jobset_health}/readyz", timeout=5
                ).status
                == 200
            ),
            "JobSet controller /readyz",
            START_TIMEOUT_SECONDS,
            process,
        )
        url = f"https://127.0.0.1:{self.ports.jobset_webhook}"
        ca_bundle = self.ca.pem()
        for document in manifests["webhooks"]:
            for hook in document["webhooks"]:
                path = hook["clientConfig"]["service"]["path"]
                hook["clientConfig"] = {
                    "url": f"{url}{path}",
                    "caBundle": base64.b64encode(ca_bundle).decode(),
                }
            self.apply(document)

    # --- talking to it -----------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca.cert_file))
        context.load_cert_chain(*map(str, self.admin))
        return context

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """One admin request to the apiserver; the decoded JSON answer."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"{self.server}{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        with urllib.request.urlopen(request, context=self.ssl_context(), timeout=30) as answer:
            return json.loads(answer.read() or b"null")

    def kubectl(self, *args: str, check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.bin / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
            check=check,
            capture_output=True,
            text=True,
            **kwargs,
        )

    def apply(self, document: dict[str, Any]) -> None:
        self.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(document))

    def env(self) -> dict[str, str]:
        """Environment for tools pointed at this cluster (kubectl, helm, the client)."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
