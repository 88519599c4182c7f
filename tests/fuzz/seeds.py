"""Write the hand-made seed corpus: `python -m tests.fuzz.seeds` from the repo root.

Seeds are where coverage-guided fuzzing starts: the spec's byte vectors
(docs/protocol.md, parsed as tests/mux/test_frames.py does), real ClientHellos
made by the stdlib ssl module, and control messages of every op and reply
shape. Files the fuzzer found worth keeping sit next to these under their
SHA-1 names. Rerunning this overwrites only the named seeds.
"""

import json
import ssl
import struct
from pathlib import Path

from relay.mux import frames as fr
from relay.mux.errors import ErrorCode
from relay.mux.frames import FrameType
from tests.mux.test_frames import VECTORS

CORPUS = Path(__file__).resolve().parent / "corpus"
RELAY, AGENT = 0x00, 0x08  # fuzz_frames mode byte: role bit


def _mode(role: int, local_streams: int = 0, windows: int = 0) -> int:
    return role | local_streams << 4 | windows << 6


def _cut(mode: int, points: list[int], body: bytes) -> bytes:
    assert len(points) <= 7
    return bytes([mode | len(points)]) + b"".join(struct.pack("!H", p) for p in points) + body


def frame_seeds() -> dict[str, bytes]:
    seeds = {}
    for v in VECTORS:
        # The vectors open streams from the relay: the agent reads them.
        role = RELAY if v["name"] in ("hello-agent", "control-open-tunnel", "control-close-tunnel") else AGENT
        seeds[f"vector-{v['name']}"] = _cut(_mode(role), [], v["bytes"])
    hi = fr.encode_json(FrameType.OPEN, 1, {"tunnel": "t1"})
    stream = (
        hi
        + fr.encode(FrameType.DATA, 1, b"hello")
        + fr.encode_window_update(1, 4096)
        + fr.encode(FrameType.FIN, 1)
        + fr.encode(FrameType.PING, 0, b"12345678")
        + fr.encode_coded(FrameType.RESET, 1, ErrorCode.CANCEL, "bye")
    )
    seeds["relay-stream-life"] = _cut(_mode(RELAY), [3, len(hi), len(hi) + 12], stream)
    agent_stream = (
        fr.encode_json(FrameType.OPEN, 2, {"tunnel": "t1", "service": "", "peer": ["127.0.0.1", 5]})
        + fr.encode(FrameType.DATA, 2, b"x" * 1024)
        + fr.encode(FrameType.DATA, 2, b"y")
    )
    seeds["agent-window-overrun"] = _cut(_mode(AGENT, windows=0), [], agent_stream)
    ours = fr.encode_window_update(2, 1) + fr.encode(FrameType.DATA, 2, b"z" * 100) + fr.encode(FrameType.FIN, 2)
    seeds["relay-own-stream"] = _cut(_mode(RELAY, local_streams=1), [1], ours)
    grow = fr.encode_json(FrameType.OPEN, 1, {}) + b"".join(fr.encode(FrameType.DATA, 1, b"g" * 256) for _ in range(8))
    seeds["relay-window-growth"] = _cut(_mode(RELAY, windows=0), [60, 400, 900], grow)
    seeds["relay-goaway-then-junk"] = _cut(
        _mode(RELAY), [], fr.encode_coded(FrameType.GOAWAY, 0, ErrorCode.NO_ERROR, "") + b"\xff" * 12
    )
    seeds["relay-too-large"] = _cut(_mode(RELAY), [5], fr.header(FrameType.DATA, 1, fr.MAX_FRAME_PAYLOAD + 1))
    return seeds


def control_seeds() -> dict[str, bytes]:
    seeds = {f"vector-{v['name']}": v["json"].encode() for v in VECTORS if v["name"].startswith("control-") and "json" in v}
    messages = {
        "open-tls-terminate": {
            "id": 3,
            "op": "open_tunnel",
            "name": "web",
            "services": [
                {"name": "web", "kind": "tls", "mode": "terminate", "alpn": ["h2", "http/1.1"]},
                {"name": "ssh", "kind": "tcp"},
            ],
            "allow": ["10.0.0.0/8", "2001:db8::/32"],
        },
        "open-tls-passthrough-reclaim": {
            "id": 4,
            "op": "open_tunnel",
            "kind": "tls",
            "reclaim": {"tunnel": "t1", "secret": "r1"},
        },
        "open-client-ca": {
            "id": 5,
            "op": "open_tunnel",
            "services": [{"name": "", "kind": "tls"}],
            "client_ca": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        },
        "unknown-op": {"id": 6, "op": "\ud800"},
        "reply-error-unknown-code": {"id": 7, "ok": False, "error": {"code": "newer_code", "message": "\udc80x"}},
        "reply-opened-no-endpoints": {"id": 8, "ok": True, "tunnel": {"id": "t2"}},
        "no-id": {"op": "close_tunnel", "tunnel": "t1"},
    }
    for name, message in messages.items():
        seeds[name] = json.dumps(message, separators=(",", ":")).encode()
    return seeds


def client_hello(server_name: str | None, alpn=("h2", "http/1.1"), tls13_only=False) -> bytes:
    """A real ClientHello from the stdlib, as tests/relay/test_clienthello.py makes them."""
    context = ssl.create_default_context()
    context.check_hostname = server_name is not None
    if tls13_only:
        context.minimum_version = ssl.TLSVersion.TLSv1_3
    if alpn:
        context.set_alpn_protocols(list(alpn))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    sslobj = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    try:
        sslobj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def _records(hello: bytes, size: int) -> bytes:
    body, out = hello[5:], b""
    for i in range(0, len(body), size):
        chunk = body[i : i + size]
        out += bytes([22, 3, 1]) + len(chunk).to_bytes(2, "big") + chunk
    return out


def clienthello_seeds() -> dict[str, bytes]:
    hello = client_hello("Abc.Tunnels.Localhost.")
    return {
        "sni-alpn": _cut(0, [], hello),
        "sni-alpn-cut": _cut(0, [1, 5, 6, 200], hello),
        "no-sni": _cut(0, [], client_hello(None, alpn=())),
        "tls13-one-alpn": _cut(0, [43], client_hello("x.example", alpn=("h2",), tls13_only=True)),
        "records-of-100": _cut(0, [3, 105], _records(hello, 100)),
        "records-of-7": _cut(0, [], _records(client_hello("a.b", alpn=("grpc-exp",)), 7)),
    }


def main() -> None:
    for target, seeds in (
        ("frames", frame_seeds()),
        ("control", control_seeds()),
        ("clienthello", clienthello_seeds()),
    ):
        folder = CORPUS / target
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in seeds.items():
            (folder / f"seed-{name}").write_bytes(data)


if __name__ == "__main__":
    main()
