"""Bounds before login, on the agent port: how many connections may be in
their TLS-and-HELLO handshake at once (in all, and per source address), and
a short ban for an address that keeps presenting wrong tokens.

A connection that has not authenticated costs the relay a TLS session and
its buffers (about 43 KB each, measured with 2,000 stalled handshakes), so
their number is capped; past the cap new ones are closed at accept, before
any TLS work. A brute force of tokens gets nowhere (tokens carry 256 random
bits) and, once banned, costs one accept and close per attempt.

Sans-IO apart from the clock it is given; `AgentLinkFactory` asks it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections import OrderedDict, deque

from twisted.logger import Logger

MAX_PENDING_LOGINS = 1024
MAX_PENDING_LOGINS_PER_SOURCE = 128
BAD_TOKENS_BEFORE_BAN = 5
BAD_TOKEN_WINDOW_SECONDS = 60.0
BAN_SECONDS = 30.0
# Source addresses whose recent failures we remember; the oldest go first.
MAX_TRACKED_SOURCES = 10_000
# A burst of pending logins (about 50 KB each) frees its memory to the
# allocator when it ends, but glibc keeps the pages: 2,000 stalled handshakes
# left the relay 60 MB larger for good. Once a burst of at least this many has
# fallen to a quarter, the free pages go back to the system (malloc_trim).
TRIM_AFTER_PENDING = 256


def _release_free_memory():
    """Return the allocator's free pages to the system (glibc only), else nothing."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        trim = None
    if trim is None:
        return lambda: None
    trim.argtypes = [ctypes.c_size_t]
    return lambda: trim(0)


release_free_memory = _release_free_memory()


class LoginGuard:
    _log = Logger()

    def __init__(
        self,
        clock,
        *,
        max_pending: int = MAX_PENDING_LOGINS,
        max_pending_per_source: int = MAX_PENDING_LOGINS_PER_SOURCE,
        bad_tokens_before_ban: int = BAD_TOKENS_BEFORE_BAN,
        window_seconds: float = BAD_TOKEN_WINDOW_SECONDS,
        ban_seconds: float = BAN_SECONDS,
        max_tracked_sources: int = MAX_TRACKED_SOURCES,
    ):
        self.clock = clock
        self.max_pending = max_pending
        self.max_pending_per_source = max_pending_per_source
        self.bad_tokens_before_ban = bad_tokens_before_ban
        self.window_seconds = window_seconds
        self.ban_seconds = ban_seconds
        self.max_tracked_sources = max_tracked_sources
        self.pending = 0
        self._pending_by_source: dict[str, int] = {}
        self._failures: OrderedDict[str, deque] = OrderedDict()  # source -> failure times
        self._banned_until: OrderedDict[str, float] = OrderedDict()
        self.refused_at_accept = 0  # over a cap, or banned
        self._burst_peak = 0  # most logins pending at once since the last trim
        self.trims = 0

    def admit(self, source: str) -> str | None:
        """None if a new connection from `source` may start its login, else
        why not ("busy", "busy_source", "banned"). An admitted one must be
        `finished()` exactly once."""
        until = self._banned_until.get(source)
        if until is not None:
            if self.clock.seconds() < until:
                self.refused_at_accept += 1
                return "banned"
            del self._banned_until[source]
        if self.pending >= self.max_pending:
            self.refused_at_accept += 1
            return "busy"
        if self._pending_by_source.get(source, 0) >= self.max_pending_per_source:
            self.refused_at_accept += 1
            return "busy_source"
        self.pending += 1
        self._burst_peak = max(self._burst_peak, self.pending)
        self._pending_by_source[source] = self._pending_by_source.get(source, 0) + 1
        return None

    def finished(self, source: str) -> None:
        """An admitted connection authenticated or went away."""
        self.pending -= 1
        if self._burst_peak >= TRIM_AFTER_PENDING and self.pending <= self._burst_peak // 4:
            # Once, after the burst: a few ms of the reactor, never per login.
            self._burst_peak = 0  # the next burst counts from its own admits
            self.trims += 1
            self.clock.callLater(0, release_free_memory)
        left = self._pending_by_source.get(source, 1) - 1
        if left > 0:
            self._pending_by_source[source] = left
        else:
            self._pending_by_source.pop(source, None)

    def bad_token(self, source: str) -> bool:
        """Count a refused token; True if that starts a ban of `source`."""
        now = self.clock.seconds()
        times = self._failures.pop(source, None) or deque()
        times.append(now)
        while times and times[0] <= now - self.window_seconds:
            times.popleft()
        if len(times) >= self.bad_tokens_before_ban:
            self._banned_until[source] = now + self.ban_seconds
            self._banned_until.move_to_end(source)
            _trim(self._banned_until, self.max_tracked_sources)
            self._log.warn(
                "agent port: {count} refused tokens from {source} in {window:.0f}s: "
                "refusing it for {ban:.0f}s",
                count=len(times), source=source, window=self.window_seconds, ban=self.ban_seconds,
            )
            return True
        self._failures[source] = times
        _trim(self._failures, self.max_tracked_sources)
        return False

    def banned(self, source: str) -> bool:
        until = self._banned_until.get(source)
        return until is not None and self.clock.seconds() < until


def _trim(table: OrderedDict, limit: int) -> None:
    while len(table) > limit:
        table.popitem(last=False)
