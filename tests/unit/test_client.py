"""The client's pure parts: how names pick a kind, what refusals say, what the tables show.

The cluster tier runs the commands against the real apiserver; here the apiserver's own
error bodies (as it sends them for an unknown resource, a missing object and RBAC) are fed
to `k8s.explain`, so each refusal is one line that says what to do.
"""

from __future__ import annotations

import json

import pytest
from kubernetes.client.exceptions import ApiException
from kubernetes.config import ConfigException
from rich.console import Console

from kubetrain import k8s
from kubetrain.api import TrainingRun
from kubetrain.client import ClientProblem, split_kind
from kubetrain.cluster_cli import describe_lines, objects_table, progress_bar, row_cells

NOT_FOUND_RESOURCE = {  # GET .../trainingruns/x when the CRD is not installed
    "kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404,
    "message": "the server could not find the requested resource",
    "details": {},
}  # fmt: skip
NOT_FOUND_OBJECT = {
    "kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404,
    "message": 'trainingruns.kubetrain.dev "x" not found',
    "details": {"name": "x", "group": "kubetrain.dev", "kind": "trainingruns"},
}  # fmt: skip
FORBIDDEN = {
    "kind": "Status", "status": "Failure", "reason": "Forbidden", "code": 403,
    "message": 'trainingruns.kubetrain.dev is forbidden: User "ana" cannot list resource '
    '"trainingruns" in API group "kubetrain.dev" in the namespace "ml"',
    "details": {"group": "kubetrain.dev", "kind": "trainingruns"},
}  # fmt: skip


def api_error(status: int, body: dict) -> ApiException:
    e = ApiException(status=status, reason=body["reason"])
    e.body = json.dumps(body)
    return e


@pytest.mark.parametrize(
    ("error", "says"),
    [
        (ConfigException("Invalid kube-config file."), "no Kubernetes cluster is configured"),
        (api_error(404, NOT_FOUND_RESOURCE), "the kubetrain CRDs are not installed in this "
         "cluster: helm install kubetrain charts/kubetrain"),
        (api_error(404, NOT_FOUND_OBJECT), "TrainingRun ml/x not found"),
        (api_error(403, FORBIDDEN), 'forbidden: trainingruns.kubetrain.dev is forbidden: User '
         '"ana" cannot list'),
    ],
    ids=["no-context", "no-crds", "not-found", "forbidden"],
)  # fmt: skip
def test_each_refusal_is_one_line_that_says_what_to_do(error: Exception, says: str) -> None:
    problem = k8s.explain(error, "TrainingRun ml/x")
    assert isinstance(problem, ClientProblem)
    assert str(problem).startswith(says) and "\n" not in str(problem)


def test_a_missing_object_reads_as_absent_and_a_missing_kind_as_an_error() -> None:
    assert k8s.explain(api_error(404, NOT_FOUND_OBJECT), "x").args[0] == "x not found"
    with pytest.raises(ValueError):
        k8s.explain(ValueError("a bug"), "x")  # not an API refusal: re-raised as it is


@pytest.mark.parametrize(
    ("name", "kind", "bare"),
    [("tr/sft", "TrainingRun", "sft"), ("pipeline/p", "Pipeline", "p"),
     ("sweeps/s", "Sweep", "s"), ("sft", None, "sft")],
)  # fmt: skip
def test_names_may_carry_their_kind(name: str, kind: str | None, bare: str) -> None:
    assert split_kind(name) == (kind, bare)


def test_an_unknown_kind_prefix_is_refused() -> None:
    with pytest.raises(ClientProblem, match="use tr/, pipeline/ or sweep/"):
        split_kind("job/x")


T_DONE = "2026-12-01T12:05:00Z"


def run(**status) -> TrainingRun:
    return TrainingRun.model_validate(
        {
            "apiVersion": "kubetrain.dev/v1alpha1",
            "kind": "TrainingRun",
            "metadata": {"name": "sft", "creationTimestamp": "2026-12-01T12:00:00Z"},
            "spec": {"method": "sft", "model": {"name": "m"}, "data": {"train": "pvc://d/t"},
                     "output": "pvc://m/sft"},
            "status": status or None,
        }
    )  # fmt: skip


def test_the_table_row_of_a_running_run() -> None:
    now = 1796126400.0 + 125  # 2m5s after creation
    cells = row_cells(
        run(
            phase="Running",
            restarts=1,
            progress={"step": 60, "totalSteps": 150, "loss": 2.345678, "eta": "40s", "percent": 40},
        ),
        now,
    )
    assert cells == [
        "sft", "TrainingRun", "Running", progress_bar(40), "60/150", "2.346", "40s", "1", "2m",
    ]  # fmt: skip
    assert progress_bar(40) == "████████░░░░░░░░░░░░ 40%"
    assert row_cells(run(), now)[2:5] == ["-", "-", "-"]


def test_a_terminal_gets_rich_progress_bars_and_a_pipe_characters() -> None:
    running = run(phase="Running", progress={"step": 60, "totalSteps": 150, "percent": 40})

    def drawn(terminal: bool) -> str:
        console = Console(
            width=120, force_terminal=terminal, color_system="truecolor" if terminal else None
        )
        with console.capture() as captured:
            console.print(objects_table([running, run()], now=0, terminal=terminal))
        return captured.get()

    on_terminal, in_pipe = drawn(True), drawn(False)
    assert "\x1b[" in on_terminal and "40%" in on_terminal  # rich's coloured bar
    assert "\x1b[" not in in_pipe and progress_bar(40) in in_pipe
    assert progress_bar(40) not in on_terminal


def test_describe_shows_conditions_outputs_and_events() -> None:
    finished = run(
        phase="Succeeded",
        attempt=2,
        restarts=1,
        conditions=[{"type": "Ready", "status": "True", "reason": "Completed",
                     "message": "attempt 2 completed", "lastTransitionTime": T_DONE}],
        outputs={"modelUri": "pvc://m/sft", "metrics": {"eval_loss": 1.5}},
    )  # fmt: skip
    events = [{"type": "Normal", "reason": "Restarting", "message": "attempt 1 failed"}]
    lines = describe_lines(finished, events)
    assert "Phase:      Succeeded" in lines
    assert "Attempt:    2 (restarts 1)" in lines
    assert "  Ready=True Completed: attempt 2 completed" in lines
    assert "  eval_loss: 1.5" in lines
    assert lines[-1] == "  Normal Restarting: attempt 1 failed"
