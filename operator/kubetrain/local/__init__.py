"""Run TrainingRuns, Pipelines and Sweeps here, with no cluster: what `kubetrain run` does.

The names below load their module when first used (PEP 562), so that what imports one part
(the client's local backend, the operator's CLI) does not load Optuna with the sweeps.
"""

from __future__ import annotations

import importlib
from typing import Any

_MODULE_OF = {
    "LocalPipelineRun": "pipeline",
    "StageOutcome": "pipeline",
    "run_pipeline_locally": "pipeline",
    "LocalRun": "runner",
    "run_locally": "runner",
    "trainer_command": "runner",
    "LocalSweepRun": "sweep",
    "run_sweep_locally": "sweep",
}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
