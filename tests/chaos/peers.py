"""Hostile peers that speak the mux protocol (docs/protocol.md, version 2) on
purpose badly, and the probes the chaos scenarios measure with.

`HostileAgent` dials the relay's agent port over TLS (trusting the relay's
dev CA), logs in with the real token, and then does what a test tells it:
floods, never reads, never answers. `HostileRelay` is a small TLS server an
unmodified `tunnel-client` connects to: it grants the agent's open_tunnel and
then sends what a test tells it. Both write raw frames (tests/mux/helpers.py)
rather than drive a `MuxConnection`, so nothing on our side refuses to send
what a real peer must survive. Every socket has a timeout.
"""

import json
import socket
import ssl
import struct
import threading
import time
from pathlib import Path

from tests.mux import helpers as fb
from relay.mux.frames import FrameType

HEADER = struct.Struct(">IBBI")
IO_TIMEOUT_SECONDS = 10.0


def read_frame(sock: socket.socket) -> tuple[int, int, bytes]:
    """One frame from a blocking socket: (type, stream_id, payload)."""
    header = _read_exact(sock, HEADER.size)
    length, frame_type, _flags, stream_id = HEADER.unpack(header)
    return frame_type, stream_id, _read_exact(sock, length)


def _read_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise EOFError(f"peer closed after {len(out)} of {n} bytes")
        out += chunk
    return bytes(out)


def read_until(sock: socket.socket, frame_type: int, timeout: float = IO_TIMEOUT_SECONDS) -> tuple[int, bytes]:
    """Skip frames until one of `frame_type` arrives: (stream_id, payload)."""
    deadline = time.monotonic() + timeout
    sock.settimeout(timeout)
    while time.monotonic() < deadline:
        kind, stream_id, payload = read_frame(sock)
        if kind == frame_type:
            return stream_id, payload
    raise TimeoutError(f"no frame of type {frame_type} within {timeout:g} s")


def goaway_code(sock: socket.socket, timeout: float = IO_TIMEOUT_SECONDS) -> int | None:
    """The code of the GOAWAY the peer sends before it closes; None if it
    closed (or reset) without one."""
    try:
        _, payload = read_until(sock, FrameType.GOAWAY, timeout)
    except (EOFError, OSError):
        return None
    return struct.unpack(">I", payload[:4])[0]


class HostileAgent:
    """A TLS connection to the relay's agent port, logged in with the token."""

    def __init__(self, relay, *, login: bool = True):
        env = relay.client_env()
        context = ssl.create_default_context(cafile=env["TUNNEL_CA"])
        raw = socket.create_connection(("127.0.0.1", relay.agent_port), timeout=IO_TIMEOUT_SECONDS)
        self.sock = context.wrap_socket(raw, server_hostname="localhost")
        self.token = env["TUNNEL_TOKEN"]
        self._next_id = 1
        if login:
            self.send(fb.hello(token=self.token))
            read_until(self.sock, FrameType.HELLO)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, message: dict) -> None:
        self.send(fb.control(message))

    def open_tunnel(self) -> tuple[str, int]:
        """open_tunnel for one TCP service: (tunnel id, public port)."""
        request_id = self._next_id
        self._next_id += 1
        self.request({"id": request_id, "op": "open_tunnel", "services": [{"name": "", "kind": "tcp"}]})
        _, payload = read_until(self.sock, FrameType.CONTROL)
        reply = json.loads(payload)
        assert reply.get("ok") is True, reply
        return reply["tunnel"]["id"], reply["tunnel"]["endpoints"][0]["tcp_socket"][1]

    def close(self) -> None:
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.sock.close()


class HostileRelay:
    """A TLS server an unmodified tunnel-client logs in to (with the relay
    dev CA's certificate for localhost from `state_dir`). `serve(script)`
    runs `script(conn)` on a thread for each link once the agent's HELLO and
    first open_tunnel are answered; the tunnel is granted as TUNNEL_ID."""

    TUNNEL_ID = "chaostunnel2345a"

    def __init__(self, state_dir: Path):
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(Path(state_dir) / "relay.pem"), str(Path(state_dir) / "relay-key.pem"))
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.links = 0  # logins served: more than one means the agent reconnected
        self.errors: list[str] = []
        self.conns: list[socket.socket] = []
        self._closed = False
        self._script = None
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def serve(self, script) -> None:
        self._script = script

    def _accept(self) -> None:
        while not self._closed:
            try:
                raw, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._link, args=(raw,), daemon=True).start()

    def _link(self, raw: socket.socket) -> None:
        raw.settimeout(IO_TIMEOUT_SECONDS)
        try:
            conn = self.context.wrap_socket(raw, server_side=True)
            self.conns.append(conn)
            read_until(conn, FrameType.HELLO)
            conn.sendall(fb.hello(session="chaos"))
            _, payload = read_until(conn, FrameType.CONTROL)
            request = json.loads(payload)
            endpoint = {"service": "", "kind": "tcp", "url": "tcp://localhost:9", "tcp_socket": ["localhost", 9]}
            conn.sendall(fb.control({
                "id": request["id"], "ok": True, "reclaimed": False, "reclaim_secret": "s" * 32,
                "tunnel": {"id": self.TUNNEL_ID, "endpoints": [endpoint], **endpoint},
            }))
            self.links += 1
            while self._script is None and not self._closed:
                time.sleep(0.02)
            if self._script is not None:
                self._script(conn)
        except Exception as e:  # reported by the test, not lost on a thread
            self.errors.append(f"{type(e).__name__}: {e}")

    def close(self) -> None:
        self._closed = True
        self.sock.close()
        for conn in self.conns:
            try:
                conn.close()
            except OSError:
                pass
        self._thread.join(1)


def echo_through_stream(conn: socket.socket, stream_id: int, payload: bytes, timeout: float = 10) -> bytes:
    """As a relay: OPEN `stream_id` to the granted tunnel, send `payload` and
    FIN, and collect the DATA that comes back until the agent's FIN."""
    conn.sendall(
        fb.open_frame(stream_id, {"tunnel": HostileRelay.TUNNEL_ID, "service": "", "peer": ["127.0.0.1", 4000],
                                  "local": ["127.0.0.1", 9]})
        + fb.data(stream_id, payload) + fb.fin(stream_id)
    )
    got = bytearray()
    deadline = time.monotonic() + timeout
    conn.settimeout(timeout)
    while time.monotonic() < deadline:
        kind, sid, body = read_frame(conn)
        if sid != stream_id:
            continue
        if kind == FrameType.DATA:
            got += body
            if body:
                conn.sendall(fb.window_update(stream_id, len(body)))
        elif kind == FrameType.FIN:
            return bytes(got)
        elif kind == FrameType.RESET:
            raise AssertionError(f"stream {stream_id} reset: {body!r}")
    raise TimeoutError(f"no FIN on stream {stream_id} within {timeout:g} s")
