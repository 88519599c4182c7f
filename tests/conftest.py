"""Settings for the whole suite."""

import os
import signal

# What `set -a; . relay-state/client.env; set +a` exports (README): a shell
# that did so for a development relay must not point the suite's agents and
# programs at that relay, its token or its CA.
AGENT_ENVIRONMENT = ("TUNNEL_RELAY", "TUNNEL_TOKEN", "TUNNEL_CA")


def pytest_configure(config):
    for key in AGENT_ENVIRONMENT:
        os.environ.pop(key, None)
    # A shell script's background job starts with SIGINT ignored, and an
    # ignored signal stays ignored across exec: every relay, agent and
    # example the tests start would then ignore the Ctrl-C they are sent
    # (Twisted keeps an inherited SIG_IGN on purpose). With a handler here,
    # each child process starts with the default disposition instead.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
