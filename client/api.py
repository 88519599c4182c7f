"""The Python API: `forward()` as in modal.forward, from plain, asyncio and
Twisted code.

    from client import forward

    with forward(8000) as tunnel:               # encrypted (default)
        print(tunnel.url, tunnel.tls_socket)

    async with forward(22, unencrypted=True) as tunnel:
        print(tunnel.tcp_socket)

Plain and asyncio callers share one private reactor running on one daemon
thread per process, started on first use and started afresh in a forked
child. It is a reactor instance of our own, never the global one, so
importing or using `client` installs no reactor and leaves the caller free
to pick theirs. Twisted callers use `open_tunnel()` / `close_tunnel()` on
their own reactor instead.

Every tunnel of a process that uses the same (relay, token, CA) shares one
agent and so one TLS link: after the first, opening a tunnel costs one round
trip. A tunnel keeps its addresses across link drops (the relay holds them
for its grace period); if they expire, the tunnel is closed with
TunnelLostError rather than silently moved to a new URL.
"""

import concurrent.futures
import os
import threading

from client.config import TunnelSpec, build_specs
from client.errors import ConfigurationError, RelayUnreachableError, TunnelError

DEFAULT_CONNECT_TIMEOUT_SECONDS = 10.0
# Bounds the goodbye on close; the relay also frees a tunnel when its link dies.
CLOSE_TIMEOUT_SECONDS = 5.0


def _settings(relay, token, ca) -> tuple[str, str, str | None]:
    relay = relay or os.environ.get("TUNNEL_RELAY")
    token = token or os.environ.get("TUNNEL_TOKEN")
    ca = ca or os.environ.get("TUNNEL_CA") or None
    if not relay:
        raise ConfigurationError("no relay address: pass relay='host:port' or set TUNNEL_RELAY")
    if not token:
        raise ConfigurationError("no token: pass token=... or set TUNNEL_TOKEN")
    if ca and not os.path.isfile(ca):
        raise ConfigurationError(f"CA file {ca} does not exist (ca= / TUNNEL_CA)")
    return relay, token, ca


def _spec(target, *, unencrypted, alpn, services, allow, client_ca, proxy_protocol,
          tls_passthrough, name=None) -> TunnelSpec:
    if isinstance(services, dict):
        # (not `name`: that is the stable name argument)
        services = [f"{service}={value}" for service, value in services.items()]
    if target is None and not services:
        raise ConfigurationError("forward() needs a port, 'host:port', or services={...}")
    if target is not None and services:
        raise ConfigurationError("give either a port or services={...}, not both")
    if isinstance(alpn, str):
        alpn = [alpn]
    if isinstance(allow, str):
        allow = [allow]
    if client_ca is not None and "-----BEGIN" not in client_ca:
        try:
            with open(client_ca) as f:  # a path; PEM text is taken as it is
                client_ca = f.read()
        except OSError as e:
            raise ConfigurationError(f"cannot read client_ca {client_ca}: {e.strerror}") from None
    (spec,) = build_specs(
        targets=[str(target)] if target is not None else [],
        services=services or (),
        unencrypted=unencrypted,
        tls_passthrough=tls_passthrough,
        alpn=alpn or (),
        allow=allow or (),
        client_ca=client_ca,
        proxy_protocol=proxy_protocol,
        stable_name=name,
    )
    return spec


# -- agents shared per reactor and (relay, token, CA) ---------------------------------

_agents: dict[tuple, object] = {}  # (id(reactor), relay, token, ca) -> TunnelAgent


def _shared_agent(reactor, relay: str, token: str, ca: str | None, links: int = 2):
    from client.agent import TunnelAgent

    key = (id(reactor), relay, token, ca, links)
    agent = _agents.get(key)
    if agent is None or agent.stopped:
        agent = TunnelAgent(reactor, relay, token, ca_path=ca, fail_on_refusal=False, links=links)
        agent.done.addErrback(lambda failure: None)  # errors reach each tunnel's caller
        agent.done.addBoth(lambda _: _agents.pop(key, None) if _agents.get(key) is agent else None)
        _agents[key] = agent
        agent.start()
    return agent


def _open_in_reactor(reactor, spec: TunnelSpec, relay, token, ca, connect_timeout: float, links: int = 2):
    """Runs in the reactor's thread: a Deferred firing with the granted Tunnel."""
    from twisted.internet import defer

    agent = _shared_agent(reactor, relay, token, ca, links)
    tunnel = agent.add_tunnel(spec, keep_address=True)

    def give_up():
        # The caller no longer waits (timeout, cancel): a grant still in
        # flight must not leave a public address open that nobody will close.
        if timer.active():
            timer.cancel()
        agent.close_tunnel(tunnel)
        if not agent.tunnels and agent.link is None:
            agent.stop()  # nothing else wants this relay; stop dialling it

    result = defer.Deferred(canceller=lambda _: give_up())

    def granted(value):
        if timer.active():
            timer.cancel()
        if not result.called:
            result.callback(value)

    def refused(failure):
        if timer.active():
            timer.cancel()
        if not result.called:
            result.errback(failure)

    def too_slow():
        if result.called:
            return
        give_up()
        result.errback(RelayUnreachableError(
            f"the relay {relay} did not grant the tunnel within {connect_timeout:g} s "
            "(is it running, and is TUNNEL_RELAY right?)"
        ))

    timer = reactor.callLater(connect_timeout, too_slow)
    tunnel.opened.addCallbacks(granted, refused)
    return result


def _close_in_reactor(tunnel):
    for agent in list(_agents.values()):
        if tunnel in agent.tunnels or agent.tunnels_by_id.get(tunnel.tunnel_id) is tunnel:
            d = agent.close_tunnel(tunnel)
            d.addTimeout(CLOSE_TIMEOUT_SECONDS, agent.reactor)
            d.addErrback(lambda failure: None)  # best effort: the relay frees it on link loss too
            return d
    tunnel.status = "closed"
    return None


# -- Twisted: the caller's reactor -------------------------------------------------------


def open_tunnel(target=None, *, reactor=None, unencrypted=False, relay=None, token=None, ca=None,
                alpn=None, services=None, allow=None, client_ca=None, proxy_protocol=None,
                tls_passthrough=False, name=None, connect_timeout=DEFAULT_CONNECT_TIMEOUT_SECONDS, links=2):
    """From Twisted code: a Deferred firing with a live Tunnel (never blocks).

    Same arguments as forward(); `reactor` defaults to the global one. Errors
    arrive as the Deferred's failure; cancelling it before it fires gives
    back a tunnel granted later. Close the tunnel with `close_tunnel(tunnel)`.
    """
    from twisted.internet import defer

    try:
        relay, token, ca = _settings(relay, token, ca)
        spec = _spec(target, unencrypted=unencrypted, alpn=alpn, services=services, allow=allow,
                     client_ca=client_ca, proxy_protocol=proxy_protocol, tls_passthrough=tls_passthrough,
                     name=name)
    except TunnelError:
        return defer.fail()
    _check_links(links)
    if reactor is None:
        from twisted.internet import reactor
    return _open_in_reactor(reactor, spec, relay, token, ca, connect_timeout, links)


def close_tunnel(tunnel):
    """From Twisted code: end a tunnel; a Deferred that fires when the relay agreed."""
    from twisted.internet import defer

    return defer.maybeDeferred(_close_in_reactor, tunnel)


# -- plain and asyncio: a private reactor on a background thread -------------------------


class _ReactorThread:
    """One private reactor running on one daemon thread."""

    def __init__(self):
        self.reactor = _new_reactor()
        ready = threading.Event()
        self.reactor.callWhenRunning(ready.set)
        self.thread = threading.Thread(
            target=self.reactor.run, kwargs={"installSignalHandlers": False},
            name="tunnel-client-reactor", daemon=True,
        )
        self.thread.start()
        if not ready.wait(30):
            raise RuntimeError("tunnel-client's reactor thread did not start")

    def submit(self, fn, *args) -> concurrent.futures.Future:
        """Run fn(*args) in the reactor thread; a Future of its (Deferred) result."""
        from twisted.internet import defer

        future = concurrent.futures.Future()

        def call():
            d = defer.maybeDeferred(fn, *args)
            d.addCallbacks(future.set_result, lambda failure: future.set_exception(failure.value))

        self.reactor.callFromThread(call)
        return future


def _new_reactor():
    try:
        from relay.wire.reactor import RelayReactor as Reactor  # epoll, with the turn-end hook
    except ImportError:  # not Linux
        from twisted.internet.selectreactor import SelectReactor as Reactor
    return Reactor()


_thread_lock = threading.Lock()
_thread: _ReactorThread | None = None


def _reactor_thread() -> _ReactorThread:
    global _thread
    with _thread_lock:
        if _thread is None:
            _thread = _ReactorThread()
        return _thread


def _after_fork_in_child() -> None:
    # The parent's reactor thread does not exist here and its sockets are the
    # parent's: forget both, and start afresh on first use.
    global _thread, _thread_lock
    _thread = None
    _thread_lock = threading.Lock()
    _agents.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _close_when_granted(future: concurrent.futures.Future) -> None:
    """The caller stopped waiting for an open (Ctrl-C, a cancelled task) that
    may still succeed: close the tunnel as soon as it is granted."""

    def close(done: concurrent.futures.Future):
        if not done.cancelled() and done.exception() is None:
            _reactor_thread().submit(_close_in_reactor, done.result())

    future.add_done_callback(close)


class TunnelContext:
    """What forward() returns: use it with `with` or `async with`; either
    gives the live Tunnel and closes it on the way out, exception or not."""

    def __init__(self, spec: TunnelSpec, relay: str, token: str, ca: str | None,
                 connect_timeout: float, links: int = 2):
        self._links = links
        self._spec = spec
        self._settings = (relay, token, ca)
        self._connect_timeout = connect_timeout
        self.tunnel = None

    def _open_future(self) -> concurrent.futures.Future:
        thread = _reactor_thread()
        return thread.submit(
            _open_in_reactor, thread.reactor, self._spec, *self._settings, self._connect_timeout, self._links
        )

    def _close_future(self) -> concurrent.futures.Future:
        return _reactor_thread().submit(_close_in_reactor, self.tunnel)

    # -- plain code -----------------------------------------------------------------

    def __enter__(self):
        future = self._open_future()
        try:
            self.tunnel = future.result(self._connect_timeout + CLOSE_TIMEOUT_SECONDS)
        except BaseException:
            _close_when_granted(future)  # Ctrl-C while opening: `with` will not call __exit__
            raise
        return self.tunnel

    def __exit__(self, *exc_info):
        if self.tunnel is not None:
            self._close_future().result(CLOSE_TIMEOUT_SECONDS + 1)
        return False

    # -- asyncio ------------------------------------------------------------------------

    async def _await(self, future: concurrent.futures.Future):
        import asyncio

        import txaio.aio

        # txaio's asyncio API bound to this loop, never its process-wide
        # framework switch (code in the same process may use Twisted's).
        loop = asyncio.get_running_loop()
        aio = txaio.aio.with_config(loop=loop)
        result = aio.create_future()

        def settle(done: concurrent.futures.Future):
            if result.done():
                return
            error = done.exception()
            if error is not None:
                aio.reject(result, error)
            else:
                aio.resolve(result, done.result())

        def settle_in_loop(done: concurrent.futures.Future):
            try:
                loop.call_soon_threadsafe(settle, done)
            except RuntimeError:
                pass  # the loop is closed: its caller is gone

        future.add_done_callback(settle_in_loop)
        return await result

    async def __aenter__(self):
        future = self._open_future()
        try:
            self.tunnel = await self._await(future)
        except BaseException:
            _close_when_granted(future)  # a cancelled task: `async with` will not call __aexit__
            raise
        return self.tunnel

    async def __aexit__(self, *exc_info):
        if self.tunnel is not None:
            await self._await(self._close_future())
        return False


def forward(target=None, *, unencrypted=False, relay=None, token=None, ca=None, alpn=None,
            services=None, allow=None, client_ca=None, proxy_protocol=None,
            tls_passthrough=False, name=None, connect_timeout=DEFAULT_CONNECT_TIMEOUT_SECONDS,
            links=2) -> TunnelContext:
    """A public address for a local port, live inside a `with` or `async with` block.

    target: a port (8000) or "host:port" on this machine's network; or give
        services={"web": 8000, "api": "localhost:9000"} for one tunnel id
        with a URL per service ("NAME=...:tcp" style modes work as on the CLI).
    unencrypted: a raw TCP tunnel (tunnel.tcp_socket) instead of TLS.
    relay, token, ca: default to TUNNEL_RELAY, TUNNEL_TOKEN, TUNNEL_CA.
    alpn: protocols the service speaks ("h2" for HTTP/2 and gRPC).
    allow: CIDRs allowed to connect; client_ca: a PEM path or text for mTLS.
    proxy_protocol: "v1" or "v2" header with the visitor's address.
    tls_passthrough: the service terminates TLS itself.
    name: a stable name: the address is tied to the token's tenant
        (https://NAME-<tenant>.<domain>, or a TCP port kept for NAME) and
        is the same after restarts of this program and of the relay.
    connect_timeout: seconds before RelayUnreachableError when the relay
        does not answer.
    links: TLS links kept to the relay, one session (default 2);
        tunnel.health is "Healthy", "Degraded", "Down" or "Inactive".

    Raises TunnelError subclasses: ConfigurationError and BadServiceNameError
    here (and BadNameError); AuthenticationError, RelayVerificationError,
    RelayUnreachableError, NoPortsAvailableError, NameUnavailableError on
    entering the block. Inside it, tunnel.status is
    "live", "reconnecting" (the link dropped; same addresses when it is back)
    or "closed" (tunnel.error a TunnelLostError if the addresses expired).
    See docs/python-api.md.
    """
    relay, token, ca = _settings(relay, token, ca)
    spec = _spec(target, unencrypted=unencrypted, alpn=alpn, services=services, allow=allow,
                 client_ca=client_ca, proxy_protocol=proxy_protocol, tls_passthrough=tls_passthrough,
                 name=name)
    _check_links(links)
    return TunnelContext(spec, relay, token, ca, connect_timeout, links)


def _check_links(links) -> None:
    from client.agent import MAX_LINKS

    if isinstance(links, bool) or not isinstance(links, int) or not 1 <= links <= MAX_LINKS:
        raise ConfigurationError(f"links must be 1 to {MAX_LINKS}")
