"""Flow-control arithmetic for one direction of one stream: no I/O, no policy
beyond the auto-tuning rule stated in docs/protocol.md ("Flow control").

The receiver owns a *target* window per stream: how many bytes the sender may
have in flight or sitting unconsumed in our buffers. It starts at the initial
window and doubles (up to a maximum) when the sender proved window-limited:
the window ran dry while our own buffer was nearly empty, which means the
bytes were in flight, not waiting for a slow consumer. A consumer that lags
halves it again. The link lends the growth above the initial window from a
shared budget, so the total a link can buffer is bounded, while every stream
keeps its initial window: a stalled stream never blocks its neighbours.

"The window ran dry" is judged against the sender's credit, not `remaining`:
`remaining` already counts credit we granted that may still be on its way to
the sender, and since we grant as we consume, it never falls below 3/4 of the
target while the consumer keeps up. So we remember where each grant ran out
(`limits`, as offsets in the stream's received bytes): a DATA frame that ends
exactly on one is a sender that stopped at its credit edge.
"""

from collections import deque

# Grants whose limit the sender has not reached yet. Usually a handful (one per
# quarter window); dropping the oldest only makes growth more conservative.
MAX_TRACKED_GRANTS = 32


class LinkBudget:
    """Bytes of window growth (above the initial window) a link may lend out."""

    __slots__ = ("available",)

    def __init__(self, total_bytes: int):
        self.available = total_bytes


class ReceiveWindow:
    __slots__ = (
        "initial",
        "maximum",
        "target",
        "remaining",
        "pending",
        "starved",
        "received_total",
        "limits",
    )

    def __init__(self, initial: int, maximum: int):
        self.initial = initial
        self.maximum = max(initial, maximum)
        self.target = initial
        self.remaining = initial  # what the peer may still send before our next grant
        self.pending = 0  # received, not yet consumed (sitting in our buffers)
        self.starved = False
        self.received_total = 0
        # received_total at which each grant's credit runs out, oldest first
        self.limits = deque([initial], maxlen=MAX_TRACKED_GRANTS)

    def received(self, n: int) -> bool:
        """Account for n received bytes; False if the peer overran the window."""
        if n > self.remaining:
            return False
        self.received_total += n
        limits = self.limits
        while limits and limits[0] < self.received_total:
            limits.popleft()
        at_limit = bool(limits) and limits[0] == self.received_total
        if at_limit:
            limits.popleft()
        if (at_limit or self.remaining - n < self.target // 4) and self.pending <= self.target // 4:
            self.starved = True  # window-limited: the bytes were in flight, not queued here
        self.remaining -= n
        self.pending += n
        return True

    def consumed(self, n: int, budget: LinkBudget) -> int:
        """Account for n consumed bytes; return the credit to grant now (0: none yet)."""
        # What the consumer had let pile up, this report included: an adapter
        # that holds credit while its transport is paused reports it all at once.
        backlog = self.pending
        self.pending -= n
        if self.starved:
            self.starved = False
            growth = min(self.target, self.maximum - self.target, budget.available)
            if growth > 0:
                budget.available -= growth
                self.target += growth
        elif backlog > self.target // 2 and self.target > self.initial:
            # The consumer lags (our buffer holds over half the window): give
            # growth back to the link rather than buffer more for this stream.
            shrink = min(self.target // 2, self.target - self.initial)
            self.target -= shrink
            budget.available += shrink
        grant = self.target - self.remaining - self.pending
        # Batch small credits: one WINDOW_UPDATE per quarter window at most.
        if grant >= self.target // 4 or (grant > 0 and self.remaining == 0):
            self.remaining += grant
            self.limits.append(self.received_total + self.remaining)
            return grant
        return 0

    def release(self, budget: LinkBudget) -> None:
        """The stream is gone: give its growth back to the link."""
        budget.available += self.target - self.initial
        self.target = self.initial
