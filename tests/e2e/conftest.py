import pytest

from harness import Backend


@pytest.fixture
def backend():
    b = Backend("b1")
    yield b
    b.stop()


@pytest.fixture
def backend2():
    b = Backend("b2")
    yield b
    b.stop()


@pytest.fixture
def gateways():
    started = []
    yield started
    for g in started:
        g.stop()
