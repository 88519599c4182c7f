"""The control protocol (relay/mux/control.py): the spec's byte examples, the
validation of every request, and the one error family both ends raise."""

import ipaddress
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.mux import MuxProtocolError
from relay.mux import control as c
from relay.mux import events as ev
from client.config import ServiceSpec, TunnelSpec
from tests.mux.helpers import LinkPair
from tests.mux.test_frames import VECTORS

VECTOR = {v["name"]: v for v in VECTORS}


@pytest.mark.parametrize(
    "name, message",
    [
        ("control-open-tunnel", c.open_tunnel_request(1, {"name": "22", "services": [{"name": "", "kind": "tcp"}]})),
        (
            "control-opened",
            c.opened_reply(
                1,
                {"id": "t1", "endpoints": [
                    {"service": "", "kind": "tcp", "url": "tcp://localhost:24817", "tcp_socket": ["localhost", 24817]}
                ]},
                reclaimed=False,
                reclaim_secret="r1",
            ),
        ),
        ("control-refused", c.error_reply(1, c.NoPortsAvailableError(None, "no free port"))),
        (
            "control-open-named",
            c.open_tunnel_request(3, TunnelSpec(
                [ServiceSpec("localhost", 8000, kind="tls")], stable_name="web",
            ).wire()),
        ),
        ("control-name-taken", c.error_reply(3, c.NameTakenError(None, "the name 'web' belongs to another tenant"))),
        ("control-close-tunnel", c.close_tunnel_request(2, "t1")),
        ("control-closed", c.ok_reply(2)),
    ],
)
def test_control_module_builds_the_spec_vectors(name, message):
    """Each control byte example in docs/protocol.md is exactly what the control module sends."""
    pair = LinkPair()
    pair.agent.send_control(message)
    assert b"".join(pair.agent.outgoing()) == VECTOR[name]["bytes"]


def test_relay_reads_the_open_tunnel_vector():
    """The spec's open_tunnel bytes decode into the request the relay validates."""
    pair = LinkPair()
    [event] = pair.relay.receive_data(VECTOR["control-open-tunnel"]["bytes"])
    assert isinstance(event, ev.ControlReceived)
    request = c.parse_request(event.message)
    assert request == c.OpenTunnel(1, (c.ServiceRequest("", "tcp", None, ()),), name="22")


def test_relay_reads_the_named_vector_and_the_agent_its_refusal():
    """The stable-name bytes decode into a request with that name; the refusal into NameTakenError (exit 9)."""
    pair = LinkPair()
    [event] = pair.relay.receive_data(VECTOR["control-open-named"]["bytes"])
    request = c.parse_request(event.message)
    assert request.stable_name == "web" and request.name == "8000"
    [event] = pair.agent.receive_data(VECTOR["control-name-taken"]["bytes"])
    reply = c.parse_reply(event.message)
    assert isinstance(reply.error, c.NameTakenError) and reply.error.exit_code == 9


@pytest.mark.parametrize("name", ["Web", "-web", "web-", "a--b", "a" * 33, "", "w.b", "wéb", None, 7, ["web"]])
def test_a_bad_stable_name_is_bad_name(name):
    """stable_name is one lowercase DNS label of 1-32 characters without "--"; anything else is bad_name (exit 2)."""
    with pytest.raises(c.BadNameError) as caught:
        c.parse_request({"id": 1, "op": "open_tunnel", "stable_name": name})
    assert caught.value.code is c.RequestErrorCode.BAD_NAME and caught.value.exit_code == 2


def test_agent_reads_the_reply_vectors():
    """The spec's replies decode into a grant, a typed refusal and a plain ok."""
    pair = LinkPair()
    events = pair.agent.receive_data(
        VECTOR["control-opened"]["bytes"] + VECTOR["control-refused"]["bytes"] + VECTOR["control-closed"]["bytes"]
    )
    opened, refused, closed = (c.parse_reply(e.message) for e in events)
    assert opened.ok and c.granted_tunnel(opened) == (
        "t1", [{"service": "", "kind": "tcp", "url": "tcp://localhost:24817", "tcp_socket": ["localhost", 24817]}], "r1"
    )
    assert not refused.ok and isinstance(refused.error, c.NoPortsAvailableError)
    assert refused.error.code is c.RequestErrorCode.NO_FREE_PORT and str(refused.error) == "no free port"
    assert closed == c.Reply(2, True, {"id": 2, "ok": True})


def test_every_error_code_round_trips_to_its_class():
    """An error reply names its code; the agent raises the same class the relay raised."""
    for code in c.RequestErrorCode:
        error = c.request_error(code, "why")
        reply = c.parse_reply(c.error_reply(7, error))
        assert type(reply.error) is type(error) and reply.error.code is code
    assert c.request_error(c.RequestErrorCode.NO_FREE_PORT, "x").exit_code == 6
    assert c.request_error(c.RequestErrorCode.BAD_SERVICE_NAME, "x").exit_code == 2
    assert isinstance(c.request_error("bad_service_name", "x"), c.ConfigurationError)


def test_unknown_error_code_from_a_newer_relay_is_kept_as_text():
    """A code this side does not know becomes a plain TunnelRequestError carrying it."""
    reply = c.parse_reply({"id": 1, "ok": False, "error": {"code": "quota_exceeded", "message": "m"}})
    assert type(reply.error) is c.TunnelRequestError and reply.error.code == "quota_exceeded"


@pytest.mark.parametrize("bad_id", [None, "1", 1.0, True, -1, 2**60, [1]])
def test_envelope_without_an_integer_id_is_a_protocol_error(bad_id):
    """No usable id: nobody to answer, so the link closes (a MuxProtocolError)."""
    with pytest.raises(MuxProtocolError):
        c.parse_request({"id": bad_id, "op": "open_tunnel"})
    with pytest.raises(MuxProtocolError):
        c.parse_reply({"id": bad_id, "ok": True})


@pytest.mark.parametrize(
    "request_fields, error_class, code",
    [
        ({"op": "nope"}, c.TunnelRequestError, "bad_request"),
        ({"services": []}, c.TunnelRequestError, "bad_request"),
        ({"services": [{"kind": "tcp"}] * 33}, c.TunnelRequestError, "bad_request"),
        ({"services": ["tcp"]}, c.TunnelRequestError, "bad_request"),
        ({"services": [{"name": "Web"}]}, c.BadServiceNameError, "bad_service_name"),
        ({"services": [{"name": "a"}, {"name": "a"}]}, c.BadServiceNameError, "bad_service_name"),
        ({"services": [{"name": "a"}, {"name": ""}]}, c.BadServiceNameError, "bad_service_name"),
        ({"services": [{"name": "\udc80"}]}, c.BadServiceNameError, "bad_service_name"),
        ({"kind": "udp"}, c.TunnelRequestError, "unsupported_kind"),
        ({"services": [{"kind": "tls", "mode": "mirror"}]}, c.TunnelRequestError, "bad_request"),
        ({"services": [{"kind": "tls", "alpn": ["h2"] * 9}]}, c.TunnelRequestError, "bad_alpn"),
        ({"services": [{"kind": "tls", "alpn": ["\u00e9"]}]}, c.TunnelRequestError, "bad_alpn"),
        ({"services": [{"kind": "tls", "alpn": "h2"}]}, c.TunnelRequestError, "bad_alpn"),
        ({"allow": ["not-a-cidr"]}, c.TunnelRequestError, "bad_allow"),
        ({"allow": [10]}, c.TunnelRequestError, "bad_allow"),
        ({"allow": ["10.0.0.0/8"] * 65}, c.TunnelRequestError, "bad_allow"),
        ({"client_ca": "not pem"}, c.TunnelRequestError, "bad_client_ca"),
        ({"client_ca": "x" * (64 * 1024 + 1)}, c.TunnelRequestError, "bad_client_ca"),
        ({"client_ca": "\udc80"}, c.TunnelRequestError, "bad_client_ca"),
        ({"op": "close_tunnel", "tunnel": 5}, c.UnknownTunnelError, "unknown_tunnel"),
    ],
)
def test_bad_requests_get_their_typed_error(request_fields, error_class, code):
    """Every malformed request raises the typed error whose code goes back to the agent."""
    message = {"id": 3, "op": "open_tunnel", **request_fields}
    with pytest.raises(error_class) as caught:
        c.parse_request(message)
    assert caught.value.code == c.RequestErrorCode(code)
    reply = c.error_reply(3, caught.value)
    json.dumps(reply).encode("utf-8")  # always encodable, whatever the peer sent


def test_open_tunnel_defaults_and_parsed_fields():
    """The short form is one unnamed TCP service; allow becomes networks; reclaim a pair."""
    request = c.parse_request({
        "id": 9, "op": "open_tunnel", "name": "n",
        "services": [{"name": "web", "kind": "tls"}, {"name": "ssh"}],
        "allow": ["10.0.0.0/8", "::1"],
        "reclaim": {"tunnel": "t", "secret": "s"},
    })
    assert request.services == (
        c.ServiceRequest("web", "tls", "terminate", ("http/1.1",)),
        c.ServiceRequest("ssh", "tcp", None, ()),
    )
    assert request.allow == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert request.reclaim == ("t", "s")
    malformed = c.parse_request({"id": 9, "op": "open_tunnel", "reclaim": {"tunnel": 1, "secret": "s"}})
    assert malformed.reclaim is None  # a fresh tunnel, not an error


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["id", "op", "services", "kind", "name", "allow", "client_ca", "reclaim", "tunnel"]),
        json_values,
    )
)
def test_any_json_request_is_a_value_or_a_typed_error(message):
    """Whatever JSON a peer sends, validation returns a request or raises one of our typed errors."""
    try:
        c.parse_request(message)
    except (c.TunnelRequestError, MuxProtocolError) as e:
        json.dumps(str(e)).encode("utf-8")


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["id", "ok", "error", "tunnel", "reclaim_secret"]), json_values))
def test_any_json_reply_is_a_value_or_a_typed_error(message):
    """Whatever JSON a relay sends back, the agent gets a Reply or a protocol error."""
    try:
        reply = c.parse_reply(message)
        if reply.ok:
            c.granted_tunnel(reply)
    except MuxProtocolError:
        pass


@pytest.mark.parametrize(
    "payload",
    [b'{"peer":["1.2.3.4",Infinity]}', b'{"x":NaN}', b'{"x":-Infinity}', b'{"n":' + b"9" * 5000 + b"}",
     b"[" * 20000 + b"]" * 20000, b'{"token":"\\udc80"', b"\xff\xfe"],
)
def test_hostile_json_is_a_protocol_error_not_an_exception(payload):
    """Non-standard constants, huge numbers, deep nesting and bad UTF-8 in any JSON frame are a MuxProtocolError."""
    from relay.mux import frames as fr

    with pytest.raises(MuxProtocolError):
        fr.decode_json(payload)
