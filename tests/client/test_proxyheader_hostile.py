"""PROXY headers from a hostile relay's OPEN metadata: never an exception."""

import pytest

from client.proxyheader import proxy_header

HOSTILE = [
    ["1.2.3.4", float("inf")], ["1.2.3.4", True], ["1.2.3.4", 1e3], ["1.2.3.4", 2**70], ["1.2.3.4", -1],
    [None, 1], ["\udc80", 1], ["1.2.3.4"], "1.2.3.4:1", 5, None, {"host": "1.2.3.4"}, [["1.2.3.4"], 1],
]


@pytest.mark.parametrize("peer", HOSTILE)
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_bad_peer_values_give_an_unknown_header(version, peer):
    """Any peer value that is not [IP string, port int 0-65535] gives PROXY UNKNOWN (v1) or LOCAL (v2)."""
    header = proxy_header(version, peer, ["127.0.0.1", 80])
    assert header in (b"PROXY UNKNOWN\r\n", b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00")


def test_a_good_peer_still_gives_its_address():
    """A well-formed peer and local are written as they are."""
    assert proxy_header("v1", ["203.0.113.7", 5000], ["127.0.0.1", 80]) == b"PROXY TCP4 203.0.113.7 127.0.0.1 5000 80\r\n"
