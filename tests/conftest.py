"""Every test runs in both backward modes: the default one (backward fills
``p.grad``) and ``one_backward=True`` (backward computes only what the rules
need). The mode is the default of ``per_sample_grads``'s keyword, so a test
that passes ``one_backward=`` itself keeps its own choice. A test about what
only one mode does is marked ``@pytest.mark.backward_mode("default")`` (or
``"one"``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gradhooks import per_sample_grads


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "backward_mode(mode): run only in 'default' or 'one' (one_backward=True)")


@pytest.fixture(autouse=True, params=["default", "one"], ids=["bw", "1bw"])
def backward_mode(request: pytest.FixtureRequest) -> Iterator[str]:
    marker = request.node.get_closest_marker("backward_mode")
    if marker is not None and marker.args[0] != request.param:
        pytest.skip(f"a test of the {marker.args[0]!r} backward mode")
    defaults = per_sample_grads.__kwdefaults__
    saved = defaults["one_backward"]
    defaults["one_backward"] = request.param == "one"
    try:
        yield request.param
    finally:
        defaults["one_backward"] = saved
