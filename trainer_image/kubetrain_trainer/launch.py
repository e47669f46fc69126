"""torchrun, with exit codes that still say what happened.

Run as (what every pod runs): python -m kubetrain_trainer.launch --config /etc/kubetrain/config.yaml
Locally, torchrun options may come first:
    python -m kubetrain_trainer.launch --standalone --nproc-per-node 2 --config cfg.yaml

torchrun takes its topology from the PET_* environment the operator sets (PET_NNODES,
PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT). Plain torchrun exits 1
whenever a worker fails, which hides whether a rank hit a configuration error (78: retrying
cannot help), became unstable (72), ran out of device memory (71) or was preempted after
saving a checkpoint (75: resume). This runs torchrun's own code in-process and passes those
worker exit codes through.

Before torchrun starts, every node waits for rank 0's address (PET_MASTER_ADDR, a DNS name
that exists only once rank 0's pod is scheduled) to resolve, for as long as the rendezvous
may take (`timeout=` in PET_RDZV_CONF, the operator's restartPolicy.startupTimeoutSeconds),
saying every 30 s that it waits, and exits 1 with a message that names the address if it
never resolves.
"""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Callable

from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

from kubetrain_trainer.contract import ExitCode

# torchrun's own deadline for the static rendezvous when --rdzv-conf sets none
# (torch.distributed.launcher.api.LaunchConfig).
TORCHRUN_RDZV_TIMEOUT_SECONDS = 900
RESOLVE_REPORT_EVERY_SECONDS = 30
RESOLVE_RETRY_SECONDS = 1


def torchrun_argv(argv: list[str]) -> list[str]:
    """Insert `--module kubetrain_trainer` between torchrun options and trainer options."""
    split = argv.index("--config") if "--config" in argv else len(argv)
    return [*argv[:split], "--module", "kubetrain_trainer", *argv[split:]]


def exit_code(failure: ChildFailedError) -> int:
    codes = {f.exitcode for f in failure.failures.values()}
    # A config error on any rank decides the outcome; it is never worth a retry. Then the
    # codes a retry policy tells apart: instability, out of memory, preemption.
    for meaningful in (
        ExitCode.CONFIG_ERROR,
        ExitCode.TRAINING_UNSTABLE,
        ExitCode.DEVICE_OUT_OF_MEMORY,
        ExitCode.PREEMPTED,
    ):
        if meaningful in codes:
            return meaningful
    return 1


def rendezvous_timeout(rdzv_conf: str) -> int:
    """The `timeout=` of torchrun's --rdzv-conf (PET_RDZV_CONF), else torchrun's default."""
    for item in rdzv_conf.split(","):
        key, _, value = item.partition("=")
        if key.strip() == "timeout" and value.strip():
            return int(value)
    return TORCHRUN_RDZV_TIMEOUT_SECONDS


def _report(message: str) -> None:
    print(f"kubetrain launch: {message}", file=sys.stderr, flush=True)


def wait_until_resolvable(
    host: str,
    port: int | None,
    timeout_seconds: float,
    *,
    resolve: Callable[..., object] = socket.getaddrinfo,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    report: Callable[[str], None] = _report,
) -> bool:
    """Whether `host` resolved within `timeout_seconds`; reports every 30 s while it waits.

    Rank 0 waits too: its own workers dial the same name, which the headless Service
    publishes only once the pod has an IP.
    """
    start = clock()
    next_report = start
    while True:
        try:
            resolve(host, port, type=socket.SOCK_STREAM)
            return True
        except OSError as e:
            error = e
        waited = clock() - start
        if waited >= timeout_seconds:
            return False
        if clock() >= next_report:
            report(
                f"waiting for rank 0's address {host} to resolve ({waited:.0f} s of "
                f"{timeout_seconds:.0f} s; rank 0's pod may not be scheduled yet): {error}"
            )
            next_report += RESOLVE_REPORT_EVERY_SECONDS
        sleep(min(RESOLVE_RETRY_SECONDS, timeout_seconds - waited))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(torchrun_argv(sys.argv[1:] if argv is None else argv))
    # Multi-node (static rendezvous at PET_MASTER_ADDR); --standalone runs need no peers.
    if args.rdzv_backend == "static" and not args.standalone:
        timeout = rendezvous_timeout(args.rdzv_conf)
        if not wait_until_resolvable(args.master_addr, args.master_port, timeout):
            _report(
                f"rank 0's address {args.master_addr} did not resolve within {timeout} s "
                "(restartPolicy.startupTimeoutSeconds); check that rank 0's pod was "
                "scheduled (multi-node runs want a gang scheduler such as Kueue) and that "
                "the headless Service exists"
            )
            return 1
    try:
        run(args)
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
