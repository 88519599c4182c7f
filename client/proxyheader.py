"""PROXY protocol headers (HAProxy's spec, v1 text and v2 binary) that the
agent writes to a service before a visitor's bytes, so the service learns the
visitor's real address: https://www.haproxy.org/download/2.8/doc/proxy-protocol.txt
"""

import ipaddress
import struct

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_VERSION_PROXY = 0x21  # version 2, command PROXY
V2_VERSION_LOCAL = 0x20  # version 2, command LOCAL (no address)
V2_TCP4 = 0x11
V2_TCP6 = 0x21


def _addresses(peer, local):
    # The relay's OPEN metadata, so a hostile relay's values: strings for
    # hosts and integers for ports, or no address at all (PROXY UNKNOWN/LOCAL).
    try:
        src = ipaddress.ip_address(peer[0])
        dst = ipaddress.ip_address(local[0])
        sport, dport = peer[1], local[1]
    except (ValueError, TypeError, LookupError):
        # The relay's metadata is a peer's JSON: an object has no [0]
        # (KeyError); each such error used to escape and drop the agent's
        # whole link (tests/chaos/).
        return None
    if type(sport) is not int or type(dport) is not int:
        return None  # 1e400 is valid JSON for inf; True is an int to Python
    if src.version != dst.version:
        # e.g. a v4 visitor on a dual-stack listener: report both in v6 form
        src = src if src.version == 6 else ipaddress.IPv6Address(f"::ffff:{src}")
        dst = dst if dst.version == 6 else ipaddress.IPv6Address(f"::ffff:{dst}")
    if not (0 <= sport <= 65535 and 0 <= dport <= 65535):
        return None
    return src, dst, sport, dport


def proxy_header(version: str, peer, local) -> bytes:
    """The header for a visitor at `peer` (host, port) who reached `local`."""
    addresses = _addresses(peer, local)
    if version == "v1":
        if addresses is None:
            return b"PROXY UNKNOWN\r\n"
        src, dst, sport, dport = addresses
        family = "TCP4" if src.version == 4 else "TCP6"
        return f"PROXY {family} {src} {dst} {sport} {dport}\r\n".encode()
    if version == "v2":
        if addresses is None:
            return V2_SIGNATURE + struct.pack("!BBH", V2_VERSION_LOCAL, 0, 0)
        src, dst, sport, dport = addresses
        body = src.packed + dst.packed + struct.pack("!HH", sport, dport)
        family = V2_TCP4 if src.version == 4 else V2_TCP6
        return V2_SIGNATURE + struct.pack("!BBH", V2_VERSION_PROXY, family, len(body)) + body
    raise ValueError(f"PROXY protocol version must be v1 or v2, not {version!r}")
