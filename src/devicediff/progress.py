"""Live progress for long studies: which runs, how far, time left.

On a terminal, a ``rich`` live table; elsewhere (CI, logs), one plain line per
event at most every few seconds.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.live import Live
from rich.table import Table


def fmt_seconds(s: float | None) -> str:
    if s is None or s != s:
        return "?"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    def __init__(self, *, enabled: bool = True, console: Console | None = None, jobs: int = 1):
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        self.jobs = max(1, jobs)
        self.live: Live | None = None
        self.current: dict[str, tuple[int, int, float]] = {}
        self.durations: list[float] = []
        self.started_at: dict[str, float] = {}
        self.total = self.done = 0
        self.failed = 0
        self.last_print = 0.0

    # -- estimates ------------------------------------------------------------------
    def eta(self) -> float | None:
        remaining = self.total - self.done
        if remaining <= 0:
            return 0.0
        now = time.time()
        per_run = sum(self.durations) / len(self.durations) if self.durations else None
        if per_run is None:  # extrapolate from the progress of running runs
            rates = [(now - self.started_at[k]) / (s / n) for k, (s, n, _) in self.current.items() if s > 0 and n > 0]
            per_run = sum(rates) / len(rates) if rates else None
        if per_run is None:
            return None
        left_running = sum(per_run * (1 - s / n) for s, n, _ in self.current.values() if n)
        queued = remaining - len(self.current)
        return (left_running + queued * per_run) / self.jobs

    def _table(self) -> Table:
        t = Table(title=f"{self.name}: {self.done}/{self.total} runs done, {self.failed} failed, ETA {fmt_seconds(self.eta())}",
                  title_justify="left", expand=False)
        t.add_column("run")
        t.add_column("step", justify="right")
        t.add_column("%", justify="right")
        t.add_column("elapsed", justify="right")
        now = time.time()
        for label, (s, n, _) in list(self.current.items())[:12]:
            pct = f"{100 * s / n:.0f}" if n else ""
            t.add_row(label, f"{s}/{n}" if n else "starting", pct, fmt_seconds(now - self.started_at.get(label, now)))
        return t

    def _plain(self, msg: str, force: bool = False) -> None:
        now = time.time()
        if force or now - self.last_print >= 5:
            self.last_print = now
            self.console.print(f"[{self.done}/{self.total}] {msg} (ETA {fmt_seconds(self.eta())})", highlight=False)

    def _refresh(self) -> None:
        if self.live is not None:
            self.live.update(self._table())

    # -- events --------------------------------------------------------------------------
    def begin(self, name: str, labels: list[str], kept: int = 0) -> None:
        self.name, self.total = name, len(labels)
        if not self.enabled:
            return
        if kept:
            self.console.print(f"{name}: {kept} run(s) already in the store are kept; {len(labels)} to run", highlight=False)
        if self.console.is_terminal and labels:
            self.live = Live(self._table(), console=self.console, refresh_per_second=4, transient=True)
            self.live.start()

    def start(self, label: str) -> None:
        self.started_at[label] = time.time()
        self.current[label] = (0, 0, time.time())
        if self.enabled:
            self._refresh() if self.live else self._plain(f"started {label}")

    def step(self, label: str, step: int, total: int) -> None:
        self.current[label] = (step, total, time.time())
        if self.enabled:
            self._refresh() if self.live else self._plain(f"{label}: step {step}/{total}")

    def finish(self, label: str, state: str, error: str | None) -> None:
        self.done += 1
        self.current.pop(label, None)
        if label in self.started_at:
            self.durations.append(time.time() - self.started_at[label])
        if state != "finished":
            self.failed += 1
        if not self.enabled:
            return
        msg = f"{label}: {state}" + (f" ({error.splitlines()[0][:160]})" if error and state != "finished" else "")
        if self.live:
            self.live.console.print(("✓ " if state == "finished" else "✗ ") + msg, highlight=False)
            self._refresh()
        else:
            self._plain(msg, force=True)

    def end(self, elapsed: float) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None
        if self.enabled and self.total:
            self.console.print(f"{self.name}: {self.done} run(s) in {fmt_seconds(elapsed)}", highlight=False)
