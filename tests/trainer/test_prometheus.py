"""A real Prometheus server scrapes a live `kubetrain run`, and its /metrics pass promtool.

The tiny from_scratch example, made long, trains with its metrics on a free port; a
Prometheus server (Debian's package) on loopback scrapes it every second. The stored step
must rise, the tokens counter must have a positive rate(), and the endpoint as served must
pass `promtool check metrics`. SIGTERM then stops the run with its checkpoint.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from example_specs import example, with_spec
from prometheus_tools import PrometheusServer, check_metrics, needs_prometheus, needs_promtool

from kubetrain.local.runner import free_port, read_local_metrics
from kubetrain_trainer.contract import STEP, TOKENS_TOTAL

pytestmark = [pytest.mark.slow, needs_prometheus, needs_promtool]

KUBETRAIN = str(Path(sys.executable).parent / "kubetrain")


def test_prometheus_scrapes_a_live_run_whose_metrics_pass_promtool(tmp_path: Path) -> None:
    doc = with_spec(
        example("trainingrun-from-scratch-tiny.yaml"),
        output=str(tmp_path / "scraped"),
        training={"maxSteps": 5000, "saveSteps": 5000, "loggingSteps": 2, "evalStrategy": "no"},
    )
    spec = tmp_path / "scraped.yaml"
    spec.write_text(yaml.safe_dump(doc))
    metrics_port = free_port()
    with (tmp_path / "run.log").open("w") as log:
        run = subprocess.Popen(
            [KUBETRAIN, "run", str(spec), "--metrics-port", str(metrics_port)],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    server = PrometheusServer(tmp_path, free_port(), [f"127.0.0.1:{metrics_port}"])
    try:
        first = server.wait_value(STEP, above=0, timeout=240)
        assert server.wait_value(STEP, above=first) > first
        assert server.wait_value(f"rate({TOKENS_TOTAL}[10s])", above=0) > 0
        assert server.wait_value('up{job="kubetrain-trainer"}', above=0) == 1
        exposition = read_local_metrics(metrics_port)
        assert exposition is not None and TOKENS_TOTAL in exposition
        check_metrics(exposition)
    finally:
        run.send_signal(signal.SIGTERM)
        code = run.wait(180)
        server.stop()
    assert code == 128 + signal.SIGTERM, (tmp_path / "run.log").read_text()[-3000:]
