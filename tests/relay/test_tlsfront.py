"""SNIRouter (relay/node/tlsfront.py) without sockets: a ClientHello from
stdlib ssl fed to the router on a StringTransport, the tunnel found through
the node's directory, and the visitor refused, passed through or terminated."""

import ssl

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from relay.mux import events as ev
from relay.node import state as relay_state
from relay.node.tlsfront import (
    CLIENT_HELLO_TIMEOUT_SECONDS,
    UNRECOGNIZED_NAME_ALERT,
    TLSContexts,
    TLSFrontFactory,
)
from tests.relay.node_helpers import DOMAIN, Node
from tests.relay.test_clienthello import client_hello
from tests.relay.test_tunnels import SlowDirectory

VISITOR = IPv4Address("TCP", "203.0.113.7", 51234)
FRONT = IPv4Address("TCP", "127.0.0.1", 443)


@pytest.fixture(scope="module")
def contexts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("state")
    state = relay_state.load_or_create(folder / "s", agent_address="localhost:1", hostnames=["localhost"])
    cert, key = folder / "w.pem", folder / "w-key.pem"
    relay_state.issue_certificate(state, [f"*.{DOMAIN}", DOMAIN], cert, key)
    return TLSContexts(cert, key)


def visitor(node, contexts):
    front = TLSFrontFactory(node.tunnels, contexts, node.reactor, node.metrics)
    router = front.buildProtocol(VISITOR)
    transport = StringTransport(peerAddress=VISITOR, hostAddress=FRONT)
    router.makeConnection(transport)
    return router, transport


def tls_tunnel(node, mode="terminate"):
    agent = node.agent()
    reply = agent.open(services=[{"name": "", "kind": "tls", "mode": mode}])
    return agent, reply.body["tunnel"]


def test_an_unknown_name_gets_the_unrecognized_name_alert(contexts):
    """A ClientHello for a name no tunnel holds is answered with a fatal unrecognized_name alert and counted."""
    node = Node()
    router, transport = visitor(node, contexts)
    router.dataReceived(client_hello(f"nobody.{DOMAIN}"))
    assert transport.value() == UNRECOGNIZED_NAME_ALERT and transport.disconnecting
    assert node.metrics.refused_by_reason["unknown_name"] == 1


def test_no_server_name_is_refused_like_an_unknown_one(contexts):
    """A ClientHello without SNI never reaches a default tunnel."""
    node = Node()
    tls_tunnel(node)
    router, transport = visitor(node, contexts)
    router.dataReceived(client_hello(None))
    assert transport.value() == UNRECOGNIZED_NAME_ALERT


def test_garbage_instead_of_a_client_hello_is_dropped_and_counted(contexts):
    """Bytes that are not a TLS handshake close the connection, counted as bad_hello."""
    node = Node()
    router, transport = visitor(node, contexts)
    router.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.value() == b"" and node.metrics.refused_by_reason["bad_hello"] == 1


def test_a_slow_client_hello_is_cut_at_the_deadline(contexts):
    """A visitor that has not sent its whole ClientHello by the deadline is dropped, counted as hello_timeout."""
    node = Node()
    router, transport = visitor(node, contexts)
    router.dataReceived(client_hello(f"x.{DOMAIN}")[:20])
    node.reactor.advance(CLIENT_HELLO_TIMEOUT_SECONDS - 0.1)
    assert node.metrics.refused_by_reason["hello_timeout"] == 0
    node.reactor.advance(0.2)
    assert node.metrics.refused_by_reason["hello_timeout"] == 1


def test_passthrough_opens_a_stream_carrying_the_sni_and_the_raw_hello(contexts):
    """In passthrough the stream opens at once with the SNI, and the ClientHello bytes are its first DATA."""
    node = Node()
    agent, tunnel = tls_tunnel(node, mode="passthrough")
    router, transport = visitor(node, contexts)
    hello = client_hello(tunnel["hostname"])
    router.dataReceived(hello)
    events = agent.pump()
    [opened] = [e for e in events if isinstance(e, ev.StreamOpened)]
    assert opened.metadata["sni"] == tunnel["hostname"] and opened.metadata["peer"] == ["203.0.113.7", 51234]
    data = b"".join(e.data for e in events if isinstance(e, ev.DataReceived))
    assert data == hello


def test_terminate_opens_the_stream_only_after_the_handshake(contexts):
    """In terminate mode the relay answers the handshake itself; the agent hears of the visitor only once it completes."""
    node = Node()
    agent, tunnel = tls_tunnel(node)
    router, transport = visitor(node, contexts)
    client = ssl.create_default_context()
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    sslobj = client.wrap_bio(incoming, outgoing, server_hostname=tunnel["hostname"])
    with pytest.raises(ssl.SSLWantReadError):
        sslobj.do_handshake()
    router.dataReceived(outgoing.read())
    assert not [e for e in agent.pump() if isinstance(e, ev.StreamOpened)]  # ServerHello sent, no stream yet
    incoming.write(transport.value())
    transport.clear()
    sslobj.do_handshake()
    sslobj.write(b"hello")
    router.dataReceived(outgoing.read())
    events = agent.pump()
    assert [e.metadata["sni"] for e in events if isinstance(e, ev.StreamOpened)] == [tunnel["hostname"]]
    assert b"".join(e.data for e in events if isinstance(e, ev.DataReceived)) == b"hello"


def test_bytes_during_a_slow_directory_lookup_are_held_and_passed_on_in_order(contexts):
    """While the directory has not answered, reading pauses and what arrived is delivered after the hello, in order."""
    node = Node(directory=SlowDirectory)
    directory = node.tunnels.directory
    agent, tunnel = tls_tunnel(node, mode="passthrough")
    router, transport = visitor(node, contexts)
    hello = client_hello(tunnel["hostname"])
    router.dataReceived(hello)
    assert transport.producerState == "paused"
    router.dataReceived(b"early bytes")
    assert not [e for e in agent.pump() if isinstance(e, ev.StreamOpened)]
    directory.answer()
    assert transport.producerState == "producing"
    events = agent.pump()
    assert b"".join(e.data for e in events if isinstance(e, ev.DataReceived)) == hello + b"early bytes"


def test_a_visitor_that_leaves_during_the_lookup_opens_no_stream(contexts):
    """If the visitor is gone when the directory answers, nothing reaches the agent."""
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    node = Node(directory=SlowDirectory)
    directory = node.tunnels.directory
    agent, tunnel = tls_tunnel(node, mode="passthrough")
    router, transport = visitor(node, contexts)
    router.dataReceived(client_hello(tunnel["hostname"]))
    router.connectionLost(Failure(ConnectionDone()))
    directory.answer()
    assert not [e for e in agent.pump() if isinstance(e, ev.StreamOpened)]
