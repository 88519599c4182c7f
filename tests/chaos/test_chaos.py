"""The chaos suite at CI size: each test runs one scenario of
tests/chaos/scenarios.py against real processes and asserts every margin it
measured (docs/security.md, "The chaos suite"). scripts/soak.py runs the same
scenarios larger, for a bounded time."""

import pytest

from tests.chaos import scenarios as sc

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(120)]


def check(margins):
    failed = [str(x) for x in margins if not x.ok]
    assert not failed, "\n".join(failed)


def test_ping_flood_that_never_reads(rig, scale):
    """An agent that pings and never reads makes the relay stop reading it, not grow."""
    check(sc.ping_flood_never_reads(rig, scale))


def test_opens_never_answered(rig, scale):
    """Visitors of an agent that never answers OPENs: past 256 in flight they are closed at once."""
    check(sc.opens_never_answered(rig, scale))


def test_empty_data_flood(rig, scale):
    """Empty DATA frames past the useless-frame bound end the link with ENHANCE_YOUR_CALM."""
    check(sc.empty_data_flood(rig, scale))


def test_garbage_control(rig, scale):
    """Garbage control messages (surrogates, huge numbers, Infinity, nesting) get typed errors, never INTERNAL_ERROR."""
    check(sc.garbage_control(rig, scale))


def test_connect_and_reset_visitors(rig, scale):
    """Visitors that connect and reset at once leave no fds behind, and a transfer beside them stays byte-exact."""
    check(sc.connect_reset_flood(rig, scale))


def test_downloads_never_read(rig, scale):
    """Visitors that never read a download hold at most one window each in the relay, and nothing once gone."""
    check(sc.never_read_downloads(rig, scale))


def test_faulty_link(rig, scale):
    """Through delay, throttle, freeze, reset and close on its link, an agent's streams stay byte-exact and it comes back."""
    check(sc.faulty_link(rig, scale))


def test_bad_open_metadata_from_a_hostile_relay(rig, scale):
    """OPENs with bad metadata from a hostile relay are refused or served one by one on the same link; a non-JSON one ends it and the agent dials again."""
    check(sc.bad_open_metadata(rig, scale))


def test_open_reset_flood_from_a_hostile_relay(rig, scale):
    """A relay that floods OPENs, then RESETs them, never reading, leaves the agent no service connections or growth."""
    check(sc.open_reset_flood(rig, scale))


def test_opens_held_by_a_hostile_relay(rig, scale):
    """Each OPEN a relay holds costs the agent one service connection and a few KiB, all returned when the link goes."""
    check(sc.opens_held(rig, scale))
