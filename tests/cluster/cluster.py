"""A whole test cluster: control plane, pod network, process kubelets, storage and kubectl.

Run as: make cluster   (= python tests/cluster/cluster.py; Ctrl-C stops it)

`TestCluster` is what the test session's `cluster` fixture and `make cluster` start: the
pod network (kubelet.PodNetwork, its gateway is the apiserver's address), the control plane
(controlplane.py), two process kubelets (kubelet.py), and then what a cluster admin adds:
namespaces labelled for PodSecurity `restricted`, and PersistentVolumes on local folders
pre-bound to the claims that `create_claim` makes (the real PV controller binds them).
`make cluster` also makes the claim `examples` in namespace `default`, filled from
examples/data, which the cluster variants of the examples (examples/cluster/) read.
For benchmarks, `stub_pods=True` runs TrainingRuns' pods as kubelet.StubPods (Running at
once, no process; `cluster.stubs.finish(namespace, run)` ends them) and `audit=(user, ...)`
turns on the apiserver's audit log of those users' requests (ControlPlane.audit_log).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from controlplane import ROOT, ControlPlane, wait_until
from kubelet import Nodes, PodNetwork, StubPods

sys.path.insert(0, str(ROOT / "scripts"))
import fetch_k8s_tools

RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
}
EXAMPLE_DATA = ROOT / "examples" / "data"


class TestCluster:
    """The control plane and its nodes (module doc). `root` holds all of their files."""

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        root: Path,
        nodes: int = 2,
        stub_pods: bool = False,
        audit: Sequence[str] = (),
    ) -> None:
        self.root = root
        self.network = PodNetwork()
        self.stubs = StubPods(self.network.gateway) if stub_pods else None
        self.audit = audit
        self.plane: ControlPlane | None = None
        self.nodes: Nodes | None = None
        self.node_count = nodes
        self.volumes = root / "volumes"
        self.log_handler: logging.FileHandler | None = None

    @property
    def kubeconfig(self) -> Path:
        assert self.plane is not None
        return self.plane.kubeconfig

    def start(self) -> TestCluster:
        self.root.mkdir(parents=True, exist_ok=True)
        # Everything the kubelets say, for the report of a failed test (kubelet_log()).
        self.log_handler = logging.FileHandler(self.root / "kubelet.log")
        self.log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.getLogger("kubelet").addHandler(self.log_handler)
        logging.getLogger("kubelet").setLevel(logging.INFO)
        try:
            self.network.create()
            self.plane = ControlPlane(
                self.root / "control-plane", host_ip=self.network.gateway, audit=self.audit
            )
            self.plane.start()
            self.nodes = Nodes(self.plane, self.root / "nodes", self.node_count, self.stubs).start(
                self.network
            )
            wait_until(self._nodes_schedulable, "Nodes Ready and without the not-ready taint", 120)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.nodes is not None:
            self.nodes.stop()
        if self.plane is not None:
            self.plane.stop()
        self.network.delete()
        if self.log_handler is not None:
            logging.getLogger("kubelet").removeHandler(self.log_handler)
            self.log_handler.close()

    def kubelet_log(self, lines: int = 60, mentioning: str | None = None) -> str:
        """The kubelets' last `lines` log lines, or only those that name `mentioning`."""
        path = self.root / "kubelet.log"
        if not path.exists():
            return ""
        found = path.read_text().splitlines()
        if mentioning is not None:
            found = [line for line in found if mentioning in line]
        return "\n".join(found[-lines:])

    def failure_report(self, namespace: str, operator_log: str = "") -> str:
        """What a failed test in `namespace` prints: its objects as kubectl lists them, the
        pods' logs, what the kubelets and the operator said of it, and where its processes
        still running are waiting."""
        listed = self.kubectl(
            "get", "trainingruns,pipelines,jobs,jobsets,pods", "-n", namespace, "-o", "wide",
            check=False,
        )  # fmt: skip
        assert self.nodes is not None
        operator_lines = [line for line in operator_log.splitlines() if namespace in line]
        return "\n".join(
            [
                f"--- kubectl get -n {namespace}\n{listed.stdout}{listed.stderr}",
                self.nodes.namespace_logs(namespace),
                "--- kubelets\n" + self.kubelet_log(200, mentioning=namespace),
                "--- operator\n" + "\n".join(operator_lines[-80:]),
                "--- processes still running\n" + self.nodes.stacks(namespace),
            ]
        )

    def check_alive(self) -> None:
        """Fail naming the component or kubelet that died."""
        assert self.plane is not None and self.nodes is not None
        self.plane.check_alive()
        self.nodes.check_alive()

    def _nodes_schedulable(self) -> bool:
        nodes = self.get("nodes")["items"]
        return len(nodes) == self.node_count and all(
            not any(t["key"].startswith("node.kubernetes.io/") for t in n["spec"].get("taints", []))
            and any(
                c["type"] == "Ready" and c["status"] == "True" for c in n["status"]["conditions"]
            )
            for n in nodes
        )

    # --- kubectl -------------------------------------------------------------------------

    def kubectl(
        self, *args: str, check: bool = True, timeout: float = 120, **kwargs: Any
    ) -> subprocess.CompletedProcess:
        """Run the kubectl built with the control plane against this cluster."""
        assert self.plane is not None
        result = self.plane.kubectl(*args, check=False, timeout=timeout, **kwargs)
        if check and result.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} exited {result.returncode}: {result.stderr}"
            )
        return result

    def get(self, *args: str) -> dict[str, Any]:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def apply(
        self, document: dict[str, Any] | list[dict[str, Any]], namespace: str | None = None
    ) -> None:
        documents = document if isinstance(document, list) else [document]
        text = "\n---\n".join(json.dumps(d) for d in documents)
        extra = ["-n", namespace] if namespace else []
        self.kubectl("apply", *extra, "-f", "-", input=text)

    # --- what an admin sets up -----------------------------------------------------------

    def create_namespace(self, name: str) -> None:
        self.apply(
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": name, "labels": RESTRICTED},
            }
        )

    def create_claim(
        self,
        namespace: str,
        name: str,
        size: str = "1Gi",
        access_modes: tuple[str, ...] = ("ReadWriteMany",),
    ) -> Path:
        """A PersistentVolumeClaim and the folder-backed PersistentVolume it binds to.

        A folder on this one machine is shared by every node, so ReadWriteMany by default.
        """
        folder = self.volumes / f"{namespace}-{name}"
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o777)
        volume = f"pv-{namespace}-{name}"
        self.apply(
            [
                {
                    "apiVersion": "v1",
                    "kind": "PersistentVolume",
                    "metadata": {"name": volume},
                    "spec": {
                        "capacity": {"storage": size},
                        "accessModes": list(access_modes),
                        "persistentVolumeReclaimPolicy": "Retain",
                        "storageClassName": "",
                        "hostPath": {"path": str(folder), "type": "Directory"},
                        "claimRef": {"namespace": namespace, "name": name},
                    },
                },
                {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "metadata": {"name": name, "namespace": namespace},
                    "spec": {
                        "accessModes": list(access_modes),
                        "storageClassName": "",
                        "volumeName": volume,
                        "resources": {"requests": {"storage": size}},
                    },
                },
            ]
        )
        wait_until(
            lambda: self.get("pvc", name, "-n", namespace)["status"].get("phase") == "Bound",
            f"claim {namespace}/{name} Bound (the PersistentVolume controller)",
            60,
        )
        return folder

    def claim_folder(self, namespace: str, name: str) -> Path:
        return self.volumes / f"{namespace}-{name}"


def fill_examples_claim(cluster: TestCluster, namespace: str = "default") -> Path:
    """The claim `examples` holding examples/data, as the examples/cluster/ runs expect."""
    folder = cluster.create_claim(namespace, "examples", "5Gi")
    shutil.copytree(EXAMPLE_DATA, folder / "data", dirs_exist_ok=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Start a test cluster on this machine (Ctrl-C stops it)."
    )
    parser.add_argument("--dir", type=Path, default=ROOT / ".cluster", help="where its files go")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if os.geteuid() != 0:
        raise SystemExit(
            "make cluster needs root: each pod gets network and mount namespaces (run it with sudo)"
        )
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    cluster = TestCluster(Path(tempfile.mkdtemp(prefix="kubetrain-cluster-", dir=args.dir)))
    print(
        "starting etcd, kube-apiserver, kube-controller-manager, kube-scheduler, JobSet "
        "and 2 kubelets ...",
        flush=True,
    )
    cluster.start()
    kubeconfig = args.dir / "kubeconfig"
    shutil.copy(cluster.kubeconfig, kubeconfig)
    fill_examples_claim(cluster)
    helm = fetch_k8s_tools.tool_path("helm")  # the real helm, from its PyPI wheel
    print(
        f"""
The cluster is up. In another shell (README.md, "A cluster on this machine"):

  export KUBECONFIG={kubeconfig}
  export PATH={cluster.plane.bin}:{helm.parent}:$PATH
  helm install kubetrain charts/kubetrain -n kubetrain --create-namespace --wait \\
      --set reconcileIntervalSeconds=2
  kubectl apply -f examples/cluster/trainingrun-from-scratch-tiny.yaml
  kubectl get tr -w

The claim `examples` (namespace default) holds examples/data. Ctrl-C stops the cluster.
""",
        flush=True,
    )
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    try:
        while not stopped.wait(1):
            cluster.check_alive()
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping the cluster ...", flush=True)
        cluster.stop()


if __name__ == "__main__":
    main()
