"""Encrypted tunnels with real clients: curl, httpx over HTTP/2, grpcio,
websockets, a Server-Sent Events stream, and a raw `ssl` socket for
close_notify and half-close.

The relay terminates TLS with its wildcard certificate (signed by the dev CA
in `relay-state/ca.pem`) and splices plaintext to the service, so every
service here is a plain loopback server: HTTP/1.1, cleartext HTTP/2 (h2c with
prior knowledge, chosen by `--alpn h2`), gRPC on an insecure port, a
WebSocket server. Clients connect to 127.0.0.1 on the relay's TLS port and
name the tunnel in SNI (and Host/:authority), since only curl resolves
`*.localhost` by itself. Every wait is bounded.
"""

import asyncio
import functools
import hashlib
import http.server
import json
import os
import random
import shutil
import socket
import ssl
import subprocess
import threading
import time
from concurrent import futures

import grpc
import h2.config
import h2.connection
import h2.events
import httpx
import pytest
from websockets.sync.client import connect as websocket_connect
from websockets.sync.server import serve as websocket_serve

from tests.e2e.harness import wait_for

pytestmark = pytest.mark.timeout(60)

MiB = 1024 * 1024
KiB = 1024
# Responses held by the HTTP/2 service until this many requests are open at once.
H2_CONCURRENT_REQUESTS = 10
# Each HTTP/2 response outgrows the 64 KiB initial windows, so WINDOW_UPDATEs
# must cross the tunnel for it to finish.
H2_RESPONSE_BYTES = 256 * KiB
# The upload service reads this much, then naps: slower than loopback, so the
# relay must pause reading the visitor and resume it (TLS records buffered).
UPLOAD_READ_BYTES = 64 * KiB
UPLOAD_NAP_SECONDS = 0.005
SSE_INTERVAL_SECONDS = 0.1
SSE_EVENTS_SENT = 30
SSE_EVENTS_READ = 12
# An event later than this after the service wrote it was buffered somewhere.
SSE_MAX_LATENCY_SECONDS = 1.0


# -- tunnels and clients --------------------------------------------------------------


def open_encrypted(relay, agents, service_port: int, *extra: str) -> tuple[str, int]:
    """Start `tunnel-client forward PORT --json ...`; return (hostname, TLS port)."""
    agent = agents(relay, "forward", str(service_port), "--json", *extra)
    line = agent.next_line()
    try:
        item = json.loads(line)
    except ValueError:
        raise AssertionError(f"not JSON: {line!r}\n{agent.stderr_text()}") from None
    hostname, port = item["tls_socket"]
    assert item["url"] == f"https://{hostname}:{port}", item
    assert hostname.endswith(".tunnels.localhost") and port == relay.tls_port, item
    return hostname, port


def ca_path(relay) -> str:
    return str(relay.state_dir / "ca.pem")


def client_context(relay) -> ssl.SSLContext:
    """Trusts only the relay's development CA, and checks the hostname."""
    return ssl.create_default_context(cafile=ca_path(relay))


def visitors(relay, hostname: str) -> int:
    for tunnel in relay.tunnels():
        if tunnel.get("hostname") == hostname:
            return tunnel["visitors"]
    raise AssertionError(f"no tunnel {hostname} in {relay.tunnels()}")


def httpx_request_args(hostname: str, port: int) -> dict:
    """Connect to 127.0.0.1 while SNI, certificate check and Host name the tunnel."""
    return {"headers": {"host": f"{hostname}:{port}"}, "extensions": {"sni_hostname": hostname}}


# -- services --------------------------------------------------------------------------


class HTTPService(http.server.SimpleHTTPRequestHandler):
    """HTTP/1.1: files from a folder, POST /upload -> length and sha256 (read
    slowly), GET /events (SSE)."""

    protocol_version = "HTTP/1.1"
    sse_sent: list  # (event number, monotonic time written), set per server

    def log_message(self, *args):
        pass

    def do_POST(self):
        if self.path != "/upload":
            self.send_error(404)
            return
        remaining = int(self.headers["Content-Length"])
        h = hashlib.sha256()
        total = 0
        while remaining:
            chunk = self.rfile.read(min(remaining, UPLOAD_READ_BYTES))
            if not chunk:
                break
            h.update(chunk)
            total += len(chunk)
            remaining -= len(chunk)
            time.sleep(UPLOAD_NAP_SECONDS)
        body = json.dumps({"bytes": total, "sha256": h.hexdigest()}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path != "/events":
            super().do_GET()
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for n in range(SSE_EVENTS_SENT):
                event = f"data: {n}\n\n".encode()
                # Recorded before the write: the client may read the event
                # (and look it up) before this thread runs again.
                self.sse_sent.append((n, time.monotonic()))
                self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                self.wfile.flush()
                time.sleep(SSE_INTERVAL_SECONDS)
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass  # the client read enough and left
        self.close_connection = True


@pytest.fixture
def http_service(tmp_path):
    folder = tmp_path / "www"
    folder.mkdir()
    handler = type("Handler", (HTTPService,), {"sse_sent": []})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(folder))
    )
    server.daemon_threads = True
    server.folder = folder
    server.sse_sent = handler.sse_sent
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


class H2CServer:
    """Cleartext HTTP/2 with prior knowledge, on the `h2` library, a thread per connection.

    Requests under /batch/ are held until `hold_for` of them are open at once
    (or 10 s pass), so the test sees real multiplexing; each response is
    `H2_RESPONSE_BYTES` derived from the path, sent as the windows allow.
    """

    def __init__(self, hold_for: int):
        self.hold_for = hold_for
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.most_held = 0
        self.authorities: set[str] = set()
        self.errors: list[str] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @staticmethod
    def body_for(path: str) -> bytes:
        return random.Random(path).randbytes(H2_RESPONSE_BYTES)

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket):
        config = h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        h = h2.connection.H2Connection(config=config)
        h.initiate_connection()
        held: list[int] = []  # stream ids with a complete request, not answered yet
        paths: dict[int, str] = {}
        outbound: dict[int, memoryview] = {}  # stream id -> body left to send
        held_since = None
        conn.settimeout(0.05)
        try:
            conn.sendall(h.data_to_send())
            while True:
                try:
                    data = conn.recv(65536)
                except socket.timeout:
                    data = None
                if data == b"":
                    return
                for event in h.receive_data(data) if data else ():
                    if isinstance(event, h2.events.RequestReceived):
                        headers = dict(event.headers)
                        paths[event.stream_id] = headers[":path"]
                        self.authorities.add(headers.get(":authority", ""))
                    elif isinstance(event, h2.events.DataReceived):
                        h.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, h2.events.StreamEnded):
                        held.append(event.stream_id)
                        held_since = held_since or time.monotonic()
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        return
                batch = [s for s in held if paths[s].startswith("/batch/")]
                self.most_held = max(self.most_held, len(batch))
                release = [s for s in held if not paths[s].startswith("/batch/")]
                if len(batch) >= self.hold_for or (batch and time.monotonic() - held_since > 10):
                    release += batch
                for stream_id in release:
                    held.remove(stream_id)
                    body = self.body_for(paths[stream_id])
                    h.send_headers(stream_id, [
                        (":status", "200"), ("content-length", str(len(body))),
                        ("content-type", "application/octet-stream"),
                    ])
                    outbound[stream_id] = memoryview(body)
                if not held:
                    held_since = None
                for stream_id, left in list(outbound.items()):
                    # Send what the stream and connection windows allow now.
                    while left:
                        room = min(h.local_flow_control_window(stream_id), h.max_outbound_frame_size)
                        if room <= 0:
                            break
                        h.send_data(stream_id, bytes(left[:room]))
                        left = left[room:]
                    if left:
                        outbound[stream_id] = left
                    else:
                        h.end_stream(stream_id)
                        del outbound[stream_id]
                pending = h.data_to_send()
                if pending:
                    conn.sendall(pending)
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.errors.append(repr(e))
        finally:
            conn.close()

    def close(self):
        self.sock.close()


class ClosingService:
    """Raw TCP: `reply_after_eof` reads to EOF, then answers and closes;
    `greet_and_close` writes a greeting and closes at once."""

    def __init__(self, mode: str):
        self.mode = mode
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.saw_eof = threading.Event()
        self.received = bytearray()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(20)
            try:
                if self.mode == "greet_and_close":
                    conn.sendall(b"hello, then goodbye\n")
                    return
                while True:
                    data = conn.recv(65536)
                    if not data:
                        break
                    self.received += data
                self.saw_eof.set()
                conn.sendall(b"got %d bytes %s\n" % (
                    len(self.received), hashlib.sha256(self.received).hexdigest().encode()))
            except OSError:
                pass

    def close(self):
        self.sock.close()


def tls_read_to_end(tls: ssl.SSLSocket, timeout: float) -> bytes:
    """Read until the peer's close_notify or a TCP EOF; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    out = bytearray()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no end of stream within {timeout}s ({len(out)} bytes read)")
        tls.settimeout(remaining)
        try:
            data = tls.recv(65536)
        except ssl.SSLZeroReturnError:  # close_notify after we sent ours
            return bytes(out)
        except socket.timeout:
            continue
        if not data:  # close_notify (or EOF) before ours
            return bytes(out)
        out += data


# -- tests -------------------------------------------------------------------------------


@pytest.mark.skipif(not shutil.which("curl"), reason="needs curl")
def test_curl_download_and_upload(relay, agents, http_service, tmp_path, record_property):
    """curl with the dev CA downloads 8 MiB and uploads 8 MiB (to a slow reader) through an encrypted tunnel byte for byte."""
    blob = random.Random(1).randbytes(8 * MiB)
    (http_service.folder / "blob.bin").write_bytes(blob)
    hostname, port = open_encrypted(relay, agents, http_service.server_address[1])
    curl = [
        "curl", "-sS", "--fail", "--http1.1", "--noproxy", "*", "--max-time", "20",
        "--cacert", ca_path(relay), "--resolve", f"{hostname}:{port}:127.0.0.1",
    ]
    out = tmp_path / "downloaded.bin"
    done = subprocess.run(
        [*curl, "-o", str(out), "-w", "%{http_version} %{speed_download} %{ssl_verify_result}",
         f"https://{hostname}:{port}/blob.bin"],
        capture_output=True, text=True, timeout=30,
    )
    assert done.returncode == 0, done.stderr
    version, speed, verify = done.stdout.split()
    assert (version, verify) == ("1.1", "0")
    got = out.read_bytes()
    assert len(got) == len(blob)
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(blob).hexdigest()
    record_property("download_MB_per_s", round(float(speed) / 1e6, 1))
    print(f"curl download through the TLS tunnel: {float(speed) / 1e6:.1f} MB/s")

    upload = random.Random(2).randbytes(8 * MiB)
    (tmp_path / "upload.bin").write_bytes(upload)
    done = subprocess.run(
        [*curl, "--data-binary", f"@{tmp_path / 'upload.bin'}", "-H", "Content-Type: application/octet-stream",
         f"https://{hostname}:{port}/upload"],
        capture_output=True, text=True, timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"bytes": len(upload), "sha256": hashlib.sha256(upload).hexdigest()}


def test_httpx_http2_concurrent_requests(relay, agents):
    """With --alpn h2, httpx negotiates HTTP/2 and multiplexes concurrent requests over one tunnel stream to an h2c service."""
    server = H2CServer(hold_for=H2_CONCURRENT_REQUESTS)
    try:
        hostname, port = open_encrypted(relay, agents, server.port, "--alpn", "h2")
        context = client_context(relay)
        url = f"https://127.0.0.1:{port}"

        async def run():
            async with httpx.AsyncClient(http2=True, verify=context, trust_env=False, timeout=15) as client:
                args = httpx_request_args(hostname, port)
                first = await client.get(f"{url}/warmup", **args)
                batch = await asyncio.gather(*(
                    client.get(f"{url}/batch/{i}", **args) for i in range(H2_CONCURRENT_REQUESTS)
                ))
                return [first, *batch]

        responses = asyncio.run(asyncio.wait_for(run(), 30))
        paths = ["/warmup"] + [f"/batch/{i}" for i in range(H2_CONCURRENT_REQUESTS)]
        for path, response in zip(paths, responses):
            assert response.status_code == 200, path
            assert response.http_version == "HTTP/2", path
            assert response.content == H2CServer.body_for(path), path
        assert server.errors == []
        assert server.connections == 1  # one TLS connection -> one stream -> one h2c connection
        assert server.most_held == H2_CONCURRENT_REQUESTS  # all open at once, not one by one
        assert server.authorities == {f"{hostname}:{port}"}
    finally:
        server.close()


def test_grpc_unary_streaming_and_status(relay, agents):
    """gRPC over --alpn h2: a 1 MiB unary call, 100 streamed messages and an error status pass intact."""
    def unary(request, context):
        return hashlib.sha256(request).digest() + request[::-1]

    def stream(request, context):
        for i in range(int(request)):
            yield b"%04d:" % i + bytes([i % 256]) * 1000

    def fail(request, context):
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing: " + request.decode())

    handler = grpc.method_handlers_generic_handler("test.Tunnel", {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[handler])
    service_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = None
    try:
        hostname, port = open_encrypted(relay, agents, service_port, "--alpn", "h2")
        credentials = grpc.ssl_channel_credentials(root_certificates=(relay.state_dir / "ca.pem").read_bytes())
        channel = grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=[
            ("grpc.ssl_target_name_override", hostname),
            ("grpc.enable_http_proxy", 0),
            ("grpc.max_receive_message_length", 8 * MiB),
            ("grpc.max_send_message_length", 8 * MiB),
        ])
        grpc.channel_ready_future(channel).result(timeout=10)

        payload = random.Random(3).randbytes(MiB)
        reply = channel.unary_unary("/test.Tunnel/Unary")(payload, timeout=10)
        assert reply == hashlib.sha256(payload).digest() + payload[::-1]

        messages = list(channel.unary_stream("/test.Tunnel/Stream")(b"100", timeout=10))
        assert messages == [b"%04d:" % i + bytes([i % 256]) * 1000 for i in range(100)]

        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary("/test.Tunnel/Fail")(b"x", timeout=10)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert caught.value.details() == "no such thing: x"
    finally:
        if channel is not None:
            channel.close()
        server.stop(grace=None)


def test_websocket_echo_frames(relay, agents):
    """A WebSocket echo through a default (http/1.1) encrypted tunnel returns text and binary frames of 1 B to 1 MiB exactly."""
    def echo(ws):
        for message in ws:
            ws.send(message)

    server = websocket_serve(echo, "127.0.0.1", 0, max_size=None, compression=None)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        hostname, port = open_encrypted(relay, agents, server.socket.getsockname()[1])
        rng = random.Random(4)
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        with websocket_connect(
            f"wss://{hostname}:{port}/echo", sock=sock, ssl=client_context(relay), server_hostname=hostname,
            max_size=None, compression=None, proxy=None, open_timeout=10, close_timeout=5,
        ) as ws:
            for size in (1, KiB, 64 * KiB, MiB):
                binary = rng.randbytes(size)
                text = "".join(rng.choice("abcxyz é€😀") for _ in range(size))
                for message in (binary, text):
                    ws.send(message)
                    back = ws.recv(timeout=10)
                    assert type(back) is type(message) and back == message, (size, type(message))
    finally:
        server.shutdown()


def test_server_sent_events_stream_unbuffered(relay, agents, http_service):
    """Server-Sent Events arrive in order, each soon after the service wrote it: the relay does not buffer."""
    hostname, port = open_encrypted(relay, agents, http_service.server_address[1])
    arrivals = []  # (data, monotonic time)
    with httpx.Client(verify=client_context(relay), trust_env=False, timeout=5) as client:
        with client.stream("GET", f"https://127.0.0.1:{port}/events", **httpx_request_args(hostname, port)) as r:
            assert r.status_code == 200
            assert r.headers["content-type"] == "text/event-stream"
            deadline = time.monotonic() + 10
            for line in r.iter_lines():
                if line.startswith("data: "):
                    arrivals.append((int(line[len("data: "):]), time.monotonic()))
                if len(arrivals) == SSE_EVENTS_READ or time.monotonic() > deadline:
                    break
    assert [n for n, _ in arrivals] == list(range(SSE_EVENTS_READ))
    sent = dict(http_service.sse_sent)
    latencies = [at - sent[n] for n, at in arrivals]
    assert max(latencies) < SSE_MAX_LATENCY_SECONDS, latencies
    # Spread over time as they were written, not delivered in one burst.
    assert arrivals[-1][1] - arrivals[0][1] > (SSE_EVENTS_READ - 1) * SSE_INTERVAL_SECONDS * 0.5


def test_close_notify_half_closes_and_service_close_ends_visitor(relay, agents):
    """A visitor's close_notify reaches the service as EOF while its reply still flows back; a service's close reaches the visitor as close_notify within seconds."""
    context = client_context(relay)

    # 1. The visitor sends, then close_notify: the service sees EOF and still answers.
    service = ClosingService("reply_after_eof")
    try:
        hostname, port = open_encrypted(relay, agents, service.port)
        payload = os.urandom(100 * KiB)
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        with context.wrap_socket(raw, server_hostname=hostname) as tls:
            tls.sendall(payload)
            tls.setblocking(False)
            try:
                tls.unwrap()  # queues and sends our close_notify
            except ssl.SSLWantReadError:
                pass  # the relay's close_notify comes later: after the reply
            assert service.saw_eof.wait(5), "the service never saw EOF after close_notify"
            reply = tls_read_to_end(tls, 5)
        assert reply == b"got %d bytes %s\n" % (len(payload), hashlib.sha256(payload).hexdigest().encode())
        assert bytes(service.received) == payload
        wait_for(lambda: visitors(relay, hostname) == 0, 5, "the relay to drop the finished visitor")
    finally:
        service.close()

    # 2. The service closes first: the visitor gets its bytes, then the end, without hanging.
    service = ClosingService("greet_and_close")
    try:
        hostname, port = open_encrypted(relay, agents, service.port)
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        with context.wrap_socket(raw, server_hostname=hostname) as tls:
            started = time.monotonic()
            assert tls_read_to_end(tls, 5) == b"hello, then goodbye\n"
            assert time.monotonic() - started < 5
        wait_for(lambda: visitors(relay, hostname) == 0, 5, "the relay to drop the closed visitor")
    finally:
        service.close()
