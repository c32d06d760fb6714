"""What a timing measures besides the clock: peak and current memory, CPU seconds of the loader workers, the
load average; and :class:`Clock`, which times ``steps`` training steps after ``warmup`` uncounted ones."""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def max_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    """Resident memory of this process now (not the peak)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def children_cpu_seconds() -> float:
    """user+system CPU seconds of this process's live child processes (the DataLoader workers)."""
    me, total = str(os.getpid()), 0
    tick = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me:  # after "pid (comm)": state, ppid, ..., utime (14th), stime (15th)
            total += int(fields[11]) + int(fields[12])
    return total / tick


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class Clock:
    """Counts training steps; times ``steps`` of them after ``warmup`` uncounted ones (end of step to end of step)."""

    def __init__(self, warmup: int, steps: int, sync: Callable[[], None] | None = None) -> None:
        if warmup < 1 or steps < 1:
            raise ValueError(f"warmup and steps must be >= 1, got {warmup} and {steps}.")
        self.warmup, self.steps, self.sync = warmup, steps, sync
        self.n = self.images = 0
        self.t0 = self.t1 = 0.0
        self.cpu0 = self.cpu1 = (0.0, 0.0)
        self.rss0 = self.rss1 = self.rss_max = 0.0

    @property
    def total(self) -> int:
        return self.warmup + self.steps

    @property
    def done(self) -> bool:
        return self.n >= self.total

    def step_end(self, batch_size: int) -> None:
        self.n += 1
        if self.warmup < self.n <= self.total:
            self.images += batch_size
        if self.n in (self.warmup, self.total):
            if self.sync is not None:
                self.sync()
            now = time.perf_counter()
            cpu = (time.process_time(), children_cpu_seconds())
            if self.n == self.warmup:
                self.t0, self.cpu0 = now, cpu
            else:
                self.t1, self.cpu1 = now, cpu
        if self.warmup <= self.n <= self.total:  # current RSS at each timed step end (a growth = memory kept)
            rss = current_rss_mb()
            self.rss_max = max(self.rss_max, rss)
            if self.n == self.warmup:
                self.rss0 = rss
            self.rss1 = rss

    def result(self) -> dict[str, Any]:
        if self.n < self.total:
            raise RuntimeError(f"Only {self.n} of {self.total} steps ran.")
        seconds = self.t1 - self.t0
        main_cpu, workers_cpu = self.cpu1[0] - self.cpu0[0], self.cpu1[1] - self.cpu0[1]
        return {
            "warmup_steps": self.warmup,
            "steps": self.steps,
            "images": self.images,
            "seconds": round(seconds, 4),
            "images_per_s": round(self.images / seconds, 2),
            "cpu_seconds_main": round(main_cpu, 3),
            "cpu_seconds_workers": round(workers_cpu, 3),
            "cpu_ms_per_image": round(1000 * (main_cpu + workers_cpu) / self.images, 3),
            "rss_mb_timed_start": round(self.rss0, 1),
            "rss_mb_timed_end": round(self.rss1, 1),
            "rss_mb_timed_max": round(self.rss_max, 1),
            "rss_growth_mb_per_step": round((self.rss1 - self.rss0) / self.steps, 3),
        }


def clock_callback(clock: Clock) -> Any:
    """A Lightning callback driving ``clock`` from ``on_train_batch_end`` (after the optimizer step)."""
    import lightning as L

    class StepClock(L.Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            clock.step_end(int(batch[0].shape[0]))

    return StepClock()
