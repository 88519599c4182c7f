"""The suite's own setup (tests/conftest.py)."""

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
