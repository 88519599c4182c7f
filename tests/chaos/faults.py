"""A fault proxy for the agent-to-relay link, switchable while it runs.

`FaultProxy` listens on loopback and forwards each accepted connection to a
target (the relay's agent port). Its mode applies to every connection, now
and later:

    pass      forward both ways
    freeze    forward nothing, close nothing: no FIN, no RST (a dead path)
    reset     RST both sides of every connection (SO_LINGER 0), then pass new ones
    close     FIN both sides of every connection, then pass new ones
    throttle  at most `rate_bytes_per_second` each way, per connection
    delay     each chunk is held `delay_ms` before it is sent on, each way

It is not a network emulator: a chunk is whatever one recv() returned;
delay keeps order by holding a queue per direction, and holds each chunk
between delay_ms and delay_ms + POLL_SECONDS (the pump looks at its queue
between reads). Threads, not asyncio, so
a test can switch modes from its own thread; every wait is bounded
(POLL_SECONDS), so `close()` stops every thread within about that long.
"""

import collections
import socket
import struct
import threading
import time

POLL_SECONDS = 0.05  # how often blocked pumps look at the mode again
CHUNK_BYTES = 65536
MODES = ("pass", "freeze", "reset", "close", "throttle", "delay")


def _rst(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def _fin(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class _Pair:
    def __init__(self, proxy: "FaultProxy", down: socket.socket, up: socket.socket):
        self.proxy = proxy
        self.down, self.up = down, up
        self.closed = False
        self.frozen = False  # this connection alone frozen (freeze()), the others pass
        self._lock = threading.Lock()
        for s in (down, up):
            s.settimeout(POLL_SECONDS)
        self.threads = [
            threading.Thread(target=self._pump, args=(down, up), daemon=True),
            threading.Thread(target=self._pump, args=(up, down), daemon=True),
        ]
        for t in self.threads:
            t.start()

    def _send(self, dst: socket.socket, data: bytes) -> bool:
        view = memoryview(data)
        while view:
            if self.closed:
                return False
            if self.proxy.mode == "freeze" or self.frozen:
                time.sleep(POLL_SECONDS)
                continue
            try:
                n = dst.send(view)
            except socket.timeout:
                continue
            except OSError:
                return False
            view = view[n:]
        return True

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        held: collections.deque = collections.deque()  # (due, bytes) for delay mode
        while not self.closed:
            mode = self.proxy.mode
            if mode == "freeze" or self.frozen:
                # Read nothing: the sender's buffers fill and its TCP stalls,
                # as on a path that drops everything.
                time.sleep(POLL_SECONDS)
                continue
            while held and (held[0][0] <= time.monotonic() or mode != "delay"):
                if not self._send(dst, held.popleft()[1]):
                    return self.close()
            limit = CHUNK_BYTES
            if mode == "throttle":
                limit = max(1, min(CHUNK_BYTES, int(self.proxy.rate_bytes_per_second * POLL_SECONDS)))
            try:
                data = src.recv(limit)
            except socket.timeout:
                continue
            except OSError:
                data = b""
            if not data:
                for _, chunk in held:
                    self._send(dst, chunk)
                return self.close()
            if mode == "delay":
                held.append((time.monotonic() + self.proxy.delay_ms / 1000, data))
                continue
            if not self._send(dst, data):
                return self.close()
            if mode == "throttle":
                time.sleep(len(data) / self.proxy.rate_bytes_per_second)

    def freeze(self) -> None:
        """Forward nothing more on this connection, close nothing: a dead path for it alone."""
        self.frozen = True

    def close(self, how: str = "close") -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
        for s in (self.down, self.up):
            (_rst if how == "reset" else _fin)(s)


class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of `target_port`; see the module docstring."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self.mode = "pass"
        self.rate_bytes_per_second = 64 * 1024
        self.delay_ms = 50.0
        self.pairs: list[_Pair] = []
        self.accepted = 0
        self._closed = False
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(POLL_SECONDS)
        self.port = self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                down, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.accepted += 1
            try:
                up = socket.create_connection(self.target, timeout=5)
            except OSError:
                _rst(down)
                continue
            self.pairs.append(_Pair(self, down, up))

    def live(self) -> list[_Pair]:
        return [p for p in self.pairs if not p.closed]

    def set(self, mode: str, *, rate_bytes_per_second: float | None = None, delay_ms: float | None = None) -> int:
        """Switch every connection to `mode`; reset and close end the live
        connections (returns how many) and then pass new ones."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        if rate_bytes_per_second is not None:
            self.rate_bytes_per_second = rate_bytes_per_second
        if delay_ms is not None:
            self.delay_ms = delay_ms
        if mode in ("reset", "close"):
            live = self.live()
            for pair in live:
                pair.close(mode)
            self.mode = "pass"
            return len(live)
        self.mode = mode
        return len(self.live())

    def close(self) -> None:
        self._closed = True
        self.sock.close()
        for pair in self.pairs:
            pair.close()
        self._thread.join(1)
        for pair in self.pairs:
            for t in pair.threads:
                t.join(1)
