"""Progress of long work: a bar on a terminal, a line in the logs every so often elsewhere.

Labeling a pool of line-scan frames, training a student or a generator and evaluating on the test split each
take minutes to hours. Without a sign of life a person cannot tell a slow stage from a hung one, nor when it
will end. So every long loop reports through :func:`progress` (or :func:`track`):

- on a terminal (stderr is a tty) a rich bar with the count, the rate and the time left;
- elsewhere (a Prefect worker, a redirected log, CI) a log line at the start, one at most every
  ``interval_s`` seconds (default 30 s, or ``$LOOM_PROGRESS_INTERVAL_S``) and one at the end, e.g.
  ``pseudo-label: 120/247 images, 0.81 images/s, ETA 2 min 40 s``;
- inside a Prefect flow or task run, lines only, to the run's logger: they show in the UI, and on a terminal
  Prefect prints them itself (a bar redrawn under Prefect's own console output would overwrite it).

Lines go to the logger the caller gives; without one to Prefect's run logger when a run is active (this
module never imports the tasks), else to the ``models.progress`` logger. Reporting never touches what it
reports on: no random draws, no synchronisation of devices, no reordering; per item it costs a counter and
a clock read (and a call into rich while a bar is drawn).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

#: Seconds between two progress lines in the logs, unless the caller or the environment says otherwise.
DEFAULT_INTERVAL_S = 30.0
#: Environment variable overriding the interval (seconds; 0 writes a line for every item).
INTERVAL_ENV = "LOOM_PROGRESS_INTERVAL_S"

T = TypeVar("T")
LoggerLike = logging.Logger | logging.LoggerAdapter


# ---- formatting ----------------------------------------------------------------------------------------


def format_duration(seconds: float) -> str:
    """A duration as a person reads it: ``"8.5 s"``, ``"40 s"``, ``"2 min 40 s"``, ``"1 h 05 min"``."""
    if not math.isfinite(seconds) or seconds < 0:
        return "unknown"
    if seconds < 10:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        minutes, rest = divmod(whole, 60)
        return f"{minutes} min {rest} s"
    hours, rest = divmod(whole, 3600)
    return f"{hours} h {rest // 60:02d} min"


def format_rate(rate: float, unit: str) -> str:
    """Items per second with as many digits as say something: ``"0.81 images/s"``, ``"12.3 steps/s"``."""
    if not math.isfinite(rate) or rate <= 0:
        return f"0 {unit}/s"
    if rate >= 100:
        text = f"{rate:.0f}"
    elif rate >= 10:
        text = f"{rate:.1f}"
    elif rate >= 0.1:
        text = f"{rate:.2f}"
    else:
        text = f"{rate:.2g}"
    return f"{text} {unit}/s"


def progress_line(
    description: str,
    completed: int,
    total: int | None,
    unit: str,
    elapsed: float,
    note: str = "",
    *,
    final: bool = False,
) -> str:
    """One progress line (a pure function of its arguments, so the format is tested on its own).

    While running: ``"<what>: 120/247 images, 0.81 images/s, ETA 2 min 40 s[, <note>]"`` (no rate or ETA
    before the first item, no ETA without a total). At the end: ``"<what>: 247/247 images in 5 min 2 s,
    0.82 images/s[, <note>]"``; a loop that ended before its total says ``"stopped at 120/247 images after
    ..."`` instead.
    """
    count = f"{completed}/{total} {unit}" if total is not None else f"{completed} {unit}"
    rate = completed / elapsed if elapsed > 0 else math.inf
    parts: list[str]
    if final:
        if total is not None and completed < total:
            head = f"stopped at {count} after {format_duration(elapsed)}"
        else:
            head = f"{count} in {format_duration(elapsed)}"
        parts = [head, format_rate(rate, unit)] if completed and elapsed > 0 else [head]
    else:
        parts = [count]
        if completed > 0 and elapsed > 0:
            parts.append(format_rate(rate, unit))
            if total is not None:
                parts.append(f"ETA {format_duration(max(0, total - completed) / rate)}")
    if note:
        parts.append(note)
    return f"{description}: {', '.join(parts)}"


# ---- where lines go ------------------------------------------------------------------------------------


def _prefect_run_logger() -> LoggerLike | None:
    """Prefect's run logger when this code runs inside a flow or task run, else None.

    Prefect is only consulted when something has imported it already: without it no run can be active, and
    importing it just to find that out would cost a second.
    """
    if "prefect" not in sys.modules:
        return None
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # MissingContextError outside a run; anything else: the plain logger will do
        return None


def _interval_from_env() -> float:
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    if not raw:
        return DEFAULT_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        logger.warning("%s=%r is not a number of seconds; using %s", INTERVAL_ENV, raw, DEFAULT_INTERVAL_S)
        return DEFAULT_INTERVAL_S
    return max(0.0, value)


# ---- the terminal bar ----------------------------------------------------------------------------------


class _SharedBar:
    """One live rich display for every bar of the process.

    rich allows one live display per console; a stage that reports inside another (the teacher's passes
    inside ``pseudo-label``) adds a row to the running display instead of starting a second one. While the
    display runs, the root logger's stderr handlers write through rich, so log records appear above the
    bars rather than through them.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._display: Any = None
        self._users = 0
        self._rerouted: list[tuple[logging.StreamHandler, Any]] = []

    def add(self, description: str, total: int | None, unit: str) -> Any:
        with self._lock:
            if self._display is None:
                self._display = self._start()
            self._users += 1
            return self._display.add_task(description, total=total, unit=unit, note="")

    def update(self, task_id: Any, completed: int, note: str) -> None:
        display = self._display
        if display is not None:
            display.update(task_id, completed=completed, note=note)

    def finish(self, task_id: Any, completed: int, note: str) -> None:
        with self._lock:
            if self._display is None:
                return
            self._display.update(task_id, completed=completed, note=note, refresh=True)
            self._users -= 1
            if self._users == 0:
                self._display.stop()
                self._display = None
                for handler, stream in self._rerouted:
                    handler.setStream(stream)
                self._rerouted = []

    def _start(self) -> Any:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, TextColumn
        from rich.progress import Progress as RichProgress
        from rich.text import Text

        class RateColumn(ProgressColumn):
            """Items per second over rich's recent window (the lines in the logs use the whole run)."""

            def render(self, task: Any) -> Text:
                speed = task.finished_speed or task.speed
                text = format_rate(speed, task.fields["unit"]) if speed else "?"
                return Text(text, style="progress.data.speed")

        class TimeColumn(ProgressColumn):
            """The time left while running (rich's estimate), the time it took once finished."""

            def render(self, task: Any) -> Text:
                if task.finished:
                    return Text(f"in {format_duration(task.finished_time or 0.0)}", "progress.elapsed")
                left = task.time_remaining
                return Text(f"ETA {format_duration(left) if left is not None else '?'}", "progress.remaining")

        original = sys.stderr
        display = RichProgress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            RateColumn(),
            TimeColumn(),
            TextColumn("{task.fields[note]}"),
            console=Console(file=original),
        )
        display.start()
        proxy = sys.stderr  # rich's stand-in while the display runs: what is written to it goes above
        if proxy is not original:
            for handler in logging.getLogger().handlers:
                if type(handler) is logging.StreamHandler and handler.stream is original:
                    handler.setStream(proxy)
                    self._rerouted.append((handler, original))
        return display


_BAR = _SharedBar()


# ---- the reporter --------------------------------------------------------------------------------------


class Progress:
    """Counts the items of one loop and shows them (see the module docstring); use as a context manager.

    ``advance()`` after each item (``set_completed`` where the loop knows its count), ``note`` for a short
    cheap extra such as the loss. Work that ends early (a time cap, an error) says so in its last line.

    Args:
        description: what is being done, the start of every line (``"pseudo-label"``).
        total: how many items the loop will do; None when it cannot know (no ETA then). With 0 or 1 item
            nothing is shown (a caller passes 0 to switch progress off).
        unit: the items' plural noun (``"images"``, ``"steps"``, ``"pairs"``).
        log: where lines go; default Prefect's run logger inside a run, else the ``models.progress`` logger.
        interval_s: least seconds between two lines (default ``$LOOM_PROGRESS_INTERVAL_S`` or 30 s).
        clock: monotonic seconds (a fake one in tests).
        terminal: draw a bar instead of writing lines (default: when stderr is a terminal and no Prefect
            run is active).
    """

    def __init__(
        self,
        description: str,
        total: int | None,
        unit: str = "images",
        *,
        log: LoggerLike | None = None,
        interval_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        terminal: bool | None = None,
    ) -> None:
        self.description = description
        self.total = total
        self.unit = unit
        self.completed = 0
        self.note = ""
        self._given_log = log
        self._interval = _interval_from_env() if interval_s is None else max(0.0, interval_s)
        self._clock = clock
        self._terminal = terminal
        self._log: LoggerLike | None = None
        self._task: Any = None
        self._bar_on = False
        self._started = 0.0
        self._last_line = 0.0
        self._active = False

    # The hot path: one add, one compare and one clock read per item when writing lines.
    def advance(self, n: int = 1, note: str | None = None) -> None:
        """Count ``n`` more items done (and replace the note when one is given)."""
        self.completed += n
        if note is not None:
            self.note = note
        self._report()

    def set_completed(self, completed: int, note: str | None = None) -> None:
        """Set the count of items done (for loops that count in jumps, e.g. accepted samples)."""
        self.completed = completed
        if note is not None:
            self.note = note
        self._report()

    def _report(self) -> None:
        if not self._active:
            return
        if self._bar_on:
            _BAR.update(self._task, self.completed, self.note)
        if self._log is not None:
            now = self._clock()
            # The last item's line would only repeat what the end line says a moment later.
            if now - self._last_line >= self._interval and self.completed != self.total:
                self._last_line = now
                elapsed = now - self._started
                self._write(
                    progress_line(self.description, self.completed, self.total, self.unit, elapsed, self.note)
                )

    def _write(self, line: str) -> None:
        assert self._log is not None
        self._log.info("%s", line)

    def __enter__(self) -> Progress:
        if self.total is not None and self.total <= 1:
            # One item has no rate and no ETA to show; callers that handle one image per call (a scorer
            # asked about each generated sample) would fill the logs with start and end lines.
            return self
        run_log = _prefect_run_logger()
        terminal = self._terminal if self._terminal is not None else _stderr_is_terminal()
        terminal = terminal and run_log is None  # in a Prefect run: its log (see the module docstring)
        if not terminal:
            self._log = self._given_log or run_log or logger
        else:
            self._task = _BAR.add(self.description, self.total, self.unit)
            self._bar_on = True
        self._active = True
        self._started = self._last_line = self._clock()
        if self._log is not None:
            self._write(progress_line(self.description, 0, self.total, self.unit, 0.0))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._active:
            return
        self._active = False
        if self._bar_on:
            self._bar_on = False
            _BAR.finish(self._task, self.completed, self.note)
        if self._log is not None:
            elapsed = self._clock() - self._started
            line = progress_line(
                self.description, self.completed, self.total, self.unit, elapsed, self.note, final=True
            )
            if exc_type is not None and not issubclass(exc_type, GeneratorExit):
                line += f" ({exc_type.__name__})"
            self._write(line)


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


#: ``with progress("pseudo-label", n) as bar: bar.advance()``: the class under the name its callers read.
progress = Progress


def track(
    items: Iterable[T],
    description: str,
    total: int | None = None,
    unit: str = "images",
    **options: Any,
) -> Iterator[T]:
    """Yield ``items`` and count each one once the loop body has finished with it.

    ``total`` defaults to ``len(items)`` where it has one. Options are those of :func:`progress`.
    """
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with progress(description, total, unit, **options) as bar:
        for item in items:
            yield item
            bar.advance()
