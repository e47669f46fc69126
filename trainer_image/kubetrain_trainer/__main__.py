"""The trainer's entry point: one TrainerConfig file in, a trained model out.

Run as: python -m kubetrain_trainer --config FILE
  (or under torchrun / kubetrain_trainer.launch for several processes)

Exit codes (contract.ExitCode): 0 done; 78 the config or data is wrong (the message says which
field, file and line; retrying cannot help); 75 stopped by SIGTERM after saving a
checkpoint (rerun to resume). The failure message also goes to the container's termination
message file, where the operator reads it into the TrainingRun's conditions.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from kubetrain_trainer.config import ConfigError, TrainerConfig, load_trainer_config
from kubetrain_trainer.contract import (
    TERMINATION_LOG,
    ExitCode,
    TrainerMetricsFile,
    config_error_message,
    preempted_message,
)

log = logging.getLogger("kubetrain_trainer")


def setup_logging() -> None:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # Keep the libraries' own INFO chatter and deprecation notices (which the user cannot
    # act on: they concern TRL's calls into transformers) out of the run log.
    warnings.filterwarnings("ignore", category=FutureWarning)
    for noisy in ("transformers", "datasets", "accelerate", "torch", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def write_termination_message(message: str) -> None:
    """Leave the reason where Kubernetes copies it into the pod's status."""
    path = Path(os.environ.get("KUBETRAIN_TERMINATION_LOG", TERMINATION_LOG))
    if path.parent.is_dir() and os.access(path.parent if not path.exists() else path, os.W_OK):
        # Kubernetes keeps at most 4096 bytes of it.
        path.write_text(message[:4000])


def run(cfg: TrainerConfig) -> dict:
    from kubetrain_trainer.metrics import summarize_run, write_metrics_json
    from kubetrain_trainer.session import Session, leave_process_group

    method = importlib.import_module(f"kubetrain_trainer.methods.{cfg.method}")
    session = Session(cfg)
    result = method.train(cfg, session)
    state = result.trainer.state
    summary = TrainerMetricsFile.model_validate(
        summarize_run(
            cfg.method,
            state.log_history,
            result.train_output,
            session.runtime(),
            state.num_input_tokens_seen,
            tokens_at_start=session.tokens_at_start(),
        )
    )
    summary.replica_checksums = result.replica_checksums
    if result.merged_dir:
        summary.merged_dir = result.merged_dir
    if session.is_main_process:
        # Written last: a metrics.json means the final model is complete.
        write_metrics_json(cfg.output_dir, summary)
    leave_process_group()
    return summary.model_dump(mode="json", exclude_unset=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kubetrain_trainer", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--config", required=True, help="TrainerConfig YAML or JSON file")
    args = parser.parse_args(argv)
    setup_logging()
    from kubetrain_trainer.session import Preempted

    try:
        cfg = load_trainer_config(args.config)
        summary = run(cfg)
    except ConfigError as e:
        message = config_error_message(str(e))
        log.error("%s", message)
        write_termination_message(message)
        return ExitCode.CONFIG_ERROR
    except Preempted as e:
        log.warning("%s; checkpoint saved, rerun to resume", e)
        write_termination_message(preempted_message(str(e)))
        return ExitCode.PREEMPTED
    except Exception as e:
        # Anything else (OOM, lost peer, storage) is worth a retry: say what it was.
        write_termination_message(f"{type(e).__name__}: {e}")
        raise
    log.info("done: %s", json.dumps(summary, default=str))
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
