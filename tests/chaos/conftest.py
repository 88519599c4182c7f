"""One rig (relay, echo service, well-behaved agent) for the chaos module;
CHAOS_SCALE multiplies every scenario's counts (1 in the normal run)."""

import os

import pytest

from tests.chaos.scenarios import Rig

SCALE = float(os.environ.get("CHAOS_SCALE", "1"))


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    r = Rig(tmp_path_factory.mktemp("chaos"))
    yield r
    r.close()


@pytest.fixture
def scale():
    return SCALE
