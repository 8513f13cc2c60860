"""Endpoint choice of the userspace proxy, checked without sockets (fake clock, seeded random)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from kproxy.backends.userspace.balancer import Balancer, Target, is_known_algorithm, parse_algorithm

A: Target = ("10.0.0.1", 80)
B: Target = ("10.0.0.2", 80)
C: Target = ("10.0.0.3", 80)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def picks(b: Balancer, n: int, client: str = "1.1.1.1") -> list[Target | None]:
    return [b.pick(client) for _ in range(n)]


@pytest.mark.parametrize(
    ("value", "expected", "known"),
    [
        ("", "round-robin", True),
        ("round-robin", "round-robin", True),
        ("Least-Connections", "least-connections", True),
        ("leastconn", "least-connections", True),
        ("random", "random", True),
        ("fastest", "round-robin", False),
    ],
    ids=["empty", "rr", "lc-case", "lc-haproxy-name", "random", "unknown-falls-back"],
)
def test_annotation_values(value: str, expected: str, known: bool) -> None:
    assert parse_algorithm(value) == expected
    assert is_known_algorithm(value) is known


def test_round_robin_cycles_over_a_shuffled_order() -> None:
    b = Balancer([A, B, C], rng=random.Random(7))
    order = b.targets
    assert sorted(order) == [A, B, C]
    assert picks(b, 7) == [*order, *order, order[0]]


def test_round_robin_order_differs_between_balancers() -> None:
    orders = {Balancer([A, B, C], rng=random.Random(seed)).targets for seed in range(20)}
    assert len(orders) > 1


def test_update_keeps_order_of_remaining_endpoints() -> None:
    b = Balancer([A, B, C], rng=random.Random(1))
    before = b.targets
    b.update([C, B])
    assert b.targets == tuple(t for t in before if t != A)
    b.update([C, B, A])
    assert b.targets[:2] == tuple(t for t in before if t != A)
    assert b.targets[2] == A


def test_empty_and_exclude() -> None:
    b = Balancer([], rng=random.Random(1))
    assert b.pick("c") is None
    b.update([A, B])
    assert b.pick("c", exclude=[A, B]) is None
    assert {b.pick("c", exclude=[A]) for _ in range(4)} == {B}


def test_affinity_holds_then_expires() -> None:
    clock = FakeClock()
    b = Balancer([A, B, C], affinity_timeout=10, clock=clock, rng=random.Random(3))
    first = b.pick("192.0.2.1")
    other = b.pick("192.0.2.2")
    assert first != other
    for _ in range(5):
        clock.now += 9
        assert b.pick("192.0.2.1") == first  # each use refreshes the timer
    clock.now += 10.5
    assert b.pick("192.0.2.1") != first  # expired: round robin moved on meanwhile


def test_affinity_survives_update_for_remaining_endpoint_only() -> None:
    b = Balancer([A, B], affinity_timeout=100, clock=FakeClock(), rng=random.Random(0))
    ca, cb = b.pick("c1"), b.pick("c2")
    assert {ca, cb} == {A, B}
    b.update([A, B, C])
    assert b.pick("c1") == ca and b.pick("c2") == cb
    b.update([t for t in (A, B, C) if t != ca])
    assert b.affinity_of("c1") is None
    assert b.pick("c1") != ca
    assert b.pick("c2") == cb


def test_failed_dial_drops_affinity() -> None:
    b = Balancer([A, B], affinity_timeout=100, clock=FakeClock(), rng=random.Random(0))
    first = b.pick("c")
    assert first is not None
    b.failed("c", first)
    second = b.pick("c", exclude=[first])
    assert second not in (None, first)
    assert b.pick("c") == second


def test_least_connections_prefers_idle_endpoints() -> None:
    b = Balancer([A, B, C], algorithm="least-connections", rng=random.Random(0))
    for _ in range(3):
        b.acquire(A)
    b.acquire(B)
    assert b.pick("c") == C
    b.acquire(C)
    b.acquire(C)
    assert b.pick("c") == B
    for _ in range(3):
        b.release(A)
    assert b.pick("c") == A


def test_least_connections_spreads_ties() -> None:
    b = Balancer([A, B, C], algorithm="least-connections", rng=random.Random(0))
    assert sorted(picks(b, 3)) == [A, B, C]  # type: ignore[type-var]


def test_removed_endpoint_keeps_count_until_released() -> None:
    b = Balancer([A, B], algorithm="least-connections", rng=random.Random(0))
    b.acquire(A)
    b.update([B])
    assert b.active(A) == 1
    b.release(A)
    assert b.active(A) == 0


def test_random_covers_every_endpoint() -> None:
    b = Balancer([A, B, C], algorithm="random", rng=random.Random(5))
    seen = Counter(picks(b, 300))
    assert set(seen) == {A, B, C}
    assert min(seen.values()) > 50


def test_configure_turns_affinity_off() -> None:
    b = Balancer([A, B], affinity_timeout=100, clock=FakeClock(), rng=random.Random(0))
    b.pick("c")
    b.configure(algorithm="round-robin", affinity_timeout=0)
    assert b.affinity_of("c") is None
    assert len(set(picks(b, 2, "c"))) == 2


def test_failed_endpoint_cools_down_while_others_remain() -> None:
    clock = FakeClock()
    b = Balancer([A, B, C], cooldown=2.0, clock=clock, rng=random.Random(0))
    b.failed("c", A)
    assert A not in picks(b, 6)
    clock.now += 2.5
    assert A in picks(b, 3)


def test_cooldown_never_leaves_nothing_to_try() -> None:
    clock = FakeClock()
    b = Balancer([A, B], cooldown=2.0, clock=clock, rng=random.Random(0))
    b.failed("c", A)
    b.failed("c", B)
    assert set(picks(b, 2)) == {A, B}
