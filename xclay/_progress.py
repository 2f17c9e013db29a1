"""Progress: a bar on an interactive terminal or notebook, a line at a steady interval in a
log (a batch job's output, no terminal), or nothing.

``progress=None`` picks by where the output goes (a bar on a terminal, lines otherwise),
``True`` always shows a bar, ``False`` shows nothing.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Any, TextIO

LOG_EVERY = 30.0  # seconds between progress lines in a log


def progress_bar(total: int, progress: bool | None, *, desc: str, unit: str) -> Any:
    """A tqdm bar to ``update()``; use it as a context manager."""
    if progress is False:
        # Plain tqdm, not tqdm.auto: importing that in a notebook without ipywidgets warns,
        # even for a bar that is never shown.
        from tqdm import tqdm

        return tqdm(total=total, disable=True)
    from tqdm.auto import tqdm as auto_tqdm

    # tqdm's disable=None: a bar only on an interactive terminal.
    return auto_tqdm(total=total, unit=unit, desc=desc, disable=None if progress is None else False)


class Progress:
    """Work done out of ``total`` units (chips, regions), shown as a bar on a terminal or as
    a line every ``every`` seconds in a log: done, regions, rate and time left.

    Parameters
    ----------
    total
        Units to do (``unit``), e.g. the chips of the regions left.
    regions
        Regions to do (counted alongside the units in log lines).
    progress
        ``None``: a bar on an interactive terminal, lines otherwise; ``True``: a bar;
        ``False``: nothing.
    desc, unit
        What is being done (``"embed"``) and what is counted (``"chip"``).
    every
        Seconds between log lines.
    stream
        Where log lines go (default: standard output, beside the plan and the report).
    """

    def __init__(
        self,
        total: int,
        *,
        regions: int,
        progress: bool | None,
        desc: str,
        unit: str,
        every: float = LOG_EVERY,
        stream: TextIO | None = None,
    ) -> None:
        self.total, self.regions, self.desc, self.unit = total, regions, desc, unit
        self.done = 0
        self.regions_done = 0
        self.every = every
        self.stream = stream or sys.stdout
        self.started = time.monotonic()
        self._last = self.started
        self._region_units = 0  # units counted inside the region in progress
        interactive = bool(getattr(sys.stderr, "isatty", lambda: False)())
        self.lines = progress is None and not interactive and total > 0
        self._bar = (
            progress_bar(total, progress, desc=desc, unit=unit)
            if progress is True or (progress is None and interactive)
            else None
        )
        if self.lines:
            self._print(_count(total, unit) + self._of_regions(regions, "to do"))

    def advance(self, units: int) -> None:
        """``units`` more done inside the region in progress."""
        self._region_units += units
        self._add(units)

    def region_done(self, units: int) -> None:
        """A region of ``units`` units finished (the units :meth:`advance` already counted
        for it are not counted twice)."""
        rest = max(0, units - self._region_units)
        self._region_units = 0
        self.regions_done += 1
        self._add(rest)

    def _add(self, units: int) -> None:
        self.done += units
        if self._bar is not None:
            self._bar.update(units)
        now = time.monotonic()
        if self.lines and now - self._last >= self.every and self.done < self.total:
            self._last = now
            self._line(now)

    def _of_regions(self, regions: int, what: str) -> str:
        if self.unit == "region":
            return f" {what}"
        return f" in {_count(regions, 'region')} {what}"

    def _print(self, text: str) -> None:
        print(f"  {self.desc:<10}  {text}", file=self.stream, flush=True)

    def _line(self, now: float, *, last: bool = False) -> None:
        seconds = now - self.started
        rate = self.done / seconds if seconds > 0 else 0.0
        share = 100.0 * self.done / self.total if self.total else 100.0
        regions = (
            f", {self.regions_done:,} of {self.regions:,} regions" if self.unit != "region" else ""
        )
        if last:
            tail = f"done in {_duration(seconds)}"
        else:
            left = (self.total - self.done) / rate if rate > 0 else float("nan")
            tail = f"about {_duration(left)} left" if left == left else "time left unknown"
        self._print(
            f"{self.done:,} of {self.total:,} {self.unit}s ({share:.0f}%){regions}, "
            f"{_rate(rate, self.unit)}, {tail}"
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.lines:
            # where it ended (or stopped), in the log
            self._line(time.monotonic(), last=self.done >= self.total)

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _rate(per_second: float, unit: str) -> str:
    if per_second >= 1 or per_second == 0:
        return f"{per_second:,.1f} {unit}s/s"
    return f"{per_second * 60:,.1f} {unit}s/min"


def _count(n: int, unit: str) -> str:
    return f"{n:,} {unit}{'s' if n != 1 else ''}"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
