"""Public port allocation: random, never straight back to the next tunnel."""

import pytest
from twisted.internet.task import Clock

from relay.node.ports import NoFreePortError, PortAllocator


def test_freed_port_rests_in_quarantine():
    """With two ports, a freed one is skipped until its quarantine ends."""
    clock = Clock()
    ports = PortAllocator(20000, 20001, quarantine_seconds=60, clock=clock)
    first = ports.candidates(1)[0]
    ports.claim(first)
    ports.release(first)
    second = ports.candidates(5)
    assert second == [20001 if first == 20000 else 20000]
    ports.claim(second[0])
    with pytest.raises(NoFreePortError, match="quarantine"):
        ports.candidates(1)
    clock.advance(60)
    assert ports.candidates(5) == [first]


def test_candidates_are_random_and_free():
    """Candidates come from the whole range, in random order, never in use."""
    ports = PortAllocator(20000, 29999, quarantine_seconds=60, clock=Clock())
    ports.claim(20005)
    picks = ports.candidates(32)
    assert len(set(picks)) == 32 and 20005 not in picks
    assert all(20000 <= p <= 29999 for p in picks)
    assert picks != sorted(picks)


def test_bad_range_is_refused():
    """A range outside 1-65535 or reversed is a ValueError."""
    with pytest.raises(ValueError):
        PortAllocator(5, 1, 1, Clock())
