"""Test hook: the trainer's training loop hangs once, as a collective waiting for a lost
peer would, while its process and metrics endpoint stay up.

Put on the trainer's PYTHONPATH with KUBETRAIN_TEST_STALL_AT_STEP=N (see
tests/e2e/test_e2e_safety_nets.py). The first time any attempt reaches step N (a marker in
the output folder remembers it), that step stops until SIGTERM arrives (the pod's
deletion), then goes on, so the trainer checkpoints and exits as on any SIGTERM. Python
imports this file at start-up in every process of the pod; only the trainer's patch bites.
"""

import os

STALL_AT_STEP = os.environ.get("KUBETRAIN_TEST_STALL_AT_STEP")

if STALL_AT_STEP:
    import time
    from pathlib import Path

    import transformers

    original_training_step = transformers.Trainer.training_step

    def training_step(self, *args, **kwargs):
        marker = Path(self.args.output_dir) / ".stalled-once"
        if self.state.global_step == int(STALL_AT_STEP) and not marker.exists():
            from kubetrain_trainer.checkpoints import sigterm_received

            marker.write_text("stalled\n")
            print(f"test hook: stalling at step {STALL_AT_STEP} until SIGTERM", flush=True)
            while not sigterm_received():
                time.sleep(0.2)
        return original_training_step(self, *args, **kwargs)

    transformers.Trainer.training_step = training_step
