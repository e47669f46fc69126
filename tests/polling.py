"""Waiting in tests: poll for a condition, never sleep blindly; stop a server within a bound.

`wait_for` polls until a check returns something truthy and fails naming what it waited
for (and what it saw last); `hold` asserts a check stays true for a while. API errors,
missing keys and lookups that find nothing yet count as "not yet". Both the operator tests
(emulated API) and the cluster tier (real control plane) use them.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from typing import Any, TypeVar

from kubernetes.client.exceptions import ApiException

T = TypeVar("T")


def wait_for(check: Callable[[], T], what: str, timeout: float = 30.0, interval: float = 0.1) -> T:
    """Poll `check` until it returns something truthy; fail naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (ApiException, KeyError, LookupError) as e:
            last = e
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last saw: {last!r}")


def hold(check: Callable[[], bool], what: str, seconds: float = 1.0) -> None:
    """Assert `check` stays true for `seconds` (several reconcile intervals)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert check(), what
        time.sleep(0.05)


def stop_process(process: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM `process`, and SIGKILL it if it has not exited `timeout` seconds later."""
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
