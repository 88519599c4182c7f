"""Errors users see: a message they can act on, and the CLI's exit code.

The Python API raises these as they are; the CLI prints the message and exits
with `exit_code`. The request errors (and their root, `TunnelError`) are the
control protocol's, shared with the relay; the rest happen only here.
"""


from relay.mux.control import (  # noqa: F401  (one family with the relay's: relay/mux/control.py)
    BadNameError,
    BadServiceNameError,
    ConfigurationError,
    LimitExceededError,
    NameInUseError,
    NameNotAllowedError,
    NameTakenError,
    NameUnavailableError,
    NoPortsAvailableError,
    ReclaimFailedError,
    TunnelError,
    TunnelRequestError,
    UnknownTunnelError,
    request_error,
)


class AuthenticationError(TunnelError):
    """The relay refused the token. Retrying will not help."""

    exit_code = 3


class RelayVerificationError(TunnelError):
    """The relay's TLS certificate did not verify for the host we dialled."""

    exit_code = 4


class RelayUnreachableError(TunnelError):
    """No link to the relay could be made (or kept) within the limits given."""

    exit_code = 5


class TunnelLostError(TunnelError):
    """A tunnel's address expired while the link was down; it is closed."""

    exit_code = 7


class RelayVersionError(TunnelError):
    """The relay speaks another version of the mux protocol: upgrade one side."""

    exit_code = 8
