"""The relay's side of an agent link: handshake deadline, token check, control.

An agent connects over TLS, sends HELLO with its token within
`handshake_timeout_seconds` (TLS handshake included), and is then served
tunnel requests. Before that it can make us buffer at most one 16 KiB HELLO
(relay.mux.frames.MAX_HELLO_PAYLOAD). Tokens are compared in constant time
against stored hashes and never logged; a session gets a short random id for
the logs instead.
"""

import secrets

from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger

from relay.wire.link import MuxLink
from relay.wire.splice import Splice
from relay.mux import ErrorCode, MuxConnection, MuxProtocolError, Role
from relay.node.tunnels import TunnelRequestError

DEFAULT_HANDSHAKE_TIMEOUT_SECONDS = 10.0
RELAY_AGENT_NAME = "tunnel-relay/0.1"


class RelayLink(MuxLink):
    _log = Logger()

    def __init__(self, factory: "AgentLinkFactory"):
        super().__init__(
            MuxConnection(Role.RELAY),
            factory.reactor,
            keepalive_interval_seconds=factory.keepalive_interval_seconds,
            keepalive_timeout_seconds=factory.keepalive_timeout_seconds,
        )
        self.factory = factory
        self.registry = factory.registry
        self.session_id = secrets.token_hex(4)
        self.authenticated = False
        self.graceful = False  # the agent said GOAWAY(NO_ERROR): free its tunnels now
        self._handshake_call = None

    def on_connected(self):
        self._handshake_call = self.clock.callLater(
            self.factory.handshake_timeout_seconds, self._handshake_expired
        )

    def _handshake_expired(self):
        self._handshake_call = None
        if not self.authenticated and not self.closed:
            self._log.warn("agent connection {peer}: no handshake in time, dropped", peer=self.peer)
            self.abort_link()

    def on_hello(self, info: dict):
        if not self.factory.check_token(info.get("token")):
            self._log.warn("agent {peer} refused: bad token", peer=self.peer)
            self.close_link(ErrorCode.AUTH_FAILED, "token refused")
            return
        self.authenticated = True
        if self._handshake_call is not None and self._handshake_call.active():
            self._handshake_call.cancel()
        self._handshake_call = None
        self.registry.links.add(self)
        self.mux.send_hello(
            {
                "relay": RELAY_AGENT_NAME,
                "session": self.session_id,
                "keepalive_interval": self.keepalive_interval_seconds,
            }
        )
        self._log.info(
            "agent {agent} connected from {peer} ({client})",
            agent=self.session_id, peer=self.peer, client=str(info.get("agent", "?"))[:80],
        )

    # -- control requests ----------------------------------------------------------

    def on_control(self, message: dict):
        request_id = message.get("id")
        if not isinstance(request_id, int):
            raise MuxProtocolError("control message without an integer id")
        op = message.get("op")
        handler = {"open_tunnel": self._open_tunnel, "close_tunnel": self._close_tunnel}.get(op)
        if handler is None:
            self._reply_error(request_id, "bad_request", f"unknown op {str(op)[:40]!r}")
            return
        try:
            handler(request_id, message)
        except TunnelRequestError as e:
            self._reply_error(request_id, e.code, str(e))

    def _reply(self, request_id: int, body: dict) -> None:
        if self.closed:
            return
        self.mux.send_control(dict(body, id=request_id, ok=True))
        self.flush()

    def _reply_error(self, request_id: int, code: str, message: str) -> None:
        if self.closed:
            return
        self.mux.send_control({"id": request_id, "ok": False, "error": {"code": code, "message": message}})
        self.flush()

    def _open_tunnel(self, request_id: int, message: dict) -> None:
        reclaim = message.get("reclaim")
        if isinstance(reclaim, dict):
            try:
                tunnel = self.registry.reclaim(self, reclaim.get("tunnel"), reclaim.get("secret"))
            except TunnelRequestError:
                pass  # expired: fall through to a fresh tunnel, the agent is told it is new
            else:
                self._reply(request_id, {"tunnel": tunnel.describe(), "reclaimed": True})
                return

        def opened(result):
            tunnel, secret = result
            self._reply(
                request_id, {"tunnel": tunnel.describe(), "reclaim_secret": secret, "reclaimed": False}
            )

        def failed(failure):
            failure.trap(TunnelRequestError)
            self._reply_error(request_id, failure.value.code, str(failure.value))

        d = self.registry.open_tunnel(self, message)
        d.addCallbacks(opened, failed)
        d.addErrback(lambda f: self._log.failure("open_tunnel failed", f))

    def _close_tunnel(self, request_id: int, message: dict) -> None:
        tunnel_id = message.get("tunnel")
        tunnel = self.registry.tunnels.get(tunnel_id) if isinstance(tunnel_id, str) else None
        if tunnel is None or tunnel.link is not self:
            raise TunnelRequestError("unknown_tunnel", "no such tunnel on this link")
        self.registry.close(tunnel, "agent closed it")
        self._reply(request_id, {})

    # -- visitors --------------------------------------------------------------------

    def open_visitor_stream(self, tunnel, endpoint, addr, local, sni=None):
        """The protocol for one visitor's connection: once it has its
        transport, it opens a stream to the agent and is spliced to it.
        `addr` and `local` are the visitor's and our side of its TCP
        connection (the stream's getPeer/getHost, and PROXY headers)."""
        metadata = {
            "tunnel": tunnel.tunnel_id,
            "service": endpoint.service,
            "peer": [getattr(addr, "host", ""), getattr(addr, "port", 0)],
            "local": [getattr(local, "host", ""), getattr(local, "port", 0)],
        }
        if sni is not None:
            metadata["sni"] = sni
        splice = Splice()

        def open_stream():
            if self.closed:
                splice.a.transport.abortConnection()  # the link died since buildProtocol
                return
            self.open_stream(metadata, splice.b).report_opened()

        splice.a.when_connected = open_stream
        return splice.a

    def close_visitors(self, tunnel) -> None:
        for stream in list(self.streams_by_tunnel.get(tunnel.tunnel_id, ())):
            stream.reset(ErrorCode.CANCEL, "tunnel closed")  # its splice aborts the visitor
        self.flush()

    def visitor_count(self, tunnel) -> int:
        return len(self.streams_by_tunnel.get(tunnel.tunnel_id, ()))

    def replace_session(self) -> None:
        """The same agent is back on a new link: drop this one without waiting."""
        if self.closed:
            return
        self.close_link(ErrorCode.SESSION_REPLACED, "session moved to a new link")
        self.abort_link()

    # -- endings -------------------------------------------------------------------------

    def on_goaway(self, code, message: str):
        if code == ErrorCode.NO_ERROR:
            self.graceful = True
        self._log.info(
            "agent {agent} said goodbye ({code})", agent=self.session_id, code=getattr(code, "name", code)
        )

    def on_link_lost(self, reason):
        if self._handshake_call is not None and self._handshake_call.active():
            self._handshake_call.cancel()
        if self.authenticated:
            self._log.info("agent {agent} link closed", agent=self.session_id)
            self.registry.link_lost(self, graceful=self.graceful)


class AgentLinkFactory(ServerFactory):
    """Builds a RelayLink for each TLS connection on the agent port."""

    _log = Logger()

    noisy = False  # one log line per tunnel/link is ours to write

    def __init__(
        self,
        reactor,
        registry,
        check_token,
        *,
        handshake_timeout_seconds: float = DEFAULT_HANDSHAKE_TIMEOUT_SECONDS,
        keepalive_interval_seconds: float,
        keepalive_timeout_seconds: float,
    ):
        self.reactor = reactor
        self.registry = registry
        self.check_token = check_token
        self.handshake_timeout_seconds = handshake_timeout_seconds
        self.keepalive_interval_seconds = keepalive_interval_seconds
        self.keepalive_timeout_seconds = keepalive_timeout_seconds

    def buildProtocol(self, addr):
        return RelayLink(self)

    def tls_handshake_failed(self, reason: str) -> None:
        """A connection on the agent port that never became a TLS session."""
        self._log.warn("agent connection dropped before its handshake: {reason}", reason=reason)
