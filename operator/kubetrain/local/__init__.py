"""Run TrainingRuns and Pipelines here, with no cluster: the default behind `kubetrain run`."""

from kubetrain.local.pipeline import LocalPipelineRun, StageOutcome, run_pipeline_locally
from kubetrain.local.runner import LocalRun, run_locally, trainer_command

__all__ = [
    "LocalPipelineRun",
    "LocalRun",
    "StageOutcome",
    "run_locally",
    "run_pipeline_locally",
    "trainer_command",
]
