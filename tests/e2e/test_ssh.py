"""A real OpenSSH session through an unencrypted tunnel."""

import subprocess

import pytest

from tests.e2e.harness import PrivateSSHD, openssh_tools

pytestmark = pytest.mark.skipif(
    not all(openssh_tools().values()),
    reason="openssh-client/openssh-server not installed (.ci/run installs them)",
)


def test_ssh_through_tunnel(relay, agents, tmp_path):
    """`ssh -p PORT relay-host` reaches the agent's sshd and runs a command, with a 1 MiB stdin round trip."""
    sshd = PrivateSSHD(tmp_path / "sshd")
    try:
        agent = agents(relay, "forward", str(sshd.port), "--unencrypted")
        host, port = agent.address()
        payload = bytes(range(256)) * 4096
        out = subprocess.run(
            sshd.ssh_args(port, host) + ["cat"], input=payload, capture_output=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout == payload
    finally:
        sshd.stop()
