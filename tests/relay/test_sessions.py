"""Sessions of several links and replicas of one tunnel (relay/node/sessions.py,
relay/node/tunnels.py), on in-memory transports and a MemoryReactorClock."""

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs

from relay.mux import ErrorCode
from relay.mux import events as ev
from relay.mux.control import RequestErrorCode
from relay.node.limits import SessionLimits
from relay.node.tenants import DEV_GRANT, Grant
from tests.relay.node_helpers import TOKEN, Node

OTHER_TOKEN = "another-tenant-token-never-logged"
SAME_TENANT_TOKEN = "same-tenant-second-token-never-logged"
TLS = [{"name": "", "kind": "tls"}]


def visit(node, port, n: int = 1):
    """`n` visitors on a tunnel's port, connected: their protocols (None if refused)."""
    out = []
    for i in range(n):
        addr = IPv4Address("TCP", "203.0.113.7", 40000 + i)
        visitor = node.listener(port).buildProtocol(addr)
        if visitor is not None:
            visitor.makeConnection(StringTransport(peerAddress=addr))
        out.append(visitor)
    return out


def opens(agent) -> list:
    return [e for e in agent.pump() if isinstance(e, ev.StreamOpened)]


def goaway_of(agent):
    return [e for e in agent.events if isinstance(e, ev.GoAwayReceived)]


def test_a_second_link_joins_the_session_with_its_secret_and_serves_its_tunnels():
    """The first link's HELLO carries a join secret; a link presenting it joins: one session, one tunnel, both links serve it."""
    node = Node()
    first = node.agent(links=2)
    assert first.hello["session"] and len(first.hello["join_secret"]) >= 43
    port = first.open().body["tunnel"]["port"]
    second = node.join(first)
    assert second.hello["session"] == first.hello["session"] and "join_secret" not in second.hello
    assert second.hello["link"] == 1
    [tunnel] = node.tunnels.tunnels.values()
    assert tunnel.links == [first.link, second.link]
    assert len(node.tunnels.sessions) == 1
    assert tunnel.describe() and node.tunnels.describe()[0]["status"] == "Healthy"
    # A tunnel opened on the second link is the session's too.
    port2 = second.open().body["tunnel"]["port"]
    assert {t.tunnel_id for t in node.tunnels.tunnels.values()} == first.link.session.tunnel_ids
    assert all(t.links == [first.link, second.link] for t in node.tunnels.tunnels.values())
    assert port != port2


def test_a_wrong_secret_is_refused_without_touching_the_session_and_never_logged():
    """A wrong join secret, an unknown session, another token's session: GOAWAY(JOIN_REFUSED); the live session keeps its links and tunnel."""
    grants = {TOKEN: DEV_GRANT, OTHER_TOKEN: Grant(tenant="acme", token_id="t2")}
    node = Node(grants=grants)
    first = node.agent(links=2)
    secret = first.hello["join_secret"]
    first.open()
    with capturedLogs() as events:
        wrong = node.join(first, secret=secret[:-1] + ("A" if secret[-1] != "A" else "B"))
        other = node.join(first, token=OTHER_TOKEN)
    for refused in (wrong, other):
        assert refused.hello is None and refused.link.closed
        [goaway] = goaway_of(refused)
        assert goaway.code == ErrorCode.JOIN_REFUSED
    text = repr([e for e in events])
    assert secret not in text and TOKEN not in text
    [tunnel] = node.tunnels.tunnels.values()
    assert tunnel.links == [first.link] and not first.link.closed
    assert first.open().ok  # the session still works


def test_visitors_spread_over_the_links_least_streams_first_and_stay_on_theirs():
    """New visitor streams go to the link with the fewest streams; losing one link resets only its streams."""
    node = Node()
    first = node.agent(links=2)
    port = first.open().body["tunnel"]["port"]
    second = node.join(first)
    visit(node, port, 6)
    on_first, on_second = opens(first), opens(second)
    assert len(on_first) == 3 and len(on_second) == 3
    tunnel_id = next(iter(node.tunnels.tunnels))
    second.lose()
    assert first.link.stream_count(tunnel_id) == 3  # the others go on
    visit(node, port, 2)
    assert len(opens(first)) == 2 and node.tunnels.describe()[0]["status"] == "Degraded"
    assert node.tunnels.tunnels[tunnel_id].deadline is None  # no grace while a link lives


def test_the_address_is_held_while_one_link_lives_and_for_the_grace_after_the_last():
    """Per-session grace: losing one link starts nothing; losing the last starts the grace; a new session reclaims the address."""
    node = Node(grace_seconds=30)
    first = node.agent(links=2)
    reply = first.open()
    second = node.join(first)
    first.lose()
    node.reactor.advance(25)  # past nothing: the grace has not started (keepalive timeout is 30)
    assert len(node.tunnels.tunnels) == 1 and node.tunnels.describe()[0]["state"] == "live"
    second.lose()
    assert len(node.tunnels.sessions) == 0
    assert node.tunnels.describe()[0]["status"] == "Down"
    node.reactor.advance(29)  # within the grace
    back = node.agent(links=2)
    again = back.open(reclaim=(reply.body["tunnel"]["id"], reply.body["reclaim_secret"]))
    assert again.ok and again.body["reclaimed"] is True
    assert again.body["tunnel"]["port"] == reply.body["tunnel"]["port"]
    node.reactor.advance(10)
    assert len(node.tunnels.tunnels) == 1
    # A join to the ended session is refused: the agent starts a new one.
    late = node.join(first)
    assert late.hello is None and goaway_of(late)[0].code == ErrorCode.JOIN_REFUSED


def test_a_takeover_replaces_the_old_sessions_links_only():
    """The secret's holder back on a new session (its old links not noticed dead) aborts the old session's links, all of them."""
    node = Node()
    first = node.agent(links=2)
    reply = first.open()
    second = node.join(first)
    back = node.agent(links=2)
    again = back.open(reclaim=(reply.body["tunnel"]["id"], reply.body["reclaim_secret"]))
    assert again.ok and again.body["reclaimed"] is True
    assert first.link.closed and second.link.closed
    [tunnel] = node.tunnels.tunnels.values()
    assert tunnel.links == [back.link]


def test_per_session_limits_count_a_session_once_not_once_per_link():
    """max_tunnels per session counts the session's tunnels over all its links."""
    node = Node(limits=SessionLimits(max_tunnels=2))
    first = node.agent(links=2)
    second = node.join(first)
    assert first.open().ok and second.open().ok
    refused = second.open()
    assert not refused.ok and refused.error.code is RequestErrorCode.LIMIT_EXCEEDED


def test_a_second_agent_of_the_name_joins_as_a_replica_and_visitors_spread_over_both():
    """Same tenant, same stable name: the second agent is a replica; visitors spread over both; a replica whose links go gets none."""
    grants = {TOKEN: DEV_GRANT, SAME_TENANT_TOKEN: Grant(tenant=DEV_GRANT.tenant, token_id="t3")}
    node = Node(grants=grants)
    first = node.agent()
    reply = first.open(stable_name="db")
    replica = node.agent(token=SAME_TENANT_TOKEN)
    joined = replica.open(stable_name="db")
    assert joined.ok and joined.body["replica"] is True and "reclaim_secret" not in joined.body
    assert joined.body["tunnel"]["id"] == reply.body["tunnel"]["id"]
    [item] = node.tunnels.describe()
    assert [r["session"] for r in item["replicas"]] == [first.hello["session"], replica.hello["session"]]
    port = reply.body["tunnel"]["port"]
    visit(node, port, 4)
    assert len(opens(first)) == 2 and len(opens(replica)) == 2
    replica.lose()
    visit(node, port, 3)
    assert len(opens(first)) == 3
    [item] = node.tunnels.describe()
    assert len(item["replicas"]) == 1 and item["status"] == "Healthy"


def test_a_replica_leaving_keeps_the_tunnel_and_other_services_are_refused():
    """A replica's close_tunnel removes it alone; a replica asking for other services is name_in_use."""
    node = Node()
    first = node.agent()
    reply = first.open(stable_name="db")
    other = node.agent().open(services=TLS, stable_name="db")
    assert not other.ok and other.error.code is RequestErrorCode.NAME_IN_USE
    replica = node.agent()
    assert replica.open(stable_name="db").ok
    assert replica.close(reply.body["tunnel"]["id"]).ok
    [tunnel] = node.tunnels.tunnels.values()
    assert tunnel.links == [first.link]


def test_a_replica_with_another_tenants_token_is_refused():
    """A stable name is its tenant's: another tenant's agent gets name_taken, never a replica."""
    grants = {TOKEN: DEV_GRANT, OTHER_TOKEN: Grant(tenant="acme", token_id="t2", names=frozenset({"db"}))}
    node = Node(grants=grants)
    node.agent().open(stable_name="db")
    refused = node.agent(token=OTHER_TOKEN).open(stable_name="db")
    assert not refused.ok and refused.error.code is RequestErrorCode.NAME_TAKEN
    [tunnel] = node.tunnels.tunnels.values()
    assert len(tunnel.sessions) == 1


def test_a_stopping_agents_other_link_ending_without_a_goodbye_frees_its_tunnels():
    """One link of the session says DRAINING (the agent stops); its other link then ends without a GOAWAY
    (it was closed mid-join): the tunnel ends at once, its port rests in quarantine, no grace period."""
    node = Node(grace_seconds=60)
    first = node.agent(links=2)
    first.open()
    second = node.join(first)
    first.mux.drain("agent draining")
    first.pump()
    assert len(node.tunnels.tunnels) == 1  # still served by the second link
    second.lose()
    assert node.tunnels.tunnels == {}
