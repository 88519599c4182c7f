"""Agent-side TLS for passthrough services given --cert/--key: the server context.

The relay passes the visitor's TLS through untouched; the agent terminates it
with the service's own certificate and hands plaintext to the service. The
TLS itself is a `TLSLayer` (relay/wire/tlslayer.py) running straight on the
visitor's `MuxStream`, its plaintext spliced to the service's TCP connection
(client/agent.py `AgentLink.on_stream_opened`): no listener, no extra hop.
This module only builds the `ssl.SSLContext` from the files given.
"""

import ssl

from client.errors import ConfigurationError


def server_context(cert_path: str, key_path: str, client_ca: str | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_path, key_path)
        if client_ca:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cadata=client_ca)
    except (OSError, ssl.SSLError) as e:
        raise ConfigurationError(f"cannot use --cert {cert_path} / --key {key_path}: {e}") from None
    return context
