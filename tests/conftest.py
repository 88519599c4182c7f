"""Settings for the whole suite."""

import signal


def pytest_configure(config):
    # A shell script's background job starts with SIGINT ignored, and an
    # ignored signal stays ignored across exec: every relay, agent and
    # example the tests start would then ignore the Ctrl-C they are sent
    # (Twisted keeps an inherited SIG_IGN on purpose). With a handler here,
    # each child process starts with the default disposition instead.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
