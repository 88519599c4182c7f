"""relay.wire.reactor.RelayReactor, run for real in a subprocess (the test process
already has pytest-twisted's reactor installed): turn-end calls run after the
batch's events and before the next wait, timers that queue one do not wait on
the poll, errors are logged without stopping the loop; and MuxLink corks the
frames of one batch into one write."""

import json
import subprocess
import sys
import textwrap

from twisted.internet.testing import StringTransport

from relay.wire.link import FLUSH_NOW_BYTES, MuxLink
from relay.wire.splice import Splice
from relay.mux import MuxConnection, Role
from tests.relay.test_link import TurnEndClock

SCRIPT = textwrap.dedent(
    """
    import json, socket, time
    from relay.wire import reactor as relay_reactor
    relay_reactor.install()
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory, Protocol
    from twisted.logger import globalLogPublisher

    log = []
    out = {"failures": []}
    globalLogPublisher.addObserver(
        lambda e: e.get("log_failure") and out["failures"].append(str(e["log_failure"].value))
    )

    class Recorder(Protocol):
        def dataReceived(self, data):
            log.append(("data", data.decode()))
            reactor.call_at_turn_end(lambda: log.append(("turn-end", data.decode())))

    port = reactor.listenTCP(0, Factory.forProtocol(Recorder), interface="127.0.0.1")
    clients = [socket.create_connection(("127.0.0.1", port.getHost().port)) for _ in range(3)]

    def send_all():
        # All three arrive before the reactor polls: one batch of three events.
        for i, c in enumerate(clients):
            c.sendall(str(i).encode())
        time.sleep(0.2)

    def from_timer():
        out["timer_queued_at"] = time.monotonic()
        reactor.call_at_turn_end(lambda: out.__setitem__("timer_ran_at", time.monotonic()))

    def failing():
        raise RuntimeError("boom")

    def finish():
        out["log"] = log
        out["reactor"] = type(reactor).__name__
        reactor.stop()

    reactor.callLater(0.3, send_all)
    reactor.callLater(1.0, from_timer)
    reactor.callLater(1.1, reactor.call_at_turn_end, failing)
    reactor.callLater(1.2, reactor.call_at_turn_end, lambda: out.__setitem__("after_error", True))
    reactor.callLater(1.5, finish)
    reactor.run()
    print(json.dumps(out))
    """
)


def run_script():
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_turn_end_calls_run_after_the_batch_and_never_wait_on_the_poll():
    out, _ = run_script()
    assert out["reactor"] == "RelayReactor"
    log = [tuple(item) for item in out["log"]]
    # Every event of the batch first, then every turn-end call, in order.
    assert sorted(log[:3]) == [("data", "0"), ("data", "1"), ("data", "2")]
    assert [kind for kind, _ in log[3:]] == ["turn-end"] * 3
    assert [value for _, value in log[3:]] == [value for _, value in log[:3]]
    # Queued by a timer with no I/O pending: runs at once, not at the next event.
    assert out["timer_ran_at"] - out["timer_queued_at"] < 0.05
    # A failing call is logged and the loop goes on.
    assert out["after_error"] is True
    assert out["failures"] == ["boom"]


def corked_link():
    """A handshaken relay link on a TurnEndClock, recording each write, and its peer core."""
    clock = TurnEndClock()
    link = MuxLink(MuxConnection(Role.RELAY), clock)
    transport = StringTransport()
    writes = []
    transport.writeSequence = lambda seq: writes.append(b"".join(seq))
    link.makeConnection(transport)
    peer = MuxConnection(Role.AGENT)
    peer.send_hello({"token": "x"})
    link.mux.receive_data(b"".join(peer.outgoing()))
    link.mux.send_hello({})
    link.flush()
    peer.receive_data(writes.pop())
    return clock, link, writes, peer


def open_splices(link, n):
    splices = []
    for _ in range(n):
        # A local connection spliced to a new stream, as the relay splices a visitor.
        splice = Splice()
        splice.a.when_connected = (lambda s: lambda: link.open_stream({"tunnel": "t"}, s.b))(splice)
        splice.a.makeConnection(StringTransport())
        splices.append(splice.a)
    return splices


def test_link_corks_the_frames_of_one_turn_into_one_write():
    clock, link, writes, peer = corked_link()
    splices = open_splices(link, 3)
    for i, splice in enumerate(splices):
        splice.dataReceived(b"visitor %d" % i)
    assert writes == []  # nothing yet: the turn is not over
    clock.end_turn()
    assert len(writes) == 1  # three OPENs and three DATA frames, one write
    events = peer.receive_data(writes[0])
    data = [e.data for e in events if type(e).__name__ == "DataReceived"]
    assert data == [b"visitor 0", b"visitor 1", b"visitor 2"]
    clock.end_turn()
    assert len(writes) == 1  # nothing queued, nothing written


def test_link_flushes_at_once_past_flush_now_bytes():
    """A turn that queued FLUSH_NOW_BYTES of DATA writes them at once rather
    than holding megabytes until the turn ends."""
    clock, link, writes, peer = corked_link()
    splices = open_splices(link, 2)
    half = FLUSH_NOW_BYTES // 2 + 1
    splices[0].dataReceived(b"x" * half)
    assert writes == []
    splices[1].dataReceived(b"y" * half)
    assert len(writes) == 1 and len(writes[0]) > 2 * half
    clock.end_turn()
    assert len(writes) == 1
