"""The live terminal view (client/console.py) without a terminal: when it is
drawn, what a snapshot of a real agent on an in-memory link holds, its
bounds, and what the drawing shows. tests/e2e/test_console.py reads the
real view back off a pty."""

import io

from rich.console import Console
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from client import console as view
from client.console import ConsoleModel, format_bytes, render, use_console
from relay.mux import ErrorCode
from tests.client.test_agent import live_agent


class _Stdout:
    def __init__(self, tty: bool):
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def test_the_view_is_drawn_only_for_a_person_at_a_terminal():
    """A terminal gets the view; a pipe, --json, JSON logs, --no-console and TERM=dumb get the plain lines."""
    plain = {"as_json": False, "log_format": "text", "no_console": False}
    env = {"TERM": "xterm-256color"}
    assert use_console(_Stdout(True), **plain, environ=env)
    assert not use_console(_Stdout(False), **plain, environ=env)
    assert not use_console(_Stdout(True), **dict(plain, as_json=True), environ=env)
    assert not use_console(_Stdout(True), **dict(plain, log_format="json"), environ=env)
    assert not use_console(_Stdout(True), **dict(plain, no_console=True), environ=env)
    assert not use_console(_Stdout(True), **plain, environ={"TERM": "dumb"})
    assert not use_console(object(), **plain, environ=env)  # no isatty at all


def test_bytes_are_shown_in_binary_units():
    """Below 1 KiB exact, above it one decimal of KiB, MiB, GiB."""
    assert [format_bytes(n) for n in (0, 1023, 1024, 1536, 5 * 2**20, 3 * 2**30)] == [
        "0 B", "1023 B", "1.0 KiB", "1.5 KiB", "5.0 MiB", "3.0 GiB",
    ]


def _model_and_visitor():
    """A live agent feeding a ConsoleModel, a visitor stream connected to its
    service: (model, agent, relay, stream id, the service's protocol)."""
    model = ConsoleModel()
    agent, tunnel, relay, _ = live_agent(on_visitor=model.visitor_ended)
    model.attach(agent, agent.reactor)
    agent.remember_address(tunnel.spec.services[0], IPv4Address("TCP", "127.0.0.1", 8000))
    stream_id = relay.mux.open_stream(
        {"tunnel": "tunnel1", "service": "", "peer": ["203.0.113.7", 40001], "local": ["127.0.0.1", 20001]}
    )
    relay.deliver()
    host, port, factory, *_ = agent.reactor.tcpClients[-1]
    service = factory.buildProtocol(IPv4Address("TCP", host, port))
    service.makeConnection(StringTransport())
    return model, agent, relay, stream_id, service


def test_a_snapshot_shows_the_tunnel_the_link_and_an_open_visitors_bytes():
    """The tunnel's address and target, the link's session and RTT, and the open
    visitor's peer and byte counts, read from the stream's own counters."""
    model, agent, relay, stream_id, service = _model_and_visitor()
    relay.mux.send(stream_id, b"v" * 1500)
    relay.deliver()
    service.dataReceived(b"s" * 700)  # the service answers: onto the stream
    agent.link.rtt_seconds = 0.0123
    snap = model.snapshot()
    (link,) = snap.links
    assert (link.relay, link.state, link.session, link.rtt_seconds, link.open_streams) == (
        "127.0.0.1:7000", "live", "sess1", 0.0123, 1,
    )
    (tunnel,) = snap.tunnels
    assert [(e.url, e.target) for e in tunnel.endpoints] == [("tcp://relay.example:20001", "localhost:8000")]
    assert (tunnel.status, tunnel.open_visitors, tunnel.bytes_in, tunnel.bytes_out) == ("live", 1, 1500, 700)
    (visitor,) = snap.visitors
    assert (visitor.peer, visitor.state, visitor.bytes_in, visitor.bytes_out) == ("203.0.113.7:40001", "open", 1500, 700)


def test_an_ended_visitor_keeps_its_final_bytes_and_the_tunnel_its_totals():
    """A visitor that ended is listed as closed with its last counts, and the
    tunnel's totals do not drop when its bytes leave the open streams."""
    model, agent, relay, stream_id, service = _model_and_visitor()
    relay.mux.send(stream_id, b"v" * 3000)
    relay.deliver()
    relay.mux.reset(stream_id, ErrorCode.CANCEL, "visitor left")
    relay.deliver()
    snap = model.snapshot()
    (tunnel,) = snap.tunnels
    assert (tunnel.open_visitors, tunnel.visitors_total, tunnel.bytes_in) == (0, 1, 3000)
    (visitor,) = snap.visitors
    assert (visitor.state, visitor.bytes_in, visitor.peer) == ("closed", 3000, "203.0.113.7:40001")


def test_a_visitor_that_never_reached_the_service_is_marked_failed():
    """A stream reset while the agent still dialled its service is a failed visitor, not a closed one."""
    model, agent, relay, _, _ = _model_and_visitor()
    stream_id = relay.mux.open_stream({"tunnel": "tunnel1", "service": "", "peer": ["198.51.100.2", 5], "local": ["127.0.0.1", 20001]})
    relay.deliver()
    relay.mux.reset(stream_id, ErrorCode.CANCEL, "gone")
    relay.deliver()
    states = {v.peer: v.state for v in model.snapshot().visitors}
    assert states == {"198.51.100.2:5": "failed", "203.0.113.7:40001": "open"}


def test_rates_are_the_bytes_moved_over_the_recent_snapshots():
    """in/s is the growth of the tunnel's bytes over the snapshots of the last seconds."""
    model, agent, relay, stream_id, service = _model_and_visitor()
    model.snapshot()
    for _ in range(4):
        agent.reactor.advance(0.25)
        relay.mux.send(stream_id, b"v" * 1000)
        relay.deliver()
        snap = model.snapshot()
    assert snap.tunnels[0].rate_in == 4000  # 4000 bytes in 1 s
    assert snap.tunnels[0].rate_out == 0


def test_ended_visitors_and_log_lines_are_bounded():
    """However many visitors come and go, the view keeps RECENT_VISITORS of them and LOG_LINES log lines."""
    model, agent, relay, first, _ = _model_and_visitor()
    for i in range(view.RECENT_VISITORS + 30):
        stream_id = relay.mux.open_stream({"tunnel": "tunnel1", "service": "", "peer": ["198.51.100.2", i + 1],
                                           "local": ["127.0.0.1", 20001]})
        relay.deliver()
        relay.mux.reset(stream_id, ErrorCode.CANCEL, "gone")
        relay.deliver()
    for i in range(view.LOG_LINES + 10):
        model.log_file().write(f"tunnel-client: line {i}\n")
    snap = model.snapshot()
    assert len(model.recent) == view.RECENT_VISITORS
    assert snap.tunnels[0].visitors_total == view.RECENT_VISITORS + 31  # counted, even if not listed
    assert len(snap.log) == view.LOG_LINES and snap.log[-1] == f"tunnel-client: line {view.LOG_LINES + 9}"


def test_a_lost_link_shows_reconnecting_and_no_round_trip():
    """Once the link drops, the link reads reconnecting, with no session or RTT."""
    model, agent, relay, _, _ = _model_and_visitor()
    relay.lose()
    (link,) = model.snapshot().links
    assert (link.state, link.session, link.rtt_seconds, link.open_streams) == ("reconnecting", None, None, 0)
    assert model.snapshot().tunnels[0].status == "reconnecting"


def test_the_drawing_shows_address_rtt_visitor_and_log():
    """What a person sees: the tunnel's URL, the RTT in ms, the visitor's peer and bytes, the last log line."""
    model, agent, relay, stream_id, service = _model_and_visitor()
    relay.mux.send(stream_id, b"v" * 1536)
    relay.deliver()
    agent.link.rtt_seconds = 0.0042
    model.log_line("tunnel-client: forwarding tcp://relay.example:20001 -> localhost:8000\n")
    out = Console(file=io.StringIO(), width=160, record=True, color_system=None)
    out.print(render(model.snapshot()))
    text = out.export_text()
    assert "tcp://relay.example:20001" in text and "localhost:8000" in text
    assert "4.2 ms" in text
    assert "203.0.113.7:40001" in text and "1.5 KiB" in text
    assert "forwarding tcp://relay.example:20001" in text
