"""Run TrainingRuns on this machine, no cluster: the embedded default behind `kubetrain run`."""

from kubetrain.local.runner import LocalRun, run_locally, trainer_command

__all__ = ["LocalRun", "run_locally", "trainer_command"]
