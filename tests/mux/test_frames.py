"""Frame layout (relay/mux/frames.py) against docs/protocol.md.

The vector tests parse the ```vector blocks of docs/protocol.md, so the spec's
byte examples are checked on every run and cannot drift from the code.
"""

import json
import re
import struct
from pathlib import Path

import pytest

from relay.mux import ErrorCode, FrameTooLargeError, MuxConnection, MuxProtocolError, Role
from relay.mux import frames as fr
from relay.mux.frames import FrameType
from tests.mux import helpers as h

PROTOCOL_MD = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
_VECTOR_BLOCK = re.compile(r"^```vector\n(.*?)^```", re.MULTILINE | re.DOTALL)


# -- the spec's vectors --------------------------------------------------------


def _parse_vector(block: str) -> dict:
    fields: dict = {"hex": ""}
    for line in block.splitlines():
        if not line.strip():
            continue
        key, sep, value = line.partition(": ")
        assert sep, f"vector line without 'key: value': {line!r}"
        if key == "hex":
            fields["hex"] += "".join(value.split())
        else:
            assert key not in fields, f"duplicate {key!r} in vector"
            fields[key] = value
    frame = dict(item.split("=", 1) for item in fields["frame"].split())
    fields["type"] = FrameType[frame["type"]]
    fields["stream"] = int(frame["stream"])
    fields["flags"] = int(frame["flags"], 0)
    fields["payload_spec"] = frame["payload"]
    fields["bytes"] = bytes.fromhex(fields["hex"])
    return fields


def _vector_payload(v: dict) -> bytes:
    """Build the payload from the vector's description, without relay.mux."""
    spec = v["payload_spec"]
    if spec == "empty":
        return b""
    if spec.startswith("hex:"):
        return bytes.fromhex(spec[4:])
    if spec.startswith("u32:"):
        return struct.pack(">I", int(spec[4:]))
    if spec == "json":
        return v["json"].encode("utf-8")
    if spec.startswith("code:"):
        return struct.pack(">I", ErrorCode[spec[5:]]) + v.get("reason", "").encode("utf-8")
    raise AssertionError(f"unknown payload spec {spec!r}")


def _load_vectors() -> list[dict]:
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    return [_parse_vector(block) for block in _VECTOR_BLOCK.findall(text)]


VECTORS = _load_vectors()


def test_spec_has_the_promised_vectors():
    """docs/protocol.md keeps a vector for the handshake, every stream frame and keepalive."""
    names = [v["name"] for v in VECTORS]
    assert len(names) == len(set(names)), "vector names must be unique"
    assert {
        "hello-agent",
        "hello-relay",
        "goaway-auth-failed",
        "data-hi-stream-2",
        "window-update-65536-stream-2",
        "fin-stream-2",
        "reset-cancel-stream-4",
        "ping",
    } <= set(names)
    assert {v["type"] for v in VECTORS} == set(FrameType), "every frame type has a vector"


@pytest.mark.parametrize("v", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector_encodes_to_its_bytes(v):
    """Encoding the frame a vector describes gives exactly the vector's bytes."""
    payload = _vector_payload(v)
    assert fr.encode(v["type"], v["stream"], payload, v["flags"]) == v["bytes"]
    # The header fields, as the spec lays them out, independently of frames.HEADER.
    length, frame_type, flags, stream_id = struct.unpack(">IBBI", v["bytes"][:10])
    assert (length, frame_type, flags, stream_id) == (
        len(payload),
        v["type"],
        v["flags"],
        v["stream"],
    )
    # The typed encoders agree with the generic one.
    if "json" in v:
        assert fr.encode_json(v["type"], v["stream"], json.loads(v["json"])) == v["bytes"]
    if v["payload_spec"].startswith("code:"):
        code = ErrorCode[v["payload_spec"][5:]]
        assert fr.encode_coded(v["type"], v["stream"], code, v.get("reason", "")) == v["bytes"]
    if v["type"] is FrameType.WINDOW_UPDATE:
        increment = int(v["payload_spec"][4:])
        assert fr.encode_window_update(v["stream"], increment) == v["bytes"]


@pytest.mark.parametrize("v", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector_decodes_to_its_frame(v):
    """Decoding a vector's bytes gives back exactly the frame it describes, byte by byte too."""
    expected = [(v["type"], v["flags"], v["stream"], _vector_payload(v))]
    assert fr.FrameDecoder(fr.MAX_FRAME_PAYLOAD).feed(v["bytes"]) == expected
    decoder = fr.FrameDecoder(fr.MAX_FRAME_PAYLOAD)
    got = []
    for i in range(len(v["bytes"])):
        got += decoder.feed(v["bytes"][i : i + 1])
    assert got == expected
    assert decoder.buffered == 0
    payload = expected[0][3]
    if "json" in v:
        assert fr.decode_json(payload) == json.loads(v["json"])
    if v["payload_spec"].startswith("code:"):
        assert fr.decode_coded(payload) == (ErrorCode[v["payload_spec"][5:]], v.get("reason", ""))


def test_agent_hello_is_the_spec_vector():
    """An agent's HELLO with token s3cret is byte for byte the spec's hello-agent vector."""
    vectors = {v["name"]: v for v in VECTORS}
    agent = MuxConnection(Role.AGENT)
    agent.send_hello({"token": "s3cret"})
    assert b"".join(agent.outgoing()) == vectors["hello-agent"]["bytes"]
    relay = MuxConnection(Role.RELAY)
    relay.receive_data(vectors["hello-agent"]["bytes"])
    relay.send_hello({})
    assert b"".join(relay.outgoing()) == vectors["hello-relay"]["bytes"]


# -- layout and round trips ----------------------------------------------------


def test_header_is_ten_bytes_big_endian():
    """The header is length u32, type u8, flags u8, stream_id u32 in network byte order."""
    assert fr.HEADER_SIZE == 10
    raw = fr.encode(FrameType.DATA, 0x01020304, b"\xaa" * 0x0506, flags=0x07)
    assert raw[:10] == bytes([0x00, 0x00, 0x05, 0x06, 0x03, 0x07, 0x01, 0x02, 0x03, 0x04])


def test_frame_type_numbers_are_the_spec_table():
    """Frame type numbers are those of the spec's table; changing one breaks the wire."""
    assert {t.name: int(t) for t in FrameType} == {
        "HELLO": 0x0,
        "CONTROL": 0x1,
        "OPEN": 0x2,
        "DATA": 0x3,
        "WINDOW_UPDATE": 0x4,
        "FIN": 0x5,
        "RESET": 0x6,
        "PING": 0x7,
        "PONG": 0x8,
        "GOAWAY": 0x9,
        "ACCEPT": 0xA,
    }


def test_error_code_numbers_are_the_spec_table():
    """Every ErrorCode appears in the spec's error table with the same number."""
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    table = dict(re.findall(r"^\| (0x[0-9A-F]+) +\| `(\w+)` *\|", text, re.MULTILINE))
    assert {name: int(num, 16) for num, name in table.items()} == {
        c.name: int(c) for c in ErrorCode
    }


def test_size_limits():
    """Limits are 16 KiB before HELLO, 256 KiB after it, and DATA is cut at 64 KiB."""
    assert fr.MAX_HELLO_PAYLOAD == 16 * 1024
    assert fr.MAX_FRAME_PAYLOAD == 256 * 1024
    assert fr.MAX_DATA_PAYLOAD == 64 * 1024
    assert fr.PROTOCOL_VERSION == 2


@pytest.mark.parametrize(
    "frame_type, stream_id, payload, flags",
    [
        (FrameType.DATA, 2, b"", 0),
        (FrameType.DATA, 2**32 - 1, b"\x00\xff" * 1000, 0),
        (FrameType.PING, 0, b"12345678", 0xFF),
        (FrameType.DATA, 3, b"x" * fr.MAX_FRAME_PAYLOAD, 0),
    ],
)
def test_round_trip(frame_type, stream_id, payload, flags):
    """decode(encode(frame)) is the frame, flags included, up to the largest payload."""
    raw = fr.encode(frame_type, stream_id, payload, flags)
    assert fr.FrameDecoder(fr.MAX_FRAME_PAYLOAD).feed(raw) == [
        (frame_type, flags, stream_id, payload)
    ]


def test_json_round_trip_is_compact_utf8():
    """JSON payloads are compact UTF-8 objects and decode back to the same object."""
    obj = {"name": "caf\u00e9", "n": [1, 2], "nested": {"ok": True}}
    raw = fr.encode_json(FrameType.CONTROL, 0, obj)
    assert b" " not in raw[10:]
    [(_, _, _, payload)] = fr.FrameDecoder().feed(raw)
    assert fr.decode_json(payload) == obj


@pytest.mark.parametrize(
    "payload",
    [
        b"[1,2]",
        b"3",
        b"not json",
        b"\xff\xfe{}",
        b"",
        b'{"a":' * 3000 + b"1" + b"}" * 3000,
        b"[" * 16000,
    ],
    ids=["array", "number", "junk", "bad-utf8", "empty", "deep-object", "deep-array"],
)
def test_json_payload_must_be_an_object(payload):
    """A JSON payload that is not a UTF-8 JSON object is a protocol error."""
    with pytest.raises(MuxProtocolError) as info:
        fr.decode_json(payload)
    assert info.value.code is ErrorCode.PROTOCOL_ERROR


def test_coded_round_trip_keeps_unknown_codes():
    """RESET/GOAWAY decode a known code to ErrorCode and keep an unknown one as an int."""
    assert fr.decode_coded(struct.pack(">I", 0xD) + "\u00e9t\u00e9".encode()) == (
        ErrorCode.CANCEL,
        "\u00e9t\u00e9",
    )
    code, reason = fr.decode_coded(struct.pack(">I", 0x1234))
    assert (code, reason) == (0x1234, "")
    assert not isinstance(code, ErrorCode)


def test_coded_payload_needs_four_bytes():
    """A RESET/GOAWAY payload shorter than its u32 code is a protocol error."""
    with pytest.raises(MuxProtocolError):
        fr.decode_coded(b"\x00\x00\x01")


def test_coded_reason_is_capped():
    """Senders cap a RESET/GOAWAY reason at 1024 bytes."""
    raw = fr.encode_coded(FrameType.RESET, 2, ErrorCode.CANCEL, "x" * 5000)
    assert len(raw) == 10 + 4 + 1024


# -- the decoder -----------------------------------------------------------------


def test_decoder_checks_length_on_the_header():
    """An oversized length is refused from the header alone, before its payload arrives."""
    decoder = fr.FrameDecoder(max_payload=100)
    assert decoder.feed(h.frame(FrameType.DATA, 2, b"x" * 100)) == [
        (FrameType.DATA, 0, 2, b"x" * 100)
    ]
    with pytest.raises(FrameTooLargeError) as info:
        fr.FrameDecoder(max_payload=100).feed(h.frame(FrameType.DATA, 2, length=101))
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE


def test_decoder_rejects_unknown_type():
    """An unknown frame type is a protocol error."""
    with pytest.raises(MuxProtocolError) as info:
        fr.FrameDecoder().feed(h.frame(0x0B, 0))
    assert info.value.code is ErrorCode.PROTOCOL_ERROR


def test_decoder_buffers_partial_frames():
    """A partial header or payload is kept until the rest arrives."""
    raw = h.data(2, b"hello") + h.fin(2)
    decoder = fr.FrameDecoder()
    assert decoder.feed(raw[:4]) == []
    assert decoder.feed(raw[4:12]) == []
    assert decoder.buffered == 12
    assert decoder.feed(raw[12:]) == [(FrameType.DATA, 0, 2, b"hello"), (FrameType.FIN, 0, 2, b"")]
    assert decoder.buffered == 0


@pytest.mark.parametrize("stop_type", [FrameType.HELLO, FrameType.GOAWAY])
def test_decoder_stops_after_frames_that_change_the_rules(stop_type):
    """A decoder told to stop after HELLO and GOAWAY hands them over before reading on, so a limit
    they change applies to what follows."""
    first = h.frame(stop_type, 0, b"{}" if stop_type is FrameType.HELLO else b"\x00\x00\x00\x00")
    big = h.data(2, b"x" * (fr.MAX_HELLO_PAYLOAD + 1))
    decoder = fr.FrameDecoder(fr.MAX_HELLO_PAYLOAD, stop_after=fr.STOP_AFTER)
    assert [f[0] for f in decoder.feed(first + big)] == [stop_type]
    decoder.max_payload = fr.MAX_FRAME_PAYLOAD
    assert [f[0] for f in decoder.feed(b"")] == [FrameType.DATA]


def test_decoder_reads_everything_by_default():
    """Without stop_after a decoder returns every complete frame in one feed."""
    raw = h.hello() + h.fin(2) + h.goaway(0) + h.ping()
    assert [f[0] for f in fr.FrameDecoder().feed(raw)] == [
        FrameType.HELLO,
        FrameType.FIN,
        FrameType.GOAWAY,
        FrameType.PING,
    ]
