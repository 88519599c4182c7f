import pytest

from tests.fleet.redis_server import REDIS_SERVER, RedisServer


@pytest.fixture
def redis_server(tmp_path):
    if REDIS_SERVER is None:
        pytest.fail("redis-server is missing: apt-get install -y redis-server (.ci/run installs it)")
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()
