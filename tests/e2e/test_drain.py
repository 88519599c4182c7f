"""Drain, end to end (docs/protocol.md "Draining", README "Stopping and
deploying"): SIGTERM on a real `twistd -n relay` or `tunnel-client` while
visitors download through the tunnel. Every download in flight completes
byte-exact (sha256), new visitors are refused, the process exits once the last
stream ends and never after its --grace-period; a stalled visitor is cut at
the deadline; a second SIGTERM or a SIGINT stops at once.

Timing figures are printed (pytest -s shows them), never asserted beyond the
deadlines the feature promises.
"""

import hashlib
import os
import signal
import socket
import threading
import time

import pytest

from tests.e2e.harness import AgentProcess, RelayProcess, connect, listening, wait_for

DOWNLOADS = 8
SIZE = 48 * 1024 * 1024
READ_RATE = 8 * 1024 * 1024  # bytes/s per visitor: slow enough to be mid-transfer at the signal
BLOB = os.urandom(SIZE)
BLOB_SHA256 = hashlib.sha256(BLOB).hexdigest()


class DownloadServer:
    """Sends BLOB to every connection (then FIN), each on its own thread."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._send, args=(conn,), daemon=True).start()

    @staticmethod
    def _send(conn):
        with conn:
            try:
                conn.sendall(memoryview(BLOB))
                conn.shutdown(socket.SHUT_WR)
                conn.settimeout(60)
                conn.recv(1)  # until the visitor closes
            except OSError:
                pass

    def close(self):
        self.sock.close()


class Download:
    """One visitor reading the blob at READ_RATE (or not at all once `stall`), on a thread."""

    def __init__(self, port: int, rate: float = READ_RATE, stop_after: int | None = None):
        self.received = 0
        self.digest = hashlib.sha256()
        self.error = None
        self.ended_at = None
        self.eof = False
        self._rate = rate
        self._stop_after = stop_after  # stall (read nothing more) after this many bytes
        self.sock = connect(port)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        started = time.monotonic()
        self.sock.settimeout(90)
        try:
            while True:
                if self._stop_after is not None and self.received >= self._stop_after:
                    time.sleep(0.05)  # stalled: our receive buffer fills, the window closes
                    continue
                data = self.sock.recv(65536)
                if not data:
                    self.eof = True
                    break
                self.received += len(data)
                self.digest.update(data)
                ahead = self.received / self._rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
        except OSError as e:
            self.error = e
        finally:
            self.ended_at = time.monotonic()
            self.sock.close()

    @property
    def complete(self) -> bool:
        return self.eof and self.received == SIZE and self.digest.hexdigest() == BLOB_SHA256

    def join(self, timeout: float):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"download still running after {timeout}s ({self.received} bytes)"


def refused(port: int) -> bool:
    """A new visitor is refused: connection refused, or closed at once without a byte."""
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=3)
    except OSError:
        return True
    with s:
        s.settimeout(3)
        try:
            return s.recv(1) == b""
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False


def clean(text: str) -> bool:
    return "Traceback" not in text and "Unhandled Error" not in text


@pytest.fixture
def server():
    s = DownloadServer()
    yield s
    s.close()


@pytest.fixture
def setup(tmp_path, server):
    """A relay (extra options from the test) and an agent forwarding the download server."""
    made = {}

    def start(*relay_args, agent_args=()):
        relay = RelayProcess(tmp_path / "relay", *relay_args).start()
        made["relay"] = relay
        agent = AgentProcess(relay, "forward", str(server.port), "--unencrypted", *agent_args)
        made["agent"] = agent
        _, port = agent.address()
        return relay, agent, port

    yield start
    if "agent" in made:
        made["agent"].stop()
    if "relay" in made:
        made["relay"].stop()


def _start_downloads(port: int, count: int = DOWNLOADS, **kwargs) -> list[Download]:
    downloads = [Download(port, **kwargs) for _ in range(count)]
    wait_for(lambda: all(d.received >= 2 * 1024 * 1024 for d in downloads), 30, "downloads under way")
    return downloads


def _exit_within(proc, seconds: float, since: float | None = None) -> float:
    """Seconds from `since` (default: now) until `proc` exited; waits at most `seconds`."""
    started = time.monotonic() if since is None else since
    proc.wait(seconds)
    return time.monotonic() - started


# -- the relay --------------------------------------------------------------------------


def test_sigterm_on_the_relay_lets_every_download_finish_refuses_new_visitors_and_exits(setup):
    """8 downloads in flight through a relay that gets SIGTERM all complete byte-exact; new agents and visitors are refused meanwhile; the relay exits 0 once they end, well inside --grace-period; the agent reconnects to the restarted relay and reclaims the same address."""
    relay, agent, port = setup("--grace-period", "60")
    downloads = _start_downloads(port)
    at_signal = [d.received for d in downloads]
    assert all(r < SIZE for r in at_signal)  # each one is in flight
    signalled = time.monotonic()
    relay.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: not listening(relay.agent_port), 10, "the agent port closed")
    assert refused(port) and refused(relay.tls_port)
    assert relay.proc.poll() is None  # still draining
    for d in downloads:
        d.join(60)
    last_done = max(d.ended_at for d in downloads)
    exit_seconds = _exit_within(relay.proc, 60, since=signalled)
    exited_at = signalled + exit_seconds
    cut = [d for d in downloads if not d.complete]
    print(
        f"\nrelay SIGTERM: {len(cut)} of {len(downloads)} downloads cut "
        f"(at the signal: {min(at_signal) / 2**20:.1f}-{max(at_signal) / 2**20:.1f} of {SIZE / 2**20:.0f} MiB); "
        f"last download done {last_done - signalled:.2f}s after SIGTERM, relay gone after {exit_seconds:.2f}s"
    )
    assert cut == [], [(d.received, d.error) for d in cut]
    assert relay.proc.returncode == 0
    assert exited_at - last_done < 30  # it did not sit out the 60 s period
    log = relay.log()
    assert "draining: no new agents or visitors; 8 stream(s)" in log and "every stream finished" in log
    assert clean(log), log
    wait_for(lambda: "the relay closed its drained link; reconnecting" in agent.stderr_text(), 10, "agent noticed")
    # A relay is back on the same ports and state: the agent reconnects with its backoff,
    # asks for its tunnel again (with its reclaim secret), and serves visitors.
    relay.start()
    wait_for(lambda: "is live again" in agent.stderr_text(), 60, "the agent's reclaim on the new relay")
    [tunnel] = relay.tunnels()
    assert tunnel["port"] == port  # reclaimed: the same address
    again = Download(port)
    again.join(60)
    assert again.complete
    assert agent.proc.poll() is None and clean(agent.stderr_text()), agent.stderr_text()


def test_a_short_grace_period_cuts_a_stalled_visitor_at_the_deadline(setup):
    """With --grace-period 2, a visitor that stopped reading holds the relay no longer than the deadline: the relay exits and the visitor is cut."""
    relay, agent, port = setup("--grace-period", "2")
    [stalled] = _start_downloads(port, 1, stop_after=4 * 1024 * 1024)
    signalled = time.monotonic()
    relay.proc.send_signal(signal.SIGTERM)
    exit_seconds = _exit_within(relay.proc, 20, since=signalled)
    print(f"\nrelay SIGTERM, --grace-period 2, one stalled visitor: relay gone after {exit_seconds:.2f}s")
    assert exit_seconds >= 1.5  # it waited for the deadline ...
    assert relay.proc.returncode == 0
    stalled._stop_after = None  # read again: the connection was cut before the whole blob
    stalled.join(30)
    assert not stalled.complete and stalled.received < SIZE
    log = relay.log()
    assert "grace period of 2s over: closing 1 stream(s) still open" in log
    assert clean(log), log
    assert time.monotonic() - signalled < 30


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_second_signal_stops_the_draining_relay_at_once(setup, second):
    """During a 60 s drain held by a stalled visitor, a second SIGTERM (or a SIGINT) makes the relay exit at once."""
    relay, agent, port = setup("--grace-period", "60")
    [stalled] = _start_downloads(port, 1, stop_after=4 * 1024 * 1024)
    relay.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "draining: no new agents" in relay.log(), 10, "the drain began")
    time.sleep(0.5)
    assert relay.proc.poll() is None
    relay.proc.send_signal(second)
    exit_seconds = _exit_within(relay.proc, 20)
    print(f"\nrelay SIGTERM then {second.name}: gone {exit_seconds:.2f}s after the second signal")
    assert relay.proc.returncode == 0
    log = relay.log()
    assert "stopping at once after" in log and clean(log), log
    assert exit_seconds < 20


def test_sigint_on_the_relay_stops_it_without_draining(setup):
    """SIGINT (Ctrl-C) first: no drain, the download is cut and the relay exits."""
    relay, agent, port = setup("--grace-period", "60")
    [download] = _start_downloads(port, 1, stop_after=4 * 1024 * 1024)
    relay.proc.send_signal(signal.SIGINT)
    _exit_within(relay.proc, 20)
    download._stop_after = None
    download.join(30)
    assert not download.complete
    log = relay.log()
    assert "draining:" not in log and "stopping at once" in log and clean(log), log


# -- the agent --------------------------------------------------------------------------


def test_sigterm_on_the_agent_lets_every_download_finish_and_frees_its_tunnel_at_once(setup):
    """8 downloads in flight through an agent that gets SIGTERM all complete byte-exact; the relay frees the tunnel at once (new visitors refused); the agent exits 0 once they end."""
    relay, agent, port = setup(agent_args=("--grace-period", "60"))
    downloads = _start_downloads(port)
    at_signal = [d.received for d in downloads]
    assert all(r < SIZE for r in at_signal)
    signalled = time.monotonic()
    agent.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: relay.tunnels() == [], 10, "the relay freed the tunnel")
    assert refused(port)
    for d in downloads:
        d.join(60)
    last_done = max(d.ended_at for d in downloads)
    exit_seconds = _exit_within(agent.proc, 60, since=signalled)
    agent.stdout.drain()
    agent.stderr.drain()
    cut = [d for d in downloads if not d.complete]
    print(
        f"\nagent SIGTERM: {len(cut)} of {len(downloads)} downloads cut; last done "
        f"{last_done - signalled:.2f}s after SIGTERM, agent gone after {exit_seconds:.2f}s"
    )
    assert cut == [], [(d.received, d.error) for d in cut]
    assert agent.proc.returncode == 0
    assert signalled + exit_seconds - last_done < 30
    err = agent.stderr_text()
    assert "draining: 8 stream(s)" in err and "every stream finished" in err and clean(err), err
    assert clean(relay.log()), relay.log()
    assert relay.proc.poll() is None


def test_the_agent_s_grace_period_cuts_a_stalled_visitor_and_a_second_signal_forces(setup):
    """--grace-period 2 on the agent: a stalled visitor is cut at the deadline; with 60 s, a second SIGTERM stops at once."""
    relay, agent, port = setup(agent_args=("--grace-period", "2"))
    [stalled] = _start_downloads(port, 1, stop_after=4 * 1024 * 1024)
    agent.proc.send_signal(signal.SIGTERM)
    exit_seconds = _exit_within(agent.proc, 20)
    agent.stderr.drain()
    print(f"\nagent SIGTERM, --grace-period 2, one stalled visitor: agent gone after {exit_seconds:.2f}s")
    assert exit_seconds >= 1.5 and agent.proc.returncode == 0
    stalled._stop_after = None
    stalled.join(30)
    assert not stalled.complete
    assert "grace period over" in agent.stderr_text() and clean(agent.stderr_text())

    second = AgentProcess(relay, "forward", str(_server_port(agent)), "--unencrypted", "--grace-period", "60")
    try:
        _, port2 = second.address()
        [held] = _start_downloads(port2, 1, stop_after=4 * 1024 * 1024)
        second.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "draining:" in second.stderr_text(), 10, "the agent's drain began")
        second.proc.send_signal(signal.SIGTERM)
        forced = _exit_within(second.proc, 20)
        second.stderr.drain()
        print(f"agent SIGTERM twice: gone {forced:.2f}s after the second")
        assert second.proc.returncode == 0 and "stopping at once" in second.stderr_text()
        assert clean(second.stderr_text())
        held._stop_after = None
        held.join(30)
        assert not held.complete
    finally:
        second.stop()
    assert clean(relay.log()), relay.log()


def _server_port(agent: AgentProcess) -> int:
    return int(agent.args[agent.args.index("forward") + 1])
