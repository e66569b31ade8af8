"""When to restart what died, and when to stop trying: one policy for the server kernel's
workers and for the children of ``sidegate up``.

A process that dies is started again after a short delay that doubles with each death close to
the last (0.1 s up to 2 s), so a process that fails at once does not spin a core. More than
``limit`` deaths within ``window`` seconds is a crash loop: restarting would not help (a bad
binary, a port taken for good, a config the process refuses), so the caller stops with one
clear line instead. A process that lived longer than the window starts a fresh count.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

LIMIT = 5  # deaths tolerated within WINDOW before it counts as a crash loop
WINDOW = 60.0  # seconds
FIRST_DELAY = 0.1  # seconds before the first restart; doubled for each death in the window
MAX_DELAY = 2.0


class RestartBudget:
    """The deaths of one process (or one set of equal processes) and what each one allows."""

    def __init__(self, limit: int = LIMIT, window: float = WINDOW, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self.clock = clock
        self.deaths: deque[float] = deque()

    def died(self) -> float | None:
        """Record a death: the seconds to wait before starting it again, or None for a crash loop."""
        now = self.clock()
        self.deaths.append(now)
        while self.deaths and self.deaths[0] < now - self.window:
            self.deaths.popleft()
        if len(self.deaths) > self.limit:
            return None
        return float(min(MAX_DELAY, FIRST_DELAY * 2 ** (len(self.deaths) - 1)))

    def summary(self) -> str:
        return f"{len(self.deaths)} exits within {self.window:g} s"
