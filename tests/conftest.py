"""Shared test plumbing.

Privileged tests need root, `ip netns` and iptables. Without them they skip with the
reason; when KPROXY_REQUIRE_PRIVILEGED=1 (set by .ci/run) a missing prerequisite is a
failure instead, so CI can never go green by skipping the kernel tests.
"""

from __future__ import annotations

import pytest

from tests.support.privileges import REQUIRED, privileged_missing


@pytest.fixture(autouse=True)
def _privileged_gate(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("privileged") is None:
        return
    reason = privileged_missing()
    if reason is None:
        return
    if REQUIRED:
        pytest.fail(f"KPROXY_REQUIRE_PRIVILEGED=1 but this test {reason}")
    pytest.skip(reason)
