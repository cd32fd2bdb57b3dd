"""Who used the CPU during a measured block: this benchmark or someone else.

A 2-core machine has no spare core: anything else running during a measured
run (a test suite, another Ray) skews a side-by-side comparison, so the
benchmarks report, and can wait out, the CPU that processes outside their own
process tree used meanwhile. Linux ``/proc`` only; elsewhere it reports 0.
"""

from __future__ import annotations

import argparse
import os
import time

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _machine_busy_s() -> float | None:
    try:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:9]]
    except OSError:
        return None
    return (sum(fields) - fields[3] - fields[4]) / _TICK  # all but idle and iowait


def _tree_cpu_s() -> float:
    """CPU seconds of this process and its live descendants (Ray's raylet and
    workers, DataLoader workers)."""
    procs: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        procs[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK)
    me, total = os.getpid(), 0.0
    for pid, (_, cpu) in procs.items():
        p, hops = pid, 0
        while p and p != me and hops < 64:
            p, hops = procs.get(p, (0, 0.0))[0], hops + 1
        if p == me:
            total += cpu
    return total


class CpuMeter:
    """Wall time and cores used during a block, by this benchmark's process
    tree and by others. Workers that exit inside the block take their CPU time
    with them, so stop the meter while they are alive."""

    def start(self) -> CpuMeter:
        self.busy0, self.own0, self.t0 = _machine_busy_s(), _tree_cpu_s(), time.perf_counter()
        return self

    def stop(self) -> None:
        self.wall = max(time.perf_counter() - self.t0, 1e-9)
        busy1, own1 = _machine_busy_s(), _tree_cpu_s()
        self.own_cores = (own1 - self.own0) / self.wall
        self.other_cores = (
            max(0.0, busy1 - self.busy0 - (own1 - self.own0)) / self.wall
            if busy1 is not None and self.busy0 is not None
            else 0.0
        )

    def __enter__(self) -> CpuMeter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_quiet(max_s: float, threshold: float = 0.15) -> float:
    """Wait (up to ``max_s``) until other processes use < ``threshold`` cores
    over a second; returns the last reading."""
    deadline = time.perf_counter() + max_s
    while True:
        with CpuMeter() as meter:
            time.sleep(1.0)
        if meter.other_cores < threshold or time.perf_counter() >= deadline:
            return meter.other_cores


def add_wait_quiet_arg(parser: argparse.ArgumentParser) -> None:
    """``--wait-quiet``, the same knob in every bench that calls :func:`wait_quiet`."""
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=60.0,
        help="before each measured run, wait up to this many seconds for other processes "
        "to use < 0.15 cores (0: don't wait; default 60)",
    )
