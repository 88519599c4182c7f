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

The link also caps the initial windows of the streams it opens, in all
(`WindowPool`): a new stream's window is taken from the pool and given back
when the stream is forgotten. As the pool fills, new streams get smaller
windows, halved step by step down to a floor (never 0: a stream always makes
progress, and a stalled one never blocks its neighbours), and past the cap
no stream is opened. With the growth budget this bounds what a peer can make
one link buffer, however many streams it has.
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


# The smallest initial window a new stream gets as the pool nears its cap:
# 4 KiB keeps 10,000+ streams on one link within the default 64 MiB (the
# benchmark holds 10,000 idle visitors; 16 KiB would refuse past ~4,000),
# and a busy stream grows from it within a few round trips (doubling, from
# the growth budget).
MIN_STREAM_WINDOW = 4 * 1024
# New streams get the full initial window while under 1/8 of the pool is
# granted, then half of it for each further 1/32 granted, down to the floor:
# at the defaults (64 MiB, 256 KiB, 4 KiB) the first 32 streams get 256 KiB,
# windows reach the floor at 18 MiB, and the rest of the pool is given out
# at the floor. Most of the pool is for many small windows, because streams
# far outnumber the ones that are busy at once, and busy ones grow.
POOL_STEPS = 32
POOL_FULL_STEPS = 4


class WindowPool:
    """Initial receive windows granted to the streams a link opened, against a cap."""

    __slots__ = ("cap", "floor", "granted")

    def __init__(self, cap_bytes: int, floor_bytes: int = MIN_STREAM_WINDOW):
        if not 0 < floor_bytes <= cap_bytes:
            raise ValueError(f"window pool of {cap_bytes} bytes with a floor of {floor_bytes}")
        self.cap = cap_bytes
        self.floor = floor_bytes
        self.granted = 0

    def offer(self, initial: int) -> int:
        """The window a stream opened now would get (0: past the cap)."""
        cap, granted = self.cap, self.granted
        halvings = max(0, (POOL_STEPS * granted) // cap - POOL_FULL_STEPS + 1)
        floor = min(self.floor, initial)
        window = min(max(initial >> halvings, floor), cap - granted)
        return window if window >= floor else 0

    def take(self, initial: int) -> int:
        """Grant a new stream its window (see `offer`); 0 if past the cap."""
        window = self.offer(initial)
        self.granted += window
        return window

    def release(self, window: int) -> None:
        self.granted -= window


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
