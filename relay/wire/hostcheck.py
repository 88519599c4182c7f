"""The Host-header check of our loopback HTTP ports (relay admin, agent metrics).

A page on another site that a browser on this machine opens cannot read a
loopback port by rebinding its own DNS name to 127.0.0.1 (DNS rebinding):
its Host stays its own name, so a port that serves only loopback names, its
bound address and names it was told of refuses it. Both ends use this, so it
lives in the shared package.
"""

from __future__ import annotations

import ipaddress

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def host_of(header: bytes | None) -> str | None:
    """The host part of a Host header, lower-cased, without port or brackets."""
    if not header:
        return None
    try:
        text = header.decode("ascii").strip().lower()
    except UnicodeDecodeError:
        return None
    if text.startswith("["):
        close = text.find("]")
        return text[1:close] if close > 0 else None
    host = text.rpartition(":")[0] if text.count(":") == 1 else text
    return host or None


def allowed_hosts_for(interface: str, extra=()) -> set[str]:
    """The names a port bound to `interface` accepts in Host."""
    allowed = {h.lower() for h in (*LOOPBACK_NAMES, *extra)}
    if interface not in ("0.0.0.0", "::", ""):
        allowed.add(interface.lower().strip("[]"))
    return allowed


def host_allowed(header: bytes | None, allowed: set[str]) -> bool:
    """Whether a request with this Host header may be served."""
    if header is None:
        # HTTP/1.0 clients (curl -0) may send none; a browser, the only
        # way a rebinding page reaches us, always does.
        return True
    host = host_of(header)
    if host is None:
        return False
    if host in allowed:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback  # 127.0.0.2 and friends
    except ValueError:
        return False
