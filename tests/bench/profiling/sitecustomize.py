"""Memory profile of a benchmarked operator process (KUBETRAIN_BENCH_PROFILE=tracemalloc).

The benchmark puts this folder on the operator's PYTHONPATH, so Python imports it at start.
A thread watches for `<KUBETRAIN_PROFILE_OUT>.go` (a signal handler would run in the event
loop's thread, between any two bytecodes): the first one starts tracemalloc (the benchmark
writes it when the operator is up, so that startup is not traced), every later one writes
the live allocations traced since then by line and by traceback (`<out>.<n>.txt`, the
largest first) and a census of the objects the garbage collector tracks, by type.
"""

from __future__ import annotations

import collections
import ctypes
import gc
import os
import sys
import threading
import time
import tracemalloc

_OUT = os.environ.get("KUBETRAIN_PROFILE_OUT", "")
_MODE = os.environ.get("KUBETRAIN_PROFILE_MODE", "tracemalloc")
_FRAMES = 8
_TOP = 30
_dumps = 0


def _census() -> list[str]:
    sizes: collections.Counter[str] = collections.Counter()
    counts: collections.Counter[str] = collections.Counter()
    for obj in gc.get_objects():
        kind = type(obj).__qualname__
        counts[kind] += 1
        sizes[kind] += sys.getsizeof(obj)
    top = sizes.most_common(25)
    return [f"{size / 2**20:8.1f} MiB {counts[kind]:9d}  {kind}" for kind, size in top]


def _dump() -> None:
    global _dumps
    _dumps += 1
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)]
    )
    lines = [f"traced now {tracemalloc.get_traced_memory()[0] / 2**20:.1f} MiB, "
             f"peak {tracemalloc.get_traced_memory()[1] / 2**20:.1f} MiB"]  # fmt: skip
    by_line = snapshot.statistics("lineno")
    lines.append(f"\n== top {_TOP} lines")
    lines += [f"{s.size / 2**20:8.2f} MiB {s.count:9d}  {s.traceback[0]}" for s in by_line[:_TOP]]
    lines.append(f"\n== top {_TOP} tracebacks (innermost last)")
    for stat in snapshot.statistics("traceback")[:_TOP]:
        lines.append(f"\n{stat.size / 2**20:.2f} MiB in {stat.count} blocks")
        lines += [f"    {frame}" for frame in stat.traceback.format()[-2 * _FRAMES :]]
    lines.append("\n== objects the garbage collector tracks, by type (shallow sizes)")
    lines += _census()
    with open(f"{_OUT}.{_dumps}.txt", "w") as out:
        out.write("\n".join(lines) + "\n")


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def _memstats() -> None:
    """Where the RSS is: glibc's heap (in use, free) and pymalloc's arenas; then trim."""
    global _dumps
    _dumps += 1
    libc = ctypes.CDLL("libc.so.6")

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]  # fmt: skip

    libc.mallinfo2.restype = Mallinfo2
    info = libc.mallinfo2()
    lines = [
        f"RSS {_rss_kib() / 1024:.1f} MiB",
        f"glibc: arena (sbrk+arenas) {info.arena / 2**20:.1f} MiB,"
        f" mmapped {info.hblkhd / 2**20:.1f} MiB in {info.hblks} blocks,"
        f" in use {info.uordblks / 2**20:.1f} MiB,"
        f" free {info.fordblks / 2**20:.1f} MiB",
    ]
    # pymalloc's figures go to C stderr: catch them in a file.
    path = f"{_OUT}.{_dumps}.pymalloc.txt"
    saved = os.dup(2)
    with open(path, "w") as out:
        os.dup2(out.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    with open(path) as out:
        lines += [line.rstrip() for line in out if "arena" in line.lower() or "# bytes" in line]
    gc.collect()
    libc.malloc_trim(0)
    lines.append(f"RSS after gc.collect() and malloc_trim(0): {_rss_kib() / 1024:.1f} MiB")
    with open(f"{_OUT}.{_dumps}.txt", "w") as out:
        out.write("\n".join(lines) + "\n")


def _watch() -> None:
    trigger = f"{_OUT}.go"
    while True:
        time.sleep(0.5)
        if not os.path.exists(trigger):
            continue
        os.unlink(trigger)
        if _MODE == "memstats":
            _memstats()
        elif not tracemalloc.is_tracing():
            # kubernetes' client imports its API modules on first use; traced, that takes
            # minutes, so import the ones the operator uses first.
            from kubernetes import client

            client.CoreV1Api, client.BatchV1Api, client.CustomObjectsApi  # noqa: B018
            tracemalloc.start(_FRAMES)
        else:
            _dump()


if _OUT:
    threading.Thread(target=_watch, name="profile-trigger", daemon=True).start()
