"""torchrun, with exit codes that still say what happened.

Run as (what every pod runs): python -m kubetrain_trainer.launch --config /etc/kubetrain/config.yaml
Locally, torchrun options may come first:
    python -m kubetrain_trainer.launch --standalone --nproc-per-node 2 --config cfg.yaml

torchrun takes its topology from the PET_* environment the operator sets (PET_NNODES,
PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT). Plain torchrun exits 1
whenever a worker fails, which hides whether a rank hit a configuration error (78: retrying
cannot help) or was preempted after saving a checkpoint (75: resume). This runs torchrun's own
code in-process and passes those worker exit codes through.
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

from kubetrain_trainer.config import EXIT_CONFIG_ERROR, EXIT_PREEMPTED


def torchrun_argv(argv: list[str]) -> list[str]:
    """Insert `--module kubetrain_trainer` between torchrun options and trainer options."""
    split = argv.index("--config") if "--config" in argv else len(argv)
    return [*argv[:split], "--module", "kubetrain_trainer", *argv[split:]]


def exit_code(failure: ChildFailedError) -> int:
    codes = {f.exitcode for f in failure.failures.values()}
    # A config error on any rank decides the outcome; it is never worth a retry.
    for meaningful in (EXIT_CONFIG_ERROR, EXIT_PREEMPTED):
        if meaningful in codes:
            return meaningful
    return 1


def main(argv: list[str] | None = None) -> int:
    try:
        run(parse_args(torchrun_argv(sys.argv[1:] if argv is None else argv)))
    except ChildFailedError as failure:
        return exit_code(failure)
    except SignalException as signalled:
        # SIGTERM reached torchrun itself (pod deletion): it forwarded the signal, and the
        # workers checkpointed and exited 75 before it returned. Its own exit reports the
        # signal, 128 + 15, as any terminated process does; the operator treats that, like
        # 75, as a preemption to resume from.
        return 128 + int(signalled.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
