"""Rate-limited logging: what a client can cause must not grow the log with every request.

A hostile caller can make every request fail the same way (garbage bytes, wrong keys, a bug it
found). `RateLimitedLog` logs the first `first` events of a kind per `interval_s`, counts the
rest, and says how many it held back ("suppressed K similar") with the next event of that kind
after the interval. Only the first event of a kind per interval carries a traceback, so a
burst of N failures writes at most `first` + 1 lines per interval, not N tracebacks.
"""

import logging
import threading
import time

# Kinds are chosen by code (method and error names), but cap them anyway: a message formatted
# from client input must never turn into a new kind per request.
_MAX_KINDS = 1024
_OTHER = "(other kinds)"


class RateLimitedLog:
  """Thread-safe; one per process is enough (`limited` below)."""

  def __init__(self, logger: logging.Logger | None = None, first: int = 5,
               interval_s: float = 60.0, clock=time.monotonic):
    self._logger = logger or logging.getLogger("jblock")
    self.first = first
    self.interval_s = interval_s
    self._clock = clock
    self._lock = threading.Lock()
    self._kinds: dict[str, list] = {}  # kind -> [window start, logged, suppressed]

  def log(self, kind: str, level: int, message: str, *args, exc_info=None,
          _depth: int = 0) -> bool:
    """Logs `message % args` unless `kind` already logged `first` times this interval; True
    if it was logged. `exc_info` is kept only for a kind's first event of an interval."""
    now = self._clock()
    with self._lock:
      if kind not in self._kinds and len(self._kinds) >= _MAX_KINDS:
        kind = _OTHER
      state = self._kinds.setdefault(kind, [now, 0, 0])
      held_back = 0
      if now - state[0] >= self.interval_s:
        held_back, state[:] = state[2], [now, 0, 0]
      if state[1] >= self.first:
        state[2] += 1
        return False
      state[1] += 1
      with_traceback = state[1] == 1
    where = 2 + _depth  # the log line names our caller's file and line, not this one
    if held_back:
      self._logger.log(level, "jblock: suppressed %d similar messages (%s) in the last %.0fs",
                       held_back, kind, self.interval_s, stacklevel=where)
    self._logger.log(level, message, *args, exc_info=exc_info if with_traceback else None,
                     stacklevel=where)
    return True

  def reset(self) -> None:
    """Forgets every kind (tests count lines from a clean start)."""
    with self._lock:
      self._kinds.clear()

  def warning(self, kind: str, message: str, *args) -> bool:
    return self.log(kind, logging.WARNING, message, *args, _depth=1)

  def error(self, kind: str, message: str, *args, exc_info=None) -> bool:
    return self.log(kind, logging.ERROR, message, *args, exc_info=exc_info, _depth=1)


limited = RateLimitedLog()
