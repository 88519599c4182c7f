"""The fleet registry (relay/node/registry.py) against a real redis-server."""

import pytest_twisted
from twisted.internet import defer, reactor, task

from relay.node.registry import RedisRegistry, RegistryUnavailableError, hostname_key, id_key

pytest_plugins = ()


def registry(server, node, ttl=3.0):
    return RedisRegistry(reactor, server.url, node, ttl_seconds=ttl, node_info={"peer": f"127.0.0.1:{node}"})


def sleep(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


@defer.inlineCallbacks
def until(predicate, seconds=5.0):
    for _ in range(int(seconds / 0.05)):
        if predicate():
            return
        yield sleep(0.05)
    raise AssertionError("condition not met in time")


@pytest_twisted.inlineCallbacks
def test_a_name_held_by_a_live_node_is_not_taken(redis_server):
    """Claims are SET NX: the first node gets the key, the second is refused, the holder claims it again."""
    r1, r2 = registry(redis_server, "r1"), registry(redis_server, "r2")
    try:
        yield r1.start()
        yield r2.start()
        assert (yield r1.claim(hostname_key("web-dev.example.net"))) is True
        assert (yield r2.claim(hostname_key("web-dev.example.net"))) is False
        assert (yield r1.claim(hostname_key("web-dev.example.net"))) is True
        assert (yield r2.holder(hostname_key("web-dev.example.net"))) == "r1"
        assert redis_server.command("TTL", hostname_key("web-dev.example.net")).startswith(b":")
    finally:
        yield r1.stop()
        yield r2.stop()


@pytest_twisted.inlineCallbacks
def test_release_publishes_and_another_node_may_claim(redis_server):
    """A release deletes only our own key and tells the others through pub/sub: their cache forgets it."""
    r1, r2 = registry(redis_server, "r1"), registry(redis_server, "r2")
    key = id_key("abcdefghijklmnop")
    try:
        yield r1.start()
        yield r2.start()
        yield sleep(0.2)  # both subscribed
        assert (yield r1.claim(key))
        yield until(lambda: r2.cache.get(key) == "r1")  # heard, not polled
        yield r1.release(key)
        yield until(lambda: key not in r2.cache)
        assert (yield r2.claim(key))
        yield r1.release(key)  # not r1's any more: r2 keeps it
        assert (yield r2.holder(key)) == "r2"
        assert redis_server.command("GET", key) == b"$2\r\nr2\r\n"
    finally:
        yield r1.stop()
        yield r2.stop()


@pytest_twisted.inlineCallbacks
def test_keys_live_while_refreshed_and_expire_after(redis_server):
    """A live node's keys outlive their ttl (refreshed every ttl/3); a dead node's expire."""
    r1 = registry(redis_server, "r1", ttl=1.5)
    key = hostname_key("api-dev.example.net")
    yield r1.start()
    assert (yield r1.claim(key))
    yield sleep(2.5)
    assert redis_server.command("GET", key) == b"$2\r\nr1\r\n"
    r1._refresher.stop()  # as if the node died: nobody refreshes
    r1.held.clear()
    yield sleep(2.0)
    assert redis_server.command("GET", key) == b"$-1\r\n"
    yield r1.stop()


@pytest_twisted.inlineCallbacks
def test_redis_away_refuses_claims_then_catches_up(redis_server, tmp_path):
    """Redis stopped: claims err (refused), the cache still answers; Redis back: the node's keys are rewritten."""
    from tests.fleet.redis_server import RedisServer

    r1 = registry(redis_server, "r1", ttl=1.5)
    key = hostname_key("web-dev.example.net")
    yield r1.start()
    assert (yield r1.claim(key))
    redis_server.stop()
    try:
        yield r1.claim(hostname_key("new-dev.example.net"))
    except RegistryUnavailableError:
        pass
    else:
        raise AssertionError("a claim with Redis away must fail")
    assert (yield r1.holder(key)) == "r1"  # from the cache
    assert r1.available is False
    again = RedisServer(tmp_path, port=redis_server.port).start()  # empty: it kept nothing
    try:
        yield until(lambda: again.command("GET", key) == b"$2\r\nr1\r\n", seconds=10)
        assert r1.available is True
    finally:
        yield r1.stop()
        again.stop()
