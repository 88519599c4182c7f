"""The data path, end to end: bulk bytes both ways, many streams at once,
backpressure from a stalled service, an unreachable service, other target
forms, and idle visitors. Real `twistd -n relay` and `tunnel-client`
processes, real loopback sockets; every wait is bounded.
"""

import hashlib
import random
import selectors
import socket
import subprocess
import threading
import time

import pytest

from tests.e2e.harness import EchoServer, closed_within, connect, free_port, recv_all, wait_for

MiB = 1024 * 1024
KiB = 1024
BULK_BYTES = 256 * MiB
BULK_DEADLINE_SECONDS = 120
CHUNK_BYTES = 256 * KiB


class Pattern:
    """A deterministic pseudo-random byte stream of `total` bytes.

    One random pool, repeated: its period (1 MiB + 13) is not a multiple of
    any frame, read or chunk size, so a dropped, repeated or misplaced chunk
    changes the digest. Slices of a doubled pool avoid copies.
    """

    PERIOD = MiB + 13

    def __init__(self, seed: int, total: int):
        pool = random.Random(seed).randbytes(self.PERIOD)
        self._doubled = memoryview(pool + pool)
        self.total = total

    def chunks(self, size: int = CHUNK_BYTES):
        offset = 0
        while offset < self.total:
            n = min(size, self.total - offset)
            start = offset % self.PERIOD
            yield self._doubled[start : start + n]
            offset += n

    def digest(self) -> str:
        h = hashlib.sha256()
        for chunk in self.chunks(MiB):
            h.update(chunk)
        return h.hexdigest()


def send_pattern(sock: socket.socket, pattern: Pattern, deadline: float) -> str:
    """sendall the pattern (blocking socket); return the digest of what was sent."""
    h = hashlib.sha256()
    for chunk in pattern.chunks():
        if time.monotonic() > deadline:
            raise AssertionError("sending took past the deadline")
        sock.sendall(chunk)
        h.update(chunk)
    return h.hexdigest()


def hash_until_eof(sock: socket.socket, deadline: float) -> tuple[int, str]:
    """Read until EOF (blocking socket with a timeout); return (length, digest)."""
    h = hashlib.sha256()
    total = 0
    buf = bytearray(CHUNK_BYTES)
    while True:
        if time.monotonic() > deadline:
            raise AssertionError(f"no EOF before the deadline ({total} bytes read)")
        n = sock.recv_into(buf)
        if n == 0:
            return total, h.hexdigest()
        h.update(memoryview(buf)[:n])
        total += n


class HashThenSendServer:
    """One-connection service: hashes everything until EOF, then sends its own
    pattern and closes."""

    def __init__(self, reply: Pattern, deadline: float):
        self.reply = reply
        self.deadline = deadline
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.received: tuple[int, str] | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.sock.settimeout(30)
            conn, _ = self.sock.accept()
            with conn:
                conn.settimeout(30)
                self.received = hash_until_eof(conn, self.deadline)
                send_pattern(conn, self.reply, self.deadline)
                conn.shutdown(socket.SHUT_WR)
        except BaseException as e:  # reported by the test
            self.error = e

    def close(self):
        self.sock.close()


@pytest.fixture
def bulk_patterns():
    return Pattern(seed=1, total=BULK_BYTES), Pattern(seed=2, total=BULK_BYTES)


def test_256mib_each_way_after_half_close(relay, agents, bulk_patterns):
    """256 MiB goes up byte-exact, the visitor's EOF reaches the service as EOF,
    and 256 MiB comes back byte-exact on the half-closed connection."""
    upload, download = bulk_patterns
    deadline = time.monotonic() + BULK_DEADLINE_SECONDS
    service = HashThenSendServer(download, deadline)
    try:
        agent = agents(relay, "forward", str(service.port), "--unencrypted")
        _, port = agent.address()
        with connect(port, timeout=30) as s:
            started = time.monotonic()
            sent_digest = send_pattern(s, upload, deadline)
            s.shutdown(socket.SHUT_WR)
            uploaded = time.monotonic()
            got_len, got_digest = hash_until_eof(s, deadline)
            done = time.monotonic()
        service.thread.join(max(1.0, deadline - time.monotonic()))
        assert service.error is None, repr(service.error)
        assert service.received == (BULK_BYTES, sent_digest)
        assert (got_len, got_digest) == (BULK_BYTES, download.digest())
        print(
            f"\nupload {BULK_BYTES / MiB / (uploaded - started):.0f} MiB/s, "
            f"download {BULK_BYTES / MiB / (done - uploaded):.0f} MiB/s"
        )
    finally:
        service.close()


def test_256mib_echo_while_sending(relay, echo, agents, bulk_patterns):
    """256 MiB echoed while still being sent comes back byte-exact, then EOF."""
    upload, _ = bulk_patterns
    deadline = time.monotonic() + BULK_DEADLINE_SECONDS
    agent = agents(relay, "forward", str(echo.port), "--unencrypted")
    _, port = agent.address()
    result: dict = {}

    def sender(sock):
        try:
            result["sent"] = send_pattern(sock, upload, deadline)
            sock.shutdown(socket.SHUT_WR)
        except BaseException as e:
            result["error"] = e

    with connect(port, timeout=30) as s:
        started = time.monotonic()
        thread = threading.Thread(target=sender, args=(s,), daemon=True)
        thread.start()
        got_len, got_digest = hash_until_eof(s, deadline)
        elapsed = time.monotonic() - started
        thread.join(max(1.0, deadline - time.monotonic()))
    assert "error" not in result, repr(result.get("error"))
    assert (got_len, got_digest) == (BULK_BYTES, result["sent"])
    print(f"\necho {BULK_BYTES / MiB / elapsed:.0f} MiB/s each way at once")


def test_200_concurrent_streams_byte_exact(relay, echo, agents):
    """200 streams open at once on one tunnel each carry their own bytes, unmixed."""
    count, size = 200, 256 * KiB
    agent = agents(relay, "forward", str(echo.port), "--unencrypted")
    _, port = agent.address()
    payloads = [random.Random(1000 + i).randbytes(size) for i in range(count)]
    socks = [connect(port, timeout=10) for _ in range(count)]
    wait_for(lambda: echo.accepted == count, 15, f"{count} service connections")
    sel = selectors.DefaultSelector()
    state = {}
    try:
        for i, s in enumerate(socks):
            s.setblocking(False)
            state[s] = {"i": i, "sent": 0, "got": bytearray()}
            sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE)
        open_count = count
        deadline = time.monotonic() + 60
        while open_count:
            assert time.monotonic() < deadline, f"{open_count} streams unfinished after 60s"
            for key, mask in sel.select(timeout=1):
                s, st = key.fileobj, state[key.fileobj]
                data = payloads[st["i"]]
                if mask & selectors.EVENT_WRITE:
                    try:
                        st["sent"] += s.send(data[st["sent"] : st["sent"] + 64 * KiB])
                    except BlockingIOError:
                        pass
                    if st["sent"] == size:
                        s.shutdown(socket.SHUT_WR)
                        sel.modify(s, selectors.EVENT_READ)
                if mask & selectors.EVENT_READ:
                    try:
                        chunk = s.recv(256 * KiB)
                    except BlockingIOError:
                        continue
                    if chunk:
                        st["got"] += chunk
                    else:
                        sel.unregister(s)
                        open_count -= 1
        bad = [st["i"] for st in state.values() if bytes(st["got"]) != payloads[st["i"]]]
        assert not bad, f"streams with wrong bytes: {bad[:10]} (of {len(bad)})"
    finally:
        sel.close()
        for s in socks:
            s.close()


class StallingServer(EchoServer):
    """Echoes, except the connection accepted after `stall_next` is set: that one
    is never read until `release` is set, then hashed until EOF."""

    def __init__(self):
        self.stall_next = False
        self.stalled = threading.Event()
        self.release = threading.Event()
        self.stalled_result: tuple[int, str] | None = None
        self._lock = threading.Lock()
        super().__init__()

    def handle(self, conn):
        with self._lock:
            stall, self.stall_next = self.stall_next, False
        if not stall:
            return super().handle(conn)
        self.stalled.set()
        if self.release.wait(60):
            conn.settimeout(30)
            self.stalled_result = hash_until_eof(conn, time.monotonic() + 30)


def _kernel_max(name: str) -> int:
    with open(f"/proc/sys/net/ipv4/{name}") as f:
        return int(f.read().split()[2])


def test_stalled_service_keeps_memory_flat_and_neighbours_flowing(relay, agents):
    """A service that never reads stalls its visitor's writes at a bounded total,
    keeps relay and agent memory flat, and leaves other streams on the link flowing."""
    flood_seconds = 5.0
    service = StallingServer()
    flood = None
    try:
        agent = agents(relay, "forward", str(service.port), "--unencrypted")
        _, port = agent.address()
        with connect(port) as warm:  # let both processes reach their steady state
            warm.sendall(b"warm-up")
            warm.shutdown(socket.SHUT_WR)
            assert recv_all(warm, 10) == b"warm-up"
        relay_base, agent_base = relay.rss_bytes(), agent.rss_bytes()

        service.stall_next = True
        flood = connect(port)
        wait_for(service.stalled.is_set, 10, "the stalled service connection")
        flood.setblocking(False)
        pattern = Pattern(seed=3, total=1 << 40)
        progress: list[tuple[float, int]] = []
        flood_state = {"digest": None, "error": None}

        def flooder():
            h = hashlib.sha256()
            sent = 0
            end = time.monotonic() + flood_seconds
            chunks = pattern.chunks(CHUNK_BYTES)
            pending = next(chunks)
            try:
                while time.monotonic() < end:
                    try:
                        n = flood.send(pending)
                    except BlockingIOError:
                        time.sleep(0.01)  # stalled: poll, so the deadline holds
                        n = 0
                    if n:
                        h.update(pending[:n])
                        sent += n
                        pending = pending[n:] if n < len(pending) else next(chunks)
                    progress.append((time.monotonic(), sent))
                flood_state["digest"] = (sent, h.hexdigest())
            except BaseException as e:
                flood_state["error"] = e

        thread = threading.Thread(target=flooder, daemon=True)
        started = time.monotonic()
        thread.start()
        relay_peak = agent_peak = 0
        neighbour_checked = False
        while thread.is_alive() and time.monotonic() < started + flood_seconds + 10:
            relay_peak = max(relay_peak, relay.rss_bytes())
            agent_peak = max(agent_peak, agent.rss_bytes())
            if not neighbour_checked and time.monotonic() > started + 2:
                # The flood has stalled by now; a neighbour on the same tunnel must still flow.
                data = random.Random(4).randbytes(MiB)
                t0 = time.monotonic()
                with connect(port) as s:
                    s.sendall(data)
                    s.shutdown(socket.SHUT_WR)
                    assert recv_all(s, 10) == data
                neighbour_seconds = time.monotonic() - t0
                neighbour_checked = True
            time.sleep(0.1)
        thread.join(5)
        assert flood_state["error"] is None, repr(flood_state["error"])
        assert neighbour_checked

        sent_total, sent_digest = flood_state["digest"]
        sent_at_3s = max(n for t, n in progress if t <= started + flood_seconds - 2)
        # Upper bound: the four socket buffers on the way at the kernel's autotuning
        # maxima (visitor send, relay receive, agent send, service receive), the
        # stream window at its 8 MiB maximum (it covers everything between the
        # relay's read and the agent's write: link buffers, frames in flight, the
        # agent's paused write buffer), and 4 MiB for the relay's one stashed read.
        # A relay or agent that buffered without bound took over 400 MiB in 5 s here.
        socket_buffers = 2 * _kernel_max("tcp_wmem") + 2 * _kernel_max("tcp_rmem")
        bound = socket_buffers + 8 * MiB + 4 * MiB
        growth = (relay_peak - relay_base, agent_peak - agent_base)
        print(
            f"\nstalled flood: {sent_total / MiB:.1f} MiB accepted ({sent_at_3s / MiB:.1f} MiB after 3 s), "
            f"RSS growth relay {growth[0] / MiB:.1f} MiB, agent {growth[1] / MiB:.1f} MiB; "
            f"neighbour 1 MiB echo in {neighbour_seconds:.2f}s"
        )
        assert sent_total < bound, (sent_total, bound)
        assert sent_total - sent_at_3s < MiB, "the visitor's writes kept flowing: no backpressure"
        assert growth[0] < 40 * MiB, growth
        assert growth[1] < 40 * MiB, growth

        # Stalled, not lost: once the service reads, it gets exactly what was sent.
        flood.setblocking(True)
        flood.shutdown(socket.SHUT_WR)
        service.release.set()
        wait_for(lambda: service.stalled_result is not None, 30, "the stalled service to drain")
        assert service.stalled_result == (sent_total, sent_digest)
    finally:
        if flood is not None:
            flood.close()
        service.release.set()
        service.close()


def test_unreachable_service_closes_visitor_and_logs_once(relay, echo, agents):
    """A visitor of a tunnel whose service is down is closed within seconds, the
    agent logs one line naming the target, and the link keeps serving."""
    dead_port = free_port()  # nothing listens there
    agent = agents(relay, "forward", str(dead_port), str(echo.port), "--unencrypted")
    _, dead = agent.address()
    _, alive = agent.address()
    wait_for(lambda: sum("forwarding" in line for line in agent.stderr.all) == 2, 5, "forwarding lines")
    # The second link (--links defaults to 2) says it joined: not a line this test counts.
    wait_for(lambda: any("joined session" in line for line in agent.stderr.all), 10, "the second link")
    before = len(agent.stderr.all)

    with connect(dead) as s:
        t0 = time.monotonic()
        assert closed_within(s, 5), "visitor of a dead service still open after 5 s"
        closed_after = time.monotonic() - t0
    wait_for(lambda: len(agent.stderr.all) > before, 5, "the agent's log line")
    time.sleep(0.5)  # a second line would come right after the first
    new = agent.stderr.all[before:]
    assert len(new) == 1, new
    assert f"localhost:{dead_port}" in new[0], new[0]
    assert closed_after < 3, closed_after

    with connect(alive) as s:  # same link, other tunnel
        s.sendall(b"still here")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s, 10) == b"still here"
    assert relay.proc.poll() is None
    assert {t["port"] for t in relay.tunnels()} == {dead, alive}


def _echo_pair_on_one_port() -> tuple[EchoServer, EchoServer]:
    """An echo on 127.0.0.1:P and another on [::1]:P: only the host tells them apart."""
    for _ in range(20):
        try:
            echo6 = EchoServer("::1")
        except OSError as e:
            pytest.skip(f"no IPv6 loopback here: {e}")
        try:
            return EchoServer("127.0.0.1", echo6.port), echo6
        except OSError:
            echo6.close()  # that port is taken on 127.0.0.1: try another
    raise AssertionError("no port free on both 127.0.0.1 and ::1")


def test_forward_ip_literal_targets(relay, agents):
    """`forward 127.0.0.1:PORT` and `forward [::1]:PORT` each reach the service on that very host."""
    echo4, echo6 = _echo_pair_on_one_port()
    try:
        agent = agents(
            relay, "forward", f"127.0.0.1:{echo4.port}", f"[::1]:{echo6.port}", "--unencrypted"
        )
        _, port4 = agent.address()
        _, port6 = agent.address()
        for port, seed, expected in ((port4, 5, (1, 0)), (port6, 6, (1, 1))):
            data = random.Random(seed).randbytes(64 * KiB)
            out = subprocess.run(
                ["nc", "-N", "127.0.0.1", str(port)], input=data, capture_output=True, timeout=15
            )
            assert out.stdout == data, (port, len(out.stdout), out.stderr)
            assert (echo4.accepted, echo6.accepted) == expected
    finally:
        echo4.close()
        echo6.close()


def test_idle_visitor_is_not_timed_out(relay, echo, agents):
    """A visitor that stays silent for 3 s keeps its stream and then works."""
    agent = agents(relay, "forward", str(echo.port), "--unencrypted")
    _, port = agent.address()
    with connect(port) as s:
        wait_for(lambda: echo.accepted == 1, 5, "the service connection")
        assert not closed_within(s, 3), "idle visitor was closed"
        s.sendall(b"after a nap")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s, 10) == b"after a nap"
