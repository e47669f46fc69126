"""kubetrain_trainer: the containerized trainer (from_scratch, sft, lora, dpo).

Run as: python -m kubetrain_trainer --config FILE
"""

__version__ = "0.1.0"
