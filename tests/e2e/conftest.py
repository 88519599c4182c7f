import pytest

from tests.e2e.harness import AgentProcess, EchoServer, RelayProcess


@pytest.fixture
def relay(tmp_path):
    r = RelayProcess(tmp_path / "relay").start()
    yield r
    r.stop()


@pytest.fixture
def echo():
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def agents():
    started = []

    def start(relay, *args, **kwargs):
        agent = AgentProcess(relay, *args, **kwargs)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()
