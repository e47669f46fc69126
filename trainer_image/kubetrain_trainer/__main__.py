"""The trainer's entry point: one TrainerConfig file in, a trained model out.

Run as: python -m kubetrain_trainer --config FILE
  (or under torchrun / kubetrain_trainer.launch for several processes)

Exit codes (contract.ExitCode): 0 done; 78 the config or data is wrong (the message says which
field, file and line; retrying cannot help); 75 stopped by SIGTERM after saving a
checkpoint (rerun to resume); 72 training became unstable (NaN/inf loss, exploding
gradients: training.stability); 71 the device ran out of memory. The failure message also
goes to the container's termination message file, where the operator reads it into the
TrainingRun's conditions.
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
    OUT_OF_MEMORY_PREFIX,
    TERMINATION_LOG,
    UNSTABLE_PREFIX,
    ExitCode,
    TrainerMetricsFile,
    config_error_message,
    outputs_message,
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
    for noisy in ("transformers", "datasets", "accelerate", "torch", "httpx", "urllib3", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def write_termination_message(message: str) -> None:
    """Leave the outcome where Kubernetes copies it into the pod's status.

    In a pod the kubelet has created the file before the container starts; elsewhere (a
    laptop) there is none and nothing is written, unless KUBETRAIN_TERMINATION_LOG names one.
    """
    override = os.environ.get("KUBETRAIN_TERMINATION_LOG")
    path = Path(override or TERMINATION_LOG)
    if (override and path.parent.is_dir()) or (path.is_file() and os.access(path, os.W_OK)):
        # Kubernetes keeps at most 4096 bytes of it.
        path.write_text(message[:4000])


def run(cfg: TrainerConfig) -> dict:
    from kubetrain_trainer.metrics import write_metrics_json
    from kubetrain_trainer.session import Session, leave_process_group
    from kubetrain_trainer.storage import stage

    # From here on the trainer sees local folders only (s3:// and hf:// are fetched, an
    # s3:// output is worked on locally and published).
    cfg, remote_output = stage(cfg)
    session = Session(cfg, remote_output=remote_output)
    if cfg.method == "evaluate":
        summary = evaluation_summary(cfg, session)
    else:
        summary = training_summary(cfg, session)
    if session.is_main_process:
        # Written last: a metrics.json means the final model is complete.
        write_metrics_json(cfg.output_dir, summary)
    leave_process_group()
    if session.is_main_process:
        # After the barrier, so the other ranks need not wait while rank 0 draws.
        write_report_or_warn(cfg)
        if remote_output is not None:
            remote_output.publish_final()
    return summary.model_dump(mode="json", exclude_unset=True)


def write_report_or_warn(cfg: TrainerConfig) -> None:
    """Write the run's report.html; a report is for reading, so failing it fails no run."""
    try:
        from kubetrain_trainer.report import write_run_report

        path = write_run_report(cfg.output_dir, run_name=cfg.run_name)
    except Exception as e:
        log.warning("the run finished, but its report could not be written: %r", e)
        return
    log.info("report: %s", path)


def training_summary(cfg: TrainerConfig, session) -> TrainerMetricsFile:
    from kubetrain_trainer.metrics import summarize_run
    from kubetrain_trainer.session import preflight

    method = importlib.import_module(f"kubetrain_trainer.methods.{cfg.method}")
    preflight(cfg)
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
    session.record_data(summary)
    summary.replica_checksums = result.replica_checksums
    summary.per_device_train_batch_size = result.trainer._train_batch_size
    summary.gradient_accumulation_steps = result.trainer.args.gradient_accumulation_steps
    if result.merged_dir:
        summary.merged_dir = result.merged_dir
    return summary


def evaluation_summary(cfg: TrainerConfig, session) -> TrainerMetricsFile:
    from kubetrain_trainer.methods.evaluate import evaluate

    metrics = evaluate(cfg)
    if session.prometheus is not None:
        session.prometheus.record_evaluation(metrics)
    return TrainerMetricsFile.model_validate(
        {"method": cfg.method, "runtime_seconds": session.runtime(), **metrics}
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kubetrain_trainer", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--config", required=True, help="TrainerConfig YAML or JSON file")
    args = parser.parse_args(argv)
    setup_logging()
    from kubetrain_trainer.session import NoBatchSizeFits, Preempted
    from kubetrain_trainer.stability import TrainingUnstable

    try:
        cfg = load_trainer_config(args.config)
        summary = run(cfg)
    except ConfigError as e:
        from kubetrain_trainer.storage import remote_names

        # A bad line in a downloaded file is named by its remote URI, not the local copy.
        message = config_error_message(remote_names(str(e)))
        log.error("%s", message)
        write_termination_message(message)
        return ExitCode.CONFIG_ERROR
    except Preempted as e:
        log.warning("%s; checkpoint saved, rerun to resume", e)
        write_termination_message(preempted_message(str(e)))
        return ExitCode.PREEMPTED
    except TrainingUnstable as e:
        message = f"{UNSTABLE_PREFIX}: {e}"
        log.error("%s", message)
        write_termination_message(message)
        return ExitCode.TRAINING_UNSTABLE
    except Exception as e:
        oom = e if isinstance(e, NoBatchSizeFits) else device_out_of_memory(e)
        if oom is not None:
            said = str(oom).strip() or type(oom).__name__
            message = f"{OUT_OF_MEMORY_PREFIX}: {said.splitlines()[0]}"
            log.error("%s", message)
            write_termination_message(message)
            return ExitCode.DEVICE_OUT_OF_MEMORY
        # Anything else (lost peer, storage) is worth a retry: say what it was.
        write_termination_message(f"{type(e).__name__}: {e}")
        raise
    log.info("done: %s", json.dumps(summary, default=str))
    # The operator copies these into status.outputs.metrics (it cannot read the output).
    write_termination_message(outputs_message(summary))
    return ExitCode.OK


def device_out_of_memory(error: BaseException) -> BaseException | None:
    """torch's OutOfMemoryError (CUDA and other accelerators) behind `error`, if any: the
    libraries between the step and here may have wrapped it."""
    torch = sys.modules.get("torch")
    seen: BaseException | None = error
    while seen is not None and torch is not None:
        if isinstance(seen, torch.OutOfMemoryError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def exit_process(code: int) -> None:
    """Exit with `code`; a rank of a process group leaves at once (see leave_process_group)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        from kubetrain_trainer.data import remove_scratch

        remove_scratch()  # os._exit skips the atexit hook that would
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    exit_process(main())
