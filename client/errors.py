"""Errors users see: a message they can act on, and the CLI's exit code.

The Python API raises these as they are; the CLI prints the message and exits
with `exit_code`.
"""


class TunnelError(Exception):
    """Base of every tunnel-client error."""

    exit_code = 1


class ConfigurationError(TunnelError):
    """Missing or malformed settings (relay address, token, CA file, targets)."""

    exit_code = 2


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


class TunnelRequestError(TunnelError):
    """The relay refused a tunnel request; `code` is the relay's reason."""

    exit_code = 6

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class NoPortsAvailableError(TunnelRequestError):
    """The relay's port range is used up (or in quarantine)."""


class BadServiceNameError(TunnelRequestError, ConfigurationError):
    """A service name the relay (or the client, before asking) refuses."""

    exit_code = 2


REQUEST_ERRORS = {"no_free_port": NoPortsAvailableError, "bad_service_name": BadServiceNameError}


def request_error(code: str, message: str) -> TunnelRequestError:
    return REQUEST_ERRORS.get(code, TunnelRequestError)(code, message)
