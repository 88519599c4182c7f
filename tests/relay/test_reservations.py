"""Reservations across relay restarts, and stable names, without sockets: two
Nodes (tests/relay/node_helpers.py) on one state folder, the second started
at a later clock time, each writing reservations.json inline."""

import json
import os
import shutil
import stat

from twisted.internet.address import IPv4Address
from twisted.logger import capturedLogs

from relay.mux import ErrorCode
from relay.mux.control import RequestErrorCode
from relay.node.reservations import RESERVATIONS_FILE
from relay.node.tenants import DEV_GRANT, Grant
from tests.relay.node_helpers import DOMAIN, HIGH, LOW, TOKEN, Node

VISITOR = IPv4Address("TCP", "203.0.113.7", 51234)
OTHER_TOKEN = "another-tenant-token-never-logged"
GRACE = 60.0

KINDS = {
    "tcp": [{"name": "", "kind": "tcp"}],
    "tls": [{"name": "", "kind": "tls"}],
    "passthrough": [{"name": "", "kind": "tls", "mode": "passthrough"}],
    "services": [{"name": "web", "kind": "tls"}, {"name": "ssh", "kind": "tcp"}],
}


def addresses(reply) -> list[str]:
    return [e["url"] for e in reply.body["tunnel"]["endpoints"]]


def open_every_kind(agent) -> dict:
    """kind -> (reply, services) for a tunnel of each kind."""
    out = {}
    for kind, services in KINDS.items():
        reply = agent.open(services=services)
        assert reply.ok, reply.error
        out[kind] = (reply, services)
    return out


def restarted(state_dir, now: float, **options) -> Node:
    node = Node(grace_seconds=GRACE, state_dir=state_dir, now=now, **options)
    node.restore()
    return node


def reclaim(agent, reply, services, **fields):
    secret = reply.body["reclaim_secret"]
    return agent.open(services=services, reclaim=(reply.body["tunnel"]["id"], secret), **fields)


def tcp_port(reply) -> int:
    return next(e["tcp_socket"][1] for e in reply.body["tunnel"]["endpoints"] if e["kind"] == "tcp")


def test_after_a_stop_every_kind_of_tunnel_is_reclaimed_at_its_address_within_the_grace(tmp_path):
    """A relay stopped (SIGTERM: a last snapshot) and started 10 s later rebinds every tunnel's ports and hostnames, refuses their visitors while the agent is away, and gives each reclaim the same addresses."""
    first = Node(grace_seconds=GRACE, state_dir=tmp_path, now=1000.0)
    agent = first.agent()
    opened = open_every_kind(agent)
    first.journal.close()  # what RelayNode.stopService does first

    node = restarted(tmp_path, now=1010.0)
    assert len(node.tunnels.tunnels) == 4
    tcp_reply = opened["tcp"][0]
    port = tcp_port(tcp_reply)
    assert node.listener(port).buildProtocol(VISITOR) is None  # bound, and refused at once
    hostname = opened["tls"][0].body["tunnel"]["hostname"]
    assert node.tunnels.route_hostname(hostname).result is not None
    assert node.metrics.refused_by_reason["agent_away"] == 1

    again = node.agent()
    for kind, (reply, services) in opened.items():
        back = reclaim(again, reply, services)
        assert back.ok and back.body["reclaimed"] is True, (kind, back.error)
        assert addresses(back) == addresses(reply), kind
    # Settings the file does not keep come from the reclaim: passthrough stays passthrough.
    passthrough = opened["passthrough"][0].body["tunnel"]["hostname"]
    assert node.tunnels.route_hostname(passthrough).result[1].mode == "passthrough"
    assert node.listener(port).buildProtocol(VISITOR) is not None  # served again
    node.reactor.advance(3600)  # the grace timers were cancelled
    assert len(node.tunnels.tunnels) == 4


def test_the_file_is_0600_holds_digests_never_secrets_and_is_replaced_atomically(tmp_path):
    """reservations.json is mode 0600 and holds the SHA-256 of each reclaim secret, never the secret; no temporary file is left."""
    node = Node(grace_seconds=GRACE, state_dir=tmp_path)
    agent = node.agent()
    reply = agent.open()
    node.reactor.advance(1)
    path = tmp_path / RESERVATIONS_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert reply.body["reclaim_secret"] not in text and TOKEN not in text
    [item] = json.loads(text)["tunnels"]
    import hashlib

    assert item["secret_sha256"] == hashlib.sha256(reply.body["reclaim_secret"].encode()).hexdigest()
    assert item["tenant"] == "dev" and item["deadline"] is None
    assert sorted(os.listdir(tmp_path)) == [RESERVATIONS_FILE]


def test_writes_are_coalesced_and_visitors_change_nothing(tmp_path):
    """Ten tunnels opened at once cost one write; a thousand visitors none; between writes only the mtime is stamped, every 2 s."""
    node = Node(grace_seconds=GRACE, state_dir=tmp_path, now=500.0)
    node.journal.start()
    agent = node.agent()
    ports = [agent.open().body["tunnel"]["port"] for _ in range(10)]
    assert node.journal.writes == 0
    node.reactor.advance(0.6)
    assert node.journal.writes == 1
    for _ in range(1000):
        node.listener(ports[0]).buildProtocol(VISITOR)
    node.reactor.advance(4.0)
    node.reactor.advance(4.0)
    assert node.journal.writes == 1
    assert (tmp_path / RESERVATIONS_FILE).stat().st_mtime == node.reactor.seconds()  # stamped, not rewritten


def test_after_a_kill_the_grace_counts_from_the_last_stamp(tmp_path):
    """With no last snapshot (SIGKILL), a reclaim within the grace of the last stamp succeeds and one after it gets a fresh address, the old port in quarantine."""
    first = Node(grace_seconds=GRACE, state_dir=tmp_path, now=1000.0)
    first.journal.start()
    agent = first.agent()
    reply = agent.open()
    first.reactor.advance(20.0)  # written at 1000.5, stamped until 1020: then killed
    for name, now, held in (("in-time", 1020.0 + GRACE - 1, True), ("late", 1020.0 + GRACE + 1, False)):
        copy = tmp_path.parent / name
        shutil.copytree(tmp_path, copy)
        node = restarted(copy, now=now)
        back = node.agent().open(reclaim=(reply.body["tunnel"]["id"], reply.body["reclaim_secret"]))
        assert back.ok and back.body["reclaimed"] is held, name
        assert (back.body["tunnel"]["port"] == reply.body["tunnel"]["port"]) is held
        if not held:
            assert node.allocator.quarantined() == 1  # freed by expiry: never handed straight on


def test_a_tunnel_already_waiting_keeps_its_own_deadline_across_the_restart(tmp_path):
    """A tunnel whose agent left before the stop expires at its own deadline, not the stop's grace."""
    first = Node(grace_seconds=GRACE, state_dir=tmp_path, now=1000.0)
    agent = first.agent()
    reply = agent.open()
    agent.lose()  # deadline 1060
    first.reactor.advance(30.0)
    first.journal.close()
    node = restarted(tmp_path, now=1050.0)
    assert len(node.tunnels.tunnels) == 1
    node.reactor.advance(11.0)  # past 1060
    assert node.tunnels.tunnels == {}
    back = node.agent().open(reclaim=(reply.body["tunnel"]["id"], reply.body["reclaim_secret"]))
    assert back.body["reclaimed"] is False


def test_the_port_quarantine_survives_a_restart(tmp_path):
    """A port freed just before the stop is still in quarantine after the start, and no new tunnel gets it."""
    first = Node(grace_seconds=GRACE, state_dir=tmp_path, now=1000.0)
    agent = first.agent()
    freed = agent.open().body["tunnel"]["port"]
    [tunnel_id] = first.tunnels.tunnels
    assert agent.close(tunnel_id).ok
    first.journal.close()
    node = restarted(tmp_path, now=1010.0)
    assert node.allocator.quarantined() == 1
    fresh = node.agent()
    ports = {fresh.open().body["tunnel"]["port"] for _ in range(HIGH - LOW)}
    assert freed not in ports
    assert not fresh.open().ok  # the tenth port is the quarantined one


def test_an_unreadable_file_is_set_aside_with_one_line_and_the_relay_starts_empty(tmp_path):
    """Garbage in reservations.json: renamed .bad, one warning, no traceback, nothing restored."""
    (tmp_path / RESERVATIONS_FILE).write_bytes(b"\x00{not json")
    with capturedLogs() as logs:
        node = restarted(tmp_path, now=10.0)
    assert node.tunnels.tunnels == {}
    assert (tmp_path / (RESERVATIONS_FILE + ".bad")).exists()
    assert [e for e in logs if "unreadable" in e.get("log_format", "")]
    assert not any(e.get("log_failure") for e in logs)


# -- stable names --------------------------------------------------------------------


def test_a_stable_name_is_name_dash_tenant_and_comes_back_after_the_grace(tmp_path):
    """--name web gives https://web-dev.<domain> (services: SERVICE-web-dev); an agent back after the grace, without the secret, gets the same hostnames."""
    node = Node(grace_seconds=GRACE, state_dir=tmp_path)
    agent = node.agent()
    single = agent.open(services=KINDS["tls"], stable_name="web")
    assert single.body["tunnel"]["hostname"] == f"web-dev.{DOMAIN}"
    several = agent.open(services=KINDS["services"], stable_name="app")
    assert several.body["tunnel"]["endpoints"][0]["hostname"] == f"web-app-dev.{DOMAIN}"
    agent.lose()
    node.reactor.advance(GRACE + 1)
    assert node.tunnels.tunnels == {}
    back = node.agent()
    assert addresses(back.open(services=KINDS["tls"], stable_name="web")) == addresses(single)
    assert addresses(back.open(services=KINDS["services"], stable_name="app")) == addresses(several)


def test_a_tcp_name_keeps_its_port_which_nobody_else_gets(tmp_path):
    """A TCP stable name reserves a port of the range for good: closed, it is neither quarantined nor given to random tunnels, and the name gets it again, also after a restart past the grace."""
    node = Node(grace_seconds=GRACE, state_dir=tmp_path, now=1000.0)
    agent = node.agent()
    named = agent.open(stable_name="db")
    port = tcp_port(named)
    assert agent.close(named.body["tunnel"]["id"]).ok
    assert node.allocator.quarantined() == 0 and port in node.allocator.in_use
    randoms = [agent.open() for _ in range(HIGH - LOW)]
    assert all(r.ok for r in randoms) and port not in {tcp_port(r) for r in randoms}
    for r in randoms:
        agent.close(r.body["tunnel"]["id"])
    assert tcp_port(agent.open(stable_name="db")) == port
    agent.lose()
    node.journal.close()
    later = restarted(tmp_path, now=1000.0 + GRACE + 30)  # expired while down
    assert later.tunnels.tunnels == {} and port in later.allocator.in_use
    assert tcp_port(later.agent().open(stable_name="db")) == port


def test_a_name_of_another_tenant_or_not_in_the_grant_is_a_typed_error():
    """A name held by another tenant is name_taken; one the token's grant does not list is name_not_allowed (checked first: a token learns nothing of names it may not have)."""
    acme = Grant(tenant="acme", token_id="t2", names=frozenset({"api", "web"}))
    node = Node(grants={TOKEN: DEV_GRANT, OTHER_TOKEN: acme})
    assert node.agent().open(services=KINDS["tls"], stable_name="web").ok
    other = node.agent(token=OTHER_TOKEN)
    taken = other.open(services=KINDS["tls"], stable_name="web")
    assert not taken.ok and taken.error.code is RequestErrorCode.NAME_TAKEN and taken.error.exit_code == 9
    refused = other.open(services=KINDS["tls"], stable_name="www")
    assert not refused.ok and refused.error.code is RequestErrorCode.NAME_NOT_ALLOWED
    allowed = other.open(services=KINDS["tls"], stable_name="api")
    assert allowed.body["tunnel"]["hostname"] == f"api-acme.{DOMAIN}"
    assert not other.link.closed


def test_a_second_live_agent_of_the_name_is_a_duplicate_unless_it_holds_the_secret():
    """With --replica-policy refuse, two agents of one tenant on one live name: the second is name_in_use; one with the reclaim secret takes over (a reconnect)."""
    node = Node(replica_policy="refuse")
    first = node.agent()
    reply = first.open(services=KINDS["tls"], stable_name="web")
    second = node.agent()
    duplicate = second.open(services=KINDS["tls"], stable_name="web")
    assert not duplicate.ok and duplicate.error.code is RequestErrorCode.NAME_IN_USE
    back = reclaim(second, reply, KINDS["tls"], stable_name="web")
    assert back.ok and back.body["reclaimed"] is True and addresses(back) == addresses(reply)
    assert first.link.closed


def test_an_agent_restarted_within_the_grace_takes_its_name_from_the_waiting_tunnel():
    """The name's tunnel waits for its agent; the same tenant without the secret (a restarted agent) ends it and gets the same address."""
    node = Node()
    first = node.agent()
    reply = first.open(stable_name="db")
    first.lose()
    again = node.agent().open(stable_name="db")
    assert again.ok and again.body["reclaimed"] is False and tcp_port(again) == tcp_port(reply)
    assert again.body["tunnel"]["id"] != reply.body["tunnel"]["id"]
    assert len(node.tunnels.tunnels) == 1


def test_bad_stable_names_are_refused_with_bad_name():
    """Not a lowercase DNS label of 1-32 characters: bad_name, exit code 2, the link stays."""
    node = Node()
    agent = node.agent()
    for name in ("Web", "-web", "web-", "a--b", "a" * 33, "", "we b", 7, "wéb"):
        reply = agent.open(stable_name=name)
        assert not reply.ok and reply.error.code is RequestErrorCode.BAD_NAME, name
        assert reply.error.exit_code == 2
    assert agent.open(stable_name="a" * 32).ok
    assert not agent.link.closed


def test_a_hostname_too_long_for_one_label_is_bad_name():
    """SERVICE-NAME-TENANT longer than 63 characters is refused before anything is bound."""
    node = Node()
    reply = node.agent().open(services=[{"name": "s" * 20, "kind": "tls"}], stable_name="n" * 32)
    assert reply.ok  # 20 + 1 + 32 + 1 + 3 = 57
    long_tenant = Grant(tenant="t" * 12, token_id="t3")
    node = Node(grants={TOKEN: long_tenant})
    reply = node.agent().open(services=[{"name": "s" * 20, "kind": "tls"}], stable_name="n" * 32)
    assert not reply.ok and reply.error.code is RequestErrorCode.BAD_NAME
    assert node.reactor.tcpServers == [] and node.tunnels.tunnels == {}


def test_goaway_from_the_agent_ends_a_named_tunnel_but_keeps_the_name():
    """GOAWAY(NO_ERROR) ends the tunnel now; the name and its port stay the tenant's."""
    node = Node()
    agent = node.agent()
    port = tcp_port(agent.open(stable_name="db"))
    agent.mux.close(ErrorCode.NO_ERROR, "bye")
    agent.pump()
    agent.lose()
    assert node.tunnels.tunnels == {} and port in node.allocator.in_use
    assert tcp_port(node.agent().open(stable_name="db")) == port


def test_a_tenant_holds_at_most_256_stable_names():
    """Names are kept for ever: the 257th distinct name of one tenant is limit_exceeded; its own names still open."""
    from relay.node.reservations import MAX_NAMES_PER_TENANT

    node = Node()
    agent = node.agent()
    for n in range(MAX_NAMES_PER_TENANT):
        reply = agent.open(services=KINDS["tls"], stable_name=f"n{n}")
        assert reply.ok, reply.error
        assert agent.close(reply.body["tunnel"]["id"]).ok
    refused = agent.open(services=KINDS["tls"], stable_name="one-more")
    assert not refused.ok and refused.error.code is RequestErrorCode.LIMIT_EXCEEDED
    assert "stable names per tenant: at most 256" in str(refused.error)
    assert agent.open(services=KINDS["tls"], stable_name="n0").ok
