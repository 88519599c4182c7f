"""The chaos scenarios, shared by tests/chaos/ (small) and scripts/soak.py
(larger, for a bounded time). Each is a function `(rig, scale) -> [Margin]`
that runs its fault against real processes on loopback and returns what it
measured next to the bound it must stay within; the caller asserts them
(pytest) or prints them (soak). A scenario raises AssertionError only for
what cannot be measured as a margin (a wrong GOAWAY code, a stream that
never finished).

`Rig` holds one relay, one echo service and one well-behaved agent whose
tunnel is the "other tunnel" whose round trip every scenario checks. The
scale multiplies counts (visitors, frames), never waits, so a larger scale
costs time roughly in proportion.
"""

import select
import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tests.chaos import measure as m
from tests.chaos.faults import FaultProxy
from tests.chaos.peers import HostileAgent, HostileRelay, echo_through_stream, goaway_code, read_frame, read_until
from tests.e2e.harness import AgentProcess, EchoServer, RelayProcess, wait_for
from tests.mux import helpers as fb
from relay.mux.errors import ErrorCode
from relay.mux.frames import FrameType
from relay.mux.connection import DEFAULT_INITIAL_WINDOW

# docs/security.md, "On every link": the relay's own limits these scenarios push on.
MAX_OPENS_IN_FLIGHT = 256
MAX_USELESS_FRAMES = 10_000
# A flood runs at most this long; the relay's bounds act within a fraction of it.
FLOOD_SECONDS = 2.0
# Agents in the fault scenarios notice a dead path this fast (keepalive).
FAULT_KEEPALIVE = ("--keepalive-interval", "0.5", "--keepalive-timeout", "2")
# A download visitor that never reads can make the relay hold one stream
# window of the service's bytes (docs/protocol.md, flow control), plus the
# socket buffers around it; 1.5x covers allocator overhead.
DOWNLOAD_BYTES = 1024 * 1024
DOWNLOAD_RSS_PER_VISITOR = int(DEFAULT_INITIAL_WINDOW * 1.5)


@dataclass
class Margin:
    scenario: str
    what: str
    measured: float
    bound: float
    unit: str = ""

    @property
    def ok(self) -> bool:
        return self.measured <= self.bound

    def __str__(self):
        return f"{self.scenario}: {self.what} {self.measured:g}{self.unit} (bound {self.bound:g}{self.unit})"


class DownloadServer(EchoServer):
    """Sends DOWNLOAD_BYTES to each connection, then waits for its EOF."""

    def handle(self, conn):
        conn.sendall(b"d" * DOWNLOAD_BYTES)
        while conn.recv(65536):
            pass


class Rig:
    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        # Hostile agents never close their tunnels: each holds a port for the
        # grace period, then quarantine. Shorter than the defaults (60 s, 120 s)
        # so a soak's rounds do not run the port range dry; the grace still
        # outlasts the faulty link's reconnects (about 1-3 s).
        self.relay = RelayProcess(
            self.workdir / "relay", "--grace-seconds=10", "--port-quarantine-seconds=1", tunnel_ports=100,
        ).start()
        self.echo = EchoServer()
        self.agents: list[AgentProcess] = []
        self.good = self.agent("forward", str(self.echo.port), "--unencrypted")
        _, self.good_port = self.good.address()

    def agent(self, *args, relay=None, **kwargs) -> AgentProcess:
        agent = AgentProcess(self.relay if relay is None else relay, *args, **kwargs)
        self.agents.append(agent)
        return agent

    def pids(self) -> dict[str, int]:
        return {"relay": self.relay.proc.pid, "agent": self.good.proc.pid}

    def snapshot(self) -> dict:
        pids = self.pids()
        return {
            "rss": {name: m.rss_bytes(pid) for name, pid in pids.items()},
            "fds": {name: m.fd_count(pid) for name, pid in pids.items()},
            "rtt": m.round_trip_seconds(self.good_port),
        }

    def after(self, name: str, before: dict, *, peak: m.RssWatch | None = None,
              peak_bound: dict | None = None) -> list[Margin]:
        """The margins every scenario states: fds and RSS flat, the good
        tunnel's round trip, and its logs clean."""
        out = []
        for proc, pid in self.pids().items():
            fds = m.settle_fds(pid, before["fds"][proc] + m.FD_MARGIN)
            out.append(Margin(name, f"{proc} fds after", fds - before["fds"][proc], m.FD_MARGIN))
            grown = m.rss_bytes(pid) - before["rss"][proc]
            out.append(Margin(name, f"{proc} RSS growth after", round(grown / 2**20, 1), m.RSS_MARGIN_BYTES / 2**20, " MiB"))
            if peak is not None:
                bound = (peak_bound or {}).get(proc, m.RSS_MARGIN_BYTES)
                grown = peak.peak[pid] - before["rss"][proc]
                out.append(Margin(name, f"{proc} RSS peak growth", round(grown / 2**20, 1), round(bound / 2**20, 1), " MiB"))
        rtt = m.round_trip_seconds(self.good_port)
        # Judged by the ratio to its bound (2x before + slack): comparable across rounds.
        out.append(Margin(name, f"good tunnel RTT / (2x before + {m.RTT_SLACK_SECONDS * 1e3:g} ms)",
                          round(rtt / m.rtt_bound(before["rtt"]), 3), 1.0))
        sent, got = m.echo_transfer(self.good_port, 256 * 1024)
        out.append(Margin(name, "good tunnel 256 KiB echo differs", int(sent != got), 0))
        out.append(self.log_margin(name))
        return out

    def log_margin(self, name: str) -> Margin:
        bad = m.forbidden_lines(self.relay.log())
        for agent in self.agents:
            bad += m.forbidden_lines(agent.stderr_text())
        for line in bad[:5]:
            print("forbidden log line:", line)
        return Margin(name, "Traceback/Unhandled Error lines", len(bad), 0)

    def close(self) -> None:
        for agent in self.agents:
            agent.stop()
        self.echo.close()
        self.relay.stop()


# -- hostile agents ------------------------------------------------------------


def ping_flood_never_reads(rig: Rig, scale: float) -> list[Margin]:
    """An agent that pings and never reads makes the relay stop reading it, not grow."""
    name = "ping flood, never reads"
    before = rig.snapshot()
    hostile = HostileAgent(rig.relay)
    burst = fb.ping() * 1000
    sent = 0
    hostile.sock.settimeout(0.5)
    with m.RssWatch(*rig.pids().values()) as peak:
        deadline = time.monotonic() + FLOOD_SECONDS * max(1.0, scale)
        try:
            while time.monotonic() < deadline:
                hostile.send(burst)
                sent += 1000
        except (socket.timeout, OSError):
            pass  # the relay stopped reading us: the bound at work
        time.sleep(0.3)
    hostile.close()
    out = rig.after(name, before, peak=peak)
    out.append(Margin(name, "PINGs sent (info)", sent, float("inf")))
    return out


def opens_never_answered(rig: Rig, scale: float) -> list[Margin]:
    """Visitors of an agent that never answers OPENs: past 256 in flight they are closed at once."""
    name = "opens never answered"
    before = rig.snapshot()
    hostile = HostileAgent(rig.relay)
    _, port = hostile.open_tunnel()
    count = int(300 * scale) + MAX_OPENS_IN_FLIGHT
    visitors = []
    refused = 0  # reset before connect() even returned: closed at once
    for _ in range(count):
        try:
            visitors.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        except ConnectionResetError:
            refused += 1
    # Count visitors the relay closed at once (EOF or RST within a second).
    time.sleep(0.5)
    open_visitors = {s.fileno(): s for s in visitors}
    poller = select.poll()  # select() stops at fd 1024
    for fd in open_visitors:
        poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline and open_visitors:
        for fd, _ in poller.poll(100):
            poller.unregister(fd)
            open_visitors.pop(fd, None)
    relay_fds = m.fd_count(rig.relay.proc.pid) - before["fds"]["relay"]
    hostile.close()
    for s in visitors:
        m.rst_close(s)
    out = rig.after(name, before)
    out.append(Margin(name, "visitors left hanging", len(open_visitors), MAX_OPENS_IN_FLIGHT))
    out.append(Margin(name, f"visitors reset at connect, of {count} (info)", refused, count))
    out.append(Margin(name, "relay fds during", relay_fds, MAX_OPENS_IN_FLIGHT + m.FD_MARGIN + 2))
    return out


def empty_data_flood(rig: Rig, scale: float) -> list[Margin]:
    """Empty DATA frames past the useless-frame bound end the link with ENHANCE_YOUR_CALM."""
    name = "empty DATA flood"
    before = rig.snapshot()
    hostile = HostileAgent(rig.relay)
    _, port = hostile.open_tunnel()
    visitor = socket.create_connection(("127.0.0.1", port), timeout=5)
    stream_id, _ = read_until(hostile.sock, FrameType.OPEN)
    hostile.send(fb.frame(FrameType.ACCEPT, stream_id))
    frames = int((MAX_USELESS_FRAMES + 2000) * max(1.0, scale))
    empty = fb.data(stream_id, b"") * 1000
    hostile.sock.settimeout(5)
    try:
        for _ in range(frames // 1000 + 1):
            hostile.send(empty)
    except OSError:
        pass  # closed on us mid-flood: fine, the code is what we check
    code = goaway_code(hostile.sock)
    hostile.close()
    visitor.close()
    out = rig.after(name, before)
    out.append(Margin(name, "GOAWAY code is not ENHANCE_YOUR_CALM", int(code != ErrorCode.ENHANCE_YOUR_CALM), 0))
    return out


# Control payloads (raw JSON text) no relay may answer with a traceback or
# INTERNAL_ERROR: each gets a typed error reply or GOAWAY(PROTOCOL_ERROR).
GARBAGE_CONTROL = [
    '{"id":1,"op":"open_tunnel","name":"\\ud800","services":[{"name":"\\udc80","kind":"tcp"}]}',
    '{"id":1,"op":"open_tunnel","services":[{"name":"","kind":"tls","alpn":["\\ud800"]}]}',
    '{"id":1,"op":"open_tunnel","allow":["\\ud800/8", 10, null]}',
    '{"id":1,"op":"open_tunnel","client_ca":"\\ud800"}',
    '{"id":1,"op":"close_tunnel","tunnel":"\\ud800"}',
    '{"id":1,"op":"\\ud800"}',
    '{"id":1e400,"op":"open_tunnel"}',
    '{"id":' + "9" * 5000 + ',"op":"open_tunnel"}',
    '{"id":Infinity,"op":"open_tunnel"}',
    '{"id":1,"op":"open_tunnel","services":' + "[" * 50000 + "]" * 50000 + "}",
    '{"id":1,"op":"open_tunnel","services":[{"name":"","kind":"tcp"}],"reclaim":{"tunnel":1e400,"secret":[]}}',
    '{"id":1,"op":"open_tunnel","services":{"a":1}}',
    '{"id":-1}', '{"id":true}', '[1,2]', '"\\ud800"', "\xff\xfe",
]


def garbage_control(rig: Rig, scale: float) -> list[Margin]:
    """Garbage control messages (surrogates, huge numbers, Infinity, nesting) get typed errors, never INTERNAL_ERROR."""
    name = "garbage control"
    before = rig.snapshot()
    internal = 0
    rounds = max(1, int(scale))
    for _ in range(rounds):
        for text in GARBAGE_CONTROL:
            hostile = HostileAgent(rig.relay)
            payload = text.encode("utf-8", "surrogatepass") if "\xff" not in text else b"\xff\xfe"
            hostile.send(fb.frame(FrameType.CONTROL, 0, payload))
            # A stream the agent may not open (odd id) with hostile metadata, too.
            hostile.send(fb.frame(FrameType.OPEN, 1, b'{"peer":["x",1e400],"tunnel":"\\ud800"}'))
            hostile.sock.settimeout(5)
            code = None
            try:
                while True:
                    kind, _, body = read_frame(hostile.sock)
                    if kind == FrameType.GOAWAY:
                        code = struct.unpack(">I", body[:4])[0]
                        break
                    if kind == FrameType.RESET:
                        break  # the odd OPEN was refused; the control was answered before it
            except (EOFError, OSError):
                pass
            if code == ErrorCode.INTERNAL_ERROR:
                internal += 1
                print("INTERNAL_ERROR for", text[:80])
            hostile.close()
    out = rig.after(name, before)
    out.append(Margin(name, "INTERNAL_ERROR answers", internal, 0))
    out.append(Margin(name, "relay 'while handling its frames' lines",
                      rig.relay.log().count("while handling its frames"), 0))
    return out


# -- visitor floods ---------------------------------------------------------------


def connect_reset_flood(rig: Rig, scale: float) -> list[Margin]:
    """Visitors that connect and reset at once leave no fds behind, and a transfer beside them stays byte-exact."""
    name = "connect-and-reset visitors"
    before = rig.snapshot()
    count = int(400 * scale)
    result = {}
    flowing = threading.Event()

    def transfer_beside():
        result["pair"] = m.echo_transfer(rig.good_port, 4 * 1024 * 1024, started=flowing)
        result["how"] = dict(m.last_transfer)

    transfer = threading.Thread(target=transfer_beside, daemon=True)
    with m.RssWatch(*rig.pids().values()) as peak:
        transfer.start()
        # Flood only once the transfer's stream is accepted: a visitor that
        # connects during the burst can be refused by the per-link cap of 256
        # opens in flight (by design, docs/security.md), which is not what
        # this checks.
        flowing.wait(10)
        refused = 0  # reset before connect() returned: the opens-in-flight cap
        for _ in range(count):
            try:
                s = socket.create_connection(("127.0.0.1", rig.good_port), timeout=5)
            except ConnectionResetError:
                refused += 1
                continue
            m.rst_close(s)
        transfer.join(30)
    out = rig.after(name, before, peak=peak)
    sent, got = result.get("pair", ("sent", "never finished"))
    if sent != got:
        print("4 MiB echo beside the flood:", result.get("how", "did not finish in 30 s"))
    out.append(Margin(name, "4 MiB echo beside the flood differs", int(sent != got), 0))
    out.append(Margin(name, f"flood visitors reset at connect, of {count} (info)", refused, count))
    return out


def never_read_downloads(rig: Rig, scale: float) -> list[Margin]:
    """Visitors that never read a download hold at most one window each in the relay, and nothing once gone."""
    name = "downloads never read"
    server = DownloadServer()
    agent = rig.agent("forward", str(server.port), "--unencrypted")
    _, port = agent.address()
    time.sleep(0.3)
    before = rig.snapshot()
    agent_rss, accepted = m.rss_bytes(agent.proc.pid), server.accepted
    count = int(60 * scale)
    visitors = []
    bound = m.RSS_MARGIN_BYTES + count * DOWNLOAD_RSS_PER_VISITOR
    pids = list(rig.pids().values()) + [agent.proc.pid]
    with m.RssWatch(*pids) as peak:
        for i in range(count):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            visitors.append(s)
            if (i + 1) % 200 == 0:
                # Below the 256 opens in flight per link: visitors past that
                # are refused by design (docs/security.md), not stalled.
                try:
                    wait_for(lambda: server.accepted - accepted > i, 10, "the downloads to start")
                except TimeoutError:
                    pass  # counted below
        time.sleep(FLOOD_SECONDS)
    for s in visitors:
        m.rst_close(s)
    out = rig.after(name, before, peak=peak, peak_bound={"relay": bound, "agent": bound})
    grown = peak.peak[agent.proc.pid] - agent_rss
    out.append(Margin(name, "download agent RSS peak growth", round(grown / 2**20, 1), round(bound / 2**20, 1), " MiB"))
    out.append(Margin(name, f"downloads the service did not start, of {count}", count - (server.accepted - accepted), 0))
    agent.stop()
    server.close()
    return out


# -- a faulty path between agent and relay -------------------------------------


def faulty_link(rig: Rig, scale: float) -> list[Margin]:
    """Through delay, throttle, freeze, reset and close on its link, an agent's streams stay byte-exact and it comes back."""
    name = "faulty link"
    proxy = FaultProxy(rig.relay.agent_port)
    agent = rig.agent("forward", str(rig.echo.port), "--unencrypted", *FAULT_KEEPALIVE,
                      env={"TUNNEL_RELAY": f"localhost:{proxy.port}"})
    _, port = agent.address()
    before = rig.snapshot()
    out = []
    bad = 0

    def exact(size):
        sent, got = m.echo_transfer(port, size)
        return sent == got

    try:
        proxy.set("delay", delay_ms=20)
        rtt = m.round_trip_seconds(port, samples=5)
        out.append(Margin(name, "RTT under 2x20 ms delay, below 40 ms (fault not active)",
                          int(rtt < 0.04), 0))
        bad += not exact(int(256 * 1024 * scale))
        proxy.set("throttle", rate_bytes_per_second=400_000)
        bad += not exact(int(200 * 1024 * scale))
        proxy.set("pass")
        # A freeze shorter than the keepalive timeout: the stream in flight survives.
        result = {}
        t = threading.Thread(target=lambda: result.update(ok=exact(int(2 * 1024 * 1024 * scale))), daemon=True)
        proxy.set("freeze")
        t.start()
        time.sleep(1.0)
        proxy.set("pass")
        t.join(30)
        bad += not result.get("ok", False)
        for fault in ("reset", "close", "freeze"):
            links = proxy.accepted
            proxy.set(fault)
            if fault == "freeze":
                time.sleep(3.0)  # past the 2 s keepalive timeout: the agent gives the link up
                proxy.set("pass")
            wait_for(lambda: proxy.accepted > links, 15, f"the agent to reconnect after {fault}")

            def works():
                try:
                    return m.round_trip_seconds(port, samples=1, timeout=1) > 0
                except (OSError, AssertionError):  # closed at once while the agent is away
                    return False

            wait_for(works, 15, f"the tunnel to serve again after {fault}", interval=0.2)
            bad += not exact(int(256 * 1024 * scale))
        out.append(Margin(name, "transfers not byte-exact", bad, 0))
    finally:
        agent.stop()
        proxy.close()
    out += rig.after(name, before)
    return out


# -- a hostile relay --------------------------------------------------------------

# OPEN metadata a relay may send; the agent refuses or serves each stream,
# never drops its link over one (JSON text: 1e400 reads as float infinity).
BAD_METADATA = [
    '{"tunnel":"%(t)s","service":"","peer":["127.0.0.1",1e400],"local":["127.0.0.1",9]}',
    '{"tunnel":"%(t)s","service":"","peer":["127.0.0.1",-1e400],"local":["127.0.0.1",1e400]}',
    '{"tunnel":"%(t)s","service":"","peer":{"a":1},"local":{}}',
    '{"tunnel":"%(t)s","service":"","peer":"127.0.0.1","local":5}',
    '{"tunnel":"%(t)s","service":"","peer":[["x"],[1]],"local":[null,true]}',
    '{"tunnel":"%(t)s","service":"","peer":["::1",70000],"local":["127.0.0.1",' + "9" * 4000 + "]}",
    '{"tunnel":"%(t)s","service":"","peer":["\\ud800",1],"local":["127.0.0.1",1]}',
    '{"tunnel":"%(t)s","service":[],"peer":null}',
    '{"tunnel":5,"service":""}',
    '{"tunnel":"\\ud800","service":"\\udc80"}',
    '{"tunnel":["%(t)s"],"service":{"x":1}}',
    "{}",
]


def _hostile_relay_agent(rig: Rig, hostile: HostileRelay, *args) -> AgentProcess:
    env = rig.relay.client_env()
    env["TUNNEL_RELAY"] = f"localhost:{hostile.port}"
    agent = rig.agent("forward", str(rig.echo.port), "--unencrypted", *args, env=env)
    agent.address()
    return agent


def bad_open_metadata(rig: Rig, scale: float) -> list[Margin]:
    """OPENs with bad metadata from a hostile relay are refused or served one by one on the same link; a non-JSON one ends it and the agent dials again."""
    name = "hostile relay: bad OPEN metadata"
    hostile = HostileRelay(rig.relay.state_dir)
    done = threading.Event()
    result = {}

    def script(conn):
        if "echo" in result:  # the reconnect after the Infinity below
            result["reconnected"] = True
            done.set()
            return
        stream_id = 2
        for _ in range(max(1, int(scale))):
            for text in BAD_METADATA:
                payload = (text % {"t": HostileRelay.TUNNEL_ID}).encode("utf-8", "surrogatepass")
                conn.sendall(fb.frame(FrameType.OPEN, stream_id, payload))
                stream_id += 2
        result["echo"] = echo_through_stream(conn, stream_id, b"still here")
        result["links"] = hostile.links
        # A literal Infinity is not JSON (RFC 8259): docs/security.md makes it a
        # PROTOCOL_ERROR that ends the link, and the agent dials again.
        conn.sendall(fb.frame(FrameType.OPEN, stream_id + 2,
                              b'{"tunnel":"%s","service":"","peer":["127.0.0.1",Infinity]}' % HostileRelay.TUNNEL_ID.encode()))
        result["infinity"] = goaway_code(conn)

    hostile.serve(script)
    agent = _hostile_relay_agent(rig, hostile, "--proxy-protocol", "v1")
    done.wait(15)
    time.sleep(0.2)
    out = [
        Margin(name, "good stream after the bad ones did not echo", int(not result.get("echo", b"").endswith(b"still here")), 0),
        Margin(name, "links the agent needed for the bad OPENs (1 = kept its link)", result.get("links", 99), 1),
        Margin(name, "Infinity not answered with GOAWAY(PROTOCOL_ERROR)",
               int(result.get("infinity") != ErrorCode.PROTOCOL_ERROR), 0),
        Margin(name, "agent did not reconnect after the PROTOCOL_ERROR", int(not result.get("reconnected")), 0),
        Margin(name, "agent 'while handling its frames' lines",
               agent.stderr_text().count("while handling its frames"), 0),
        Margin(name, "agent exited", int(agent.proc.poll() is not None), 0),
        rig.log_margin(name),
    ]
    for error in hostile.errors:
        print("hostile relay:", error)
    agent.stop()
    hostile.close()
    return out


def open_reset_flood(rig: Rig, scale: float) -> list[Margin]:
    """A relay that floods OPENs, then RESETs them, never reading, leaves the agent no service connections or growth."""
    name = "hostile relay: OPEN+RESET flood"
    hostile = HostileRelay(rig.relay.state_dir)
    count = int(500 * scale)
    flooded = threading.Event()
    drain = threading.Event()
    result = {}

    def script(conn):
        stream_id = 2
        opens = []
        for _ in range(count):
            opens.append(fb.open_frame(stream_id, {"tunnel": HostileRelay.TUNNEL_ID, "service": "",
                                                   "peer": ["127.0.0.1", 1], "local": ["127.0.0.1", 9]}))
            stream_id += 2
        conn.sendall(b"".join(opens))
        time.sleep(0.5)  # some dials finish, some are in flight
        conn.sendall(b"".join(fb.reset(sid, ErrorCode.CANCEL, "chaos") for sid in range(2, stream_id, 2)))
        flooded.set()
        drain.wait(20)  # never read until the test has measured
        conn.settimeout(0.5)
        try:
            while conn.recv(65536):
                pass
        except (socket.timeout, OSError):
            pass
        result["echo"] = echo_through_stream(conn, stream_id, b"after the flood")

    hostile.serve(script)
    accepted_before = rig.echo.accepted
    agent = _hostile_relay_agent(rig, hostile)
    pid = agent.proc.pid
    time.sleep(0.3)
    fds_before, rss_before = m.fd_count(pid), m.rss_bytes(pid)
    with m.RssWatch(pid) as peak:
        flooded.wait(20)
        fds = m.settle_fds(pid, fds_before + m.FD_MARGIN)
    drain.set()
    deadline = time.monotonic() + 10
    while "echo" not in result and time.monotonic() < deadline:
        time.sleep(0.05)
    out = [
        Margin(name, "agent fds after", fds - fds_before, m.FD_MARGIN),
        # The agent dials for every OPEN before its RESET comes (it has no cap
        # of its own, see opens_held), so the peak scales with the count.
        Margin(name, f"agent RSS peak growth ({AGENT_KIB_PER_HELD_STREAM} KiB per OPEN + 8 MiB)",
               round((peak.peak[pid] - rss_before) / 2**20, 1),
               round((count * AGENT_KIB_PER_HELD_STREAM * 1024 + 8 * 2**20) / 2**20, 1), " MiB"),
        Margin(name, f"service connections for {count} reset OPENs (info)",
               rig.echo.accepted - accepted_before, count + 1),
        Margin(name, "stream after the flood did not echo", int(result.get("echo") != b"after the flood"), 0),
        Margin(name, "links the agent needed (1 = kept its link)", hostile.links, 1),
        rig.log_margin(name),
    ]
    for error in hostile.errors:
        print("hostile relay:", error)
    agent.stop()
    hostile.close()
    return out


class HoldServer:
    """A service that accepts connections and holds them, one thread for all."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4096)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.conns.append(conn)

    def close(self):
        self._closed = True
        self._thread.join(1)
        self.sock.close()
        for conn in self.conns:
            conn.close()


# What one stream a relay opened costs the agent while it is held: the
# service connection's fd and about 7.5 KiB (measured with 3,000); twice that
# per stream plus 8 MiB (the allocator's steps) is the bound, so a leak per
# stream shows; the count itself is the relay's to choose (no agent cap).
AGENT_KIB_PER_HELD_STREAM = 16


def opens_held(rig: Rig, scale: float) -> list[Margin]:
    """Each OPEN a relay holds costs the agent one service connection and a few KiB, all returned when the link goes."""
    name = "hostile relay: OPENs held"
    hold = HoldServer()
    hostile = HostileRelay(rig.relay.state_dir)
    count = int(1000 * scale)
    go, release = threading.Event(), threading.Event()

    def script(conn):
        go.wait(20)
        conn.sendall(b"".join(
            fb.open_frame(2 + 2 * i, {"tunnel": HostileRelay.TUNNEL_ID, "service": "",
                                      "peer": ["127.0.0.1", 1], "local": ["127.0.0.1", 9]})
            for i in range(count)))
        conn.settimeout(0.2)
        while not release.is_set():  # read (and drop) the ACCEPTs
            try:
                conn.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
        conn.close()

    hostile.serve(script)
    env = rig.relay.client_env()
    env["TUNNEL_RELAY"] = f"localhost:{hostile.port}"
    agent = rig.agent("forward", str(hold.port), "--unencrypted", env=env)
    agent.address()
    pid = agent.proc.pid
    time.sleep(0.3)
    fds0, rss0 = m.fd_count(pid), m.rss_bytes(pid)
    go.set()
    try:
        wait_for(lambda: len(hold.conns) >= count, 30, f"{count} service connections")
    except TimeoutError:
        pass
    time.sleep(0.3)
    fds, rss = m.fd_count(pid) - fds0, m.rss_bytes(pid) - rss0
    release.set()
    after = m.settle_fds(pid, fds0 + m.FD_MARGIN)
    out = [
        Margin(name, f"agent fds held for {count} OPENs (streams capped at 65,536 per link)", fds, count + m.FD_MARGIN),
        Margin(name, f"agent RSS growth holding them ({AGENT_KIB_PER_HELD_STREAM} KiB each + 8 MiB)",
               round(rss / 2**20, 1), round((count * AGENT_KIB_PER_HELD_STREAM * 1024 + 8 * 2**20) / 2**20, 1), " MiB"),
        Margin(name, "agent fds after the link closed", after - fds0, m.FD_MARGIN),
        Margin(name, "service connections not made", count - len(hold.conns), 0),
        rig.log_margin(name),
    ]
    agent.stop()
    hostile.close()
    hold.close()
    return out


SCENARIOS = [
    ping_flood_never_reads,
    opens_never_answered,
    empty_data_flood,
    garbage_control,
    connect_reset_flood,
    never_read_downloads,
    faulty_link,
    bad_open_metadata,
    open_reset_flood,
    opens_held,
]
