"""tunnel-client: public addresses for local TCP services, through a tunnel relay.

    from client import forward

    with forward(8000) as tunnel:
        print(tunnel.url)

Importing this package loads no reactor and no Twisted module; see
docs/python-api.md, client/api.py (forward, open_tunnel, close_tunnel) and
client/errors.py.
"""

from client.api import TunnelContext, close_tunnel, forward, open_tunnel
from client.errors import (
    AuthenticationError,
    BadNameError,
    BadServiceNameError,
    ConfigurationError,
    LimitExceededError,
    NameInUseError,
    NameNotAllowedError,
    NameTakenError,
    NameUnavailableError,
    NoPortsAvailableError,
    RelayUnreachableError,
    RelayVerificationError,
    RelayVersionError,
    TunnelError,
    TunnelLostError,
    TunnelRequestError,
)

__all__ = [
    "AuthenticationError",
    "BadNameError",
    "BadServiceNameError",
    "ConfigurationError",
    "LimitExceededError",
    "NameInUseError",
    "NameNotAllowedError",
    "NameTakenError",
    "NameUnavailableError",
    "NoPortsAvailableError",
    "RelayUnreachableError",
    "RelayVerificationError",
    "RelayVersionError",
    "TunnelContext",
    "TunnelError",
    "TunnelLostError",
    "TunnelRequestError",
    "close_tunnel",
    "forward",
    "open_tunnel",
]
