#!/usr/bin/env python3
"""Fuzz target: the control decoder (relay/mux/control.py) on any CONTROL payload.

The input is a CONTROL frame's payload. `frames.decode_json` turns it into a
dict or raises MuxProtocolError; the dict then goes through both ends'
readers: `parse_request` (relay), `parse_reply` and, for a success,
`granted_tunnel` (agent). Rule (docs/protocol.md, "Control messages"): only
a TunnelRequestError (replied to, link kept) or a MuxProtocolError (link
closed) may escape, and every error message, including the typed error a
reply carries, is UTF-8 encodable, because it goes into a reply, a GOAWAY
reason, a log line or a terminal. Anything else is a finding.
"""

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from relay.mux import control as ctl  # noqa: E402
from relay.mux import frames as fr  # noqa: E402
from relay.mux.errors import MuxProtocolError  # noqa: E402
from relay.mux.frames import FrameType  # noqa: E402
from tests.fuzz.harness import fuzz_main  # noqa: E402

ALLOWED = (ctl.TunnelRequestError, MuxProtocolError)


def _encodable(error: Exception) -> None:
    str(error).encode("utf-8")  # UnicodeEncodeError is the finding


def _check_request(message: dict) -> None:
    try:
        request = ctl.parse_request(message)
    except ALLOWED as e:
        _encodable(e)
        if isinstance(e, ctl.TunnelRequestError):
            # The relay answers it: the reply must be a frame it can send.
            fr.encode_json(FrameType.CONTROL, 0, ctl.error_reply(ctl.request_id_of(message), e))
        return
    assert isinstance(request, (ctl.OpenTunnel, ctl.CloseTunnel))
    assert request.request_id == message["id"]
    if isinstance(request, ctl.OpenTunnel):
        assert 1 <= len(request.services) <= ctl.MAX_SERVICES
        assert len(request.allow) <= ctl.MAX_ALLOW_ENTRIES
        request.name.encode("utf-8")  # shown in the admin API and logs
        assert len(request.name) <= ctl.MAX_TUNNEL_NAME_CHARS
        names = [s.name for s in request.services]
        assert len(set(names)) == len(names)
        for service in request.services:
            assert service.kind in ctl.KINDS
            assert service.mode in (ctl.TLS_MODES if service.kind == "tls" else (None,))
            assert len(service.alpn) <= ctl.MAX_ALPN_ENTRIES
            assert all(isinstance(p, str) and p.isascii() for p in service.alpn)
        assert request.client_ca is None or isinstance(request.client_ca, bytes)


def _check_reply(message: dict) -> None:
    try:
        reply = ctl.parse_reply(message)
    except ALLOWED as e:
        _encodable(e)
        return
    if not reply.ok:
        assert isinstance(reply.error, ctl.TunnelRequestError)
        _encodable(reply.error)
        str(reply.error.code.value if isinstance(reply.error.code, ctl.RequestErrorCode) else reply.error.code).encode(
            "utf-8"
        )
        return
    try:
        tunnel_id, endpoints, secret = ctl.granted_tunnel(reply)
    except ALLOWED as e:
        _encodable(e)
        return
    assert isinstance(tunnel_id, str) and isinstance(endpoints, list)
    assert secret is None or isinstance(secret, str)


def one_input(data: bytes) -> None:
    try:
        message = fr.decode_json(data)
    except MuxProtocolError as e:
        _encodable(e)
        return
    _check_request(message)
    _check_reply(message)


if __name__ == "__main__":
    fuzz_main("tests.fuzz.fuzz_control")
