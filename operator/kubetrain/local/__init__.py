"""Run TrainingRuns, Pipelines and Sweeps here, with no cluster: what `kubetrain run` does."""

from kubetrain.local.pipeline import LocalPipelineRun, StageOutcome, run_pipeline_locally
from kubetrain.local.runner import LocalRun, run_locally, trainer_command
from kubetrain.local.sweep import LocalSweepRun, run_sweep_locally

__all__ = [
    "LocalPipelineRun",
    "LocalRun",
    "LocalSweepRun",
    "StageOutcome",
    "run_locally",
    "run_pipeline_locally",
    "run_sweep_locally",
    "trainer_command",
]
