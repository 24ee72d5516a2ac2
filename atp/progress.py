"""Progress display on stderr: stages, and what happens inside a long one.

:class:`Display` shows a run's stages: on a terminal a tqdm bar (``optimise (cpu)
██████ 5/10 00:05 round 2, iteration 140``), elsewhere (a log file, a pipe, CI) one
plain line per stage and at most one line per :data:`LOG_INTERVAL_S` seconds from inside
a stage -- never the bar's carriage-return frames.

Long loops say where they are with :func:`tick` (``tick(round=2)``, ``tick(iteration=
140)``): a no-op unless a display is active in this context (:func:`reporting`), so the
maths modules that call it (optimizer rounds and iterations, the sequencing correction,
the plan save) need no progress argument and cost nothing when nobody watches.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from contextvars import ContextVar

from tqdm import tqdm

LOG_INTERVAL_S = 5.0  # non-terminal output: at most one inner-progress line per interval
_reporter: ContextVar[Callable[[dict], None] | None] = ContextVar("atp_progress",
                                                                  default=None)


def tick(**fields) -> None:
    """Report progress inside the current stage (``round=2``, ``iteration=140``,
    ``step='report.html'``); nothing happens when no display is active."""
    cb = _reporter.get()
    if cb is not None:
        cb(fields)


@contextlib.contextmanager
def reporting(callback: Callable[[dict], None] | None):
    """Route :func:`tick` calls in this context to ``callback(fields)``."""
    token = _reporter.set(callback)
    try:
        yield
    finally:
        _reporter.reset(token)


def is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a file
        return False


# outer to inner: a new outer value clears the inner ones (a new round restarts iterations)
LEVELS = ("correction_round", "round", "iteration")


def _merge(current: dict, new: dict) -> dict:
    out = dict(current)
    for k in new:
        if k in LEVELS:
            for inner in LEVELS[LEVELS.index(k) + 1:]:
                out.pop(inner, None)
    out.update(new)
    order = {k: i for i, k in enumerate(LEVELS)}
    return dict(sorted(out.items(), key=lambda kv: order.get(kv[0], len(LEVELS))))


def _describe(fields: dict) -> str:
    parts = []
    for k, v in fields.items():
        if isinstance(v, float):
            v = f"{v:.4g}"
        parts.append(f"{v}" if k == "step" else f"{k.replace('_', ' ')} {v}")
    return ", ".join(parts)


class Display:
    """Stages of one run on ``stream`` (default stderr); ``enabled=False``: silent."""

    def __init__(self, enabled: bool, total: int, *, stream=None, prefix: str = "atp"):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = bool(enabled)
        self.tty = self.enabled and is_terminal(self.stream)
        self.total, self.done, self.prefix = total, 0, prefix
        self.stage_name = ""
        self.fields: dict = {}
        self._last_line = 0.0
        self._bar = None
        if self.tty:
            self._bar = tqdm(total=total, file=self.stream, unit="stage", leave=False,
                             bar_format="{desc:<28}{bar:20}{n_fmt}/{total_fmt} {elapsed}"
                                        "{postfix}")

    def _print(self, text: str) -> None:
        try:
            print(f"{self.prefix}: {text}", file=self.stream, flush=True)
        except (BrokenPipeError, ValueError):  # the reader went away: keep working
            self.enabled = False

    def start(self, name: str) -> None:
        self.stage_name, self.fields = name, {}
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_description_str(name)
            self._bar.set_postfix_str("", refresh=True)
        else:
            self._print(f"[{self.done + 1}/{self.total}] {name}")
            self._last_line = time.monotonic()

    def grow(self, n: int) -> None:
        """The run needs ``n`` more stages than first counted."""
        self.total += n
        if getattr(self, "_bar", None) is not None:
            self._bar.total = self.total
            self._bar.refresh()

    def tick(self, fields: dict) -> None:
        if not self.enabled:
            return
        self.fields = _merge(self.fields, fields)
        if self._bar is not None:
            self._bar.set_postfix_str(_describe(self.fields), refresh=True)
            return
        now = time.monotonic()
        if now - self._last_line >= LOG_INTERVAL_S:
            self._last_line = now
            self._print(f"    {self.stage_name}: {_describe(self.fields)}")

    def finish(self) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.update(1)

    @contextlib.contextmanager
    def stage(self, name: str):
        """Show ``name`` and route :func:`tick` to this display while it runs."""
        self.start(name)
        with reporting(self.tick if self.enabled else None):
            yield
        self.finish()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


@contextlib.contextmanager
def saving(enabled: bool, what: str, *, stream=None):
    """Display for writing a plan folder: one line (terminal: updated in place) naming
    each file as it is written (``tick(step='report.html')``)."""
    d = Display(enabled, 1, stream=stream)
    try:
        with d.stage(f"save {what}"):
            yield d
    finally:
        d.close()
