"""A bandwidth cap on a splice: a token bucket per direction, paid after each read.

`ThrottledSplice` is a `Splice` (relay/wire/splice.py, still the only splice)
whose sides charge every chunk they pass on to a `TokenBucket`. A chunk is
never held back (it was already read, and holding it would be a buffer of our
own): it is written at once, and when the bucket is in debt the side pauses
its own transport (a socket stops being read; a `MuxStream` withholds window
credit, so the agent stops sending) and a timer resumes it once the debt is
paid. The cost is per chunk and only on capped tunnels: an uncapped tunnel
gets a plain `Splice`, unchanged.

The buckets belong to the tunnel (relay/node/tunnels.py), one per direction,
so a capped tunnel's visitors share its cap, and a reload can change the rate
of live streams (`TokenBucket.set_rate`).
"""

from __future__ import annotations

from relay.wire.splice import Splice, _SpliceSide

# A quarter of a second of burst, and never less than one 64 KiB read: the
# bucket then never pauses a transport for less than one chunk's worth.
BURST_SECONDS = 0.25
MIN_BURST_BYTES = 64 * 1024


def _burst(rate: float) -> int:
    return max(MIN_BURST_BYTES, int(rate * BURST_SECONDS))


class TokenBucket:
    """`rate` bytes per second, bursts of `burst`; a charge may overdraw it."""

    __slots__ = ("clock", "rate", "burst", "tokens", "at")

    def __init__(self, rate: float, clock):
        self.clock = clock
        self.at = clock.seconds()
        self.rate = float(rate)
        self.burst = _burst(self.rate)
        self.tokens = float(self.burst)

    def set_rate(self, rate: float) -> None:
        """A new rate from now on (what was earned so far stays earned)."""
        self._refill()
        self.rate = float(rate)
        self.burst = _burst(self.rate)
        self.tokens = min(self.tokens, float(self.burst))

    def _refill(self) -> None:
        now = self.clock.seconds()
        self.tokens = min(float(self.burst), self.tokens + (now - self.at) * self.rate)
        self.at = now

    def charge(self, n: int) -> float:
        """Take `n` bytes; the seconds until the bucket is out of debt (0: none)."""
        self._refill()
        self.tokens -= n
        return -self.tokens / self.rate if self.tokens < 0 else 0.0

    def wait_seconds(self) -> float:
        self._refill()
        return -self.tokens / self.rate if self.tokens < 0 else 0.0


class _ThrottledSide(_SpliceSide):
    __slots__ = ("bucket", "clock", "throttled", "_resume_call")

    def __init__(self, splice, bucket: TokenBucket, clock):
        super().__init__(splice)
        self.bucket = bucket
        self.clock = clock
        self.throttled = False  # we paused our own transport for the bucket
        self._resume_call = None

    def dataReceived(self, data: bytes):
        super().dataReceived(data)
        wait = self.bucket.charge(len(data))
        if wait > 0 and not self.throttled:
            self._throttle(wait)

    def _throttle(self, wait: float) -> None:
        self.throttled = True
        if not self.paused and not self._waiting and not self.read_ended and not self.lost:
            self.transport.pauseProducing()
        self._resume_call = self.clock.callLater(wait, self._unthrottle)

    def _unthrottle(self) -> None:
        self._resume_call = None
        if self.lost:
            return
        wait = self.bucket.wait_seconds()  # the tunnel's other visitors may have spent it
        if wait > 0:
            self._resume_call = self.clock.callLater(wait, self._unthrottle)
            return
        self.throttled = False
        if not self.paused and not self._waiting and not self.read_ended:
            self.transport.resumeProducing()

    def pauseProducing(self):
        if self.throttled:
            self.paused = True  # already paused for the bucket
            return
        super().pauseProducing()

    def resumeProducing(self):
        if self.throttled:
            self.paused = False  # the timer resumes it
            return
        super().resumeProducing()

    def connectionLost(self, reason):
        call, self._resume_call = self._resume_call, None
        if call is not None and call.active():
            call.cancel()
        super().connectionLost(reason)


class ThrottledSplice(Splice):
    """A splice whose side `a` pays into `a_bucket` for what it reads, `b` into `b_bucket`."""

    __slots__ = ()

    def __init__(self, clock, a_bucket: TokenBucket, b_bucket: TokenBucket):
        self.a = _ThrottledSide(self, a_bucket, clock)
        self.b = _ThrottledSide(self, b_bucket, clock)
        self.a.other, self.b.other = self.b, self.a
        self.joined = False

    def _join(self) -> None:
        super()._join()
        for side in (self.a, self.b):
            # The join resumes each side; one its early bytes put in debt stays paused.
            if side.throttled and not side.read_ended and not side.lost:
                side.transport.pauseProducing()
