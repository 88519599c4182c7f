"""Real processes on loopback for end-to-end tests: `twistd -n relay`,
`tunnel-client`, and small blocking services. Every wait is bounded.

The relay and the agent run from the installed package (the README's test
command installs it), from a temporary folder, never from the repository.

Free ports, the bounded wait, `listening` and the private sshd are the
benchmark's (scripts/bench/processes.py), imported here so that tests take
them from this module as before. `scripts` is found the way `tests` is: from
the repository root, which pytest puts on sys.path (rootdir, both packages).
"""

import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import urllib.request
import json
from pathlib import Path

from scripts.bench.processes import (  # noqa: F401 - the tests' names for them
    PrivateSSHD,
    free_port,
    free_port_range,
    listening,
    openssh_tools,
    stop_process,
    wait_for,
)

BIN = Path(sys.executable).parent
TWISTD = str(BIN / "twistd")
TUNNEL_CLIENT = str(BIN / "tunnel-client")


class _LineReader:
    """Collects a pipe's lines on a thread so reads can time out."""

    def __init__(self, stream):
        self.lines: "queue.Queue[str]" = queue.Queue()
        self.all: list[str] = []
        self._thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self._thread.start()

    def _run(self, stream):
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.all.append(line)
            self.lines.put(line)
        stream.close()

    def drain(self, timeout: float = 2) -> None:
        """Wait (bounded) until the pipe's last line is in `all`: after the process ended."""
        self._thread.join(timeout)

    def next_line(self, timeout: float) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output line within {timeout}s") from None


class RelayProcess:
    def __init__(self, workdir: Path, *extra: str, tunnel_ports: int = 20, env: dict | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.state_dir = self.workdir / "relay-state"
        self.agent_port = free_port()
        self.admin_port = free_port()
        self.tls_port = free_port()
        self.port_range = free_port_range(tunnel_ports)
        self.extra = list(extra)
        self.log_path = self.workdir / "relay.log"
        self.proc = None
        self._env = env

    def args(self) -> list[str]:
        low, high = self.port_range
        return [
            TWISTD, "-n", "--pidfile=", f"--logfile={self.log_path}", "relay",
            f"--state-dir={self.state_dir}", f"--agent-port={self.agent_port}",
            f"--admin-port={self.admin_port}", f"--tls-port={self.tls_port}",
            f"--ports={low}-{high}", *self.extra,
        ]

    def start(self, timeout: float = 20) -> "RelayProcess":
        env = dict(os.environ, **(self._env or {}))
        env.pop("PYTHONPATH", None)
        self.proc = subprocess.Popen(
            self.args(), cwd=self.workdir, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        wait_for(lambda: self.proc.poll() is not None or listening(self.agent_port), timeout, "relay agent port")
        if self.proc.poll() is not None:
            raise AssertionError(f"relay exited {self.proc.returncode}:\n{self.log()}")
        wait_for(lambda: listening(self.admin_port), timeout, "relay admin port")
        return self

    def client_env(self) -> dict:
        env = {}
        for line in (self.state_dir / "client.env").read_text().splitlines():
            key, _, value = line.partition("=")
            env[key] = value
        return env

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def admin(self, path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5) as r:
            return json.loads(r.read())

    def tunnels(self) -> list[dict]:
        return self.admin("/v1/tunnels")["tunnels"]

    def stop(self, timeout: float = 10) -> int:
        return stop_process(self.proc, timeout) if self.proc is not None else 0

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def rss_bytes(self) -> int:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss


class AgentProcess:
    def __init__(self, relay: RelayProcess | None, *args: str, env: dict | None = None, cwd: Path | None = None):
        base = dict(os.environ)
        base.pop("PYTHONPATH", None)
        if relay is not None:
            base.update(relay.client_env())
        base.update(env or {})
        self.args = [TUNNEL_CLIENT, *args]
        self.proc = subprocess.Popen(
            self.args, cwd=cwd or (relay.workdir if relay else None), env=base,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self.stdout = _LineReader(self.proc.stdout)
        self.stderr = _LineReader(self.proc.stderr)

    def next_line(self, timeout: float = 30) -> str:
        try:
            return self.stdout.next_line(timeout)
        except AssertionError as e:  # say why: the agent's own words
            raise AssertionError(f"{e}; agent stderr:\n{self.stderr_text()[-2000:]}") from None

    def address(self, timeout: float = 30) -> tuple[str, int]:
        """The next printed tcp://host:port, as (host, port)."""
        line = self.next_line(timeout)
        assert line.startswith("tcp://"), (line, self.stderr_text())
        host, _, port = line[len("tcp://"):].rpartition(":")
        return host, int(port)

    def stderr_text(self) -> str:
        return "\n".join(self.stderr.all)

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self.stdout.drain()
        self.stderr.drain()
        return code

    def stop(self, sig=signal.SIGTERM, timeout: float = 10) -> int:
        stop_process(self.proc, timeout, sig)
        self.stdout.drain()
        self.stderr.drain()
        return self.proc.returncode

    def rss_bytes(self) -> int:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss


class EchoServer:
    """Threaded echo service honouring half-close: echoes until EOF, then
    shuts down its write side."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
        except OSError:
            self.sock.close()
            raise
        self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def handle(self, conn):
        while True:
            data = conn.recv(262144)
            if not data:
                conn.shutdown(socket.SHUT_WR)
                return
            conn.sendall(data)

    def _echo(self, conn):
        with conn:
            try:
                self.handle(conn)
            except OSError:
                pass

    def close(self):
        self._closed = True
        self.sock.close()


def connect(port: int, host: str = "127.0.0.1", timeout: float = 10) -> socket.socket:
    s = socket.create_connection((host, port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def recv_all(sock: socket.socket, timeout: float = 30) -> bytes:
    sock.settimeout(timeout)
    chunks = []
    while True:
        data = sock.recv(262144)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """True if the peer closed (EOF or reset) within `seconds`."""
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


class _ProxiedPair:
    """One connection through a LinkProxy: the accepted side and the upstream side."""

    def __init__(self, down: socket.socket, up: socket.socket, blackholed: bool):
        self.down, self.up = down, up
        self.blackholed = blackholed
        self.closed = False
        self._lock = threading.Lock()
        for src, dst in ((down, up), (up, down)):
            threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            if self.blackholed:
                continue  # swallow: nothing passes, nothing is closed
            try:
                dst.sendall(data)
            except OSError:
                break
        if not self.blackholed:
            self.close()  # one side ended: end the other (TLS links never half-close)

    def close(self, rst: bool = False) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
        for s in (self.down, self.up):
            try:
                if rst:
                    # Linger 0: close() sends RST; SHUT_RD only wakes our recv thread.
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    s.shutdown(socket.SHUT_RD)
                else:
                    s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


class LinkProxy:
    """A TCP proxy on loopback between an agent and the relay's agent port,
    which a test can cut (FIN or RST on both sides of every connection) or
    blackhole (bytes swallowed, nothing closed: a silently dead path)."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.blackhole_new = False  # connections accepted from now on are blackholed
        self.pairs: list[_ProxiedPair] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._closed:
            try:
                down, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            try:
                up = socket.create_connection(self.target, timeout=5)
                up.settimeout(None)
            except OSError:
                down.close()
                continue
            self.pairs.append(_ProxiedPair(down, up, self.blackhole_new))

    def live_pairs(self) -> list[_ProxiedPair]:
        return [p for p in self.pairs if not p.closed]

    def cut(self, rst: bool = False) -> int:
        """Close both sides of every proxied connection; returns how many."""
        live = self.live_pairs()
        for pair in live:
            pair.close(rst=rst)
        return len(live)

    def blackhole(self) -> None:
        """Swallow every byte on current connections and on new ones."""
        self.blackhole_new = True
        for pair in self.pairs:
            pair.blackholed = True

    def restore_new(self) -> None:
        """Forward connections accepted from now on; blackholed ones stay silent."""
        self.blackhole_new = False

    def close(self) -> None:
        self._closed = True
        self.sock.close()
        for pair in self.pairs:
            pair.close()
