"""--log-format json (relay/wire/jsonlog.py): one JSON object per event, and
no secret in any line or metric of a node's life (tests/relay/node_helpers.py)."""

import json

from prometheus_client import generate_latest
from twisted.internet.address import IPv4Address
from twisted.logger import LogLevel, Logger, capturedLogs
from twisted.python.failure import Failure

from relay.node.service import Options
from relay.wire.jsonlog import json_line
from relay.wire.prommetrics import PrometheusMetrics, metrics_registry
from tests.relay.node_helpers import TOKEN, Node


def test_a_line_has_time_level_namespace_message_and_simple_fields_only():
    """An event becomes one line of JSON with its formatted message and simple fields; objects and log_ keys stay out."""
    event = {"log_level": LogLevel.warn, "log_namespace": "relay.x", "log_time": 0.0,
             "log_format": "tunnel {tunnel} closed after {n} s", "tunnel": "abc", "n": 1.5,
             "obj": object(), "ratio": float("nan")}
    line = json_line(event)
    assert line.endswith("\n") and line.count("\n") == 1
    record = json.loads(line)
    assert record == {"time": "1970-01-01T00:00:00.000+00:00", "level": "warn", "namespace": "relay.x",
                      "message": "tunnel abc closed after 1.5 s", "tunnel": "abc", "n": 1.5, "ratio": "nan"}


def test_a_failure_is_a_traceback_field_on_the_same_line():
    """log.failure's traceback is a field, so the event stays one line."""
    try:
        1 / 0
    except ZeroDivisionError:
        failure = Failure()
    record = json.loads(json_line({"log_level": LogLevel.critical, "log_namespace": "n", "log_time": 1.0,
                                   "log_format": "boom", "log_failure": failure}))
    assert "ZeroDivisionError" in record["traceback"] and record["message"] == "boom"


def test_fields_named_like_secrets_are_left_out_whatever_they_hold():
    """A field called token, reclaim_secret or password never reaches the line, even if a log call passed one."""
    with capturedLogs() as events:
        Logger(namespace="t").info("login {who}", who="agent-1", token=TOKEN, reclaim_secret="s" * 32,
                                   admin_password="hunter2")
    [line] = [json_line(e) for e in events]
    assert TOKEN not in line and "s" * 32 not in line and "hunter2" not in line
    assert json.loads(line)["who"] == "agent-1"


def test_no_token_or_reclaim_secret_in_any_log_line_or_metric_of_a_node():
    """Through login, a bad token, a tunnel, a visitor and a lost link, no JSON log line and no metric holds a token or reclaim secret."""
    with capturedLogs() as events:
        node = Node(metrics=lambda n: PrometheusMetrics(
            "relay", tenant_of=lambda t: n.tunnels.tunnel_tenant(t), live_links=lambda: n.tunnels.links))
        node.agent(token="wrong-" + TOKEN)
        agent = node.agent()
        reply = agent.open()
        secret = reply.body["reclaim_secret"]
        node.listener(reply.body["tunnel"]["port"]).buildProtocol(IPv4Address("TCP", "203.0.113.7", 1))
        agent.lose()
    lines = [json_line(e) for e in events]
    assert lines
    page = generate_latest(metrics_registry(node.metrics, "tunnel_relay")).decode()
    for text in [*lines, page]:
        assert TOKEN not in text and secret not in text


def test_the_relay_takes_text_or_json_and_refuses_other_formats():
    """--log-format is text by default, json on request, and anything else a usage error."""
    import pytest
    from twisted.python import usage

    options = Options()
    options.parseOptions(["--log-format", "json"])
    assert options["log-format"] == "json"
    options = Options()
    options.parseOptions([])
    assert options["log-format"] == "text"
    with pytest.raises(usage.UsageError, match="log-format"):
        Options().parseOptions(["--log-format", "xml"])
