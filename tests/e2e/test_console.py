"""The live terminal view of a real `tunnel-client` under a pty, its screen
read back with pyte (a VT100 emulator), against a real relay and visitors;
and the plain lines wherever the output is not a person's terminal."""

import fcntl
import json
import os
import re
import signal
import socket
import struct
import subprocess
import termios
import threading

import pyte
import pytest

from tests.e2e.harness import TUNNEL_CLIENT, AgentProcess, closed_within, connect, recv_all, stop_process, wait_for

COLUMNS, ROWS = 150, 45
ESCAPE = "\x1b"


class PtyAgent:
    """tunnel-client with stdin, stdout and stderr on one pty of COLUMNS x ROWS;
    a thread feeds everything it draws to a pyte screen."""

    def __init__(self, relay, *args: str, env: dict | None = None):
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
        full_env = dict(os.environ, TERM="xterm-256color", COLUMNS=str(COLUMNS), LINES=str(ROWS))
        full_env.pop("PYTHONPATH", None)
        full_env.pop("NO_COLOR", None)
        full_env.update(relay.client_env())
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [TUNNEL_CLIENT, *args], stdin=slave, stdout=slave, stderr=slave, env=full_env,
            cwd=relay.workdir, start_new_session=True,
        )
        os.close(slave)
        self._master = master
        self.screen = pyte.Screen(COLUMNS, ROWS)
        self._stream = pyte.ByteStream(self.screen)
        self.raw = bytearray()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        while True:
            try:
                data = os.read(self._master, 65536)
            except OSError:  # EIO: the last holder of the pty's other end is gone
                return
            if not data:
                return
            with self._lock:
                self.raw += data
                self._stream.feed(data)

    def text(self) -> str:
        with self._lock:
            return "\n".join(line.rstrip() for line in self.screen.display)

    def lines(self) -> list[str]:
        with self._lock:
            return [line.rstrip() for line in self.screen.display]

    def wait_screen(self, pattern: str, timeout: float = 30):
        """The first match of `pattern` on the screen, waiting (bounded) for it."""
        try:
            return wait_for(lambda: re.search(pattern, self.text()), timeout, f"{pattern!r} on the screen")
        except TimeoutError as e:
            raise AssertionError(f"{e}; the screen:\n{self.text()}") from None

    def stop(self, sig=signal.SIGINT, timeout: float = 10) -> int:
        code = stop_process(self.proc, timeout, sig)
        self._reader.join(5)
        os.close(self._master)
        return code


@pytest.fixture
def pty_agents():
    started = []

    def start(relay, *args, **kwargs):
        agent = PtyAgent(relay, *args, **kwargs)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        if agent.proc.poll() is None:
            agent.stop()


def test_the_live_view_shows_the_address_the_link_and_a_visitors_bytes(relay, echo, pty_agents):
    """In a terminal the agent draws its tunnel's address, its live link with a
    round-trip time, and a visitor's peer address and bytes as they pass; log
    lines stay inside the view; Ctrl-C leaves the last frame, marked stopped."""
    agent = pty_agents(relay, "forward", str(echo.port), "--unencrypted")
    match = agent.wait_screen(r"tcp://localhost:(\d+)")
    port = int(match.group(1))
    low, high = relay.port_range
    assert low <= port <= high
    agent.wait_screen(r"live\s+\S+\s+\d+s\s+\d+\.\d ms")  # state, session, up, RTT: measured at once
    assert f"localhost:{echo.port}" in agent.text()
    with connect(port) as visitor:
        peer = f"127.0.0.1:{visitor.getsockname()[1]}"
        visitor.sendall(b"v" * 3000)
        got = b""
        visitor.settimeout(10)
        while len(got) < 3000:
            got += visitor.recv(65536)
        assert got == b"v" * 3000
        # The visitor's row: its address, 3000 bytes each way (2.9 KiB), open.
        agent.wait_screen(re.escape(peer) + r"\s+2\.9 KiB\s+2\.9 KiB\s+open")
        visitor.shutdown(socket.SHUT_WR)
        assert recv_all(visitor, 10) == b""
    agent.wait_screen(re.escape(peer) + r"\s+2\.9 KiB\s+2\.9 KiB\s+closed")
    agent.wait_screen(r"open 0\s+visitors 1\s+in 2\.9 KiB \(.*\)\s+out 2\.9 KiB")  # the tunnel's totals
    lines = agent.lines()
    assert lines[0].startswith("tunnel-client  (Ctrl+C to quit)"), lines[:3]
    log_at = lines.index("Log")
    assert any("forwarding tcp://localhost:" in line for line in lines[log_at:]), lines
    # The log line is in the panel and nowhere above it: stderr did not write under the view.
    assert not any("forwarding" in line for line in lines[:log_at])
    assert agent.stop(signal.SIGINT) == 0
    text = agent.text()
    assert "stopped" in text and f"tcp://localhost:{port}" in text
    assert b"\x1b[?25h" in agent.raw  # the cursor is given back


def test_a_visitor_to_an_unreachable_service_is_shown_failed(relay, pty_agents):
    """A visitor whose service refuses the agent's connection appears as failed,
    and the agent's warning about it lands in the view's log panel."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]  # nobody listens once closed
    agent = pty_agents(relay, "forward", str(dead_port), "--unencrypted")
    port = int(agent.wait_screen(r"tcp://localhost:(\d+)").group(1))
    with connect(port) as visitor:
        peer = f"127.0.0.1:{visitor.getsockname()[1]}"
        assert closed_within(visitor, 15)  # reset: the relay closes it at once
    agent.wait_screen(re.escape(peer) + r".*failed")
    agent.wait_screen(r"cannot reach localhost:%d" % dead_port)


@pytest.mark.parametrize("flag", ["--no-console", "--json"])
def test_a_terminal_still_gets_plain_lines_when_asked(relay, echo, pty_agents, flag):
    """--no-console and --json in a terminal print today's lines: no drawing, no escape codes."""
    agent = pty_agents(relay, "forward", str(echo.port), "--unencrypted", flag)
    agent.wait_screen(r"tcp://localhost:\d+")
    wait_for(lambda: b"forwarding" in agent.raw, 30, "the log line")
    out = bytes(agent.raw).decode()
    assert ESCAPE not in out
    lines = [line for line in out.replace("\r\n", "\n").split("\n") if line]
    printed = [line for line in lines if not line.startswith("tunnel-client:")]
    if flag == "--json":
        (item,) = [json.loads(line) for line in printed]
        assert item["url"].startswith("tcp://localhost:") and item["local"] == f"localhost:{echo.port}"
    else:
        (line,) = printed
        assert re.fullmatch(r"tcp://localhost:\d+", line)
    assert "Tunnels" not in out


def test_a_pipe_gets_exactly_the_plain_lines(relay, echo):
    """Not a terminal: stdout is the address line alone, stderr the log lines, neither with an escape code."""
    agent = AgentProcess(relay, "forward", str(echo.port), "--unencrypted", env={"TERM": "xterm-256color"})
    try:
        host, port = agent.address()
        wait_for(lambda: any("forwarding" in line for line in agent.stderr.all), 30, "the log line")
    finally:
        agent.stop()
    assert agent.stdout.all == [f"tcp://{host}:{port}"]
    assert all(line.startswith("tunnel-client: ") for line in agent.stderr.all), agent.stderr.all
    assert ESCAPE not in "".join(agent.stdout.all + agent.stderr.all)
