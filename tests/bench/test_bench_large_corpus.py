"""Benchmark: from_scratch over a corpus larger than the memory the trainer may use (issue 16).

Run as: make bench   (alone: .venv/bin/pytest -m bench -s tests/bench -k large_corpus;
        KUBETRAIN_BENCH_MEMORY_GIB=1 the trainer's memory limit,
        KUBETRAIN_BENCH_CORPUS_GIB=1.25 the corpus size, at least the limit)

A machine's free memory is tens of GiB, and tokenizing that much text on 2 cores takes
hours; so the trainer runs under a memory limit below the corpus size instead: a memory
cgroup made here (root only), with cgroup v2's memory.max where the memory controller is on
the unified hierarchy, else cgroup v1's memory.limit_in_bytes. The limit counts the page
cache the trainer fills, which the kernel reclaims at the limit; memory the process holds
(its anonymous pages) cannot be reclaimed without swap, so a run that held the corpus would
be killed by the cgroup's OOM killer. The corpus is generated text (words of a small
lexicon) as JSON lines; the trainer is the tiny from_scratch example's model, maxLength 128,
20 steps. Printed: the trainer's resident set size (VmRSS, and RssAnon: the part that
cannot be reclaimed) and the cgroup's usage every 10 seconds with the log line reached,
then the peak RSS (rusage), the cgroup's peak and its OOM kills. It asserts that the run
finished and nothing was OOM-killed; times are reported, not tested.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from kubetrain.api import parse_document, to_trainer_config
from kubetrain.local.runner import resolve_local_uri
from kubetrain_trainer.config import dump_trainer_config

pytestmark = [pytest.mark.bench, pytest.mark.timeout(7200)]

REPO = Path(__file__).resolve().parents[2]
GIB = 1 << 30
MEMORY_LIMIT = int(float(os.environ.get("KUBETRAIN_BENCH_MEMORY_GIB", "1")) * GIB)
CORPUS_SIZE = int(float(os.environ.get("KUBETRAIN_BENCH_CORPUS_GIB", "1.25")) * GIB)
SAMPLE_SECONDS = 10
LEXICON = [
    "".join(random.Random(i).choices("abcdefghijklmnopqrstuvwxyz", k=3 + i % 7))
    for i in range(2000)
]


class MemoryCgroup:
    """A memory cgroup of its own with a hard limit (v2 memory.max, else v1)."""

    def __init__(self, limit: int) -> None:
        unified = Path("/sys/fs/cgroup")
        if (unified / "cgroup.controllers").is_file() and "memory" in (
            unified / "cgroup.controllers"
        ).read_text().split():
            self.version, parent = 2, unified
        elif Path("/sys/fs/cgroup/memory/memory.limit_in_bytes").is_file():
            self.version, parent = 1, Path("/sys/fs/cgroup/memory")
        else:
            pytest.skip("no memory cgroup controller to limit the trainer with")
        if os.geteuid() != 0 or not os.access(parent, os.W_OK):
            pytest.skip(f"{parent} is not writable (run as root)")
        self.path = parent / f"kubetrain-bench-{os.getpid()}"
        self.path.mkdir()
        if self.version == 2:
            (self.path / "memory.max").write_text(str(limit))
            (self.path / "memory.swap.max").write_text("0")
        else:
            (self.path / "memory.limit_in_bytes").write_text(str(limit))

    def enter(self) -> None:
        """Move the calling process (a child before exec) into the cgroup."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def usage(self) -> int:
        name = "memory.current" if self.version == 2 else "memory.usage_in_bytes"
        return int((self.path / name).read_text())

    def peak(self) -> int | None:
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        return int((self.path / name).read_text()) if (self.path / name).is_file() else None

    def oom_kills(self) -> int:
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        for line in (self.path / name).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def remove(self) -> None:
        self.path.rmdir()


def write_corpus(path: Path, size: int) -> int:
    """Generated JSON lines of text until the file holds `size` bytes; returns rows."""
    pick = random.Random(0)
    rows = 0
    with path.open("w") as f:
        while f.tell() < size:
            lines = [
                json.dumps({"text": " ".join(pick.choices(LEXICON, k=pick.randint(20, 400)))})
                for _ in range(1000)
            ]
            f.write("\n".join(lines) + "\n")
            rows += len(lines)
    return rows


def trainer_config(corpus: Path, output: Path) -> Path:
    doc = yaml.safe_load((REPO / "examples" / "trainingrun-from-scratch-tiny.yaml").read_text())
    spec = doc["spec"]
    spec["data"] = {"train": str(corpus), "format": "text", "maxLength": 128}
    spec["training"].update(maxSteps=20, evalStrategy="no", saveSteps=20, loggingSteps=5)
    spec["output"] = str(output)
    run = parse_document(doc, "bench")
    cfg = to_trainer_config(run.metadata.name, run.spec, resolve_local_uri, metrics_port=0)
    output.mkdir(parents=True)
    path = output / "config.yaml"
    path.write_text(dump_trainer_config(cfg))
    return path


def status_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def test_from_scratch_on_a_corpus_larger_than_its_memory(tmp_path: Path) -> None:
    assert CORPUS_SIZE >= MEMORY_LIMIT, "KUBETRAIN_BENCH_CORPUS_GIB must be at least the limit"
    cgroup = MemoryCgroup(MEMORY_LIMIT)
    try:
        started = time.monotonic()
        corpus = tmp_path / "corpus.jsonl"
        rows = write_corpus(corpus, CORPUS_SIZE)
        print(f"\ncorpus: {corpus.stat().st_size / GIB:.2f} GiB, {rows} rows, written in "
              f"{time.monotonic() - started:.0f} s; memory limit {MEMORY_LIMIT / GIB:.2f} GiB "
              f"(cgroup v{cgroup.version}); load {os.getloadavg()[0]:.1f}")  # fmt: skip
        config = trainer_config(corpus, tmp_path / "out")
        trainer = subprocess.Popen(
            [sys.executable, "-m", "kubetrain_trainer", "--config", str(config)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            preexec_fn=cgroup.enter,
        )  # fmt: skip
        last_line = [""]
        log: list[str] = []

        def follow() -> None:
            for line in trainer.stdout:
                log.append(line)
                if "] INFO " in line:
                    last_line[0] = line.split("] INFO ", 1)[1].strip()[:70]

        reader = threading.Thread(target=follow, daemon=True)
        reader.start()
        began = time.monotonic()
        peak_rss = 0
        print(f"{'seconds':>8} {'VmRSS MiB':>10} {'RssAnon MiB':>12} {'cgroup MiB':>11}  log")
        while True:
            try:
                trainer.wait(timeout=SAMPLE_SECONDS)
                break
            except subprocess.TimeoutExpired:
                pass
            try:
                rss = status_kib(trainer.pid)
            except (FileNotFoundError, ProcessLookupError):
                continue
            peak_rss = max(peak_rss, rss["VmHWM"])
            print(f"{time.monotonic() - began:8.0f} {rss['VmRSS'] >> 10:10} "
                  f"{rss['RssAnon'] >> 10:12} {cgroup.usage() >> 20:11}  {last_line[0]}",
                  flush=True)  # fmt: skip
        reader.join(timeout=10)
        peak = cgroup.peak()
        kills = cgroup.oom_kills()
        print(f"exit {trainer.returncode} after {time.monotonic() - began:.0f} s; peak RSS "
              f"{peak_rss >> 10} MiB (last sample's VmHWM), cgroup peak {(peak or 0) >> 20} MiB "
              f"of {MEMORY_LIMIT >> 20}; OOM kills {kills}")  # fmt: skip
        assert kills == 0 and trainer.returncode == 0, "".join(log[-40:])
        metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
        assert metrics["train_rows"] == rows and metrics["global_step"] == 20
    finally:
        cgroup.remove()
