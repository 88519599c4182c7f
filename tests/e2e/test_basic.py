"""The README's tour, end to end: relay, agent, visitor."""

import json
import socket

from tests.e2e.harness import connect, recv_all


def test_forward_unencrypted_echo(relay, echo, agents):
    """A visitor's bytes reach the service and come back unchanged, with half-close."""
    agent = agents(relay, "forward", str(echo.port), "--unencrypted")
    host, port = agent.address()
    assert host == "localhost"
    low, high = relay.port_range
    assert low <= port <= high
    with connect(port) as s:
        s.sendall(b"hello tunnel\n")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s, 10) == b"hello tunnel\n"


def test_json_output_several_ports(relay, echo, agents):
    """--json prints one flushed JSON object per tunnel, with url and tcp_socket."""
    agent = agents(relay, "forward", str(echo.port), f"127.0.0.1:{echo.port}", "--unencrypted", "--json")
    first = json.loads(agent.next_line())
    second = json.loads(agent.next_line())
    for item in (first, second):
        host, port = item["tcp_socket"]
        assert item["url"] == f"tcp://{host}:{port}"
    assert first["tcp_socket"][1] != second["tcp_socket"][1]
    for item in (first, second):
        with connect(item["tcp_socket"][1]) as s:
            s.sendall(b"x" * 1000)
            s.shutdown(socket.SHUT_WR)
            assert recv_all(s, 10) == b"x" * 1000


def test_token_file(relay, echo, agents, tmp_path):
    """--token-file reads the token from a file (kept out of ps), instead of TUNNEL_TOKEN."""
    token_file = tmp_path / "token"
    token_file.write_text(relay.client_env()["TUNNEL_TOKEN"] + "\n")
    agent = agents(
        relay, "forward", str(echo.port), "--unencrypted", "--token-file", str(token_file),
        env={"TUNNEL_TOKEN": ""},
    )
    host, port = agent.address()
    with connect(port) as s:
        s.sendall(b"token from a file")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s, 10) == b"token from a file"
