"""Settings for every test: offline, quiet tokenizers.

Helpers that tests import live in uniquely named modules (example_specs.py here), never in
a conftest.py: several folders have one, and `from conftest import` would pick any of them.
"""

from __future__ import annotations

import os

# Nothing may come from a model hub, and tokenizers' thread pool must not fork-warn.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
