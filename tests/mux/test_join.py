"""Joining a session (docs/protocol.md, "Joining a session"): the HELLO
fields both ends build and read, checked against the spec's byte vectors."""

from relay.mux import MuxConnection, Role
from relay.mux import control
from relay.mux import events as ev
from tests.mux.test_frames import VECTORS

VECTOR = {v["name"]: v for v in VECTORS}
SESSION, SECRET = "1a2b3c4d", "c2Vzc2lvbi1qb2luLXNlY3JldA"


def hello_bytes(role_fields: dict) -> bytes:
    agent = MuxConnection(Role.AGENT)
    agent.send_hello(role_fields)
    return b"".join(agent.outgoing())


def test_a_new_sessions_hello_says_how_many_links_it_keeps():
    """hello_fields(links=2) is the hello-agent-links vector, byte for byte."""
    assert hello_bytes(control.hello_fields("s3cret", links=2)) == VECTOR["hello-agent-links"]["bytes"]


def test_a_joining_links_hello_names_the_session_and_its_secret():
    """hello_fields(join=...) is the hello-agent-join vector, and the relay reads the same Join back."""
    fields = control.hello_fields("s3cret", join=control.Join(SESSION, SECRET))
    data = hello_bytes(fields)
    assert data == VECTOR["hello-agent-join"]["bytes"]
    relay = MuxConnection(Role.RELAY)
    [hello] = relay.receive_data(data)
    assert isinstance(hello, ev.HelloReceived)
    assert control.parse_join(hello.info) == control.Join(SESSION, SECRET)
    assert "links" not in hello.info


def test_the_relays_hello_gives_the_join_secret_to_the_first_link():
    """The relay's accepting HELLO with a session is the hello-relay-session vector; the agent reads its secret."""
    relay = MuxConnection(Role.RELAY)
    relay.receive_data(VECTOR["hello-agent-links"]["bytes"])
    relay.send_hello({"session": SESSION, "join_secret": SECRET})
    data = b"".join(relay.outgoing())
    assert data == VECTOR["hello-relay-session"]["bytes"]
    agent = MuxConnection(Role.AGENT)
    agent.send_hello(control.hello_fields("s3cret", links=2))
    agent.outgoing()
    [hello] = agent.receive_data(data)
    assert control.joined_secret(hello.info) == SECRET


def test_links_and_malformed_joins_are_read_safely():
    """`links` is 1..16 (1 if absent or not an integer); a malformed join is a join that fails, never a new session."""
    assert control.parse_hello_links({}) == 1
    assert control.parse_hello_links({"links": 4}) == 4
    assert control.parse_hello_links({"links": 999}) == control.MAX_LINKS_PER_SESSION
    for bad in (0, -1, "2", 2.0, True, None):
        assert control.parse_hello_links({"links": bad}) == 1, bad
    assert control.parse_join({"token": "x"}) is None
    for bad in ("s", 7, [], {"session": 1, "secret": "x"}, {"session": "a" * 33, "secret": "x"}, {"session": "a"}):
        join = control.parse_join({"join": bad})
        assert join is not None and join.secret == "" or join.session == "", bad
    assert SECRET not in repr(control.Join(SESSION, SECRET))  # never in a log line by accident
    assert control.joined_secret({"join_secret": 5}) is None and control.joined_secret({}) is None
