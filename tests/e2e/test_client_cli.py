"""The cluster commands as a user types them, against the real control plane.

`kubetrain submit` applies a run file; `kubetrain logs -f` streams rank 0's lines as they
are written and, after rank 0's pod is killed, goes on into attempt 2's pod; `kubetrain get
runs NAME --watch` shows the step advancing; `kubetrain wait` exits 0 when the run succeeds
and 1 with the reason on a configuration error. Refusals are one line that says what to
do: not found, no kube context, forbidden (a service account no one bound a role to) and no
CRDs (a second apiserver over the same etcd, with nothing installed). Each command is the
installed entry point, run with the cluster's kubeconfig. The Python client makes the same
calls against the cluster and, with backend "local", against this machine, in one
parametrised test.
"""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e_runs import Runs, tiny_spec
from example_specs import example, with_spec
from polling import wait_for

from kubetrain import k8s
from kubetrain.api import TrainingRun
from kubetrain.client import Client, RunFailed

pytestmark = pytest.mark.e2e

KUBETRAIN = str(Path(sys.executable).parent / "kubetrain")
STEP = re.compile(r"^step (\d+)/", re.MULTILINE)


def kubetrain(runs: Runs, *args: str, timeout: float = 120, env: dict | None = None):
    return subprocess.run(
        [KUBETRAIN, *args, "-n", runs.namespace],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or runs.cluster.plane.env(),
        check=False,
    )


def run_file(tmp_path: Path, name: str, spec: dict) -> Path:
    path = tmp_path / f"{name}.yaml"
    doc = {"apiVersion": "kubetrain.dev/v1alpha1", "kind": "TrainingRun",
           "metadata": {"name": name}, "spec": spec}  # fmt: skip
    path.write_text(yaml.safe_dump(doc))
    return path


class Streamed:
    """A command's stdout read line by line in a thread, as a person watches it."""

    def __init__(self, runs: Runs, *args: str) -> None:
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [KUBETRAIN, *args, "-n", runs.namespace],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=runs.cluster.plane.env(),
        )
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait(timeout=30)
        self.thread.join(timeout=30)


def test_submit_follow_watch_and_wait_as_a_user_types_them(runs: Runs, tmp_path: Path) -> None:
    spec = tiny_spec(
        "trainingrun-from-scratch-tiny.yaml",
        "cli",
        training={"maxSteps": 150, "saveSteps": 20, "evalSteps": 20, "loggingSteps": 5},
        restartPolicy={"maxRestarts": 2},
    )
    submitted = kubetrain(runs, "submit", str(run_file(tmp_path, "cli", spec)))
    assert submitted.returncode == 0, submitted.stderr
    assert submitted.stdout.strip() == "trainingrun.kubetrain.dev/cli created"
    again = kubetrain(runs, "submit", str(run_file(tmp_path, "cli", spec)))
    assert again.stdout.strip() == "trainingrun.kubetrain.dev/cli unchanged", again.stdout

    logs = Streamed(runs, "logs", "cli", "-f")
    watch = Streamed(runs, "get", "runs", "cli", "--watch", "--interval", "0.5")
    try:
        # Lines arrive while rank 0 trains, not all at the end.
        wait_for(lambda: STEP.search(logs.text), "rank 0's first step in `kubetrain logs -f`", 180)
        assert runs.status("cli").get("phase") != "Succeeded"
        wait_for(lambda: runs.status("cli").get("latestCheckpoint"), "a checkpoint", 120)
        runs.kill("cli-1", 0)
        waited = kubetrain(runs, "wait", "cli", "--timeout", "300", timeout=320)
        assert waited.returncode == 0, waited.stderr
        assert waited.stdout.startswith("trainingrun/cli Succeeded"), waited.stdout
        logs.process.wait(timeout=120)  # following ends once the run is done
    finally:
        logs.stop()
        watch.stop()
    assert runs.status("cli")["attempt"] == 2
    # Attempt 2's lines followed attempt 1's: the log resumes and ends with the last step.
    assert "resum" in logs.text.lower(), logs.text[-3000:]
    assert "done step 150/150" in logs.text, logs.text[-3000:]
    rows = [line for line in watch.lines if line.startswith("cli ")]
    steps = [int(m.group(1)) for row in rows if (m := re.search(r"\b(\d+)/150\b", row))]
    # The step advanced between redraws (it goes back once, to attempt 2's checkpoint).
    assert any(later > earlier for earlier, later in itertools.pairwise(steps)), watch.text[-3000:]

    shown = kubetrain(runs, "describe", "cli")
    assert "Phase:      Succeeded" in shown.stdout and "Events:" in shown.stdout, shown.stdout


def test_wait_exits_1_with_the_reason_of_a_config_error(runs: Runs, tmp_path: Path) -> None:
    # Chats cannot pretrain a model from scratch; only the trainer finds out, reading them.
    spec = tiny_spec("trainingrun-from-scratch-tiny.yaml", "chats")
    spec["data"] = {"train": "pvc://datasets/sft-messages.jsonl", "format": "messages"}
    spec["training"]["evalStrategy"] = "no"
    assert kubetrain(runs, "submit", str(run_file(tmp_path, "chats", spec))).returncode == 0
    waited = kubetrain(runs, "wait", "chats", "--timeout", "240", timeout=260)
    assert waited.returncode == 1, (waited.stdout, waited.stderr)
    assert waited.stderr.startswith("TrainingRun chats failed: ConfigError: "), waited.stderr
    assert "from_scratch pretrains on raw text" in waited.stderr


def test_refusals_are_one_line(runs: Runs, tmp_path: Path) -> None:
    missing = kubetrain(runs, "wait", "nothing-here")
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"error: no TrainingRun or Pipeline or Sweep nothing-here in namespace {runs.namespace}"
    ]
    no_cluster = kubetrain(
        runs, "get", env={**runs.cluster.plane.env(), "KUBECONFIG": str(tmp_path / "none")}
    )
    assert no_cluster.returncode == 2
    (line,) = no_cluster.stderr.strip().splitlines()
    assert line.startswith("error: no Kubernetes cluster is configured"), line


def test_a_user_without_rights_is_told_whom_to_ask(runs: Runs, tmp_path: Path) -> None:
    # A service account nobody bound a role to: RBAC refuses it, as it would a new colleague.
    plane = runs.cluster.plane
    plane.kubectl("create", "serviceaccount", "newcomer", "-n", runs.namespace)
    token = plane.kubectl("create", "token", "newcomer", "-n", runs.namespace).stdout.strip()
    config = yaml.safe_load(plane.kubeconfig.read_text())
    config["users"] = [{"name": "admin", "user": {"token": token}}]
    kubeconfig = tmp_path / "newcomer.kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(config))
    refused = kubetrain(runs, "get", "runs", env={**plane.env(), "KUBECONFIG": str(kubeconfig)})
    assert refused.returncode == 2, (refused.stdout, refused.stderr)
    (line,) = refused.stderr.strip().splitlines()
    assert line.startswith("error: forbidden: "), line
    assert f"system:serviceaccount:{runs.namespace}:newcomer" in line
    assert "kubetrain-edit" in line


def test_a_cluster_without_the_crds_says_how_to_install_them(runs: Runs, tmp_path: Path) -> None:
    with runs.cluster.plane.bare_apiserver() as kubeconfig:
        env = {**runs.cluster.plane.env(), "KUBECONFIG": str(kubeconfig)}
        run = run_file(tmp_path, "x", tiny_spec("trainingrun-sft-tiny.yaml", "x"))
        for args in (("get", "runs"), ("submit", str(run)), ("describe", "x")):
            refused = kubetrain(runs, *args, env=env)
            assert refused.returncode == 2, (args, refused.stdout, refused.stderr)
            (line,) = refused.stderr.strip().splitlines()
            assert line == (
                "error: the kubetrain CRDs are not installed in this cluster: helm install "
                "kubetrain charts/kubetrain (or kubectl apply -f crds/)"
            ), (args, line)


@pytest.mark.parametrize("backend", ["local", "kubernetes"])
def test_the_python_client_trains_follows_and_waits_on_either_backend(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The same calls against the cluster and against this machine (one argument apart)."""
    steps = {"maxSteps": 60, "saveSteps": 30, "evalSteps": 30, "loggingSteps": 5}
    if backend == "kubernetes":
        runs: Runs = request.getfixturevalue("runs")
        client = Client(runs.namespace, kubeconfig=runs.cluster.plane.kubeconfig)
        request.addfinalizer(k8s.configure)  # the next user of kubetrain.k8s starts afresh
        spec = tiny_spec("trainingrun-from-scratch-tiny.yaml", "py", training=steps)
        bad = tiny_spec("trainingrun-from-scratch-tiny.yaml", "py-chats")
    else:
        client = Client(backend="local", workdir=tmp_path / "local")
        doc = example("trainingrun-from-scratch-tiny.yaml")
        spec = with_spec(doc, output=str(tmp_path / "py"), training=steps)["spec"]
        bad = with_spec(doc, output=str(tmp_path / "py-chats"))["spec"]
    bad["data"] = {"train": bad["data"]["train"].replace("pretrain.jsonl", "sft-messages.jsonl"),
                   "format": "messages"}  # fmt: skip
    bad["training"]["evalStrategy"] = "no"

    def trainingrun(name: str, body: dict) -> dict:
        return {"apiVersion": "kubetrain.dev/v1alpha1", "kind": "TrainingRun",
                "metadata": {"name": name}, "spec": body}  # fmt: skip

    ((submitted, action),) = client.submit(trainingrun("py", spec))
    assert (submitted.metadata.name, action) == ("py", "created")
    followed: list[str] = []
    reader = threading.Thread(target=lambda: followed.extend(client.logs("py", follow=True)))
    reader.start()
    seen: list[tuple[str | None, int | None]] = []

    def note(run: Any) -> None:
        progress = run.status.progress if run.status else None
        seen.append((run.status.phase if run.status else None, progress and progress.step))

    done = client.wait("py", timeout=300, callback=note, interval=0.5)
    reader.join(timeout=120)
    assert isinstance(done, TrainingRun) and done.status is not None
    assert done.status.phase == "Succeeded"
    assert done.status.outputs is not None and "eval_loss" in (done.status.outputs.metrics or {})
    assert seen[-1][0] == "Succeeded" and any(step for _phase, step in seen), seen
    assert any(STEP.match(line) for line in followed), followed[-20:]
    assert any("done step 60/60" in line for line in followed), followed[-20:]
    assert [r.metadata.name for r in client.list("TrainingRun")] == ["py"]

    client.submit(trainingrun("py-chats", bad))
    with pytest.raises(RunFailed) as failed:
        client.wait("py-chats", timeout=240, interval=0.5)
    said = str(failed.value)
    assert "failed: ConfigError: " in said and "from_scratch pretrains on raw text" in said
