"""Flow control (docs/protocol.md "Flow control"): send windows, credit, auto-tuning.

Most tests send relay -> agent, with the agent as the receiver that grants
credit. `flight()` models one round trip over a link with latency: the relay
sends all its windows allow, the agent reads the frames one at a time (as
Twisted hands over one read after another), and only then do the agent's
WINDOW_UPDATEs reach the relay.
"""

import pytest

from relay.mux import ErrorCode, FlowControlError, FrameType, MuxProtocolError
from relay.mux import events as ev
from relay.mux import frames as fr
from relay.mux.window import LinkBudget, ReceiveWindow
from tests.mux import helpers as h
from tests.mux.helpers import LinkPair

KiB = 1024
MiB = 1024 * KiB
INITIAL = 256 * KiB
MAXIMUM = 8 * MiB
BIG = b"\x00" * (16 * MiB)


def opened(**agent_kwargs) -> tuple[LinkPair, int]:
    pair = LinkPair(agent_kwargs=agent_kwargs)
    sid = pair.relay.open_stream({})
    pair.exchange()
    return pair, sid


def flight(pair: LinkPair, policies: dict[int, str | None]) -> dict[int, int]:
    """One round trip on the streams of `policies`; return the bytes each carried.

    A stream's policy says when the agent consumes what it received: "prompt"
    (right after each read), "late" (only once the whole flight is in), or
    None (never: a stalled consumer).
    """
    carried = {sid: pair.relay.send(sid, BIG) for sid in policies}
    received = {sid: 0 for sid in policies}
    for raw in h.split(b"".join(pair.relay.outgoing())):
        for event in pair.agent.receive_data(raw):
            assert isinstance(event, ev.DataReceived)
            received[event.stream_id] += len(event.data)
            if policies[event.stream_id] == "prompt":
                pair.agent.consumed(event.stream_id, len(event.data))
    for sid, policy in policies.items():
        if policy == "late":
            pair.agent.consumed(sid, received[sid])
    assert received == carried
    pair.to_relay()
    return carried


# -- send window ---------------------------------------------------------------


def test_sender_cannot_exceed_the_window():
    """send() takes no more than the peer's window and returns the count taken; at zero it takes
    nothing."""
    pair, sid = opened()
    assert pair.relay.send_window(sid) == INITIAL
    assert pair.relay.send(sid, b"x" * (INITIAL + 1000)) == INITIAL
    assert pair.relay.send_window(sid) == 0
    assert pair.relay.send(sid, b"more") == 0
    frames = h.sent(pair.relay)
    assert sum(len(f[3]) for f in frames) == INITIAL


def test_data_frames_are_cut_at_64k():
    """A large write goes out as DATA frames of at most 64 KiB, in order."""
    pair, sid = opened()
    payload = bytes(range(256)) * 800  # 204800 bytes
    assert pair.relay.send(sid, payload) == len(payload)
    frames = h.sent(pair.relay)
    assert [len(f[3]) for f in frames] == [65536, 65536, 65536, 8192]
    assert b"".join(f[3] for f in frames) == payload


def test_send_window_of_unknown_stream_is_zero():
    """A stream that does not exist has no send window."""
    pair, _ = opened()
    assert pair.relay.send_window(98) == 0


# -- receive window -------------------------------------------------------------


def test_receiver_rejects_an_overrun():
    """DATA past the credit granted closes the link with FLOW_CONTROL_ERROR."""
    pair, sid = opened(initial_window=4096)
    assert pair.agent.receive_data(h.data(sid, b"x" * 4000)) == [ev.DataReceived(sid, b"x" * 4000)]
    with pytest.raises(FlowControlError) as info:
        pair.agent.receive_data(h.data(sid, b"x" * 97))
    assert info.value.code is ErrorCode.FLOW_CONTROL_ERROR
    [goaway] = h.sent(pair.agent)
    assert (
        goaway[0] is FrameType.GOAWAY
        and fr.decode_coded(goaway[3])[0] is ErrorCode.FLOW_CONTROL_ERROR
    )


def test_granted_credit_extends_what_the_peer_may_send():
    """After a WINDOW_UPDATE the peer may send exactly the window plus the increment, not a byte
    more."""
    pair, sid = opened(initial_window=4096)
    pair.agent.receive_data(h.data(sid, b"x" * 3000))
    pair.agent.consumed(sid, 3000)
    assert h.sent(pair.agent) == [(FrameType.WINDOW_UPDATE, 0, sid, (3000).to_bytes(4, "big"))]
    assert pair.agent.receive_data(h.data(sid, b"x" * 4096)) == [ev.DataReceived(sid, b"x" * 4096)]
    with pytest.raises(FlowControlError):
        pair.agent.receive_data(h.data(sid, b"x"))


def test_credit_is_returned_only_after_consumed():
    """Received bytes earn the sender no credit until the receiver reports them consumed."""
    pair, sid = opened()
    assert pair.relay.send(sid, b"x" * (INITIAL // 2)) == INITIAL // 2
    pair.to_agent()
    assert pair.agent.outgoing() == []
    assert pair.relay.send_window(sid) == INITIAL // 2
    pair.agent.consumed(sid, INITIAL // 2)
    assert h.sent(pair.agent) == [
        (FrameType.WINDOW_UPDATE, 0, sid, (INITIAL // 2).to_bytes(4, "big"))
    ]


def test_credit_is_batched_by_quarter_window():
    """Consumed bytes are credited in one WINDOW_UPDATE once a quarter of the window is due."""
    pair, sid = opened()
    pair.relay.send(sid, b"x" * (INITIAL // 2))
    pair.to_agent()
    for _ in range(63):
        pair.agent.consumed(sid, 1024)
    assert pair.agent.outgoing() == []
    pair.agent.consumed(sid, 1024)
    assert h.sent(pair.agent) == [(FrameType.WINDOW_UPDATE, 0, sid, (64 * 1024).to_bytes(4, "big"))]


def test_any_credit_goes_out_when_the_peer_has_none():
    """When the peer's window is empty even a one-byte credit is sent at once."""
    pair, sid = opened()
    pair.relay.send(sid, b"x" * INITIAL)
    pair.to_agent()
    pair.agent.consumed(sid, 1)
    assert h.sent(pair.agent) == [(FrameType.WINDOW_UPDATE, 0, sid, (1).to_bytes(4, "big"))]


def test_window_opened_only_when_the_window_was_empty():
    """The sender gets WindowOpened when credit arrives on an empty window, and not otherwise."""
    pair, sid = opened()
    pair.relay.send(sid, b"x" * (INITIAL - 1))
    pair.to_agent()
    pair.agent.consumed(sid, INITIAL // 2)
    assert pair.to_relay() == []
    pair.relay.send(sid, BIG)
    pair.to_agent()
    pair.agent.consumed(sid, INITIAL // 2)
    assert pair.to_relay() == [ev.WindowOpened(sid)]


def test_no_credit_once_the_peer_has_finished():
    """After the peer's FIN no WINDOW_UPDATE is sent: it will not send again."""
    pair, sid = opened()
    pair.relay.send(sid, b"x" * INITIAL)
    pair.relay.end_stream(sid)
    pair.to_agent()
    pair.agent.consumed(sid, INITIAL)
    assert pair.agent.outgoing() == []


def test_consumed_on_a_gone_stream_is_a_no_op():
    """Reporting bytes consumed on a stream that is gone sends nothing."""
    pair, sid = opened()
    pair.relay.send(sid, b"x" * INITIAL)
    pair.to_agent()
    pair.agent.reset(sid)
    pair.agent.outgoing()
    pair.agent.consumed(sid, INITIAL)
    pair.agent.consumed(12345, 10)
    assert pair.agent.outgoing() == []


@pytest.mark.parametrize(
    "raw, code",
    [
        (h.window_update(2, 0), ErrorCode.PROTOCOL_ERROR),
        (h.frame(FrameType.WINDOW_UPDATE, 2, b"\x00\x00\x01"), ErrorCode.PROTOCOL_ERROR),
        (h.frame(FrameType.WINDOW_UPDATE, 2, b"\x00\x00\x00\x01\x00"), ErrorCode.PROTOCOL_ERROR),
        (h.window_update(2, 2**31 - INITIAL), ErrorCode.FLOW_CONTROL_ERROR),
    ],
    ids=["zero", "short", "long", "overflow"],
)
def test_bad_window_updates(raw, code):
    """A WINDOW_UPDATE of 0, not 4 bytes long, or lifting the window past 2^31-1 closes the link."""
    pair, sid = opened()
    assert sid == 2
    with pytest.raises(MuxProtocolError) as info:
        pair.relay.receive_data(raw)
    assert info.value.code is code


def test_window_may_reach_2_31_minus_1():
    """A window of exactly 2^31-1 is allowed."""
    pair, sid = opened()
    assert pair.relay.receive_data(h.window_update(sid, 2**31 - 1 - INITIAL)) == []
    assert pair.relay.send_window(sid) == 2**31 - 1


# -- auto-tuning -------------------------------------------------------------------


def test_window_grows_to_the_maximum_when_window_limited_and_consumed_promptly():
    """A sender held back only by its window, with a prompt consumer, gets a window that grows to 8
    MiB and no further."""
    pair, sid = opened()
    flights = [flight(pair, {sid: "prompt"})[sid] for _ in range(10)]
    assert flights[0] == INITIAL
    assert flights[1] > INITIAL
    assert MAXIMUM in flights[:6]
    assert max(flights) == MAXIMUM
    assert flights[-3:] == [MAXIMUM] * 3


def test_window_grows_with_unaligned_writes_too():
    """Growth does not depend on writes lining up with 64 KiB frames: the sender stopping at its
    credit is the signal."""
    pair, sid = opened()
    flights = []
    for _ in range(12):
        total = 0
        while (n := pair.relay.send(sid, b"y" * 50_000)) > 0:
            total += n
        for raw in h.split(b"".join(pair.relay.outgoing())):
            for event in pair.agent.receive_data(raw):
                pair.agent.consumed(sid, len(event.data))
        pair.to_relay()
        flights.append(total)
    assert flights[0] == INITIAL
    assert max(flights) == MAXIMUM


def test_window_does_not_grow_for_a_lagging_consumer():
    """If the received bytes sit unconsumed when the window runs dry, the window stays at its
    initial size."""
    pair, sid = opened()
    flights = [flight(pair, {sid: "late"})[sid] for _ in range(8)]
    assert flights == [INITIAL] * 8


def test_window_does_not_grow_for_an_app_limited_sender():
    """A sender that never uses its whole window, writing small pieces, does not make the window
    grow."""
    pair, sid = opened()
    for i in range(2000):
        pair.relay.send(sid, b"z" * (1000 + i % 97))
        for event in pair.to_agent():
            pair.agent.consumed(sid, len(event.data))
        pair.to_relay()
    assert pair.agent.budget.available == 64 * MiB
    assert pair.relay.send_window(sid) <= INITIAL


def test_window_shrinks_when_the_consumer_lags():
    """After growing, each round in which the consumer lets over half the window pile up halves it,
    down to the initial size."""
    pair, sid = opened()
    for _ in range(8):
        flight(pair, {sid: "prompt"})
    assert pair.agent.budget.available == 64 * MiB - (MAXIMUM - INITIAL)
    flights = [
        flight(pair, {sid: "late"})[sid] for _ in range(7)
    ]  # each flight sits unconsumed, then goes at once
    assert flights[0] == MAXIMUM  # already granted while the consumer kept up
    assert flights == sorted(flights, reverse=True)
    assert all(later in (earlier, earlier // 2) for earlier, later in zip(flights, flights[1:]))
    assert flights[-1] == INITIAL
    assert pair.agent.budget.available == 64 * MiB


def test_link_budget_bounds_total_growth():
    """Growth above the initial windows, summed over a link's streams, never exceeds the link
    budget."""
    budget = 1 * MiB
    pair = LinkPair(agent_kwargs={"link_budget": budget})
    sids = [pair.relay.open_stream({}) for _ in range(4)]
    pair.exchange()
    for _ in range(8):
        carried = flight(pair, {sid: "prompt" for sid in sids})
        assert sum(carried.values()) <= len(sids) * INITIAL + budget
        assert 0 <= pair.agent.budget.available <= budget
    assert pair.agent.budget.available == 0
    assert sum(carried.values()) > len(sids) * INITIAL


def test_no_budget_no_growth():
    """With an empty link budget every stream keeps its initial window."""
    pair, sid = opened(link_budget=0)
    assert [flight(pair, {sid: "prompt"})[sid] for _ in range(6)] == [INITIAL] * 6


@pytest.mark.parametrize("how", ["fin", "reset"])
def test_closing_a_stream_returns_its_growth(how):
    """When a grown stream closes, its growth goes back to the link budget."""
    pair, sid = opened()
    for _ in range(4):
        flight(pair, {sid: "prompt"})
    assert pair.agent.budget.available < 64 * MiB
    if how == "fin":
        pair.relay.end_stream(sid)
        pair.agent.end_stream(sid)
    else:
        pair.agent.reset(sid)
    pair.exchange()
    assert sid not in pair.agent.streams
    assert pair.agent.budget.available == 64 * MiB


def test_stalled_streams_do_not_stop_a_neighbour():
    """Streams whose consumers stalled cost one window each and never slow a neighbour down."""
    pair = LinkPair()
    stalled = [pair.relay.open_stream({}) for _ in range(8)]
    busy = pair.relay.open_stream({})
    pair.exchange()
    policies = {sid: None for sid in stalled}
    policies[busy] = "prompt"
    rounds = [flight(pair, policies) for _ in range(8)]
    assert [r[stalled[0]] for r in rounds] == [INITIAL] + [0] * 7
    assert all(r[busy] > 0 for r in rounds)
    assert rounds[-1][busy] == MAXIMUM
    # Only the busy stream borrowed from the budget; each stalled one holds its initial window.
    assert pair.agent.budget.available == 64 * MiB - (MAXIMUM - INITIAL)


# -- window.py arithmetic -------------------------------------------------------------


def test_receive_window_refuses_overrun():
    """received() reports an overrun instead of counting it."""
    window = ReceiveWindow(1000, 8000)
    assert window.received(1000)
    assert not window.received(1)
    assert (window.remaining, window.pending) == (0, 1000)


def test_growth_is_doubling_lent_from_the_budget_and_capped():
    """Each starved round doubles the target, takes the growth from the budget, and stops at the
    maximum."""
    budget = LinkBudget(10_000)
    window = ReceiveWindow(1000, 4000)
    targets = []
    for _ in range(4):
        assert window.received(window.remaining)  # the sender used its credit to the last byte
        window.consumed(window.pending, budget)
        targets.append(window.target)
    assert targets == [2000, 4000, 4000, 4000]
    assert budget.available == 10_000 - 3000
    window.release(budget)
    assert budget.available == 10_000 and window.target == 1000


def test_shrink_never_goes_below_initial():
    """A lagging consumer halves the target, never below the initial window."""
    budget = LinkBudget(10_000)
    window = ReceiveWindow(1000, 8000)
    for _ in range(3):
        window.received(window.remaining)
        window.consumed(window.pending, budget)
    assert window.target == 8000
    window.received(4000)  # a full window arrives, in two pieces, and sits in our buffer
    window.received(window.remaining)
    targets = []
    while window.pending:
        window.consumed(min(500, window.pending), budget)
        targets.append(window.target)
    assert targets[:3] == [4000, 2000, 1000]
    assert min(targets) == 1000
    assert budget.available == 10_000
