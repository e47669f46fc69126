"""The pod's launcher before torchrun: rank 0's address, the rendezvous deadline.

Nothing trains here: a fake resolver and clock drive the wait for rank 0's DNS name, and
torchrun's own argument parsing and rendezvous registry read the environment the operator
renders, to show which deadline torchrun really applies.
"""

from __future__ import annotations

import datetime
import socket

import pytest
from torch.distributed.elastic.rendezvous import RendezvousParameters
from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler
from torch.distributed.run import config_from_args, parse_args

from kubetrain.api import TrainingRun
from kubetrain.render import render_trainingrun
from kubetrain_trainer import launch


class FakeDns:
    """getaddrinfo that fails until `resolves_at` on a fake clock that sleep advances."""

    def __init__(self, resolves_at: float | None) -> None:
        self.now = 0.0
        self.resolves_at = resolves_at
        self.lookups: list[tuple[str, int | None]] = []
        self.reports: list[str] = []

    def resolve(self, host: str, port: int | None, **_: object) -> list[object]:
        self.lookups.append((host, port))
        if self.resolves_at is None or self.now < self.resolves_at:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [object()]

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def wait(self, timeout: float) -> bool:
        return launch.wait_until_resolvable(
            "run-0-0.run", 29500, timeout, resolve=self.resolve, clock=lambda: self.now,
            sleep=self.sleep, report=self.reports.append,
        )  # fmt: skip


def test_waits_for_rank_0s_address_and_says_so_every_30_seconds() -> None:
    dns = FakeDns(resolves_at=75)
    assert dns.wait(3600)
    assert dns.now == 75
    assert dns.lookups[0] == ("run-0-0.run", 29500)
    assert len(dns.reports) == 3  # at 0 s, 30 s and 60 s
    assert dns.reports[1].startswith("waiting for rank 0's address run-0-0.run to resolve (30 s")
    assert "of 3600 s" in dns.reports[1] and "Name or service not known" in dns.reports[1]


def test_a_name_that_resolves_at_once_costs_one_lookup_and_no_message() -> None:
    dns = FakeDns(resolves_at=0)
    assert dns.wait(3600)
    assert (len(dns.lookups), dns.reports, dns.now) == (1, [], 0)


def test_gives_up_at_the_timeout() -> None:
    dns = FakeDns(resolves_at=None)
    assert not dns.wait(90)
    assert dns.now == 90
    assert len(dns.reports) == 3


def test_main_exits_1_naming_the_address_when_it_never_resolves(monkeypatch, capsys) -> None:
    waited: list[tuple[str, int, int]] = []

    def never(host: str, port: int, timeout: int) -> bool:
        waited.append((host, port, timeout))
        return False

    def not_reached(args: object) -> None:
        raise AssertionError("torchrun started without rank 0's address")

    monkeypatch.setattr(launch, "wait_until_resolvable", never)
    monkeypatch.setattr(launch, "run", not_reached)
    monkeypatch.setenv("PET_MASTER_ADDR", "run-0-0.run")
    monkeypatch.setenv("PET_MASTER_PORT", "29500")
    monkeypatch.setenv("PET_RDZV_CONF", "timeout=120")
    assert launch.main(["--nnodes", "2", "--node-rank", "1", "--config", "c.yaml"]) == 1
    assert waited == [("run-0-0.run", 29500, 120)]
    err = capsys.readouterr().err
    assert "rank 0's address run-0-0.run did not resolve within 120 s" in err
    assert "restartPolicy.startupTimeoutSeconds" in err


def test_standalone_runs_do_not_wait(monkeypatch) -> None:
    ran: list[object] = []
    monkeypatch.setattr(launch, "wait_until_resolvable", lambda *a: pytest.fail("waited"))
    monkeypatch.setattr(launch, "run", ran.append)
    assert launch.main(["--standalone", "--nproc-per-node", "2", "--config", "c.yaml"]) == 0
    assert len(ran) == 1


@pytest.mark.parametrize(
    ("conf", "seconds"),
    [
        ("timeout=7200", 7200),
        ("join_timeout=5, timeout=60", 60),
        ("", 900),
        ("read_timeout=9", 900),
    ],
)
def test_rendezvous_timeout_reads_torchruns_rdzv_conf(conf: str, seconds: int) -> None:
    assert launch.rendezvous_timeout(conf) == seconds


def test_torchrun_waits_for_the_other_nodes_as_long_as_the_spec_says(monkeypatch) -> None:
    run = TrainingRun.model_validate(
        {
            "apiVersion": "kubetrain.dev/v1alpha1",
            "kind": "TrainingRun",
            "metadata": {"name": "run"},
            "spec": {
                "method": "sft",
                "model": {"name": "Qwen/Qwen2.5-0.5B"},
                "data": {"train": "pvc://datasets/train.jsonl"},
                "output": "pvc://outputs/run",
                "resources": {"nodes": 2, "procPerNode": 2},
                "restartPolicy": {"startupTimeoutSeconds": 7200},
            },
        }
    )
    (job,) = [o for o in render_trainingrun(run, 0) if o["kind"] == "Job"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    for var in container["env"]:
        # Only PET_NODE_RANK comes from elsewhere (the completion index): say node 1.
        monkeypatch.setenv(var["name"], var.get("value", "1"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = parse_args(launch.torchrun_argv(container["command"][3:]))
    config, _, _ = config_from_args(args)
    assert (config.rdzv_backend, config.rdzv_configs) == ("static", {"timeout": "7200", "rank": 1})
    handler = get_rendezvous_handler(
        RendezvousParameters(
            backend=config.rdzv_backend,
            endpoint=config.rdzv_endpoint,
            run_id=config.run_id,
            min_nodes=config.min_nodes,
            max_nodes=config.max_nodes,
            **config.rdzv_configs,
        )
    )
    # The static rendezvous's TCPStore waits this long for every node to connect.
    assert handler.timeout == datetime.timedelta(seconds=7200)
    assert (handler.master_addr, handler.rank, handler.world_size) == ("run-0-0.run", 1, 2)
