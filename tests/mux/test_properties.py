"""Property tests for MuxConnection (hypothesis), as h2's tests/test_state_machines.py.

- Splitting: any split of a valid byte stream into reads gives the same events
  and the same replies as feeding it whole.
- Robustness: any bytes, on either side, before or after the handshake, give
  events or a MuxProtocolError subclass (with GOAWAY queued), never another
  exception.
- State machine: random interleavings of commands on both ends of a link either
  succeed or raise MuxUsageError, and the bytes they put on the wire are always
  accepted by the peer, with stream data arriving intact and in order.
"""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from relay.mux import ErrorCode, FrameType, MuxConnection, MuxProtocolError, MuxUsageError, Role
from relay.mux import events as ev
from relay.mux import frames as fr
from tests.mux import helpers as h
from tests.mux.helpers import TOKEN, LinkPair

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- strategies --------------------------------------------------------------------

json_objects = st.dictionaries(
    st.text(max_size=8),
    st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.text(max_size=20)),
    max_size=4,
)
error_codes = st.sampled_from(list(ErrorCode))

# One command of a relay that sends a valid stream to an agent.
relay_commands = st.one_of(
    st.tuples(st.just("open"), json_objects),
    # Some writes exceed 16 KiB, the pre-HELLO limit: they must still be read as
    # 256 KiB-limited frames whatever read they land in.
    st.tuples(
        st.just("send"),
        st.integers(0, 8),
        st.one_of(st.integers(0, 300), st.integers(16_000, 70_000)),
    ),
    st.tuples(st.just("fin"), st.integers(0, 8)),
    st.tuples(st.just("reset"), st.integers(0, 8), error_codes, st.text(max_size=10)),
    st.tuples(st.just("control"), json_objects),
    st.tuples(st.just("ping"), st.binary(min_size=8, max_size=8)),
    st.tuples(st.just("pong"), st.binary(min_size=8, max_size=8)),
    st.tuples(st.just("window_update"), st.integers(0, 8), st.integers(1, 100_000)),
)


def valid_relay_stream(commands, goaway: bool) -> bytes:
    """What a relay writes to an agent: its HELLO, then `commands`, maybe a final GOAWAY."""
    relay = MuxConnection(Role.RELAY)
    relay.receive_data(h.hello(token=TOKEN))
    relay.send_hello({"motd": "welcome"})
    out = [b"".join(relay.outgoing())]
    opened: list[int] = []
    for command in commands:
        kind, *args = command
        stream_id = (
            opened[args[0] % len(opened)]
            if opened and kind in ("send", "fin", "reset", "window_update")
            else None
        )
        try:
            if kind == "open":
                opened.append(relay.open_stream(args[0]))
            elif kind == "send" and stream_id is not None:
                relay.send(stream_id, bytes([stream_id % 256]) * args[1])
            elif kind == "fin" and stream_id is not None:
                relay.end_stream(stream_id)
            elif kind == "reset" and stream_id is not None:
                relay.reset(stream_id, args[1], args[2])
            elif kind == "control":
                relay.send_control(args[0])
            elif kind == "ping":
                relay.ping(args[0])
            elif kind == "pong":  # as if answering an agent's PING
                relay._control.append(h.pong(args[0]))
            elif kind == "window_update" and stream_id in relay.streams:
                relay._control.append(h.window_update(stream_id, args[1]))
        except MuxUsageError:
            pass
        out.append(b"".join(relay.outgoing()))
    if goaway:
        out.append(h.goaway(ErrorCode.NO_ERROR, "bye") + h.frame(0x7F, 0, length=2**32 - 1))
    return b"".join(out)


def split_at(raw: bytes, cuts) -> list[bytes]:
    points = sorted({0, len(raw), *(c % (len(raw) + 1) for c in cuts)})
    return [raw[a:b] for a, b in zip(points, points[1:])]


def waiting_agent() -> MuxConnection:
    agent = MuxConnection(Role.AGENT)
    agent.send_hello({"token": TOKEN})
    agent.outgoing()
    return agent


def feed(conn: MuxConnection, chunks) -> tuple[list, bytes]:
    events = []
    for chunk in chunks:
        events += conn.receive_data(chunk)
    return events, b"".join(conn.outgoing())


# -- splitting ----------------------------------------------------------------------


@SETTINGS
@given(
    commands=st.lists(relay_commands, max_size=25),
    goaway=st.booleans(),
    cuts=st.lists(st.integers(0, 2**20), max_size=30),
)
def test_any_split_of_a_valid_stream_gives_the_same_events(commands, goaway, cuts):
    """Feeding an agent a valid relay stream in any reads gives the same events and replies as
    feeding it whole."""
    raw = valid_relay_stream(commands, goaway)
    whole = feed(waiting_agent(), [raw])
    assert whole == feed(waiting_agent(), split_at(raw, cuts))
    assert whole[0][0] == ev.HelloReceived(
        {"motd": "welcome", "version": 2, "initial_window": 256 * 1024}
    )


@settings(SETTINGS, max_examples=100)
@given(commands=st.lists(relay_commands, max_size=25))
def test_byte_at_a_time_gives_the_same_events(commands):
    """Feeding a valid stream one byte per read gives the same events as feeding it whole."""
    raw = valid_relay_stream(commands, goaway=False)[:8_000]  # a prefix is valid too
    assert feed(waiting_agent(), [raw]) == feed(
        waiting_agent(), [raw[i : i + 1] for i in range(len(raw))]
    )


@SETTINGS
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["open", "send", "fin", "control", "ping"]), st.integers(0, 70_000)
        ),
        max_size=20,
    ),
    cuts=st.lists(st.integers(0, 2**20), max_size=30),
)
def test_relay_side_split_gives_the_same_events(ops, cuts):
    """Feeding the relay a valid agent stream (after the handshake) in any reads gives the same
    events as feeding it whole."""
    pair = LinkPair()
    agent = pair.agent
    opened: list[int] = []
    for kind, n in ops:
        if kind == "open":
            opened.append(agent.open_stream({"n": n}))
        elif kind in ("send", "fin") and opened:
            sid = opened[n % len(opened)]
            try:
                agent.send(sid, b"a" * n) if kind == "send" else agent.end_stream(sid)
            except MuxUsageError:
                pass  # already finished
        elif kind == "control":
            agent.send_control({"n": n})
        elif kind == "ping":
            agent.ping(n.to_bytes(8, "big"))
    raw = b"".join(agent.outgoing())

    def accepted_relay():
        relay = MuxConnection(Role.RELAY)
        relay.receive_data(h.hello(token=TOKEN))
        relay.send_hello({})
        relay.outgoing()
        return relay

    assert feed(accepted_relay(), [raw]) == feed(accepted_relay(), split_at(raw, cuts))


# -- robustness -----------------------------------------------------------------------

frame_types = st.one_of(st.sampled_from(list(FrameType)), st.integers(0, 255))
stream_ids = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 2**31, 2**32 - 1])
payloads = st.one_of(
    st.binary(max_size=40),
    json_objects.map(lambda o: h.json_frame(0, 0, o)[10:]),
    st.builds(
        lambda v, w, t: h.hello(version=v, initial_window=w, token=t)[10:],
        st.sampled_from([2, 2, 2, 1, "2", None]),
        st.one_of(st.just(256 * 1024), st.integers(-5, 2**32)),
        st.text(max_size=5),
    ),
    st.integers(0, 2**32 - 1).map(lambda n: n.to_bytes(4, "big")),
    st.tuples(st.integers(0, 20), st.text(max_size=10)).map(
        lambda t: t[0].to_bytes(4, "big") + t[1].encode()
    ),
    st.integers(0, 70_000).map(lambda n: b"d" * n),
    st.integers(0, 4000).map(lambda n: b"[" * n + b"]" * n),  # nesting depth, not size
)
frames_st = st.builds(
    lambda t, s, p, f: h.frame(t, s, p, flags=f),
    frame_types,
    stream_ids,
    payloads,
    st.integers(0, 255),
)
wire = st.one_of(
    st.binary(max_size=200),
    st.lists(frames_st, max_size=12).map(b"".join),
    st.tuples(st.lists(frames_st, max_size=8).map(b"".join), st.binary(max_size=30)).map(b"".join),
)


def fresh_relay():
    return MuxConnection(Role.RELAY)


def accepted_relay():
    relay = MuxConnection(Role.RELAY)
    relay.receive_data(h.hello(token=TOKEN))
    relay.send_hello({})
    relay.open_stream({})
    relay.outgoing()
    return relay


def open_agent():
    agent = waiting_agent()
    agent.receive_data(h.hello() + h.open_frame(2) + h.open_frame(4))
    agent.open_stream({})
    agent.outgoing()
    return agent


def check_any_bytes(conn: MuxConnection, raw: bytes, cuts) -> None:
    """Arbitrary bytes give events or a MuxProtocolError subclass with GOAWAY(code) queued."""
    try:
        for chunk in split_at(raw, cuts):
            for event in conn.receive_data(chunk):
                assert type(event) in ev.Event.__args__
    except MuxProtocolError as e:
        assert isinstance(e.code, ErrorCode)
        last = h.parse(b"".join(conn.outgoing()))[-1]
        assert last[0] is FrameType.GOAWAY and fr.decode_coded(last[3])[0] == e.code
        assert conn.receive_data(raw) == []  # a closed link ignores the rest


ROBUSTNESS = settings(SETTINGS, max_examples=150)
cut_lists = st.lists(st.integers(0, 2**16), max_size=5)


@ROBUSTNESS
@given(raw=wire, cuts=cut_lists)
def test_any_bytes_to_a_fresh_relay(raw, cuts):
    """Any bytes to a relay awaiting HELLO give events or a MuxProtocolError, never another
    exception."""
    check_any_bytes(fresh_relay(), raw, cuts)


@ROBUSTNESS
@given(raw=wire, cuts=cut_lists)
def test_any_bytes_to_an_accepted_relay(raw, cuts):
    """Any bytes to a relay with an open link give events or a MuxProtocolError, never another
    exception."""
    check_any_bytes(accepted_relay(), raw, cuts)


@ROBUSTNESS
@given(raw=wire, cuts=cut_lists)
def test_any_bytes_to_a_waiting_agent(raw, cuts):
    """Any bytes to an agent awaiting the relay's HELLO give events or a MuxProtocolError, never
    another exception."""
    check_any_bytes(waiting_agent(), raw, cuts)


@ROBUSTNESS
@given(raw=wire, cuts=cut_lists)
def test_any_bytes_to_an_open_agent(raw, cuts):
    """Any bytes to an agent with an open link give events or a MuxProtocolError, never another
    exception."""
    check_any_bytes(open_agent(), raw, cuts)


@ROBUSTNESS
@given(raw=wire, cuts=cut_lists)
def test_any_bytes_to_a_silent_agent(raw, cuts):
    """Any bytes to an agent that has not sent HELLO give events or a MuxProtocolError, never
    another exception."""
    check_any_bytes(MuxConnection(Role.AGENT), raw, cuts)


# -- state machine ----------------------------------------------------------------------

# window_cap: the first stream a side opens gets 4096, the next ones 1024 (the
# floor), and past 8192 in all open_stream refuses until a stream ends.
SMALL = {
    "initial_window": 4096, "max_window": 32768, "link_budget": 32768,
    "window_cap": 8192, "min_window": 1024,
}


class LinkMachine(RuleBasedStateMachine):
    """Both ends of a link under random commands, with bytes delivered in random pieces."""

    def __init__(self):
        super().__init__()
        self.pair = LinkPair(agent_kwargs=SMALL, relay_kwargs=SMALL)
        self.conns = {"agent": self.pair.agent, "relay": self.pair.relay}
        self.peer = {"agent": "relay", "relay": "agent"}
        self.pipes = {"agent": b"", "relay": b""}  # bytes on their way *to* this side
        self.ids: set[int] = set()  # every stream id either side has seen
        self.sent: dict[tuple[str, int], bytes] = {}  # (sender, id) -> bytes send() took
        self.got: dict[tuple[str, int], bytes] = {}  # (receiver, id) -> bytes delivered
        self.unconsumed: dict[tuple[str, int], int] = {}
        self.counter = 0

    def _pick(self, data, side: str) -> int:
        """Mostly a stream that is live on `side`; sometimes a gone or never-opened one."""
        live = sorted(self.conns[side].streams)
        if live and data.draw(st.sampled_from([True, True, True, False])):
            return data.draw(st.sampled_from(live))
        return data.draw(st.sampled_from(sorted(self.ids | {97, 98})))

    def _usage(self, command, *args):
        """Run a command: it succeeds or raises MuxUsageError, nothing else."""
        try:
            return command(*args)
        except MuxUsageError:
            return None

    sides = st.sampled_from(["agent", "relay"])

    @initialize(relay_streams=st.integers(1, 3), agent_streams=st.integers(0, 2))
    def some_streams(self, relay_streams, agent_streams):
        """Start with streams open both ways, so the rules mostly act on live ones."""
        for _ in range(relay_streams):
            self.open_stream("relay")
        for _ in range(agent_streams):
            self.open_stream("agent")
        self.deliver("agent", True, 0)
        self.deliver("relay", True, 0)

    @rule(side=sides)
    def open_stream(self, side):
        self.counter += 1
        sid = self._usage(self.conns[side].open_stream, {"n": self.counter})
        if sid is not None:
            self.ids.add(sid)

    @rule(side=sides, data=st.data(), n=st.integers(0, 10_000))
    def send(self, side, data, n):
        self._send(side, self._pick(data, side), n)

    def _send(self, side: str, sid: int, n: int) -> None:
        self.counter += 1
        payload = bytes([self.counter % 251]) * n
        taken = self._usage(self.conns[side].send, sid, payload)
        if taken is not None:
            assert 0 <= taken <= n
            self.sent[(side, sid)] = self.sent.get((side, sid), b"") + payload[:taken]

    @rule(side=sides, data=st.data())
    def end_stream(self, side, data):
        self._usage(self.conns[side].end_stream, self._pick(data, side))

    @rule(side=sides, data=st.data(), code=error_codes, now=st.sampled_from([False, False, True]))
    def reset(self, side, data, code, now):
        if now:  # less often than the other commands, or few streams live long
            self._usage(self.conns[side].reset, self._pick(data, side), code, "because")

    @rule(
        side=sides,
        data=st.data(),
        everything=st.sampled_from([True, True, False]),
        cut=st.integers(0, 2**14),
    )
    def consume(self, side, data, everything, cut):
        sid = self._pick(data, side)
        waiting = self.unconsumed.get((side, sid), 0)
        n = waiting if everything else cut % (waiting + 1)
        self.unconsumed[(side, sid)] = self.unconsumed.get((side, sid), 0) - n
        self._usage(self.conns[side].consumed, sid, n)

    @rule(side=sides, message=json_objects, opaque=st.binary(min_size=8, max_size=8))
    def chatter(self, side, message, opaque):
        """A control message and a keepalive ping."""
        self._usage(self.conns[side].send_control, message)
        self._usage(self.conns[side].ping, opaque)

    @rule(side=sides, code=error_codes, now=st.sampled_from([False] * 9 + [True]))
    def close(self, side, code, now):
        if now:  # rarely: a closed link makes every later step trivial
            self.conns[side].close(code, "done")

    @rule(side=sides, everything=st.sampled_from([True, True, False]), cut=st.integers(0, 2**16))
    def deliver(self, side, everything, cut):
        """Move what `side`'s peer wrote (all, or a prefix cut anywhere) to `side`, which accepts it."""
        sender = self.conns[self.peer[side]]
        self.pipes[side] += b"".join(sender.outgoing())
        n = len(self.pipes[side]) if everything else cut % (len(self.pipes[side]) + 1)
        chunk, self.pipes[side] = self.pipes[side][:n], self.pipes[side][n:]
        for event in self.conns[side].receive_data(chunk):  # must not raise
            if isinstance(event, ev.StreamOpened):
                self.ids.add(event.stream_id)
            elif isinstance(event, ev.DataReceived):
                key = (side, event.stream_id)
                self.got[key] = self.got.get(key, b"") + event.data
                self.unconsumed[key] = self.unconsumed.get(key, 0) + len(event.data)

    @rule(side=sides, data=st.data(), n=st.integers(1, 40_000))
    def pump(self, side, data, n):
        """A burst through one stream: send, deliver, the peer consumes it all, credit comes back."""
        sid = self._pick(data, side)
        self._send(side, sid, n)
        self.exchange()
        peer = self.peer[side]
        self._usage(self.conns[peer].consumed, sid, self.unconsumed.get((peer, sid), 0))
        self.unconsumed[(peer, sid)] = 0
        self.exchange()

    @rule()
    def exchange(self):
        """Everything in flight arrives, both ways (as often as partial deliveries)."""
        self.deliver("agent", True, 0)
        self.deliver("relay", True, 0)

    @invariant()
    def stream_data_arrives_intact_and_in_order(self):
        for (receiver, sid), got in self.got.items():
            assert self.sent.get((self.peer[receiver], sid), b"").startswith(got)

    @invariant()
    def windows_stay_in_bounds(self):
        for side, conn in self.conns.items():
            assert 0 <= conn.budget.available <= SMALL["link_budget"]
            # the window pool holds exactly the windows of the streams still open
            assert conn.window_pool.granted == sum(s.pooled for s in conn.streams.values())
            assert conn.window_pool.granted <= SMALL["window_cap"]
            for stream in conn.streams.values():
                assert 0 <= stream.send_window <= 2**31 - 1
                assert stream.recv.initial <= stream.recv.target <= SMALL["max_window"]
                # what the receiver holds = what it delivered and was not told was consumed
                assert stream.recv.pending == self.unconsumed.get((side, stream.stream_id), 0)


LinkMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLinkStateMachine = LinkMachine.TestCase
