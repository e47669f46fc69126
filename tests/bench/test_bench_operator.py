"""Benchmark: the operator at scale on the real control plane (issue 10, part 4).

Run as: make bench   (alone: .venv/bin/pytest -m bench -s tests/bench -k operator; root)

A fresh TestCluster per scenario, its TrainingRun pods stubbed (kubelet.StubPods: Running at
once, no process, one shared /metrics page that advances a step a second) and the
apiserver's audit log on. The chart is installed with helm for its CRDs, ServiceAccount and
RBAC (replicaCount=0); the operator runs here as `kubetrain operator` processes with a
TokenRequest token of the chart's ServiceAccount (RBAC enforced), so that their RSS
(/proc/<pid>/status) and /metrics can be read. Then RUNS tiny TrainingRuns are created at
once in NAMESPACES namespaces, and measured:
- seconds until all their Jobs exist, and until all runs are Running;
- p50/p99 of kubetrain_reconcile_duration_seconds (from the histogram's buckets), during
  the start and while the runs sit Running;
- the operator's peak RSS (VmHWM), and its CPU (share of a core, and per reconcile);
- API requests per second the operator sends (audit events by user and credential, so
  each replica apart), by verb and resource, in windows of WINDOW seconds: all runs
  Running, half of them finished (their pods end Succeeded), all finished.
Scenarios: one standalone replica, then two replicas under kopf peering (the active one
and the standby apart). It asserts nothing about speed; it fails when the setup breaks.

Environment: KUBETRAIN_BENCH_RUNS (1000), KUBETRAIN_BENCH_NAMESPACES (10),
KUBETRAIN_BENCH_INTERVAL (the operator's --reconcile-interval, 10 as in production),
KUBETRAIN_BENCH_WINDOW (seconds per measured window, 60), KUBETRAIN_BENCH_REPLICAS
(scenarios, "1,2"), KUBETRAIN_BENCH_PROFILE ("tracemalloc": each replica traces its
allocations from when it is up, and writes the live ones by traceback, and a census of
objects by type, when all runs are Running and after each window: replica-N.profile.K.txt
in the scenario's folder, see tests/bench/profiling; "memstats": glibc's and pymalloc's
figures and the RSS after malloc_trim(0) at the same points, untraced). The machine is
shared: the load average is printed with the figures.
"""

from __future__ import annotations

import base64
import collections
import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "cluster"))
sys.path.insert(0, str(REPO / "tests" / "e2e"))

from cluster import TestCluster  # noqa: E402
from controlplane import free_port  # noqa: E402
from e2e_runs import OPERATOR_NAMESPACE, OPERATOR_RELEASE, helm  # noqa: E402

from kubetrain.api import GROUP, LABEL_RUN, PLURAL, VERSION  # noqa: E402

pytestmark = pytest.mark.bench

RUNS = int(os.environ.get("KUBETRAIN_BENCH_RUNS", "1000"))
NAMESPACES = int(os.environ.get("KUBETRAIN_BENCH_NAMESPACES", "10"))
INTERVAL = float(os.environ.get("KUBETRAIN_BENCH_INTERVAL", "10"))
WINDOW = float(os.environ.get("KUBETRAIN_BENCH_WINDOW", "60"))
REPLICAS = [int(r) for r in os.environ.get("KUBETRAIN_BENCH_REPLICAS", "1,2").split(",")]
PROFILE = os.environ.get("KUBETRAIN_BENCH_PROFILE", "")
OPERATOR_USER = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_RELEASE}"
CREDENTIAL_ID = "authentication.kubernetes.io/credential-id"
CLAIM = "data"
# Generous: the point is to measure, but a broken setup must not hang for an hour.
START_TIMEOUT = max(300.0, RUNS * 1.0) * (
    4 if PROFILE == "tracemalloc" else 1
)  # traced: several times slower


def run_spec(name: str) -> dict[str, Any]:
    """The tiny from_scratch example, its data and output on the namespace's claim."""
    doc = yaml.safe_load(
        (REPO / "examples" / "cluster" / "trainingrun-from-scratch-tiny.yaml").read_text()
    )
    spec = doc["spec"]
    for key in ("train", "eval"):
        spec["data"][key] = spec["data"][key].replace("pvc://examples/", f"pvc://{CLAIM}/")
    spec["output"] = f"pvc://{CLAIM}/outputs/{name}"
    return spec


# --- the operator processes ------------------------------------------------------------


@dataclass
class Replica:
    """One `kubetrain operator` process with a token of its own (told apart in the audit
    log by the token's JTI, the credential-id the apiserver records)."""

    index: int
    folder: Path
    metrics_port: int = field(default_factory=free_port)
    liveness_port: int = field(default_factory=free_port)
    jti: str = ""
    process: subprocess.Popen | None = None
    rss_samples: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"replica-{self.index}"

    @property
    def log(self) -> Path:
        return self.folder / f"{self.name}.log"

    @property
    def profile(self) -> Path:
        return self.folder / f"{self.name}.profile"

    def signal_profile(self) -> None:
        """Start tracing (first time) or write the live allocations (see tests/bench/profiling)."""
        if PROFILE:
            Path(f"{self.profile}.go").touch()

    def start(self, cluster: TestCluster, peering: str | None) -> None:
        token = cluster.kubectl(
            "create", "token", OPERATOR_RELEASE, "-n", OPERATOR_NAMESPACE, "--duration=6h"
        ).stdout.strip()
        payload = token.split(".")[1]
        self.jti = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["jti"]
        kubeconfig = self.folder / f"{self.name}.kubeconfig"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [
                        {
                            "name": "bench",
                            "cluster": {
                                "server": cluster.plane.server,
                                "certificate-authority": str(cluster.plane.ca.cert_file),
                            },
                        }
                    ],
                    "users": [{"name": "operator", "user": {"token": token}}],
                    "contexts": [
                        {"name": "bench", "context": {"cluster": "bench", "user": "operator"}}
                    ],
                    "current-context": "bench",
                }
            )
        )
        argv = [
            str(REPO / ".venv" / "bin" / "kubetrain"),
            "operator",
            f"--metrics-port={self.metrics_port}",
            f"--liveness-port={self.liveness_port}",
            f"--reconcile-interval={INTERVAL}",
        ]
        if peering:
            argv.append(f"--peering={peering}")
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
        env["KUBECONFIG"] = str(kubeconfig)
        if PROFILE:
            env["KUBETRAIN_PROFILE_MODE"] = PROFILE
            env["PYTHONPATH"] = str(Path(__file__).parent / "profiling")
            env["KUBETRAIN_PROFILE_OUT"] = str(self.profile)
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                ["setpriv", "--pdeathsig", "KILL", *argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )

    def healthy(self) -> bool:
        self.check_alive()
        try:
            return requests.get(f"http://127.0.0.1:{self.liveness_port}/healthz", timeout=2).ok
        except requests.RequestException:
            return False

    def check_alive(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])
            raise AssertionError(f"operator {self.name} exited {self.process.returncode}:\n{tail}")

    def proc_status(self, key: str) -> int:
        """A /proc/<pid>/status figure in bytes (VmRSS, VmHWM)."""
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise LookupError(key)

    def sample_rss(self) -> None:
        self.rss_samples.append(self.proc_status("VmRSS"))

    def cpu_seconds(self) -> float:
        assert self.process is not None
        return cpu_seconds(self.process.pid)

    def reconcile_histogram(self) -> dict[float, float]:
        """kubetrain_reconcile_duration_seconds: cumulative count per bucket bound."""
        text = requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).text
        buckets: dict[float, float] = {}
        for family in text_string_to_metric_families(text):
            if family.name != "kubetrain_reconcile_duration_seconds":
                continue
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    buckets[float(sample.labels["le"])] = sample.value
        return buckets

    def stop(self) -> None:
        if PROFILE and self.process is not None and self.process.poll() is None:
            self.signal_profile()  # the last profile, also when the scenario failed
            deadline = time.monotonic() + 300
            while Path(f"{self.profile}.go").exists() and time.monotonic() < deadline:
                time.sleep(1)
            time.sleep(30)  # written after the trigger is taken (a census takes a while)
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def quantile(q: float, before: dict[float, float], after: dict[float, float]) -> float | None:
    """histogram_quantile over the observations between two histogram readings."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    rank = q * counts[-1]
    lower, below = 0.0, 0.0
    for bound, count in zip(bounds, counts, strict=True):
        if count >= rank:
            if bound == float("inf"):
                return lower  # above the highest finite bucket: its bound is all we know
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-9)
        lower, below = bound, count
    return None


def quantiles(
    before: dict[float, float], after: dict[float, float]
) -> tuple[float | None, float | None]:
    """p50 and p99 of what was observed between two readings."""
    return quantile(0.5, before, after), quantile(0.99, before, after)


# --- the audit log ---------------------------------------------------------------------


def parse_time(stamp: str) -> float:
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


class Audit:
    """The operator's requests from the apiserver's audit log, read as it grows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        # (time, credential JTI, "verb resource[/subresource]") of each finished request
        self.requests: list[tuple[float, str, str]] = []

    def read(self) -> None:
        with self.path.open("rb") as log:
            log.seek(self.offset)
            data = log.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        for line in data[:end].splitlines():
            event = json.loads(line)
            if event.get("stage") != "ResponseComplete":
                continue
            user = event.get("user") or {}
            if user.get("username") != OPERATOR_USER:
                continue
            ref = event.get("objectRef") or {}
            resource = ref.get("resource") or event.get("requestURI", "?").split("?")[0]
            if ref.get("subresource"):
                resource += "/" + ref["subresource"]
            credential = ((user.get("extra") or {}).get(CREDENTIAL_ID) or [""])[0]
            self.requests.append(
                (
                    parse_time(event["requestReceivedTimestamp"]),
                    credential.removeprefix("JTI="),
                    f"{event['verb']} {resource}",
                )
            )

    def window(self, start: float, end: float, jti: str) -> collections.Counter[str]:
        """Requests by `verb resource` of one replica, received in [start, end)."""
        self.read()
        return collections.Counter(
            what for when, who, what in self.requests if start <= when < end and who == jti
        )


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class JobWatch:
    """The runs' Jobs as a watch brings them, and when the last new one came.

    Polling a list of a thousand Jobs twice a second would cost the apiserver measured
    megabytes a second; the watch sends each Job once, and times it to the event.
    """

    def __init__(self, batch: k8s_client.BatchV1Api) -> None:
        self.batch = batch
        self.names: set[tuple[str, str]] = set()
        self.last_added = 0.0
        self.response: Any = None
        self.stopped = False
        self.error = ""
        listed = json.loads(
            batch.list_job_for_all_namespaces(label_selector=LABEL_RUN, _preload_content=False).data
        )
        self.add(listed["items"])
        self.thread = threading.Thread(
            target=self.follow, args=(listed["metadata"]["resourceVersion"],), daemon=True
        )
        self.thread.start()

    def add(self, jobs: list[dict[str, Any]]) -> None:
        for job in jobs:
            meta = job["metadata"]
            self.names.add((meta["namespace"], meta["name"]))
        self.last_added = time.monotonic()

    def follow(self, since: str) -> None:
        while not self.stopped:
            self.response = self.batch.list_job_for_all_namespaces(
                label_selector=LABEL_RUN,
                watch=True,
                resource_version=since,
                allow_watch_bookmarks=True,
                timeout_seconds=600,
                _preload_content=False,
            )
            pending = b""
            try:
                for chunk in self.response.stream(65536):
                    *lines, pending = (pending + chunk).split(b"\n")
                    for line in lines:
                        event = json.loads(line)
                        if event["type"] == "ERROR":  # 410: the count can no longer be trusted
                            self.error = event["object"].get("message", "watch error")
                            return
                        since = event["object"]["metadata"].get("resourceVersion", since)
                        if event["type"] == "ADDED":
                            self.add([event["object"]])
            except Exception as e:
                if not self.stopped:
                    self.error = f"the watch of Jobs failed: {e}"
                return

    def count(self) -> int:
        if self.error:
            raise AssertionError(f"benchmark setup: {self.error}")
        return len(self.names)

    def stop(self) -> None:
        self.stopped = True
        if self.response is not None:
            self.response.close()


# --- one scenario ----------------------------------------------------------------------


@dataclass
class Window:
    name: str
    seconds: float
    by_replica: dict[str, collections.Counter[str]]
    reconcile: dict[str, tuple[float | None, float | None]]
    reconciles_per_second: dict[str, float]
    cpu_per_second: dict[str, float]  # CPU-seconds the replica used per second of the window
    scrapes_per_second: float
    load: float


@dataclass
class Result:
    replicas: int
    jobs_seconds: float | None = None
    running_seconds: float | None = None
    start_reconcile: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    windows: list[Window] = field(default_factory=list)
    peak_rss: dict[str, int] = field(default_factory=dict)
    kubelet_sync_max: float = 0.0
    roles: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class Scenario:
    def __init__(self, tmp: Path, replicas: int) -> None:
        self.tmp = tmp
        self.cluster = TestCluster(tmp / "cluster", stub_pods=True, audit=(OPERATOR_USER,))
        self.replicas = [Replica(i, tmp) for i in range(replicas)]
        self.result = Result(replicas)
        self.runs = [(f"bench-{i % NAMESPACES}", f"run-{i:04d}") for i in range(RUNS)]

    # --- setup -------------------------------------------------------------------------

    def start(self) -> None:
        started = time.monotonic()
        self.cluster.start()
        admin = k8s_client.Configuration()
        k8s_config.load_kube_config(
            config_file=str(self.cluster.kubeconfig), client_configuration=admin
        )
        admin.connection_pool_maxsize = 32
        api = k8s_client.ApiClient(admin)
        self.api = api
        self.custom = k8s_client.CustomObjectsApi(api)
        self.batch = k8s_client.BatchV1Api(api)
        self.cluster.create_namespace(OPERATOR_NAMESPACE)
        helm(
            self.cluster,
            "install",
            OPERATOR_RELEASE,
            str(REPO / "charts" / "kubetrain"),
            "--namespace",
            OPERATOR_NAMESPACE,
            "--set",
            "replicaCount=0",
            "--set",
            "peering.enabled=true",
            "--set",
            "dashboard.enabled=false",
            "--wait",
            "--timeout",
            "3m",
        )
        for index in range(NAMESPACES):
            self.cluster.create_namespace(f"bench-{index}")
            self.cluster.create_claim(f"bench-{index}", CLAIM)
        peering = OPERATOR_RELEASE if len(self.replicas) > 1 else None
        for replica in self.replicas:
            replica.start(self.cluster, peering)
        for replica in self.replicas:
            self.wait(replica.healthy, f"operator {replica.name} /healthz", 120)
        if peering:
            time.sleep(10)  # kopf peering: the replicas meet and all but one pause
        for replica in self.replicas:
            replica.signal_profile()
        self.audit = Audit(self.cluster.plane.audit_log)
        self.served_at_start = self.apiserver_requests()
        print(f"\n[bench] {len(self.replicas)} replica(s): cluster and operator up in "
              f"{time.monotonic() - started:.0f}s; {self.rss()}", flush=True)  # fmt: skip

    def stop(self) -> None:
        for replica in self.replicas:
            replica.stop()
        self.cluster.stop()

    def wait(self, check, what: str, timeout: float, every: float = 0.5) -> Any:
        """Poll `check`, failing clearly when time is up or a component or replica died."""
        deadline = time.monotonic() + timeout
        while True:
            self.cluster.check_alive()
            for replica in self.replicas:
                replica.check_alive()
            result = check()
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"benchmark setup: no {what} after {timeout:.0f}s")
            time.sleep(every)

    # --- reading the cluster ---------------------------------------------------------------

    def apiserver_requests(self) -> float:
        """Requests the apiserver has served since it started (apiserver_request_total)."""
        response = self.api.call_api("GET", f"{self.api.configuration.host}/metrics")
        response.read()
        return sum(
            sample.value
            for family in text_string_to_metric_families(response.data.decode())
            if family.name == "apiserver_request"
            for sample in family.samples
            if sample.name == "apiserver_request_total"
        )

    def cpu_by_process(self) -> dict[str, float]:
        """CPU-seconds used so far by each part: the control plane's processes, the
        operator's replicas, and this process (the kubelets, stub pods and the client)."""
        assert self.cluster.plane is not None
        used = {name: cpu_seconds(process.pid) for name, process in self.cluster.plane.processes}
        used.update({r.name: r.cpu_seconds() for r in self.replicas})
        used["benchmark and kubelets"] = cpu_seconds(os.getpid())
        return used

    def job_count(self) -> int:
        return self.jobs.count()

    def phases(self) -> collections.Counter[str]:
        answer = self.custom.list_cluster_custom_object(
            GROUP, VERSION, PLURAL, resource_version="0", _preload_content=False
        )
        return collections.Counter(
            (item.get("status") or {}).get("phase", "-")
            for item in json.loads(answer.data)["items"]
        )

    def sample_rss(self) -> None:
        for replica in self.replicas:
            replica.sample_rss()

    def rss(self) -> str:
        """Each replica's RSS now and its peak so far (where the memory grew)."""
        return ", ".join(
            f"{r.name} RSS {r.proc_status('VmRSS') / 2**20:.0f} MiB "
            f"(peak {r.proc_status('VmHWM') / 2**20:.0f})"
            for r in self.replicas
        )

    def histograms(self) -> dict[str, dict[float, float]]:
        return {r.name: r.reconcile_histogram() for r in self.replicas}

    # --- the measurements ------------------------------------------------------------------

    def create_runs(self) -> None:
        def create(run: tuple[str, str]) -> None:
            namespace, name = run
            body = {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "TrainingRun",
                "metadata": {"name": name, "namespace": namespace},
                "spec": run_spec(name),
            }
            self.custom.create_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, body, _preload_content=False
            )

        before = self.histograms()
        self.jobs = JobWatch(self.batch)
        cpu_before = self.cpu_by_process()
        t0 = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(create, self.runs))
        created = time.monotonic() - t0
        print(f"[bench] created {RUNS} TrainingRuns in {created:.1f}s; {self.rss()}", flush=True)

        def all_jobs() -> bool:
            self.sample_rss()
            return self.job_count() >= RUNS

        self.wait(all_jobs, f"{RUNS} Jobs", START_TIMEOUT)
        self.result.jobs_seconds = self.jobs.last_added - t0
        self.jobs.stop()
        cpu = self.cpu_by_process()
        elapsed = time.monotonic() - t0
        self.result.notes.append(
            "CPU from the first create to the last Job, in cores: "
            + ", ".join(f"{name} {(cpu[name] - cpu_before[name]) / elapsed:.2f}" for name in cpu)
        )
        print(f"[bench] all {RUNS} Jobs after {self.result.jobs_seconds:.1f}s; {self.rss()}",
              flush=True)  # fmt: skip

        def all_running() -> bool:
            self.sample_rss()
            return self.phases().get("Running", 0) >= RUNS

        self.wait(all_running, f"{RUNS} runs Running", START_TIMEOUT, every=2)
        self.result.running_seconds = time.monotonic() - t0
        print(f"[bench] all {RUNS} runs Running after {self.result.running_seconds:.1f}s; "
              f"{self.rss()}", flush=True)  # fmt: skip
        for replica in self.replicas:
            replica.signal_profile()
        after = self.histograms()
        self.result.start_reconcile = {name: quantiles(before[name], after[name]) for name in after}

    def measure(self, name: str) -> None:
        """One window: settle for an interval, then count for WINDOW seconds."""
        time.sleep(INTERVAL)
        before = self.histograms()
        cpu_before = {r.name: r.cpu_seconds() for r in self.replicas}
        scrapes = self.cluster.stubs.metrics.requests
        start = time.time()
        deadline = time.monotonic() + WINDOW
        while time.monotonic() < deadline:
            self.sample_rss()
            for replica in self.replicas:
                replica.check_alive()
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
        end = time.time()
        after = self.histograms()
        cpu = {
            r.name: (r.cpu_seconds() - cpu_before[r.name]) / (end - start) for r in self.replicas
        }
        time.sleep(2)  # the audit log's last lines
        window = Window(
            name,
            end - start,
            {r.name: self.audit.window(start, end, r.jti) for r in self.replicas},
            {r.name: quantiles(before[r.name], after[r.name]) for r in self.replicas},
            {
                r.name: (after[r.name].get(float("inf"), 0) - before[r.name].get(float("inf"), 0))
                / (end - start)
                for r in self.replicas
            },
            cpu,
            (self.cluster.stubs.metrics.requests - scrapes) / (end - start),
            os.getloadavg()[0],
        )
        self.result.windows.append(window)
        rates = ", ".join(
            f"{r}: {sum(c.values()) / window.seconds:.1f} req/s"
            for r, c in window.by_replica.items()
        )
        print(f"[bench] window {name}: {rates}; load {window.load:.1f}; {self.rss()}", flush=True)
        for replica in self.replicas:
            replica.signal_profile()

    def finish(self, runs: list[tuple[str, str]]) -> None:
        for namespace, name in runs:
            self.cluster.stubs.finish(namespace, name)

    def run(self) -> Result:
        self.create_runs()
        self.measure("all Running")
        half = RUNS // 2
        self.finish(self.runs[:half])
        self.wait(
            lambda: self.phases().get("Succeeded", 0) >= half, f"{half} runs Succeeded", 600, 2
        )
        self.measure("half done")
        self.finish(self.runs[half:])
        self.wait(
            lambda: self.phases().get("Succeeded", 0) >= RUNS, f"{RUNS} runs Succeeded", 600, 2
        )
        self.measure("all done")
        for replica in self.replicas:
            self.result.peak_rss[replica.name] = replica.proc_status("VmHWM")
        self.result.kubelet_sync_max = max(k.sync_max for k in self.cluster.nodes.kubelets)
        # In a peering, the replica that sent the requests is the active one.
        first = self.result.windows[0].by_replica
        busiest = max(first, key=lambda r: sum(first[r].values()))
        self.result.roles = {
            r.name: ("active" if r.name == busiest else "standby")
            if len(self.replicas) > 1
            else "standalone"
            for r in self.replicas
        }
        self.audit.read()
        sent = len(self.audit.requests)
        served = self.apiserver_requests() - self.served_at_start
        self.result.notes.append(
            f"the apiserver served {served:.0f} requests from the operator's start to the end "
            f"(every client: controllers, kubelets, this benchmark); the operator sent {sent}"
        )
        return self.result


# --- the report ------------------------------------------------------------------------


def fmt(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f}ms" if seconds < 1 else f"{seconds:.2f}s"


def report(results: list[Result]) -> str:
    lines = [
        "",
        f"Operator at scale: {RUNS} TrainingRuns in {NAMESPACES} namespaces, reconcile "
        f"interval {INTERVAL:g}s, {WINDOW:g}s windows ({os.cpu_count()} cores, shared)",
        "",
    ]
    header = f"{'scenario':<26}{'replica':<24}{'figure':<38}value"
    lines += [header, "-" * len(header)]
    for result in results:
        scenario = "1 replica" if result.replicas == 1 else f"{result.replicas} replicas, peering"

        def row(
            replica: str, figure: str, value: str, scenario: str = scenario, lines=lines
        ) -> None:
            lines.append(f"{scenario:<26}{replica:<24}{figure:<38}{value}")

        row("", "all Jobs exist after", fmt(result.jobs_seconds))
        row("", "all runs Running after", fmt(result.running_seconds))
        for name, role in result.roles.items():
            label = f"{name} ({role})"
            p50, p99 = result.start_reconcile.get(name, (None, None))
            row(label, "reconcile p50 / p99, start", f"{fmt(p50)} / {fmt(p99)}")
            for window in result.windows:
                p50, p99 = window.reconcile[name]
                count = window.by_replica[name]
                rate = sum(count.values()) / window.seconds
                row(label, f"req/s, {window.name}", f"{rate:.1f}")
                row(label, f"reconcile p50 / p99, {window.name}", f"{fmt(p50)} / {fmt(p99)}")
                row(
                    label,
                    f"reconciles/s, {window.name}",
                    f"{window.reconciles_per_second[name]:.1f}",
                )
                visits = window.reconciles_per_second[name]
                cpu = window.cpu_per_second[name]
                per_visit = f", {cpu / visits * 1000:.0f} ms per reconcile" if visits else ""
                row(label, f"CPU, {window.name}", f"{cpu * 100:.0f}% of a core{per_visit}")
            row(label, "peak RSS", f"{result.peak_rss.get(name, 0) / 2**20:.0f} MiB")
        for window in result.windows:
            row("", f"metric scrapes/s, {window.name}", f"{window.scrapes_per_second:.1f}")
            row("", f"load average, {window.name}", f"{window.load:.1f}")
        row("", "kubelet's longest sync", fmt(result.kubelet_sync_max))
        lines.append("")
        for window in result.windows:
            for name, count in window.by_replica.items():
                if not count:
                    continue
                top = ", ".join(
                    f"{what} {n / window.seconds:.2f}" for what, n in count.most_common(8)
                )
                lines.append(f"  {scenario}, {name}, {window.name}: {top} (req/s)")
        lines += [f"  {note}" for note in result.notes]
        lines.append("")
    return "\n".join(lines)


@pytest.mark.timeout(4 * 3600)
def test_operator_at_scale(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("the operator benchmark needs root: the process kubelet makes a bridge")
    results = []
    for replicas in REPLICAS:
        scenario = Scenario(tmp_path / f"replicas-{replicas}", replicas)
        try:
            scenario.start()
            results.append(scenario.run())
        finally:
            scenario.stop()
        print(report(results[-1:]), flush=True)
    print(report(results), flush=True)
