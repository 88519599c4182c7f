"""The fleet registry: which node holds each stable hostname, random id and
TCP port, kept in Redis (`--registry redis://HOST:PORT/DB`, docs/network.md).

What it is: a small claim table. Every key a node holds is written with
`SET key node NX EX ttl` (a key held by another live node is not taken),
refreshed every `ttl / 3` by one Lua script that also rewrites the keys Redis
lost (it restarted empty) and reports the ones another node now holds, and
released with a compare-and-delete script. Changes are published on one
pub/sub channel, so every node's cache follows claims and releases without
polling; a miss in the cache asks Redis once.

What it is not: the routing. `relay/node/fleetdir.py` asks it; the links to
other nodes are `relay/node/peers.py`'s.

Redis going away breaks nothing already routed: the node keeps serving what
it holds and what its cache knows, refuses what it cannot resolve (a new
stable name it cannot claim, a name it has never heard of), logs one line
when Redis goes and one when it is back, and then rewrites its keys at once.

The client is txredisapi: Twisted-native (Deferreds on our reactor, pub/sub
as a protocol), where redis-py's asyncio client would need Twisted's asyncio
reactor in place of relay/wire/reactor.py's.
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger

# A key outlives its node by at most this long (a node killed with SIGKILL).
DEFAULT_TTL_SECONDS = 30.0
# Cached answers, bounded: the oldest go first.
MAX_CACHED_KEYS = 100_000
# How long one Redis call may take before the registry counts Redis as away.
CALL_TIMEOUT_SECONDS = 2.0
PREFIX = "trelay:"
CHANNEL = PREFIX + "changes"

# KEYS: the keys a node holds; ARGV[1]: its name, ARGV[2]: ttl in ms.
# Refresh the ones it still holds, rewrite the ones Redis lost, and return
# the ones another node holds now (they are no longer ours).
REFRESH_SCRIPT = """
local lost = {}
for i, key in ipairs(KEYS) do
  local v = redis.call('GET', key)
  if v == ARGV[1] then
    redis.call('PEXPIRE', key, ARGV[2])
  elseif not v then
    redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
  else
    table.insert(lost, key)
  end
end
return lost
"""
# Delete KEYS[1] only if ARGV[1] holds it.
RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RegistryUnavailableError(Exception):
    """Redis did not answer: the registry cannot say."""


def parse_registry_url(url: str) -> tuple[str, int, int]:
    """(host, port, db) of redis://HOST:PORT/DB; ValueError if it is not one."""
    parts = urlsplit(url)
    if parts.scheme != "redis" or not parts.hostname:
        raise ValueError(f"{url!r}: want redis://HOST:PORT/DB")
    path = parts.path.strip("/")
    db = int(path) if path else 0
    return parts.hostname, parts.port or 6379, db


def hostname_key(hostname: str) -> str:
    return f"{PREFIX}host:{hostname}"


def id_key(tunnel_id: str) -> str:
    return f"{PREFIX}id:{tunnel_id}"


def port_key(node: str, port: int) -> str:
    # A TCP port belongs to one node's address (<node>.<domain>:<port>).
    return f"{PREFIX}port:{node}:{port}"


def node_key(node: str) -> str:
    return f"{PREFIX}node:{node}"


class RedisRegistry:
    """One node's view of the fleet registry."""

    _log = Logger()

    def __init__(self, reactor, url: str, node: str, *, ttl_seconds: float = DEFAULT_TTL_SECONDS,
                 node_info: dict | None = None):
        self.reactor = reactor
        self.host, self.port, self.db = parse_registry_url(url)
        self.node = node
        self.ttl_seconds = ttl_seconds
        self.node_info = node_info or {}  # what peers need to reach us (relay/node/peers.py)
        self.held: set[str] = set()  # keys this node holds
        self.cache: dict[str, str] = {}  # key -> node, from pub/sub and lookups
        self.available = False
        self._said_away = False
        self._redis = None
        self._subscriber = None
        self._refresher = task.LoopingCall(self.refresh)
        self._refresher.clock = reactor
        self.on_lost = None  # called with each key another node took from us

    # -- lifecycle -----------------------------------------------------------------

    def _connect(self):
        import txredisapi

        # Lazy: commands wait for the connection, which txredisapi redials by itself.
        self._redis = txredisapi.lazyConnectionPool(
            self.host, self.port, dbid=self.db, poolsize=2, reconnect=True,
            connectTimeout=CALL_TIMEOUT_SECONDS, replyTimeout=CALL_TIMEOUT_SECONDS,
        )

    @defer.inlineCallbacks
    def start(self):
        """Subscribe, start refreshing, write our keys; errs with
        RegistryUnavailableError if Redis did not answer: the node runs
        anyway and catches up when Redis comes."""
        if self._redis is None:
            self._connect()
        self._subscribe()
        self._refresher.start(self.ttl_seconds / 3, now=False)
        yield self.refresh()

    def _subscribe(self):
        import txredisapi

        registry = self

        class Subscriber(txredisapi.SubscriberProtocol):
            def connectionMade(self):
                super().connectionMade()
                registry._subscriber = self
                self.subscribe(CHANNEL)

            def messageReceived(self, pattern, channel, message):
                registry._heard(message)

            def connectionLost(self, reason):
                registry._subscriber = None
                super().connectionLost(reason)

        from twisted.internet.endpoints import clientFromString

        factory = txredisapi.SubscriberFactory()
        factory.protocol = Subscriber
        factory.reconnect = True
        factory.maxDelay = 2.0  # back within seconds of Redis
        endpoint = clientFromString(
            self.reactor, f"tcp:host={self.host}:port={self.port}:timeout={CALL_TIMEOUT_SECONDS:g}",
        )
        factory.startConnecting(endpoint)
        self._subscriber_factory = factory

    def stop(self) -> defer.Deferred:
        if self._refresher.running:
            self._refresher.stop()
        subscriber = getattr(self, "_subscriber_factory", None)
        self._subscriber_factory = None
        d = self.release_all()

        def disconnect(_):
            closing = [f.disconnect() for f in (subscriber,) if f is not None]
            if self._redis is not None:
                closing.append(self._redis.disconnect())
            return defer.DeferredList(closing, consumeErrors=True)

        d.addBoth(disconnect)
        return d

    # -- Redis calls, with one line when it goes away and one when it is back -------

    def _call(self, name: str, *args) -> defer.Deferred:
        if self._redis is None:
            self._connect()
        d = defer.maybeDeferred(getattr(self._redis, name), *args)
        d.addTimeout(CALL_TIMEOUT_SECONDS, self.reactor)
        d.addCallbacks(self._answered, self._failed)
        return d

    def _answered(self, result):
        if not self.available:
            self.available = True
            if self._said_away:
                self._said_away = False
                self._log.info("registry: Redis at {host}:{port} is back; rewriting this node's keys",
                               host=self.host, port=self.port)
                self.reactor.callLater(0, self.refresh)
        return result

    def _failed(self, failure):
        if self.available or not self._said_away:
            self._said_away = True
            self._log.warn(
                "registry: Redis at {host}:{port} does not answer ({error}): serving what this node holds "
                "and knows, refusing what it cannot resolve",
                host=self.host, port=self.port, error=failure.getErrorMessage() or failure.type.__name__,
            )
        self.available = False
        raise RegistryUnavailableError(failure.getErrorMessage())

    # -- claims ----------------------------------------------------------------------

    @defer.inlineCallbacks
    def claim(self, key: str):
        """Take `key` for this node: True, or False if another live node holds
        it. Errs with RegistryUnavailableError when Redis does not answer."""
        if key in self.held:
            return True
        ttl_ms = int(self.ttl_seconds * 1000)
        ok = yield self._call("set", key, self.node, None, ttl_ms, True)  # SET key node PX ttl NX
        if not ok:
            holder = yield self._call("get", key)
            if holder != self.node:
                if holder is not None:
                    self._remember(key, holder)
                return False
        self.held.add(key)
        self._remember(key, self.node)
        self._publish(f"claim {key} {self.node}")
        return True

    def record(self, key: str) -> defer.Deferred:
        """Claim `key` without caring who had it: a fact of this node only (its ports)."""
        d = self.claim(key)
        d.addErrback(lambda f: f.trap(RegistryUnavailableError) and False)
        return d

    def release(self, key: str) -> defer.Deferred:
        if key not in self.held:
            return defer.succeed(None)
        self.held.discard(key)
        if self.cache.get(key) == self.node:
            del self.cache[key]
        d = self._call("eval", RELEASE_SCRIPT, [key], [self.node])
        d.addCallback(lambda _: self._publish(f"release {key} {self.node}"))
        # Redis away: the key expires by itself within the ttl.
        d.addErrback(lambda f: f.trap(RegistryUnavailableError) and None)
        return d

    def release_all(self) -> defer.Deferred:
        return defer.DeferredList([self.release(k) for k in list(self.held)], consumeErrors=True)

    @defer.inlineCallbacks
    def refresh(self):
        """Every ttl/3: keep our keys alive (rewrite those Redis lost), drop
        those another node holds now. A failure was logged by `_failed`."""
        keys = sorted(self.held)
        try:
            yield self._call("set", node_key(self.node), json.dumps(self.node_info),
                             None, int(self.ttl_seconds * 1000))
            lost = yield self._call("eval", REFRESH_SCRIPT, keys, [self.node, int(self.ttl_seconds * 1000)])
        except RegistryUnavailableError:
            return
        for key in lost or ():
            key = key.decode() if isinstance(key, bytes) else key
            self.held.discard(key)
            self._log.warn("registry: {key} is held by another node now", key=key)
            if self.on_lost is not None:
                self.on_lost(key)

    # -- lookups ---------------------------------------------------------------------

    @defer.inlineCallbacks
    def holder(self, key: str):
        """The node holding `key`, or None; from the cache, else from Redis.
        Redis away and nothing cached: errs with RegistryUnavailableError."""
        node = self.cache.get(key)
        if node is not None:
            return node
        node = yield self._call("get", key)
        if node is not None:
            self._remember(key, node)
        return node

    @defer.inlineCallbacks
    def node_info_of(self, node: str):
        """What `node` published about itself (its peer address), or None."""
        raw = self.cache.get(node_key(node))
        if raw is None:
            raw = yield self._call("get", node_key(node))
            if raw is None:
                return None
            self._remember(node_key(node), raw)
        try:
            info = json.loads(raw)
        except ValueError:
            return None
        return info if isinstance(info, dict) else None

    def _remember(self, key: str, node: str) -> None:
        if len(self.cache) >= MAX_CACHED_KEYS and key not in self.cache:
            self.cache.pop(next(iter(self.cache)))
        self.cache[key] = node

    def _publish(self, message: str) -> None:
        d = self._call("publish", CHANNEL, message)
        d.addErrback(lambda f: f.trap(RegistryUnavailableError))

    def _heard(self, message) -> None:
        """A change another node published: "claim KEY NODE" or "release KEY NODE"."""
        if isinstance(message, bytes):
            message = message.decode("utf-8", "replace")
        parts = str(message).split(" ")
        if len(parts) != 3:
            return
        verb, key, node = parts
        if verb == "claim":
            self._remember(key, node)
        elif verb == "release" and self.cache.get(key) == node:
            del self.cache[key]


class RegistryService(Service):
    """Starts and stops the registry and the peer links with the node."""

    def __init__(self, registry: RedisRegistry, peers=None):
        self.registry = registry
        self.peers = peers

    def startService(self) -> None:
        super().startService()
        d = self.registry.start()
        d.addErrback(lambda f: f.trap(RegistryUnavailableError))  # logged once by _failed

    def stopService(self) -> defer.Deferred:
        super().stopService()
        if self.peers is not None:
            self.peers.close_all()
        return self.registry.stop()
