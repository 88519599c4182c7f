"""Network pieces of the benchmark: the service, the delay line, the
visitor-side clients and two helper processes. Stdlib only (the `api` helper
imports the installed `client` package): it is also run as a script, with
only its own folder on sys.path.

Run as a process by the bench (`python scripts/bench/benchnet.py ROLE ...`):

- `service`: an echo service (selectors, TCP_NODELAY, thousands of idle
  connections) and a bulk service (a thread per connection) on two ports;
- `delay`: a user-space delay line (asyncio) between a listening port and a
  target: a fixed one-way delay each way, paced to a rate, with at most
  rate x delay bytes in flight per direction;
- `idle`: opens N visitor connections (1-byte echo each) and holds them;
- `api`: times forward() open+close on a live link (the Python API).

Imported by the bench (stacks.py, workloads.py) for the clients: bulk
upload/download, many streams, ping-pong, new connections. A client speaks plain TCP or TLS (SNI + CA), so
the same code measures every path.

Bulk protocol (so that TLS visitors need no half-close): the client sends one
byte, b"U" or b"D". Upload: then frames `u32 length | bytes`, a 0 length ends
it, and the service answers `u64 bytes | f64 seconds` it measured from the
first frame to the end. Download: the service sends until the client closes.
"""

import argparse
import asyncio
import errno
import json
import os
import resource
import selectors
import socket
import ssl
import struct
import sys
import threading
import time
from collections import deque

CHUNK = 256 * 1024  # bulk read and write size
UPLOAD_REPLY = struct.Struct("!Qd")
SKIP = struct.Struct("!d")
U32 = struct.Struct("!I")


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return hard
        except (ValueError, OSError):
            pass
    return soft


def recv_exact(sock, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise ConnectionError(f"EOF after {got} of {n} bytes")
        got += k
    return bytes(buf)


# -- the service ----------------------------------------------------------------------


class EchoService:
    """Single-threaded echo on a selector: TCP_NODELAY, closes on EOF."""

    def __init__(self, host: str = "127.0.0.1"):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(4096)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.sock, selectors.EVENT_READ, None)
        self.pending: dict[socket.socket, bytes] = {}

    def run(self) -> None:
        sel = self.sel
        while True:
            for key, mask in sel.select():
                if key.data is None:
                    self._accept()
                elif mask & selectors.EVENT_WRITE:
                    self._write(key.fileobj)
                else:
                    self._read(key.fileobj)

    def _accept(self) -> None:
        for _ in range(256):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # EMFILE and the like: try again on the next event
                return
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sel.register(conn, selectors.EVENT_READ, True)

    def _close(self, conn) -> None:
        self.pending.pop(conn, None)
        try:
            self.sel.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()

    def _read(self, conn) -> None:
        try:
            data = conn.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        try:
            sent = conn.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(conn)
            return
        if sent < len(data):
            self.pending[conn] = data[sent:]
            self.sel.modify(conn, selectors.EVENT_WRITE, True)

    def _write(self, conn) -> None:
        data = self.pending.get(conn, b"")
        try:
            sent = conn.send(data)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if sent < len(data):
            self.pending[conn] = data[sent:]
        else:
            self.pending.pop(conn, None)
            self.sel.modify(conn, selectors.EVENT_READ, True)


class BulkService:
    """A thread per connection: b"U" counts framed uploads, b"D" sends until closed."""

    MAX_SECONDS = 120  # a download nobody closes stops by itself

    def __init__(self, host: str = "127.0.0.1"):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]
        self.payload = memoryview(bytes(CHUNK))

    def run(self) -> None:
        while True:
            conn, _ = self.sock.accept()
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn) -> None:
        with conn:
            try:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.settimeout(60)
                mode = conn.recv(1)
                if mode == b"U":
                    self._upload(conn)
                elif mode == b"D":
                    self._download(conn)
            except OSError:
                pass

    def _upload(self, conn) -> None:
        """Counts from the first frame, or from `skip` seconds after it (a ramp-up
        left out); answers the bytes and seconds counted."""
        (skip,) = SKIP.unpack(recv_exact(conn, SKIP.size))
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        total = 0
        first = None
        mark = None  # (time, total) where counting starts
        perf = time.perf_counter
        while True:
            (length,) = U32.unpack(recv_exact(conn, 4))
            now = perf()
            if first is None:
                first = now
                mark = (now, 0)
            elif skip and mark[1] == 0 and now - first >= skip:
                mark = (now, total)
            if length == 0:
                break
            need = length
            while need:
                k = conn.recv_into(view[: min(need, CHUNK)])
                if not k:
                    raise ConnectionError("EOF inside a frame")
                need -= k
            total += length
        conn.sendall(UPLOAD_REPLY.pack(total - mark[1], perf() - mark[0]))

    def _download(self, conn) -> None:
        deadline = time.monotonic() + self.MAX_SECONDS
        payload = self.payload
        while time.monotonic() < deadline:
            conn.sendall(payload)


def run_service(args) -> None:
    raise_nofile()
    echo = EchoService()
    bulk = BulkService()
    threading.Thread(target=echo.run, daemon=True).start()
    threading.Thread(target=bulk.run, daemon=True).start()
    print(json.dumps({"echo": echo.port, "bulk": bulk.port}), flush=True)
    sys.stdin.read()  # until the parent closes our stdin (or dies)


# -- the delay line -------------------------------------------------------------------


class _Direction:
    """One direction of one connection: delay, pace, bound what is in flight."""

    def __init__(self, loop, reader, writer, delay: float, rate: float, cap: int):
        self.loop, self.reader, self.writer = loop, reader, writer
        self.delay, self.rate, self.cap = delay, rate, cap
        self.queue: deque = deque()
        self.inflight = 0
        self.have_data = asyncio.Event()
        self.have_space = asyncio.Event()

    async def read(self) -> None:
        try:
            while True:
                while self.inflight >= self.cap:
                    self.have_space.clear()
                    await self.have_space.wait()
                data = await self.reader.read(min(65536, self.cap - self.inflight))
                if not data:
                    break
                self.queue.append((self.loop.time() + self.delay, data))
                self.inflight += len(data)
                self.have_data.set()
        except (ConnectionError, OSError):
            pass
        self.queue.append((self.loop.time() + self.delay, None))
        self.have_data.set()

    async def write(self) -> None:
        next_free = 0.0
        try:
            while True:
                while not self.queue:
                    self.have_data.clear()
                    await self.have_data.wait()
                due, data = self.queue.popleft()
                start = max(due, next_free)
                wait = start - self.loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if data is None:
                    if self.writer.can_write_eof():
                        self.writer.write_eof()
                    return
                self.writer.write(data)
                next_free = start + len(data) / self.rate
                await self.writer.drain()
                self.inflight -= len(data)
                self.have_space.set()
        except (ConnectionError, OSError):
            pass


async def _delay_main(args) -> None:
    loop = asyncio.get_running_loop()
    target_host, _, target_port = args.target.rpartition(":")
    cap = max(65536, int(args.rate * args.delay))

    async def handle(reader, writer):
        try:
            up_reader, up_writer = await asyncio.open_connection(target_host, int(target_port))
        except OSError:
            writer.close()
            return
        for w in (writer, up_writer):
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        a = _Direction(loop, reader, up_writer, args.delay, args.rate, cap)
        b = _Direction(loop, up_reader, writer, args.delay, args.rate, cap)
        await asyncio.gather(a.read(), a.write(), b.read(), b.write(), return_exceptions=True)
        for w in (writer, up_writer):
            w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
    print(json.dumps({"port": server.sockets[0].getsockname()[1]}), flush=True)
    await loop.run_in_executor(None, sys.stdin.read)


def run_delay(args) -> None:
    asyncio.run(_delay_main(args))


# -- clients ----------------------------------------------------------------------------


class Endpoint:
    """Where a visitor connects: plain TCP, or TLS to 127.0.0.1 with SNI and a CA."""

    def __init__(self, host: str, port: int, tls_hostname: str | None = None, cafile: str | None = None):
        self.host, self.port = host, port
        self.tls_hostname, self.cafile = tls_hostname, cafile
        self._context = None

    def to_json(self) -> dict:
        return {"host": self.host, "port": self.port, "tls_hostname": self.tls_hostname, "cafile": self.cafile}

    @classmethod
    def from_json(cls, obj: dict) -> "Endpoint":
        return cls(obj["host"], obj["port"], obj.get("tls_hostname"), obj.get("cafile"))

    def context(self) -> ssl.SSLContext:
        if self._context is None:
            self._context = ssl.create_default_context(cafile=self.cafile)
        return self._context

    def connect(self, timeout: float = 10):
        sock = socket.create_connection((self.host, self.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls_hostname:
            sock = self.context().wrap_socket(sock, server_hostname=self.tls_hostname)
        return sock


def bulk_upload(ep: Endpoint, seconds: float, skip: float = 0.0) -> dict:
    """Send for `seconds`; the rate the service measured on its side, leaving
    out the first `skip` seconds."""
    frame = memoryview(U32.pack(CHUNK) + bytes(CHUNK))
    with ep.connect() as sock:
        sock.settimeout(60)
        sock.sendall(b"U" + SKIP.pack(skip))
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            sock.sendall(frame)
        sock.sendall(U32.pack(0))
        total, duration = UPLOAD_REPLY.unpack(recv_exact(sock, UPLOAD_REPLY.size))
    return {"bytes": total, "seconds": duration, "MBps": total / duration / 1e6 if duration > 0 else 0.0}


def bulk_download(ep: Endpoint, seconds: float, skip: float = 0.0) -> dict:
    """Receive for `seconds` after the first byte; the rate the visitor saw
    after the first `skip` seconds. `bytes_total` counts them all."""
    buf = bytearray(CHUNK)
    with ep.connect() as sock:
        sock.settimeout(60)
        sock.sendall(b"D")
        total = sock.recv_into(buf)
        if not total:
            raise ConnectionError("download: EOF before any byte")
        perf = time.perf_counter
        start = perf()
        end = start + seconds
        mark = (start, total) if not skip else None
        now = start
        while now < end:
            n = sock.recv_into(buf)
            if not n:
                raise ConnectionError("download: EOF")
            total += n
            now = perf()
            if mark is None and now - start >= skip:
                mark = (now, total)
    if mark is None or now - mark[0] <= 0:
        mark = (start, 0)
    counted = total - mark[1]
    return {"bytes": counted, "bytes_total": total, "seconds": now - mark[0],
            "MBps": counted / (now - mark[0]) / 1e6}


def multi_download(ep: Endpoint, streams: int, seconds: float, warmup: float = 0.3,
                   start_timeout: float = 5.0) -> dict:
    """`streams` concurrent downloads: aggregate rate and Jain's fairness of
    what each stream got in the same window. A stream that gets nothing is
    starved, not an error: it counts as 0 (and in `starved`).

    One thread reads every stream (selectors, non-blocking): 64 threads
    handing the GIL to each other cost this client more CPU per GB than the
    relay, on the two cores every path under test shares."""
    counts = [0] * streams
    socks = []
    sel = selectors.DefaultSelector()
    buf = bytearray(256 * 1024)
    try:
        for i in range(streams):
            sock = ep.connect()
            sock.sendall(b"D")
            sock.setblocking(False)
            socks.append(sock)
            sel.register(sock, selectors.EVENT_READ, i)
        tls = ep.tls_hostname is not None

        def pump(until: float, wait_for_all: bool = False) -> None:
            while True:
                now = time.monotonic()
                if now >= until or (wait_for_all and all(counts)):
                    return
                for key, _ in sel.select(min(0.05, until - now)):
                    i = key.data
                    sock = key.fileobj
                    # One read per ready stream and turn (fair), plus what a TLS
                    # socket already decrypted, which select() cannot see.
                    while True:
                        try:
                            n = sock.recv_into(buf)
                        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                            break
                        if not n:
                            raise ConnectionError(f"stream {i}: EOF")
                        counts[i] += n
                        if not (tls and sock.pending()):
                            break

        pump(time.monotonic() + start_timeout, wait_for_all=True)
        pump(time.monotonic() + warmup)
        before = list(counts)
        t0 = time.perf_counter()
        pump(time.monotonic() + seconds)
        after = list(counts)
        elapsed = time.perf_counter() - t0
    finally:
        sel.close()
        for sock in socks:
            sock.close()
    got = [a - b for a, b in zip(after, before)]
    total = sum(got)
    squares = sum(x * x for x in got)
    jain = total * total / (len(got) * squares) if squares else 0.0
    return {"MBps": total / elapsed / 1e6, "jain": jain, "per_stream_bytes": got, "seconds": elapsed,
            "starved": sum(1 for x in got if x == 0), "never_started": sum(1 for c in before if c == 0)}


def ping_pong(ep: Endpoint, count: int, warmup: int, max_seconds: float) -> list[float]:
    """1-byte round trips on one connection; microseconds each."""
    out = []
    with ep.connect() as sock:
        sock.settimeout(10)
        perf = time.perf_counter
        end = time.monotonic() + max_seconds
        for i in range(warmup + count):
            t = perf()
            sock.sendall(b"x")
            if not sock.recv(1):
                raise ConnectionError("echo closed")
            if i >= warmup:
                out.append((perf() - t) * 1e6)
                if time.monotonic() > end:
                    break
    return out


def _one_connection(ep: Endpoint) -> float:
    t = time.perf_counter()
    sock = ep.connect()
    try:
        sock.sendall(b"x")
        if sock.recv(1) != b"x":
            raise ConnectionError("no echo")
    finally:
        sock.close()
    return (time.perf_counter() - t) * 1e6


class _Conn:
    """One connection of new_connections(): connect, (TLS handshake), send one
    byte, read the echo, close; driven by selector events, never blocking."""

    __slots__ = ("sock", "started", "step")

    def __init__(self, ep: Endpoint, started: float):
        self.started = started
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # the bench binds 127.0.0.1
        try:
            self.sock.setblocking(False)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = self.sock.connect_ex((ep.host, ep.port))
            if err not in (0, errno.EINPROGRESS):
                raise OSError(err, os.strerror(err))
        except OSError:
            self.sock.close()
            raise
        self.step = "connect"

    def advance(self, ep: Endpoint) -> int | None:
        """Go as far as possible: the selector event to wait for next, or None when done."""
        sock = self.sock
        if self.step == "connect":
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
            if ep.tls_hostname:
                self.sock = sock = ep.context().wrap_socket(
                    sock, server_hostname=ep.tls_hostname, do_handshake_on_connect=False)
                self.step = "handshake"
            else:
                self.step = "send"
        if self.step == "handshake":
            try:
                sock.do_handshake()
            except ssl.SSLWantReadError:
                return selectors.EVENT_READ
            except ssl.SSLWantWriteError:
                return selectors.EVENT_WRITE
            self.step = "send"
        if self.step == "send":
            try:
                if not sock.send(b"x"):
                    return selectors.EVENT_WRITE
            except (BlockingIOError, ssl.SSLWantWriteError):
                return selectors.EVENT_WRITE
            except ssl.SSLWantReadError:
                return selectors.EVENT_READ
            self.step = "echo"
        try:
            data = sock.recv(1)
        except (BlockingIOError, ssl.SSLWantReadError):
            return selectors.EVENT_READ
        if data != b"x":
            raise ConnectionError("no echo")
        sock.close()
        return None


def new_connections(ep: Endpoint, parallel: int, max_count: int, seconds: float, warmup: int = 5) -> dict:
    """connect + 1-byte echo + close, `parallel` at a time, until `max_count`
    or `seconds`: rate per second and each connection's microseconds.

    One thread drives every connection (non-blocking sockets, one selector):
    32 blocking client threads cost about 350 us of CPU per connection on
    the two cores the path under test shares, more than the relay."""
    for _ in range(warmup):
        _one_connection(ep)
    latencies: list[float] = []
    errors: list[str] = []
    sel = selectors.DefaultSelector()
    perf = time.perf_counter
    end = time.monotonic() + seconds
    left = max_count
    active = 0

    def start() -> None:
        nonlocal left, active
        while left > 0 and active < parallel and time.monotonic() < end and len(errors) <= 20:
            left -= 1
            try:
                conn = _Conn(ep, perf())
            except OSError as e:
                errors.append(str(e))
                continue
            sel.register(conn.sock, selectors.EVENT_WRITE, conn)
            active += 1

    def finish(conn: _Conn, error: Exception | None) -> None:
        nonlocal active
        active -= 1
        if error is None:
            latencies.append((perf() - conn.started) * 1e6)
        else:
            errors.append(str(error))
            conn.sock.close()

    t0 = perf()
    try:
        start()
        hard_end = end + 30
        while active and time.monotonic() < hard_end:
            for key, _ in sel.select(1.0):
                conn = key.data
                sel.unregister(key.fileobj)
                try:
                    wanted = conn.advance(ep)
                except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
                    finish(conn, e)
                    continue
                if wanted is None:
                    finish(conn, None)
                else:
                    sel.register(conn.sock, wanted, conn)
            start()
    finally:
        for key in list(sel.get_map().values()):
            key.fileobj.close()
        sel.close()
    elapsed = perf() - t0
    if not latencies:
        raise ConnectionError("no connection succeeded: " + "; ".join(errors[:3]))
    return {"per_s": len(latencies) / elapsed, "latencies_us": latencies, "errors": len(errors)}


# -- idle visitors (own process) --------------------------------------------------------


async def _idle_main(args) -> None:
    raise_nofile()
    ep = Endpoint.from_json(json.loads(args.endpoint))
    context = ep.context() if ep.tls_hostname else None
    held = []
    failed = 0
    not_tried = 0
    limit = asyncio.Semaphore(args.concurrency)
    t0 = time.perf_counter()
    deadline = time.monotonic() + args.max_seconds

    async def one():
        nonlocal failed, not_tried
        async with limit:
            if time.monotonic() > deadline:
                not_tried += 1
                return
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(
                        ep.host, ep.port, ssl=context, server_hostname=ep.tls_hostname if context else None
                    ),
                    30,
                )
                writer.write(b"x")
                if await asyncio.wait_for(reader.readexactly(1), 30) != b"x":
                    raise ConnectionError("no echo")
                held.append(writer)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ssl.SSLError):
                failed += 1

    await asyncio.gather(*(one() for _ in range(args.n)))
    print(json.dumps({"held": len(held), "failed": failed, "not_tried": not_tried,
                      "seconds": time.perf_counter() - t0}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for writer in held:
        writer.transport.abort()


def run_idle(args) -> None:
    asyncio.run(_idle_main(args))


# -- forward() on a live link (own process) ---------------------------------------------


def run_api(args) -> None:
    t0 = time.perf_counter()
    from client import forward

    t_import = time.perf_counter() - t0
    opens, closes = [], []
    t1 = time.perf_counter()
    with forward(args.target, unencrypted=args.unencrypted):  # brings the link up
        first_open = time.perf_counter() - t1
        for _ in range(args.cycles):
            a = time.perf_counter()
            ctx = forward(args.target, unencrypted=args.unencrypted)
            ctx.__enter__()
            b = time.perf_counter()
            ctx.__exit__(None, None, None)
            c = time.perf_counter()
            opens.append((b - a) * 1e3)
            closes.append((c - b) * 1e3)
    print(json.dumps({"import_ms": t_import * 1e3, "first_open_ms": first_open * 1e3,
                      "open_ms": opens, "close_ms": closes}), flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="role", required=True)
    sub.add_parser("service")
    p = sub.add_parser("delay")
    p.add_argument("--target", required=True, help="HOST:PORT")
    p.add_argument("--delay", type=float, default=0.05, help="one-way delay, seconds")
    p.add_argument("--rate", type=float, default=50e6, help="bytes per second each way")
    p = sub.add_parser("idle")
    p.add_argument("--endpoint", required=True, help="JSON of an Endpoint")
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--max-seconds", type=float, default=60, help="stop opening after this long; hold what is open")
    p = sub.add_parser("api")
    p.add_argument("--target", required=True)
    p.add_argument("--cycles", type=int, default=10)
    p.add_argument("--unencrypted", action="store_true")
    args = parser.parse_args(argv)
    {"service": run_service, "delay": run_delay, "idle": run_idle, "api": run_api}[args.role](args)


if __name__ == "__main__":
    main()
