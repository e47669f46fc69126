"""The process kubelet: the one emulated part of the test cluster.

`Kubelet` registers one Node with the real apiserver (capacity cpu, memory, nvidia.com/gpu
and pods; Ready; its Lease renewed) under its own node identity (`system:node:<name>`, so
the Node authorizer and NodeRestriction judge it as they judge a kubelet), and runs the pods
that the real scheduler binds to it as local processes:
- each pod gets its own network namespace with an address on a bridge (`PodNetwork`), so
  every pod listens on its own IP and ports never collide; `<hostname>.<subdomain>` names of
  pods under a Service of that name resolve through the pod's /etc/hosts, which `PodDns`
  keeps current (the cluster DNS's job);
- the container runs in a mount namespace of its own (sandbox.py) with its volumes
  bind-mounted where the pod says: emptyDir (a folder, or tmpfs for medium Memory),
  ConfigMap, Secret, downwardAPI and projected volumes (ServiceAccount tokens from the
  TokenRequest API, as the kubelet gets them), and PersistentVolumeClaims bound to hostPath
  or local PersistentVolumes (the real binder binds them); the termination log at the
  container's terminationMessagePath;
- env is resolved as the kubelet resolves it: values with $(VAR) expansion, the downward
  API, Secret and ConfigMap keys, envFrom; a missing one leaves the container waiting with
  the kubelet's own `CreateContainerConfigError` reason and message, and a missing volume
  source leaves it `ContainerCreating` with a FailedMount event, until it appears;
- status is reported as the kubelet reports it (phase, conditions, container state,
  exit code, termination message, FallbackToLogsOnError, restarts for restartPolicy Always
  and OnFailure, reason OOMKilled for `oom_kill`; `terminate` sends SIGTERM and leaves the pod
  in place, as a spot reclaim notice does); deletion sends SIGTERM, then SIGKILL
  after the grace period, and removes the pod; `/containerLogs` is served over TLS the way
  the kubelet's API serves it, so `kubectl logs [-f]` works through the apiserver.

`freeze` makes the node dead as a partitioned node is: no heartbeat (the Lease and Ready go
stale), no sync (a deleted pod stays Terminating), while its containers' processes run on;
`thaw` brings it back, and its next sync releases (kills) the processes of pods deleted for
good meanwhile, as a kubelet that comes back does.

What it does not do: pull or run images (the image is this checkout and its venv, with the
ENV, ENTRYPOINT and CMD of the project's Dockerfile for that image; any other image waits
in ErrImagePull); enforce securityContext (processes run as this user, the root filesystem
stays writable), resources, cgroups or limits; run probes (a started container is Ready),
init or sidecar containers beyond the first container, exec, attach or port-forward;
authenticate the apiserver's calls to its log endpoint; rotate ServiceAccount tokens;
run more than the first container of a pod. Grace periods are capped at GRACE_CAP_SECONDS,
restart back-off at BACKOFF_CAP_SECONDS. Mount points that do not exist are created, empty,
on this machine's filesystem (the mounts themselves stay inside the pod). It needs root
(network and mount namespaces) and Linux.

Stub mode (benchmarks, `StubPods`): pods labelled `kubetrain.dev/run` get no process, no
network namespace and no volumes; they are marked Running and Ready at once, their podIP the
address where one shared `StubMetrics` server serves a trainer's /metrics page on port 9400,
and they end Succeeded (exit 0) when `StubPods.finish` names their run. A stub pod costs
the API one status patch when it starts and one when it ends; other pods (the operator's
own, if it runs in the cluster) run for real.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import http.server
import ipaddress
import json
import logging
import os
import re
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

log = logging.getLogger("kubelet")

ROOT = Path(__file__).resolve().parents[2]
SANDBOX = Path(__file__).with_name("sandbox.py")
VENV_BIN = Path(sys.executable).parent
# Images the kubelet can "run": this checkout, set up as each Dockerfile sets up its image.
IMAGE_DOCKERFILES = {
    "ghcr.io/kubetrain/operator": ROOT / "operator" / "Dockerfile",
    "ghcr.io/kubetrain/trainer": ROOT / "trainer_image" / "Dockerfile",
}
CAPACITY = {"cpu": "64", "memory": "512Gi", "nvidia.com/gpu": "8", "pods": "110"}
GRACE_CAP_SECONDS = 20.0
BACKOFF_CAP_SECONDS = 10.0
LEASE_SECONDS = 40
HEARTBEAT_SECONDS = 10.0
SYNC_SECONDS = 0.2
TERMINATION_MESSAGE_LIMIT = 4096
# util-linux: the kernel kills the pod's process when the kubelet's thread goes.
DIE_WITH_PARENT = ("setpriv", "--pdeathsig", "KILL")
# Stub mode: the pods of TrainingRuns carry this label (kubetrain.api.LABEL_RUN).
STUB_LABEL = "kubetrain.dev/run"
STUB_METRICS_PORT = 9400


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def run_ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


# --- images --------------------------------------------------------------------------


@dataclass
class Image:
    """What a Dockerfile's final stage sets: ENV, ENTRYPOINT and CMD."""

    env: dict[str, str]
    entrypoint: list[str]
    cmd: list[str]

    @classmethod
    def from_dockerfile(cls, path: Path) -> Image:
        text = re.sub(r"\\\n", " ", path.read_text())
        stage = re.split(r"^FROM .*$", text, flags=re.M)[-1]
        env: dict[str, str] = {}
        entrypoint: list[str] = []
        cmd: list[str] = []
        for line in stage.splitlines():
            word, _, rest = line.strip().partition(" ")
            if word == "ENV":
                for pair in shlex.split(rest):
                    key, _, value = pair.partition("=")
                    env[key] = value
            elif word == "ENTRYPOINT":
                entrypoint = json.loads(rest)
            elif word == "CMD":
                cmd = json.loads(rest)
        # The image's PATH leads to its venv; here the venv is this one.
        env["PATH"] = f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin"
        return cls(env, entrypoint, cmd)


def image_for(reference: str) -> Image | None:
    repository = reference.split("@")[0].rsplit(":", 1)[0] if "/" in reference else reference
    dockerfile = IMAGE_DOCKERFILES.get(repository)
    return Image.from_dockerfile(dockerfile) if dockerfile else None


# --- the pod network -----------------------------------------------------------------


class PodNetwork:
    """A bridge with a /24 of its own; one network namespace and veth pair per pod."""

    def __init__(self) -> None:
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        self.index = next(i for i in range(1, 250) if f" ktbr{i}:" not in links)
        self.bridge = f"ktbr{self.index}"
        self.subnet = ipaddress.ip_network(f"10.250.{self.index}.0/24")
        self.gateway = str(self.subnet.network_address + 1)
        self.next_host = 2
        self.lock = threading.Lock()

    def create(self) -> PodNetwork:
        # Namespaces and veths of this index without its bridge are left from a cluster
        # that was killed: they would collide with the new pods' names.
        netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        for name in re.findall(rf"^(kt{self.index}p\d+)", netns, re.M):
            self.remove_pod(name)
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        for name in re.findall(rf"^\d+: (kt{self.index}v\d+)[@:]", links, re.M):
            with contextlib.suppress(subprocess.CalledProcessError):
                run_ip("link", "del", name)
        run_ip("link", "add", self.bridge, "type", "bridge")
        run_ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        run_ip("link", "set", self.bridge, "up")
        return self

    def delete(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            run_ip("link", "del", self.bridge)

    def add_pod(self) -> tuple[str, str]:
        """A new network namespace wired to the bridge: (its name, the pod's IP)."""
        with self.lock:
            host = self.next_host
            self.next_host += 1
        if host > 254:
            raise RuntimeError(f"pod network {self.subnet} is out of addresses")
        netns, veth = f"kt{self.index}p{host}", f"kt{self.index}v{host}"
        ip = str(self.subnet.network_address + host)
        run_ip("netns", "add", netns)
        run_ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        run_ip("link", "set", veth, "master", self.bridge, "up")
        run_ip("-n", netns, "addr", "add", f"{ip}/24", "dev", "eth0")
        run_ip("-n", netns, "link", "set", "eth0", "up")
        run_ip("-n", netns, "link", "set", "lo", "up")
        run_ip("-n", netns, "route", "add", "default", "via", self.gateway)
        return netns, ip

    @staticmethod
    def remove_pod(netns: str) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            run_ip("netns", "del", netns)  # takes its veth pair with it


# --- DNS -----------------------------------------------------------------------------


class PodDns:
    """What cluster DNS answers for pods: `<hostname>.<subdomain>[.<ns>.svc[.cluster.local]]`
    for pods with an IP under a headless Service named like their subdomain, written into
    every running pod's /etc/hosts (in place: the file is bind-mounted)."""

    def __init__(self, core: k8s_client.CoreV1Api) -> None:
        self.core = core
        self.lock = threading.Lock()
        self.files: dict[str, tuple[str, str, str]] = {}  # hosts file -> (ns, hostname, ip)
        self.records: list[tuple[str, str, str, str]] = []  # (ns, hostname, subdomain, ip)
        self.fresh = False  # records are kept only while some pod has a hosts file

    def register(self, hosts_file: Path, namespace: str, hostname: str, ip: str) -> None:
        if not self.fresh:
            self.refresh(force=True)
        with self.lock:
            self.files[str(hosts_file)] = (namespace, hostname, ip)
            self._write(str(hosts_file))

    def forget(self, hosts_file: Path) -> None:
        with self.lock:
            self.files.pop(str(hosts_file), None)

    def refresh(self, force: bool = False) -> None:
        if not self.files and not force:  # nobody to tell (stub pods have no hosts file)
            self.fresh = False
            return
        pods = json.loads(self.core.list_pod_for_all_namespaces(_preload_content=False).data)
        services = json.loads(
            self.core.list_service_for_all_namespaces(_preload_content=False).data
        )
        headless = {
            (s["metadata"]["namespace"], s["metadata"]["name"])
            for s in services["items"]
            if s["spec"].get("clusterIP") == "None"
        }
        records = sorted(
            (p["metadata"]["namespace"], p["spec"]["hostname"], p["spec"]["subdomain"], ip)
            for p in pods["items"]
            if (ip := (p.get("status") or {}).get("podIP"))
            and p["spec"].get("hostname")
            and (p["metadata"]["namespace"], p["spec"].get("subdomain")) in headless
        )
        with self.lock:
            self.fresh = True
            if records != self.records:
                self.records = records
                for path in self.files:
                    self._write(path)

    def _write(self, path: str) -> None:
        namespace, hostname, own_ip = self.files[path]
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost", f"{own_ip}\t{hostname}"]
        for ns, host, subdomain, ip in self.records:
            names = [f"{host}.{subdomain}.{ns}.svc.cluster.local", f"{host}.{subdomain}.{ns}.svc"]
            if ns == namespace:
                names.append(f"{host}.{subdomain}")
            lines.append(f"{ip}\t{' '.join(names)}")
        with contextlib.suppress(FileNotFoundError), open(path, "r+") as hosts:
            hosts.truncate(0)
            hosts.write("\n".join(lines) + "\n")


# --- one pod -------------------------------------------------------------------------


class NotReady(Exception):
    """The container cannot start yet; `reason` and `message` are the kubelet's words."""

    def __init__(self, reason: str, message: str, event: str | None = None) -> None:
        super().__init__(message)
        self.reason, self.message, self.event = reason, message, event


@dataclass
class PodRuntime:
    """The kubelet's record of one pod: its folder, namespace, process and restarts."""

    namespace: str
    name: str
    uid: str
    folder: Path
    netns: str | None = None
    ip: str | None = None
    popen: subprocess.Popen | None = None
    started_at: str | None = None
    restarts: int = 0
    last_terminated: dict[str, Any] | None = None
    restart_after: float = 0.0
    sigterm_at: float | None = None
    oom: bool = False
    finished: bool = False  # the pod reached Succeeded or Failed
    waiting: tuple[str, str] | None = None
    stub: bool = False  # StubPods: no process, Running at once

    @property
    def log_file(self) -> Path:
        return self.folder / "container.log"

    @property
    def termination_file(self) -> Path:
        return self.folder / "termination-log"

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL the container's process and all it started."""
        if self.popen is None:
            return
        with contextlib.suppress(psutil.NoSuchProcess):
            main = psutil.Process(self.popen.pid)
            for member in [*main.children(recursive=True), main]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    member.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(30)


# --- the kubelet ---------------------------------------------------------------------


class Kubelet:
    """One Node and the pods bound to it (see the module doc)."""

    def __init__(
        self,
        name: str,
        kubeconfig: Path,
        network: PodNetwork,
        dns: PodDns,
        root: Path,
        tls: tuple[Path, Path],
        api_server: tuple[str, int],
        version: str,
        stubs: StubPods | None = None,
    ) -> None:
        self.name = name
        self.stubs = stubs
        # Seconds the last sync took, and the longest one (a benchmark reports them).
        self.sync_last = self.sync_max = 0.0
        self.api = k8s_config.new_client_from_config(config_file=str(kubeconfig))
        self.core = k8s_client.CoreV1Api(self.api)
        self.coordination = k8s_client.CoordinationV1Api(self.api)
        self.network = network
        self.dns = dns
        self.root = root
        self.api_server = api_server
        self.version = version
        self.pods: dict[tuple[str, str], PodRuntime] = {}
        self.lock = threading.RLock()
        self.stop_flag = threading.Event()
        self.frozen = threading.Event()  # freeze(): a dead node, neither heartbeat nor sync
        self.thread: threading.Thread | None = None
        self.log_server = LogServer(self, tls)

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> Kubelet:
        self.root.mkdir(parents=True, exist_ok=True)
        self.log_server.start()
        self._register()
        self.thread = threading.Thread(target=self._loop, name=f"kubelet-{self.name}", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_flag.set()
        if self.thread is not None:
            self.thread.join(30)
        with self.lock:
            for pod in self.pods.values():
                pod.kill()
                self._release(pod)
        self.log_server.stop()

    def check_alive(self) -> None:
        if self.thread is not None and not self.thread.is_alive() and not self.stop_flag.is_set():
            raise RuntimeError(f"kubelet {self.name} stopped working (see its log lines)")

    def oom_kill(self, namespace: str, pod: str) -> None:
        """The container is killed as the kernel's OOM killer would kill it."""
        with self.lock:
            runtime = self.pods[namespace, pod]
            runtime.oom = True
            runtime.kill()

    def kill(self, namespace: str, pod: str) -> None:
        """The container dies at once, every process in it (a crash)."""
        with self.lock:
            self.pods[namespace, pod].kill()

    def terminate(self, namespace: str, pod: str) -> None:
        """SIGTERM to the container's main process, the pod left in place: what a spot
        instance's reclaim notice or a node drain's handler does. It exits as it will."""
        with self.lock:
            runtime = self.pods[namespace, pod]
            if runtime.running():
                runtime.popen.send_signal(signal.SIGTERM)  # type: ignore[union-attr]

    def freeze(self) -> None:
        """The node stops answering (module doc); returns once no sync is under way."""
        self.frozen.set()
        with self.lock:  # a sync that began before waits here, one after sees `frozen`
            pass

    def thaw(self) -> None:
        """The node answers again: heartbeat and sync from its next round on."""
        self.frozen.clear()

    # --- the node ----------------------------------------------------------------------

    def _register(self) -> None:
        body = {
            "metadata": {
                "name": self.name,
                "labels": {
                    "kubernetes.io/hostname": self.name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                },
            },
        }
        with contextlib.suppress(ApiException):
            self.core.create_node(body)
        self._heartbeat()

    def _heartbeat(self) -> None:
        stamp = now()
        conditions = [
            {
                "type": kind,
                "status": "False",
                "reason": f"KubeletHas{reason}",
                "lastHeartbeatTime": stamp,
                "lastTransitionTime": stamp,
            }
            for kind, reason in (
                ("MemoryPressure", "SufficientMemory"),
                ("DiskPressure", "NoDiskPressure"),
                ("PIDPressure", "SufficientPID"),
            )
        ] + [
            {
                "type": "Ready",
                "status": "True",
                "reason": "KubeletReady",
                "message": "process kubelet is posting ready status",
                "lastHeartbeatTime": stamp,
                "lastTransitionTime": stamp,
            }
        ]
        capacity = CAPACITY
        if self.stubs is not None:
            capacity = {**CAPACITY, "pods": str(self.stubs.pods_per_node)}
        status = {
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": conditions,
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": self.name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.log_server.port}},
            "nodeInfo": {
                "kubeletVersion": self.version,
                "operatingSystem": "linux",
                "architecture": "amd64",
                "containerRuntimeVersion": "process://kubetrain",
                "osImage": "kubetrain process kubelet",
                "kernelVersion": os.uname().release,
                "machineID": self.name,
                "systemUUID": self.name,
                "bootID": self.name,
                "kubeProxyVersion": "",
            },
        }
        self.core.patch_node_status(self.name, {"status": status})
        lease = {
            "metadata": {"name": self.name, "namespace": "kube-node-lease"},
            "spec": {
                "holderIdentity": self.name,
                "leaseDurationSeconds": LEASE_SECONDS,
                "renewTime": micro_now(),
            },
        }
        try:
            self.coordination.patch_namespaced_lease(self.name, "kube-node-lease", lease)
        except ApiException as e:
            if e.status != 404:
                raise
            self.coordination.create_namespaced_lease("kube-node-lease", lease)

    # --- the loop ----------------------------------------------------------------------

    def _loop(self) -> None:
        """Heartbeat and sync until stopped. A kubelet outlives every error: an apiserver that
        times out or drops a connection under load is met again on the next round."""
        last_heartbeat = 0.0
        # A sync that takes long (a thousand pods) is followed by a pause as long as it took,
        # so that listing never takes more than half of the kubelet's time.
        while not self.stop_flag.wait(max(SYNC_SECONDS, self.sync_last)):
            if self.frozen.is_set():
                last_heartbeat = 0.0  # the first round after thaw() says the node is back
                continue
            try:
                if time.monotonic() - last_heartbeat > HEARTBEAT_SECONDS:
                    self._heartbeat()
                    last_heartbeat = time.monotonic()
                started = time.monotonic()
                self.sync()
                self.sync_last = time.monotonic() - started
                self.sync_max = max(self.sync_max, self.sync_last)
            except ApiException as e:
                if e.status not in (404, 409):  # those: an object changed under us
                    log.warning("kubelet %s: %s %s, trying again", self.name, e.status, e.reason)
            except Exception:
                log.exception("kubelet %s: sync failed, trying again", self.name)
                self.stop_flag.wait(1.0)

    def sync(self) -> None:
        answer = self.core.list_pod_for_all_namespaces(
            field_selector=f"spec.nodeName={self.name}",
            # Stub mode lists from the apiserver's watch cache: cheap for a thousand pods.
            **({"resource_version": "0"} if self.stubs is not None else {}),
            _preload_content=False,
        )
        pods = json.loads(answer.data)["items"]
        seen = set()
        with self.lock:
            if self.frozen.is_set():
                return  # frozen while listing: what was listed is not acted on
            for pod in pods:
                meta = pod["metadata"]
                key = (meta["namespace"], meta["name"])
                seen.add(key)
                runtime = self.pods.get(key)
                if runtime is not None and runtime.uid != meta["uid"]:
                    self._release(self.pods.pop(key))  # a new pod of the same name
                    runtime = None
                if runtime is None:
                    if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                        continue  # finished before this kubelet started
                    runtime = PodRuntime(
                        meta["namespace"],
                        meta["name"],
                        meta["uid"],
                        self.root / "pods" / pod_folder_name(meta),
                        stub=self.stubs is not None and STUB_LABEL in (meta.get("labels") or {}),
                    )
                    self.pods[key] = runtime
                self._sync_pod(pod, runtime)
            for key in [k for k in self.pods if k not in seen]:
                self._release(self.pods.pop(key))  # deleted for good

    def _sync_pod(self, pod: dict[str, Any], runtime: PodRuntime) -> None:
        try:
            self._sync_pod_once(pod, runtime)
        except ApiException as e:  # this pod's call failed: the other pods go on
            if e.status not in (404, 409):
                log.warning("%s/%s: %s %s", runtime.namespace, runtime.name, e.status, e.reason)
        except Exception as e:  # this pod's trouble, not the node's: say so and retry
            log.exception("%s/%s: cannot run the container", runtime.namespace, runtime.name)
            runtime.restart_after = time.monotonic() + BACKOFF_CAP_SECONDS
            container = pod["spec"]["containers"][0]
            self._event(pod, "Warning", "Failed", f"Error: {e}")
            with contextlib.suppress(ApiException):
                waiting = self._waiting_status(pod, container, "RunContainerError", str(e))
                self._patch_status(pod, waiting)

    def _sync_pod_once(self, pod: dict[str, Any], runtime: PodRuntime) -> None:
        if runtime.stub:
            self._sync_stub(pod, runtime)
            return
        if pod["metadata"].get("deletionTimestamp"):
            self._terminate(pod, runtime)
            return
        if runtime.finished:
            return
        if runtime.popen is None or (not runtime.running() and self._should_restart(pod, runtime)):
            if time.monotonic() >= runtime.restart_after:
                self._start(pod, runtime)
            return
        if not runtime.running() and runtime.popen.returncode is not None:
            self._report_exit(pod, runtime)

    def _sync_stub(self, pod: dict[str, Any], runtime: PodRuntime) -> None:
        """A stub pod: Running at once, Succeeded when its run is finished; no API call
        while nothing changes."""
        assert self.stubs is not None
        container = pod["spec"]["containers"][0]
        if pod["metadata"].get("deletionTimestamp"):
            if runtime.sigterm_at is None:  # one delete; the next list says it is gone
                runtime.sigterm_at = time.monotonic()
                self.core.delete_namespaced_pod(
                    runtime.name,
                    runtime.namespace,
                    body=k8s_client.V1DeleteOptions(
                        grace_period_seconds=0,
                        preconditions=k8s_client.V1Preconditions(uid=runtime.uid),
                    ),
                )
            return
        if runtime.finished:
            return
        if runtime.started_at is None:
            runtime.ip, runtime.started_at = self.stubs.address, now()
            status = self._running_status(pod, container, runtime)
            status["status"]["conditions"][0]["status"] = "True"  # no sandbox, but "ready"
            self._patch_status(pod, status)
            return
        if self.stubs.finished(runtime.namespace, pod["metadata"]["labels"][STUB_LABEL]):
            terminated = {
                "exitCode": 0,
                "reason": "Completed",
                "startedAt": runtime.started_at,
                "finishedAt": now(),
            }
            state = {"terminated": terminated}
            self._patch_status(
                pod, self._status(pod, container, runtime, "Succeeded", state, ready=False)
            )
            runtime.finished = True

    # --- starting a container ----------------------------------------------------------

    def _start(self, pod: dict[str, Any], runtime: PodRuntime) -> None:
        container = pod["spec"]["containers"][0]
        image = image_for(container["image"])
        try:
            if image is None:
                raise NotReady(
                    "ErrImagePull",
                    f"the process kubelet runs only kubetrain's images, not {container['image']}",
                )
            env = self._environment(pod, container, image)
            mounts = self._volumes(pod, container, runtime)
        except NotReady as e:
            if runtime.waiting != (e.reason, e.message):
                runtime.waiting = (e.reason, e.message)
                if e.event:
                    self._event(pod, "Warning", "FailedMount", e.event)
                elif e.reason == "CreateContainerConfigError":
                    self._event(pod, "Warning", "Failed", f"Error: {e.message}")
                self._patch_status(pod, self._waiting_status(pod, container, e.reason, e.message))
            return
        runtime.waiting = None
        runtime.folder.mkdir(parents=True, exist_ok=True)
        if runtime.netns is None:
            runtime.netns, runtime.ip = self.network.add_pod()
        hostname = pod["spec"].get("hostname") or pod["metadata"]["name"]
        hosts = runtime.folder / "hosts"
        hosts.touch()
        self.dns.register(hosts, runtime.namespace, hostname, runtime.ip)
        runtime.termination_file.write_text("")
        resolv = runtime.folder / "resolv.conf"
        # No DNS server: names come from /etc/hosts, and a lookup that misses (torch's
        # reverse lookups of peers) fails at once instead of timing out on the host's server.
        resolv.write_text(
            f"nameserver 127.0.0.1\nsearch {runtime.namespace}.svc.cluster.local "
            "svc.cluster.local cluster.local\noptions ndots:5 timeout:1 attempts:1\n"
        )
        mounts += [
            {"source": str(hosts), "target": "/etc/hosts"},
            {"source": str(resolv), "target": "/etc/resolv.conf"},
            {
                "source": str(runtime.termination_file),
                "target": container.get("terminationMessagePath", "/dev/termination-log"),
            },
        ]
        env.update(
            {
                "HOSTNAME": hostname,
                "OMP_NUM_THREADS": "1",  # one core's worth each: pods share this machine
                "HF_HUB_OFFLINE": "1",  # nothing here reaches a model hub
            }
        )
        argv = self._command(container, image, env)
        spec = {
            "argv": argv,
            "env": env,
            "mounts": mounts,
            "workingDir": container.get("workingDir") or str(ROOT),
            "imageRoot": str(ROOT),
            "hostname": hostname,
        }
        spec_file = runtime.folder / "container.json"
        spec_file.write_text(json.dumps(spec))
        if runtime.log_file.exists():
            runtime.log_file.replace(runtime.folder / "container.previous.log")
        with runtime.log_file.open("wb") as out:
            runtime.popen = subprocess.Popen(
                [
                    *DIE_WITH_PARENT,
                    "ip",
                    "netns",
                    "exec",
                    runtime.netns,
                    sys.executable,
                    str(SANDBOX),
                    str(spec_file),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        runtime.started_at = now()
        runtime.oom = False
        log.info(
            "started %s/%s on %s (%s): %s",
            runtime.namespace,
            runtime.name,
            self.name,
            runtime.ip,
            shlex.join(argv),
        )
        self._event(pod, "Normal", "Started", f"Started container {container['name']}")
        self._patch_status(pod, self._running_status(pod, container, runtime))

    @staticmethod
    def _command(container: dict[str, Any], image: Image, env: dict[str, str]) -> list[str]:
        """The kubelet's rule: command replaces ENTRYPOINT (and drops CMD), args replace CMD."""
        if container.get("command"):
            argv = container["command"] + container.get("args", [])
        else:
            argv = image.entrypoint + container.get("args", image.cmd)
        return [expand(a, env) for a in argv]

    def _environment(
        self, pod: dict[str, Any], container: dict[str, Any], image: Image
    ) -> dict[str, str]:
        host, port = self.api_server
        env = {
            **image.env,
            # Where kube-proxy would route the `kubernetes` Service: the apiserver itself.
            "KUBERNETES_SERVICE_HOST": host,
            "KUBERNETES_SERVICE_PORT": str(port),
            "KUBERNETES_SERVICE_PORT_HTTPS": str(port),
        }
        namespace = pod["metadata"]["namespace"]
        for source in container.get("envFrom", []):
            prefix = source.get("prefix", "")
            if "configMapRef" in source:
                data = self._config_map(namespace, source["configMapRef"])
            else:
                data = self._secret(namespace, source["secretRef"])
            env.update({prefix + k: v for k, v in (data or {}).items()})
        for var in container.get("env", []):
            if "value" in var:
                env[var["name"]] = expand(var["value"], env)
                continue
            source = var.get("valueFrom") or {}
            if "fieldRef" in source:
                env[var["name"]] = self._field(pod, source["fieldRef"]["fieldPath"])
            elif "secretKeyRef" in source:
                value = self._key(namespace, "Secret", source["secretKeyRef"])
                if value is not None:
                    env[var["name"]] = value
            elif "configMapKeyRef" in source:
                value = self._key(namespace, "ConfigMap", source["configMapKeyRef"])
                if value is not None:
                    env[var["name"]] = value
            else:
                env[var["name"]] = ""
        return env

    def _field(self, pod: dict[str, Any], path: str) -> str:
        keyed = re.fullmatch(r"metadata\.(annotations|labels)\['(.+)'\]", path)
        if keyed:
            return (pod["metadata"].get(keyed.group(1)) or {}).get(keyed.group(2), "")
        simple = {
            "metadata.name": pod["metadata"]["name"],
            "metadata.namespace": pod["metadata"]["namespace"],
            "metadata.uid": pod["metadata"]["uid"],
            "spec.nodeName": self.name,
            "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default"),
            "status.hostIP": "127.0.0.1",
            "status.podIP": self.pods[pod["metadata"]["namespace"], pod["metadata"]["name"]].ip
            or "",
        }
        return simple.get(path, "")

    def _config_map(self, namespace: str, ref: dict[str, Any]) -> dict[str, str] | None:
        try:
            return self.core.read_namespaced_config_map(ref["name"], namespace).data or {}
        except ApiException as e:
            if e.status != 404:
                raise
            if ref.get("optional"):
                return None
            raise NotReady(
                "CreateContainerConfigError", f'configmap "{ref["name"]}" not found'
            ) from e

    def _secret(self, namespace: str, ref: dict[str, Any]) -> dict[str, str] | None:
        try:
            data = self.core.read_namespaced_secret(ref["name"], namespace).data or {}
        except ApiException as e:
            if e.status != 404:
                raise
            if ref.get("optional"):
                return None
            raise NotReady("CreateContainerConfigError", f'secret "{ref["name"]}" not found') from e
        return {k: base64.b64decode(v).decode() for k, v in data.items()}

    def _key(self, namespace: str, kind: str, ref: dict[str, Any]) -> str | None:
        data = (self._secret if kind == "Secret" else self._config_map)(namespace, ref)
        if data is None:
            return None
        if ref["key"] not in data:
            if ref.get("optional"):
                return None
            raise NotReady(
                "CreateContainerConfigError",
                f"couldn't find key {ref['key']} in {kind} {namespace}/{ref['name']}",
            )
        return data[ref["key"]]

    # --- volumes -----------------------------------------------------------------------

    def _volumes(
        self, pod: dict[str, Any], container: dict[str, Any], runtime: PodRuntime
    ) -> list[dict[str, Any]]:
        volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        mounts = []
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            source = self._volume_source(pod, volume, runtime)
            if source is None:  # emptyDir of medium Memory
                mounts.append({"target": mount["mountPath"], "tmpfs": True})
                continue
            if mount.get("subPath"):
                source = source / mount["subPath"]
                source.mkdir(parents=True, exist_ok=True)
            read_only = mount.get("readOnly", False) or bool(
                (volume.get("persistentVolumeClaim") or {}).get("readOnly")
            )
            mounts.append(
                {"source": str(source), "target": mount["mountPath"], "readOnly": read_only}
            )
        return mounts

    def _volume_source(
        self, pod: dict[str, Any], volume: dict[str, Any], runtime: PodRuntime
    ) -> Path | None:
        namespace = pod["metadata"]["namespace"]
        folder = runtime.folder / "volumes" / volume["name"]
        if "emptyDir" in volume:
            if (volume["emptyDir"] or {}).get("medium") == "Memory":
                return None
            folder.mkdir(parents=True, exist_ok=True)
            return folder
        if "persistentVolumeClaim" in volume:
            return self._claim_folder(
                namespace, volume["persistentVolumeClaim"]["claimName"], volume["name"]
            )
        files: dict[str, str] = {}
        try:
            if "configMap" in volume:
                files = self._projected_keys(namespace, "ConfigMap", volume["configMap"])
            elif "secret" in volume:
                ref = {**volume["secret"], "name": volume["secret"]["secretName"]}
                files = self._projected_keys(namespace, "Secret", ref)
            elif "downwardAPI" in volume:
                files = self._downward_files(pod, volume["downwardAPI"])
            elif "projected" in volume:
                for source in volume["projected"]["sources"]:
                    if "serviceAccountToken" in source:
                        token = source["serviceAccountToken"]
                        files[token["path"]] = self._token(pod, token)
                    elif "configMap" in source:
                        files.update(
                            self._projected_keys(namespace, "ConfigMap", source["configMap"])
                        )
                    elif "secret" in source:
                        files.update(self._projected_keys(namespace, "Secret", source["secret"]))
                    elif "downwardAPI" in source:
                        files.update(self._downward_files(pod, source["downwardAPI"]))
            else:
                kind = next(iter(k for k in volume if k != "name"))
                raise NotReady(
                    "ContainerCreating",
                    f"the process kubelet cannot mount {kind} volumes",
                    event=f'MountVolume.SetUp failed for volume "{volume["name"]}" : '
                    f"unsupported {kind}",
                )
        except NotReady as e:
            if e.reason == "CreateContainerConfigError":  # said of a volume: FailedMount
                raise NotReady(
                    "ContainerCreating",
                    e.message,
                    event=f'MountVolume.SetUp failed for volume "{volume["name"]}" : {e.message}',
                ) from e
            raise
        folder.mkdir(parents=True, exist_ok=True)
        for relative, text in files.items():
            path = folder / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        return folder

    def _projected_keys(self, namespace: str, kind: str, ref: dict[str, Any]) -> dict[str, str]:
        data = (self._secret if kind == "Secret" else self._config_map)(namespace, ref)
        if data is None:
            return {}
        items = ref.get("items")
        if not items:
            return dict(data)
        files = {}
        for item in items:
            if item["key"] not in data:
                if ref.get("optional"):
                    continue
                raise NotReady(
                    "CreateContainerConfigError",
                    f"configmap references non-existent config key: {item['key']}",
                )
            files[item["path"]] = data[item["key"]]
        return files

    def _downward_files(self, pod: dict[str, Any], spec: dict[str, Any]) -> dict[str, str]:
        return {
            item["path"]: self._field(pod, item["fieldRef"]["fieldPath"])
            for item in spec.get("items", [])
            if "fieldRef" in item
        }

    def _token(self, pod: dict[str, Any], spec: dict[str, Any]) -> str:
        """A bound ServiceAccount token from the TokenRequest API, as the kubelet gets it."""
        meta = pod["metadata"]
        body = {
            "spec": {
                "audiences": [spec["audience"]] if spec.get("audience") else None,
                "expirationSeconds": spec.get("expirationSeconds", 3607),
                "boundObjectRef": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": meta["name"],
                    "uid": meta["uid"],
                },
            }
        }
        answer = self.core.create_namespaced_service_account_token(
            pod["spec"].get("serviceAccountName", "default"), meta["namespace"], body
        )
        return answer.status.token

    def _claim_folder(self, namespace: str, claim_name: str, volume: str) -> Path:
        """The folder behind a Bound claim's hostPath or local PersistentVolume."""
        try:
            claim = self.core.read_namespaced_persistent_volume_claim(claim_name, namespace)
        except ApiException as e:
            if e.status != 404:
                raise
            message = f'persistentvolumeclaim "{claim_name}" not found'
            raise NotReady("ContainerCreating", message, event=message) from e
        if claim.status.phase != "Bound":
            message = f'persistentvolumeclaim "{claim_name}" is not bound'
            raise NotReady("ContainerCreating", message, event=message)
        volume_object = self.core.read_persistent_volume(claim.spec.volume_name)
        source = volume_object.spec.host_path or volume_object.spec.local
        if source is None:
            raise NotReady(
                "ContainerCreating",
                f"PersistentVolume {claim.spec.volume_name} is neither hostPath nor local",
                event=f'MountVolume.SetUp failed for volume "{volume}": '
                "unsupported PersistentVolume",
            )
        folder = Path(source.path)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    # --- exits, restarts and deletion --------------------------------------------------

    @staticmethod
    def _should_restart(pod: dict[str, Any], runtime: PodRuntime) -> bool:
        policy = pod["spec"].get("restartPolicy", "Always")
        code = runtime.popen.returncode if runtime.popen else None
        return policy == "Always" or (policy == "OnFailure" and code not in (0, None))

    def _exit_state(self, pod: dict[str, Any], runtime: PodRuntime) -> dict[str, Any]:
        container = pod["spec"]["containers"][0]
        code = runtime.popen.returncode
        code = code if code >= 0 else 128 - code  # killed by signal N: 128 + N
        message = (
            runtime.termination_file.read_text(errors="replace")
            if runtime.termination_file.exists()
            else ""
        )
        if (
            not message
            and code != 0
            and container.get("terminationMessagePolicy") == "FallbackToLogsOnError"
        ):
            message = "\n".join(runtime.log_file.read_text(errors="replace").splitlines()[-80:])[
                -2048:
            ]
        reason = "OOMKilled" if runtime.oom else ("Completed" if code == 0 else "Error")
        terminated = {
            "exitCode": code,
            "reason": reason,
            "startedAt": runtime.started_at,
            "finishedAt": now(),
        }
        if message:
            terminated["message"] = message[-TERMINATION_MESSAGE_LIMIT:]
        return terminated

    def _report_exit(self, pod: dict[str, Any], runtime: PodRuntime) -> None:
        container = pod["spec"]["containers"][0]
        terminated = self._exit_state(pod, runtime)
        log.info("%s/%s exited %d", runtime.namespace, runtime.name, terminated["exitCode"])
        if self._should_restart(pod, runtime):
            runtime.restarts += 1
            runtime.last_terminated = terminated
            backoff = min(BACKOFF_CAP_SECONDS, 2.0 ** (runtime.restarts - 1))
            runtime.restart_after = time.monotonic() + backoff
            status = self._waiting_status(
                pod,
                container,
                "CrashLoopBackOff",
                f"back-off {backoff:.0f}s restarting failed container",
            )
            status["status"]["phase"] = "Running"
            self._patch_status(pod, status)
            return
        runtime.finished = True
        phase = "Succeeded" if terminated["exitCode"] == 0 else "Failed"
        self._patch_status(
            pod,
            self._status(pod, container, runtime, phase, {"terminated": terminated}, ready=False),
        )
        self.dns.forget(runtime.folder / "hosts")

    def _terminate(self, pod: dict[str, Any], runtime: PodRuntime) -> None:
        """SIGTERM, SIGKILL after the grace period, then the pod is removed."""
        if runtime.running():
            grace = min(
                pod["metadata"].get("deletionGracePeriodSeconds")
                or pod["spec"].get("terminationGracePeriodSeconds", 30),
                GRACE_CAP_SECONDS,
            )
            if runtime.sigterm_at is None:
                runtime.sigterm_at = time.monotonic()
                log.info("%s/%s deleted: SIGTERM", runtime.namespace, runtime.name)
                self._event(
                    pod,
                    "Normal",
                    "Killing",
                    f"Stopping container {pod['spec']['containers'][0]['name']}",
                )
                os.kill(runtime.popen.pid, signal.SIGTERM)
            elif time.monotonic() - runtime.sigterm_at > grace:
                log.info("%s/%s: grace period over, SIGKILL", runtime.namespace, runtime.name)
                runtime.kill()
            return
        if runtime.popen is not None and not runtime.finished:
            runtime.finished = True
            container = pod["spec"]["containers"][0]
            terminated = self._exit_state(pod, runtime)
            phase = "Succeeded" if terminated["exitCode"] == 0 else "Failed"
            with contextlib.suppress(ApiException):
                self._patch_status(
                    pod,
                    self._status(
                        pod, container, runtime, phase, {"terminated": terminated}, ready=False
                    ),
                )
        self._release(runtime)
        with contextlib.suppress(ApiException):
            self.core.delete_namespaced_pod(
                runtime.name,
                runtime.namespace,
                grace_period_seconds=0,
                body=k8s_client.V1DeleteOptions(
                    grace_period_seconds=0,
                    preconditions=k8s_client.V1Preconditions(uid=runtime.uid),
                ),
            )

    def _release(self, runtime: PodRuntime) -> None:
        if runtime.running():
            runtime.kill()
        self.dns.forget(runtime.folder / "hosts")
        if runtime.netns is not None:
            self.network.remove_pod(runtime.netns)
            runtime.netns = None

    # --- status ------------------------------------------------------------------------

    def _status(
        self,
        pod: dict[str, Any],
        container: dict[str, Any],
        runtime: PodRuntime,
        phase: str,
        state: dict[str, Any],
        ready: bool,
    ) -> dict[str, Any]:
        stamp = now()
        flag = "True" if ready else "False"
        conditions = [
            {
                "type": "PodReadyToStartContainers",
                "status": "True" if runtime.netns else "False",
                "lastTransitionTime": stamp,
            },
            {"type": "Initialized", "status": "True", "lastTransitionTime": stamp},
            {"type": "ContainersReady", "status": flag, "lastTransitionTime": stamp},
            {"type": "Ready", "status": flag, "lastTransitionTime": stamp},
        ]
        if not ready:
            for condition in conditions[2:]:
                condition["reason"] = (
                    "PodCompleted" if phase in ("Succeeded", "Failed") else "ContainersNotReady"
                )
        container_status = {
            "name": container["name"],
            "image": container["image"],
            "imageID": "",
            "ready": ready,
            "started": "running" in state,
            "restartCount": runtime.restarts,
            "state": state,
        }
        if runtime.last_terminated:
            container_status["lastState"] = {"terminated": runtime.last_terminated}
        status: dict[str, Any] = {
            "phase": phase,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "startTime": pod.get("status", {}).get("startTime") or stamp,
            "conditions": conditions,
            "containerStatuses": [container_status],
        }
        if runtime.ip:
            status["podIP"] = runtime.ip
            status["podIPs"] = [{"ip": runtime.ip}]
        return {"status": status}

    def _running_status(
        self, pod: dict[str, Any], container: dict[str, Any], runtime: PodRuntime
    ) -> dict[str, Any]:
        return self._status(
            pod,
            container,
            runtime,
            "Running",
            {"running": {"startedAt": runtime.started_at}},
            ready=True,
        )

    def _waiting_status(
        self, pod: dict[str, Any], container: dict[str, Any], reason: str, message: str
    ) -> dict[str, Any]:
        key = (pod["metadata"]["namespace"], pod["metadata"]["name"])
        runtime = self.pods[key]
        phase = pod.get("status", {}).get("phase") or "Pending"
        return self._status(
            pod,
            container,
            runtime,
            phase,
            {"waiting": {"reason": reason, "message": message}},
            ready=False,
        )

    def _patch_status(self, pod: dict[str, Any], body: dict[str, Any]) -> None:
        self.core.patch_namespaced_pod_status(
            pod["metadata"]["name"], pod["metadata"]["namespace"], body
        )

    def _event(self, pod: dict[str, Any], kind: str, reason: str, message: str) -> None:
        meta = pod["metadata"]
        stamp = now()
        body = {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
                "fieldPath": f"spec.containers{{{pod['spec']['containers'][0]['name']}}}",
            },
            "type": kind,
            "reason": reason,
            "message": message,
            "source": {"component": "kubelet", "host": self.name},
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        with contextlib.suppress(ApiException):
            self.core.create_namespaced_event(meta["namespace"], body)


def py_spy_dump(pid: int) -> str:
    """py-spy's dump of a live Python process (a dev dependency), or why there is none."""
    spy = shutil.which("py-spy", path=str(VENV_BIN)) or shutil.which("py-spy")
    if spy is None:
        return "(py-spy is not installed)"
    try:
        done = subprocess.run(
            [spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        return "(py-spy timed out)"
    return (done.stdout + done.stderr).strip()


def pod_folder_name(meta: dict[str, Any]) -> str:
    return f"{meta['namespace']}_{meta['name']}_{meta['uid'][:8]}"


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined names are replaced, $$ escapes, others stay."""

    def replace(found: re.Match) -> str:
        if found.group(0) == "$$":
            return "$"
        name = found.group(1)
        return env.get(name, found.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", replace, value)


# --- the kubelet's API: container logs -----------------------------------------------


class LogServer:
    """GET /containerLogs/<namespace>/<pod>/<container>[?follow&tailLines&limitBytes&previous]
    over TLS, the endpoint the apiserver proxies `kubectl logs` to."""

    def __init__(self, kubelet: Kubelet, tls: tuple[Path, Path]) -> None:
        self.kubelet = kubelet
        handler = type("Handler", (_LogHandler,), {"kubelet": kubelet})
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*map(str, tls))
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _LogHandler(http.server.BaseHTTPRequestHandler):
    kubelet: Kubelet
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("log server: " + format, *args)

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        parts = url.path.strip("/").split("/")
        if url.path == "/healthz":
            self._answer(200, b"ok")
            return
        if len(parts) != 4 or parts[0] != "containerLogs":
            self._answer(404, b"not found")
            return
        namespace, pod = parts[1], parts[2]
        with self.kubelet.lock:
            runtime = self.kubelet.pods.get((namespace, pod))
        if runtime is None or not runtime.log_file.exists():
            self._answer(404, f'container logs of pod "{pod}" not found'.encode())
            return
        previous = query.get("previous", ["false"])[0] == "true"
        path = runtime.folder / "container.previous.log" if previous else runtime.log_file
        if not path.exists():
            self._answer(400, f'previous terminated container in pod "{pod}" not found'.encode())
            return
        follow = query.get("follow", ["false"])[0] == "true" and not previous
        tail = int(query["tailLines"][0]) if "tailLines" in query else None
        limit = int(query["limitBytes"][0]) if "limitBytes" in query else None
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        sent = 0
        with path.open("rb") as source:
            data = source.read()
            if tail is not None:
                data = b"".join(data.splitlines(keepends=True)[-tail:] if tail else [])
            while True:
                if limit is not None:
                    data = data[: max(0, limit - sent)]
                if data:
                    self._chunk(data)
                    sent += len(data)
                if not follow or (limit is not None and sent >= limit):
                    break
                if not runtime.running() and runtime.popen is not None:
                    rest = source.read()
                    if rest:
                        self._chunk(rest)
                    break
                time.sleep(0.1)
                data = source.read()
        self._chunk(b"")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _answer(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


# --- stub pods (benchmarks) ---------------------------------------------------------


class StubPods:
    """Stub mode (module doc): pods labelled STUB_LABEL run nothing; their podIP is
    `address`, where one StubMetrics page answers for every one of them on port 9400.
    `finish(namespace, run)` makes the pods of that run end Succeeded, exit 0."""

    def __init__(self, address: str, pods_per_node: int = 2000) -> None:
        self.address = address
        self.pods_per_node = pods_per_node
        self.metrics = StubMetrics(address)
        self.lock = threading.Lock()
        self.finished_runs: set[tuple[str, str]] = set()

    def start(self) -> None:
        self.metrics.start()

    def stop(self) -> None:
        self.metrics.stop()

    def finish(self, namespace: str, run: str) -> None:
        with self.lock:
            self.finished_runs.add((namespace, run))

    def finished(self, namespace: str, run: str) -> bool:
        with self.lock:
            return (namespace, run) in self.finished_runs


class StubMetrics:
    """A trainer's /metrics page (kubetrain_trainer_*), the same for every stub pod: one step
    a second since it started, so every scrape sees progress, as from a real trainer."""

    TOTAL_STEPS = 1_000_000

    def __init__(self, address: str, port: int = STUB_METRICS_PORT) -> None:
        self.address, self.port = address, port
        self.started = time.monotonic()
        self.requests = 0
        self.server: http.server.ThreadingHTTPServer | None = None

    def start(self) -> None:
        """Listen (the address is the pod network's gateway: start after the bridge)."""
        page = self.page

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                body = page().encode()
                self.send_response(200 if self.path == "/metrics" else 404)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer((self.address, self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def page(self) -> str:
        self.requests += 1
        step = min(int(time.monotonic() - self.started) + 1, self.TOTAL_STEPS - 1)
        values = {
            "step": step,
            "total_steps": self.TOTAL_STEPS,
            "epoch": step / 1000,
            "loss": 5.0 / (1 + step / 100),
            "tokens_per_second": 12345.0,
            "checkpoint_step": step // 100 * 100,
        }
        return "".join(
            f"# TYPE kubetrain_trainer_{name} gauge\nkubetrain_trainer_{name} {value}\n"
            for name, value in values.items()
        )

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


# --- the nodes of a test cluster -----------------------------------------------------


class Nodes:
    """The pod network, DNS and `count` kubelets of one cluster, started and stopped as one."""

    def __init__(
        self, plane: Any, root: Path, count: int = 2, stubs: StubPods | None = None
    ) -> None:
        self.plane = plane
        self.root = root
        self.count = count
        self.stubs = stubs
        self.network: PodNetwork | None = None
        self.kubelets: list[Kubelet] = []
        self.dns_thread: threading.Thread | None = None
        self.stop_flag = threading.Event()

    def start(self, network: PodNetwork) -> Nodes:
        self.network = network
        admin = k8s_config.new_client_from_config(config_file=str(self.plane.kubeconfig))
        self.dns = PodDns(k8s_client.CoreV1Api(admin))
        host, port = self.plane.host_ip, self.plane.ports.apiserver
        if self.stubs is not None:
            self.stubs.start()
        for index in range(self.count):
            name = f"kubelet-{index}"
            kubeconfig = self.plane.node_kubeconfig(name)
            kubelet = Kubelet(
                name,
                kubeconfig,
                network,
                self.dns,
                self.root / name,
                (self.plane.pki / "kubelet.crt", self.plane.pki / "kubelet.key"),
                (host, port),
                self.plane.version,
                self.stubs,
            )
            self.kubelets.append(kubelet.start())
        self.dns_thread = threading.Thread(target=self._dns_loop, name="pod-dns", daemon=True)
        self.dns_thread.start()
        return self

    def _dns_loop(self) -> None:
        while not self.stop_flag.wait(0.5):
            with contextlib.suppress(Exception):
                self.dns.refresh()

    def stop(self) -> None:
        self.stop_flag.set()
        for kubelet in self.kubelets:
            kubelet.stop()
        if self.stubs is not None:
            self.stubs.stop()

    def check_alive(self) -> None:
        for kubelet in self.kubelets:
            kubelet.check_alive()

    def pod_log(self, namespace: str, pod: str) -> str:
        """What a pod's container wrote (kept after the pod is gone, like the node's disk)."""
        logs = sorted(
            self.root.glob(f"*/pods/{namespace}_{pod}_*/container.log"),
            key=lambda p: p.stat().st_mtime,
        )
        if not logs:
            raise LookupError(f"no kubelet ran pod {namespace}/{pod}")
        return logs[-1].read_text(errors="replace")

    def job_log(self, namespace: str, job: str, index: int = 0) -> str:
        """The log of pod `index` of Job `job` (the newest such pod)."""
        pattern = re.compile(
            rf"{re.escape(namespace)}_{re.escape(job)}-{index}-[a-z0-9]{{5}}_[a-z0-9-]+"
        )
        logs = sorted(
            (
                p
                for p in self.root.glob("*/pods/*/container.log")
                if pattern.fullmatch(p.parent.name)
            ),
            key=lambda p: p.stat().st_mtime,
        )
        if not logs:
            raise LookupError(f"no kubelet ran pod {index} of Job {namespace}/{job}")
        return logs[-1].read_text(errors="replace")

    def namespace_logs(self, namespace: str, lines: int = 40) -> str:
        """The last lines of every pod log of a namespace, for a failed test's report."""
        out = []
        for path in sorted(self.root.glob(f"*/pods/{namespace}_*/container.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.parent.name}\n" + "\n".join(tail))
        return "\n".join(out)

    def stacks(self, namespace: str) -> str:
        """The Python stacks of a namespace's pod processes still running (py-spy), so that a
        test that timed out shows where the trainer or torchrun was waiting."""
        out = []
        for kubelet in self.kubelets:
            with kubelet.lock:
                running = [
                    r for (ns, _), r in kubelet.pods.items() if ns == namespace and r.running()
                ]
            for runtime in running:
                assert runtime.popen is not None
                with contextlib.suppress(psutil.NoSuchProcess):
                    main = psutil.Process(runtime.popen.pid)
                    for process in [main, *main.children(recursive=True)]:
                        out.append(
                            f"--- {runtime.name} pid {process.pid}: {' '.join(process.cmdline())}"
                        )
                        out.append(py_spy_dump(process.pid))
        return "\n".join(out)

    def find(self, namespace: str, pod: str) -> Kubelet:
        for kubelet in self.kubelets:
            with kubelet.lock:
                if (namespace, pod) in kubelet.pods:
                    return kubelet
        raise LookupError(f"no kubelet runs pod {namespace}/{pod}")

    def kill(self, namespace: str, pod: str) -> None:
        self.find(namespace, pod).kill(namespace, pod)

    def oom_kill(self, namespace: str, pod: str) -> None:
        self.find(namespace, pod).oom_kill(namespace, pod)

    def terminate(self, namespace: str, pod: str) -> None:
        self.find(namespace, pod).terminate(namespace, pod)
