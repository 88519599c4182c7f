"""Reading a TLS ClientHello for routing: server name (SNI) and ALPN offers.

Sans-IO and stdlib only. `ClientHelloReader.feed()` takes the visitor's first
bytes as they arrive, however they are split into TCP segments and TLS records,
and answers once the whole ClientHello is in: RFC 8446 section 4.1.2 (the
message) and 5.1 (records: a handshake message may span several), RFC 6066
section 3 (server_name), RFC 7301 section 3.1 (ALPN). It never decrypts or
answers anything: the bytes read are kept so that the caller can replay them
into a TLS layer (terminate) or to the service (passthrough).
"""

import struct
from dataclasses import dataclass

RECORD_HEADER = struct.Struct("!BHH")  # content type, legacy version, length
CONTENT_HANDSHAKE = 22
HANDSHAKE_CLIENT_HELLO = 1
EXTENSION_SERVER_NAME = 0
EXTENSION_ALPN = 16
NAME_TYPE_HOST_NAME = 0
# RFC 8446 5.1: a record's plaintext is at most 2^14 bytes.
MAX_RECORD_PAYLOAD = 2**14
# Real ClientHellos are 0.5-2 KiB (post-quantum key shares included); anything
# above this is junk meant to make us buffer.
MAX_CLIENT_HELLO_BYTES = 64 * 1024
# Records one ClientHello may span: real ones use one; a 1-byte-per-record
# hello is legal but only good for making us do work.
MAX_RECORDS = 4096


class ClientHelloError(Exception):
    """The bytes are not a TLS ClientHello we can route."""


@dataclass(frozen=True)
class ClientHello:
    server_name: str | None  # lower-cased, trailing dot dropped; None if absent
    alpn: tuple[str, ...]
    raw: bytes  # every byte read so far, to replay


def normalize_server_name(name: str) -> str:
    return name.rstrip(".").lower()


class ClientHelloReader:
    """Feeds bytes in; keeps its place, so each byte is looked at once however
    the visitor splits its hello (a 1-byte-per-record dribble costs linear work)."""

    __slots__ = ("_buffer", "_offset", "_handshake", "_records")

    def __init__(self):
        self._buffer = bytearray()  # every byte read, replayed to the TLS layer or service
        self._offset = 0  # end of the last whole record in _buffer
        self._handshake = bytearray()  # handshake bytes of the records so far
        self._records = 0

    def feed(self, data: bytes) -> ClientHello | None:
        """None while more bytes are needed; raises ClientHelloError on junk."""
        self._buffer += data
        buf = self._buffer
        handshake = self._handshake
        while True:
            offset = self._offset
            if len(buf) - offset < RECORD_HEADER.size:
                return self._need_more()
            content_type, version, length = RECORD_HEADER.unpack_from(buf, offset)
            if content_type != CONTENT_HANDSHAKE:
                raise ClientHelloError("not a TLS handshake")
            if version >> 8 != 3:
                raise ClientHelloError("not TLS (bad record version)")
            if length == 0 or length > MAX_RECORD_PAYLOAD:
                raise ClientHelloError("bad TLS record length")
            if len(buf) - offset - RECORD_HEADER.size < length:
                return self._need_more()
            self._records += 1
            if self._records > MAX_RECORDS:
                raise ClientHelloError("ClientHello split into too many records")
            start = offset + RECORD_HEADER.size
            handshake += buf[start : start + length]
            self._offset = start + length
            if len(handshake) >= 4:
                if handshake[0] != HANDSHAKE_CLIENT_HELLO:
                    raise ClientHelloError("first handshake message is not a ClientHello")
                body_length = int.from_bytes(handshake[1:4], "big")
                if body_length > MAX_CLIENT_HELLO_BYTES:
                    raise ClientHelloError("ClientHello too large")
                if len(handshake) >= 4 + body_length:
                    name, alpn = parse_client_hello_body(bytes(handshake[4 : 4 + body_length]))
                    return ClientHello(name, alpn, bytes(buf))

    def _need_more(self) -> None:
        if len(self._buffer) > MAX_CLIENT_HELLO_BYTES + 1024:
            raise ClientHelloError("ClientHello too large")
        return None


class _Cursor:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ClientHelloError("truncated ClientHello")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def vector(self, length_bytes: int) -> bytes:
        length = self.u8() if length_bytes == 1 else self.u16()
        return self.take(length)

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


def parse_client_hello_body(body: bytes) -> tuple[str | None, tuple[str, ...]]:
    c = _Cursor(body)
    c.take(2 + 32)  # legacy_version, random
    c.vector(1)  # legacy_session_id
    c.vector(2)  # cipher_suites
    c.vector(1)  # legacy_compression_methods
    server_name, alpn = None, ()
    if c.left == 0:
        return server_name, alpn  # no extensions at all (SSLv3-style hello)
    extensions = _Cursor(c.vector(2))
    seen = set()
    while extensions.left:
        ext_type = extensions.u16()
        ext = _Cursor(extensions.vector(2))
        if ext_type in seen:
            raise ClientHelloError("duplicate extension")  # RFC 8446 4.2
        seen.add(ext_type)
        if ext_type == EXTENSION_SERVER_NAME:
            names = _Cursor(ext.vector(2))
            while names.left:
                name_type = names.u8()
                name = names.vector(2)
                if name_type == NAME_TYPE_HOST_NAME and server_name is None:
                    try:
                        text = name.decode("ascii")
                    except UnicodeDecodeError:
                        raise ClientHelloError("server name is not ASCII") from None
                    server_name = normalize_server_name(text)
        elif ext_type == EXTENSION_ALPN:
            protocols = _Cursor(ext.vector(2))
            offered = []
            while protocols.left:
                offered.append(protocols.vector(1).decode("ascii", "replace"))
            alpn = tuple(offered)
    return server_name, alpn
