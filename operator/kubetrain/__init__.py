"""kubetrain: TrainingRun and Pipeline custom resources, their operator and local runner."""

__version__ = "0.1.0"
