"""The suite's own setup (tests/conftest.py)."""

import os
import subprocess
import sys

CHILD = "import signal; print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)"
PARENT = f"""
import signal, subprocess, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a shell's background job starts
{{configure}}
print(subprocess.run([sys.executable, "-c", {CHILD!r}], capture_output=True, text=True).stdout.strip())
"""


def test_children_of_a_run_started_with_sigint_ignored_get_the_default():
    """Started with SIGINT ignored, the suite still gives the processes it starts a SIGINT that works."""
    without = PARENT.format(configure="")
    with_conftest = PARENT.format(configure="import tests.conftest as c; c.pytest_configure(None)")
    run = lambda code: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert run(without).stdout.strip() == "True"  # what the children inherited before
    assert run(with_conftest).stdout.strip() == "False"


def test_test_relays_tunnel_ports_stay_clear_of_a_development_relay():
    """Tunnel port blocks of test relays never overlap a dev relay's 20000-29999 (its tunnels take
    ports there at any time) nor the ephemeral range, and their fixed ports are the kernel's picks."""
    from scripts.bench.processes import free_port, free_port_range

    for count in (1, 20, 200, 400):
        for _ in range(20):
            low, high = free_port_range(count)
            assert high - low + 1 == count
            assert 29999 < low and high < 32768, (low, high)
    assert free_port() not in (17000, 17443, 17080)


def test_the_suite_ignores_a_sourced_client_env():
    """TUNNEL_RELAY/TOKEN/CA exported by `. relay-state/client.env` are gone once the suite is configured."""
    code = (
        "import os, tests.conftest as c; c.pytest_configure(None); "
        "print([k for k in ('TUNNEL_RELAY', 'TUNNEL_TOKEN', 'TUNNEL_CA') if k in os.environ])"
    )
    env = dict(os.environ, TUNNEL_RELAY="localhost:17000", TUNNEL_TOKEN="t", TUNNEL_CA="/x")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, env=env)
    assert out.stdout.strip() == "[]", out.stderr
