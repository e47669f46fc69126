"""The URL the operator reads rank 0's metrics from: IPv6 pod IPs need brackets."""

from __future__ import annotations

import pytest

from kubetrain.k8s import metrics_url


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("10.244.1.7", "http://10.244.1.7:9400/metrics"),
        ("fd00:10:244::7", "http://[fd00:10:244::7]:9400/metrics"),
        ("::1", "http://[::1]:9400/metrics"),
        ("sft-0.sft.ml.svc", "http://sft-0.sft.ml.svc:9400/metrics"),
    ],
)
def test_metrics_url(host: str, url: str) -> None:
    assert metrics_url(host, 9400) == url
