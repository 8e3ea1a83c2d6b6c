"""A step says what it is doing once it has run a second and, while it runs, that it still is: no command looks hung.

On a machine at load 10, importing TensorFlow, building a model or compiling its first forward pass each take tens of
seconds in which nothing else is printed (issue #32 measured 35-99 s). ``heartbeat`` wraps such a step: one line
naming it (after ANNOUNCE_AFTER seconds, or before it), then a line from a daemon thread whenever nothing was said
for INTERVAL seconds. The thread needs the GIL only to print; TensorFlow's C++ work (graph optimisation, the
forward pass) releases it, and Python-heavy work (a Keras model's layers being built) hands it over every few ms.

Only this module's own imports are taken (threading, time, sys), so a command can start a heartbeat before its slow
imports.
"""
from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager

# Seconds without output after which a running step says so again; the README promises no silence over 30 s.
INTERVAL = 10.0
# A step is announced once it has run this long: one that fails at once (a damaged file, a missing run) leaves its
# error alone on stderr, as one line, and a quick step adds no line; a slow one is named within a second.
ANNOUNCE_AFTER = 1.0
STILL = "still {doing} ({seconds:.0f} s)"


def printer(stream: str = "stdout", prefix: str = "", end: str = "\n") -> Callable[[str], None]:
    """A ``say`` that prints to sys.stdout or sys.stderr, looked up at each line (a test's capture, a redirect)."""
    def say(message: str) -> None:
        print(f"{prefix}{message}", end=end, file=getattr(sys, stream), flush=True)
    return say


class Heartbeat:
    """The running step: ``doing`` may change as it goes (the batch, the backbone); ``said()`` tells the heartbeat
    that the caller printed something itself, so its next line waits a full INTERVAL from then."""

    def __init__(self, doing: str, say: Callable[[str], None], interval: float, still: str,
                 announce_after: float | None = None):
        self.doing, self._say, self._interval, self._still = doing, say, interval, still
        self._announce_after = announce_after  # None: announced already, or not to be
        self.started = self._since = self._last = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="featstack-heartbeat", daemon=True)

    def set(self, doing: str) -> None:
        """A new phase of the step: its "still" lines name it and count its seconds from now."""
        with self._lock:
            self.doing, self._since = doing, time.monotonic()

    def said(self) -> None:
        with self._lock:
            self._last = time.monotonic()

    def _beat(self) -> None:
        if self._announce_after is not None:
            if self._stop.wait(self._announce_after):
                return
            self._say_safely(f"{self.doing} …")
            self.said()
        wait = self._interval
        while not self._stop.wait(wait):
            with self._lock:
                now = time.monotonic()
                due = now - self._last >= self._interval
                if due:
                    message = self._still.format(doing=self.doing, seconds=now - self._since)
                    self._last = now
                wait = max(0.0, self._last + self._interval - now) if not due else self._interval
            if due:
                self._say_safely(message)

    def _say_safely(self, message: str) -> None:
        try:
            self._say(message)
        except (OSError, ValueError):  # the stream closed under us (the step's end, a redirect's)
            pass


@contextmanager
def heartbeat(doing: str, say: Callable[[str], None] | None = None, *, announce: bool = True,
              announce_after: float | None = None, interval: float | None = None, still: str = STILL):
    """Within the block, ``say`` "<doing> …" once the step has run ``announce_after`` seconds (default
    ANNOUNCE_AFTER; 0: before it starts; not at all if ``announce`` is false: the caller said it), then
    "still <doing> (N s)" each time nothing was said for ``interval`` seconds (default INTERVAL). ``say`` defaults to
    printing on stdout. Yields the Heartbeat, whose ``doing`` the block may update."""
    say = say or printer()
    after = ANNOUNCE_AFTER if announce_after is None else announce_after
    if announce and after <= 0:
        say(f"{doing} …")
    beat = Heartbeat(doing, say, INTERVAL if interval is None else interval, still,
                     after if announce and after > 0 else None)
    beat._thread.start()
    try:
        yield beat
    finally:
        beat._stop.set()
        beat._thread.join()
