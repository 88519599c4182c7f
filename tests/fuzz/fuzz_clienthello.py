#!/usr/bin/env python3
"""Fuzz target: ClientHelloReader.feed (relay/node/clienthello.py), fed the
input cut at points the input itself chooses (`harness.cuts`).

Rules: each feed returns None (more bytes needed), a ClientHello, or raises
ClientHelloError; the reader holds at most MAX_CLIENT_HELLO_BYTES + 1024 bytes
while it waits; a ClientHello's `raw` is exactly the bytes fed so far, its
server name is normalized ASCII and its ALPN offers are strings. And, as the
module promises, the verdict does not depend on how the bytes were split
(inputs below the size cap, where a split cannot trip the cap early). Any
other exception is a finding.
"""

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from relay.node.clienthello import (  # noqa: E402
    MAX_CLIENT_HELLO_BYTES,
    ClientHello,
    ClientHelloError,
    ClientHelloReader,
    normalize_server_name,
)
from tests.fuzz.harness import cuts, fuzz_main, pieces  # noqa: E402

MAX_WAITING_BYTES = MAX_CLIENT_HELLO_BYTES + 1024


def read(chunks: list[bytes]):
    """(server_name, alpn) once the hello is whole, None if still waiting, or ClientHelloError."""
    reader = ClientHelloReader()
    fed = b""
    for chunk in chunks:
        fed += chunk
        try:
            result = reader.feed(chunk)
        except ClientHelloError as e:
            str(e).encode("utf-8")
            return ClientHelloError
        if result is None:
            assert len(reader._buffer) <= MAX_WAITING_BYTES, "reader buffers past its cap"
            continue
        assert isinstance(result, ClientHello)
        assert result.raw == fed, "raw is not the bytes read"
        if result.server_name is not None:
            assert result.server_name.isascii()
            assert result.server_name == normalize_server_name(result.server_name)
        assert isinstance(result.alpn, tuple) and all(isinstance(p, str) for p in result.alpn)
        return result.server_name, result.alpn
    return None


def one_input(data: bytes) -> None:
    points, body = cuts(data)
    split = read(pieces(body, points))
    if len(body) <= MAX_CLIENT_HELLO_BYTES:
        assert read([body]) == split, f"split {points} changed the verdict"


if __name__ == "__main__":
    fuzz_main("tests.fuzz.fuzz_clienthello")
