"""Reading SNI and ALPN from a ClientHello, however it arrives."""

import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.node.clienthello import (
    MAX_CLIENT_HELLO_BYTES,
    ClientHelloError,
    ClientHelloReader,
)


def client_hello(server_name="Abc.Tunnels.Localhost.", alpn=("h2", "http/1.1")) -> bytes:
    context = ssl.create_default_context()
    if alpn:
        context.set_alpn_protocols(list(alpn))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    sslobj = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        sslobj.do_handshake()
    return outgoing.read()


def split_into_records(hello: bytes, size: int) -> bytes:
    """The same handshake message re-framed into TLS records of `size` bytes."""
    body = hello[5:]
    out = b""
    for i in range(0, len(body), size):
        chunk = body[i : i + size]
        out += bytes([22, 3, 1]) + len(chunk).to_bytes(2, "big") + chunk
    return out


def test_reads_name_lowercased_without_trailing_dot_and_alpn():
    """SNI is lower-cased with its trailing dot dropped; ALPN offers keep their order."""
    hello = client_hello()
    result = ClientHelloReader().feed(hello)
    assert result.server_name == "abc.tunnels.localhost"
    assert result.alpn == ("h2", "http/1.1")
    assert result.raw == hello


def test_one_byte_at_a_time():
    """A ClientHello dribbled byte by byte is read once it is whole, not before."""
    hello = client_hello()
    reader = ClientHelloReader()
    for i in range(len(hello) - 1):
        assert reader.feed(hello[i : i + 1]) is None
    assert reader.feed(hello[-1:]).server_name == "abc.tunnels.localhost"


@pytest.mark.parametrize("record_size", [1, 7, 100, 300])
def test_handshake_split_across_records(record_size):
    """A ClientHello fragmented over several TLS records (RFC 8446 5.1) is reassembled."""
    wire = split_into_records(client_hello(), record_size)
    result = ClientHelloReader().feed(wire)
    assert result is not None and result.server_name == "abc.tunnels.localhost"
    assert result.raw == wire


def test_no_sni_gives_none():
    """A ClientHello without server_name reads as a None name (the router refuses it)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    sslobj = context.wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        sslobj.do_handshake()
    assert ClientHelloReader().feed(outgoing.read()).server_name is None


@pytest.mark.parametrize(
    "junk",
    [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"SSH-2.0-OpenSSH_9.2\r\n", b"\x16\x03\x01\x00\x00", b"\x16\x09\x01\x00\x05hello"],
)
def test_junk_is_refused(junk):
    """Bytes that are not a TLS handshake are a ClientHelloError, not a wait."""
    with pytest.raises(ClientHelloError):
        ClientHelloReader().feed(junk)


def test_oversized_hello_is_refused_before_it_is_buffered_whole():
    """A declared ClientHello above the cap is refused from its header."""
    body_length = MAX_CLIENT_HELLO_BYTES + 1
    record = bytes([22, 3, 1, 0, 4, 1]) + body_length.to_bytes(3, "big")
    with pytest.raises(ClientHelloError, match="too large"):
        ClientHelloReader().feed(record)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_give_a_result_a_wait_or_a_typed_error(data):
    """Random bytes never raise anything but ClientHelloError."""
    try:
        ClientHelloReader().feed(data)
    except ClientHelloError:
        pass


@pytest.fixture(scope="module")
def real_hello():
    return client_hello()


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_any_corruption_of_a_real_hello_is_handled(real_hello, data):
    """Flipping bytes of a real ClientHello gives a result, a wait or a ClientHelloError."""
    hello = bytearray(real_hello)
    for _ in range(data.draw(st.integers(1, 8))):
        index = data.draw(st.integers(0, len(hello) - 1))
        hello[index] = data.draw(st.integers(0, 255))
    try:
        ClientHelloReader().feed(bytes(hello))
    except ClientHelloError:
        pass
