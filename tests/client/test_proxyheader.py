"""PROXY protocol headers from the relay's OPEN metadata (client/proxyheader.py)."""

import json

import pytest

from client.proxyheader import V2_SIGNATURE, proxy_header

# What a hostile relay can put in "peer" and "local": JSON, read as the agent reads it.
BAD_ADDRESSES = [
    '["127.0.0.1", 1e400]', '["127.0.0.1", -1e400]', '{"a": 1}', '{}', '"127.0.0.1"', "5",
    "null", '[["x"], [1]]', '["127.0.0.1"]', '["::1", 70000]', '["127.0.0.1", "http"]',
]


@pytest.mark.parametrize("bad", BAD_ADDRESSES)
def test_bad_metadata_gives_the_unknown_header_not_an_exception(bad):
    """Any peer or local value a relay sends gives the UNKNOWN / LOCAL header, never an exception."""
    value = json.loads(bad)
    good = ["127.0.0.1", 9]
    for peer, local in ((value, good), (good, value)):
        assert proxy_header("v1", peer, local) == b"PROXY UNKNOWN\r\n"
        assert proxy_header("v2", peer, local) == V2_SIGNATURE + b"\x20\x00\x00\x00"


def test_good_metadata_gives_the_addresses():
    """A visitor's address and the relay's give the TCP4 header (the spec's v1 form)."""
    assert proxy_header("v1", ["203.0.113.7", 51234], ["127.0.0.1", 20001]) == (
        b"PROXY TCP4 203.0.113.7 127.0.0.1 51234 20001\r\n"
    )
