"""Flow-control arithmetic for one direction of one stream: no I/O, no policy
beyond the auto-tuning rule stated in docs/protocol.md ("Flow control").

The receiver owns a *target* window per stream: how many bytes the sender may
have in flight or sitting unconsumed in our buffers. It starts at the initial
window and doubles (up to a maximum) when the sender proved window-limited:
the window nearly ran dry while our own buffer was nearly empty, which means
the bytes were in flight, not waiting for a slow consumer. A consumer that
lags halves it again. The link lends the growth above the initial window from
a shared budget, so the total a link can buffer is bounded, while every stream
keeps its initial window: a stalled stream never blocks its neighbours.
"""


class LinkBudget:
    """Bytes of window growth (above the initial window) a link may lend out."""

    __slots__ = ("available",)

    def __init__(self, total_bytes: int):
        self.available = total_bytes


class ReceiveWindow:
    __slots__ = ("initial", "maximum", "target", "remaining", "pending", "starved")

    def __init__(self, initial: int, maximum: int):
        self.initial = initial
        self.maximum = max(initial, maximum)
        self.target = initial
        self.remaining = initial  # what the peer may still send before our next grant
        self.pending = 0  # received, not yet consumed (sitting in our buffers)
        self.starved = False

    def received(self, n: int) -> bool:
        """Account for n received bytes; False if the peer overran the window."""
        if n > self.remaining:
            return False
        if self.remaining - n < self.target // 4 and self.pending <= self.target // 4:
            self.starved = True  # window-limited: the bytes were in flight, not queued here
        self.remaining -= n
        self.pending += n
        return True

    def consumed(self, n: int, budget: LinkBudget) -> int:
        """Account for n consumed bytes; return the credit to grant now (0: none yet)."""
        self.pending -= n
        if self.starved:
            self.starved = False
            growth = min(self.target, self.maximum - self.target, budget.available)
            if growth > 0:
                budget.available -= growth
                self.target += growth
        elif self.pending > self.target // 2 and self.target > self.initial:
            # The consumer lags (our buffer holds over half the window): give
            # growth back to the link rather than buffer more for this stream.
            shrink = min(self.target // 2, self.target - self.initial)
            self.target -= shrink
            budget.available += shrink
        grant = self.target - self.remaining - self.pending
        # Batch small credits: one WINDOW_UPDATE per quarter window at most.
        if grant >= self.target // 4 or (grant > 0 and self.remaining == 0):
            self.remaining += grant
            return grant
        return 0

    def release(self, budget: LinkBudget) -> None:
        """The stream is gone: give its growth back to the link."""
        budget.available += self.target - self.initial
        self.target = self.initial
