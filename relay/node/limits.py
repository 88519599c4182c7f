"""Limits of one agent session (one authenticated link, until several links
join one session), with defaults no ordinary user reaches by accident.

docs/security.md lists each limit, its default and what it protects. The
production-node issue makes them per tenant; until then every session gets
the defaults, or what `twistd relay` was given.
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


DEFAULT_LIMITS = SessionLimits()
