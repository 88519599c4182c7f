"""Public TCP ports for unencrypted tunnels: random choice, quarantine on release.

A freed port is not handed to another tunnel for `quarantine_seconds`, so a
visitor holding a stale address never reaches someone else's service. Binding
is the caller's job (tunnels.py): a port another process holds is skipped.
"""

import secrets


class NoFreePortError(Exception):
    """Every port of the range is in use or in quarantine."""


class PortAllocator:
    def __init__(self, low: int, high: int, quarantine_seconds: float, clock):
        if not 1 <= low <= high <= 65535:
            raise ValueError(f"bad port range {low}-{high}")
        self.low, self.high = low, high
        self.quarantine_seconds = quarantine_seconds
        self.clock = clock
        self.in_use: set[int] = set()
        self._quarantine: dict[int, float] = {}  # port -> when it may be reused
        self._random = secrets.SystemRandom()

    @property
    def size(self) -> int:
        return self.high - self.low + 1

    def _expire_quarantine(self) -> None:
        now = self.clock.seconds()
        for port in [p for p, until in self._quarantine.items() if until <= now]:
            del self._quarantine[port]

    def candidates(self, count: int, within: tuple[int, int] | None = None) -> list[int]:
        """Up to `count` distinct free ports in random order; `within` (LO, HI)
        narrows the range (a token's ports: relay/node/tokens.py)."""
        self._expire_quarantine()
        low, high = self.low, self.high
        if within is not None:
            low, high = max(low, within[0]), min(high, within[1])
            if low > high:
                raise NoFreePortError(
                    f"ports {within[0]}-{within[1]} lie outside the relay's range {self.low}-{self.high}"
                )
        size = high - low + 1
        if within is None:
            used, resting = len(self.in_use), len(self._quarantine)
        else:
            used = sum(low <= p <= high for p in self.in_use)
            resting = sum(low <= p <= high for p in self._quarantine)
        busy = used + resting
        if busy >= size:
            raise NoFreePortError(f"no free port in {low}-{high}: {used} in use, {resting} in quarantine")
        picked: list[int] = []
        if size <= 4096 or busy > size // 2:
            free = [
                p for p in range(low, high + 1)
                if p not in self.in_use and p not in self._quarantine
            ]
            self._random.shuffle(free)
            return free[:count]
        seen: set[int] = set()
        while len(picked) < count and len(seen) < 4 * count:
            port = self._random.randint(low, high)
            if port in seen:
                continue
            seen.add(port)
            if port not in self.in_use and port not in self._quarantine:
                picked.append(port)
        return picked

    def claim(self, port: int) -> None:
        self.in_use.add(port)

    def unclaim(self, port: int) -> None:
        """A claimed port that was never bound (another process holds it, or
        the request failed): free again at once, no quarantine."""
        self.in_use.discard(port)

    def release(self, port: int) -> None:
        if port in self.in_use:
            self.in_use.discard(port)
            self._quarantine[port] = self.clock.seconds() + self.quarantine_seconds

    def keep(self, port: int) -> None:
        """A port reserved for a stable name: unbound, but nobody else's."""
        self.in_use.add(port)

    def quarantine_until(self, port: int, until: float) -> None:
        """Quarantine restored from the state folder after a restart."""
        if port not in self.in_use and until > self.clock.seconds():
            self._quarantine[port] = until

    def quarantine(self) -> dict[int, float]:
        """Port -> when it may be reused, for the state folder."""
        self._expire_quarantine()
        return dict(self._quarantine)

    def quarantined(self) -> int:
        self._expire_quarantine()
        return len(self._quarantine)
