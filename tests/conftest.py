"""Settings for every test: offline, quiet tokenizers.

Helpers that tests import live in uniquely named modules (example_specs.py here), never in
a conftest.py: several folders have one, and `from conftest import` would pick any of them.
The one fixture here, `s3_server`, is a real S3 server for every tier (tests/s3_server.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from s3_server import S3Server

# Nothing may come from a model hub, and tokenizers' thread pool must not fork-warn.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3 server (versitygw, tests/s3_server.py) on loopback for the whole session;
    skips without the binary (`make cluster-tools`), fails so under KUBETRAIN_CI."""
    from s3_server import S3Server  # only sessions that use it pay for the import

    server = S3Server(tmp_path_factory.mktemp("s3"))
    try:
        yield server
    finally:
        server.stop()
