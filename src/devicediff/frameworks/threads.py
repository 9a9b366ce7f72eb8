"""Measure the threads a run really used, from the kernel's per-thread CPU clocks.

The original study checked thread counts by eye in htop. Here each thread's
user+system time is read from ``/proc/self/task/*/stat`` when training starts
and ends; a thread counts as *active* if it was on a CPU for at least 10% of
the training wall time. Standard library only.
"""

from __future__ import annotations

import os
import time

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _thread_times() -> dict[int, float]:
    out: dict[int, float] = {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            # fields[11], fields[12] are utime and stime (stat fields 14 and 15)
            out[int(tid)] = (int(fields[11]) + int(fields[12])) / _TICK
        except (OSError, IndexError, ValueError):
            continue
    return out


class ThreadSampler:
    def __init__(self, active_fraction: float = 0.10):
        self.active_fraction = active_fraction
        self.t0 = time.perf_counter()
        self.start = _thread_times()

    def report(self) -> dict:
        wall = max(time.perf_counter() - self.t0, 1e-9)
        end = _thread_times()
        used = {tid: end[tid] - self.start.get(tid, 0.0) for tid in end}
        cpu = sum(max(v, 0.0) for v in used.values())
        return {
            "available": bool(end),
            "threads_total": len(end),
            "threads_active": sum(1 for v in used.values() if v >= self.active_fraction * wall),
            "cpu_seconds": round(cpu, 3),
            "wall_seconds": round(wall, 3),
            "parallelism": round(cpu / wall, 2),  # mean number of cores busy
        }
