"""Limits of one agent session (one authenticated link, until several links
join one session), with defaults no ordinary user reaches by accident.

docs/security.md lists each limit, its default and what it protects. A
token of the tokens file (relay/node/tokens.py) may narrow some of them: its
session then gets the node's limits with the token's in their place, and the
`token_*` fields, which count over every session of that token together.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SessionLimits:
    # Tunnels one session may hold at once (the Python API shares one link
    # for all of a process's tunnels: 80 in one test, so well above that).
    max_tunnels: int = 512
    # Public TCP ports one session may hold: one agent took all 64 ports of
    # a 64-port range in two requests.
    max_ports: int = 512
    # TLS hostnames one session may hold.
    max_hostnames: int = 1024
    # Distinct client CA bytes one session's tunnels may hold in the relay
    # (one copy per distinct PEM, shared by every tunnel that names it):
    # each 60 KiB client_ca used to add about 55 KiB, without limit.
    max_client_ca_bytes: int = 1024 * 1024
    # Concurrent visitor streams: 4,583 visitors that connected and reset in
    # 3 s made 1,392 service connections at once. The benchmark holds 10,000
    # idle visitors on one tunnel, so the caps sit well above that.
    max_streams_per_tunnel: int = 16_384
    max_streams_per_link: int = 65_536
    # New visitor streams per second per tunnel (a token bucket): the
    # benchmark opens about 4,400/s; the burst absorbs a reconnect storm.
    new_streams_per_second: float = 10_000.0
    new_streams_burst: int = 20_000
    # -- set only from a token (None: no such limit) --
    # Tunnels, and concurrent visitor streams, of every session of the token
    # together: an agent must not get twice its share by dialling twice.
    token_max_tunnels: int | None = None
    token_max_streams: int | None = None
    # Bytes per second per tunnel, each direction on its own (a token bucket
    # shared by the tunnel's visitors: relay/wire/throttle.py).
    bandwidth_bytes_per_second: int | None = None
    # Public ports the token's TCP endpoints are bound from (LO, HI).
    port_range: tuple[int, int] | None = None


DEFAULT_LIMITS = SessionLimits()

# File descriptors kept free for the admin port, agent links, and the
# listening sockets of new tunnels: a visitor whose socket would eat into
# them is closed at once. Linux gives each new socket the lowest free number,
# so its number is (nearly) the count of open files: an O(1) check.
FD_RESERVE = 64


def visitor_fd_limit(reserve: int = FD_RESERVE) -> int:
    """The highest file descriptor number a visitor may have, from the soft
    RLIMIT_NOFILE (read once, after the relay raised it)."""
    import resource

    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 2**31 - 1
    return max(soft - reserve, 16)
