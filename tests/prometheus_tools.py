"""Prometheus' own tools for the tests: promtool, and a Prometheus server on loopback.

Both come from Debian's prometheus package (`apt-get install --no-install-recommends
prometheus`; .ci/run installs it). A test that needs one skips without it on a developer's
machine, but fails under .ci/run (KUBETRAIN_CI=1), so CI never passes by skipping.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from polling import stop_process

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")


def needs(tool: str | None, name: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        tool is None and not os.environ.get("KUBETRAIN_CI"),
        reason=f"needs {name} on PATH (apt-get install --no-install-recommends prometheus)",
    )


needs_promtool = needs(PROMTOOL, "promtool")
needs_prometheus = needs(PROMETHEUS, "prometheus")


def promtool(*args: str, stdin: str | None = None, cwd: Path | None = None) -> str:
    """Run promtool; fail with its output unless it exits 0 and reports no problem."""
    assert PROMTOOL is not None, "promtool is not on PATH (apt-get install prometheus)"
    done = subprocess.run(
        [PROMTOOL, *args], input=stdin, capture_output=True, text=True, cwd=cwd, timeout=120
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"promtool {' '.join(args)} exited {done.returncode}:\n{output}"
    return output


def check_metrics(exposition: str) -> None:
    """`promtool check metrics`: it prints nothing and exits 0 when every metric is clean."""
    output = promtool("check", "metrics", stdin=exposition)
    assert not output.strip(), output


class PrometheusServer:
    """A Prometheus server on 127.0.0.1 scraping `targets` every second, in `workdir`."""

    def __init__(self, workdir: Path, port: int, targets: list[str]) -> None:
        assert PROMETHEUS is not None, "prometheus is not on PATH (apt-get install prometheus)"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "kubetrain-trainer",
                                "static_configs": [{"targets": targets}]}],
        }  # fmt: skip
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{port}"
        self.log = (workdir / "prometheus.log").open("w")
        self.process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def query(self, expr: str) -> list[dict[str, Any]] | None:
        """The instant vector `expr` selects now, or None while the server does not answer."""
        try:
            response = requests.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=5)
            response.raise_for_status()
        except requests.RequestException:
            assert self.process.poll() is None, f"prometheus exited {self.process.returncode}"
            return None
        return response.json()["data"]["result"]

    def wait_value(self, expr: str, above: float, timeout: float = 120) -> float:
        """Poll `expr` until its single sample's value exceeds `above`; returns the value."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            result = self.query(expr)
            if result:
                last = float(result[0]["value"][1])
                if last > above:
                    return last
            time.sleep(0.5)
        raise AssertionError(f"{expr} never rose above {above} in {timeout:.0f}s (last {last})")

    def stop(self) -> None:
        stop_process(self.process)
        self.log.close()
