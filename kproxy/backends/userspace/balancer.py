"""Endpoint choice for one service port of the userspace proxy.

Kept free of sockets and of the event loop so every rule (round robin order,
affinity lifetime, least connections, what survives an endpoint update) can be
checked with a fake clock and a seeded random source. The forwarders call `pick`
per new connection (or UDP client), `acquire`/`release` around a connection's life
for least-connections, and `failed` when a dial fails so affinity does not pin a
client to a dead backend.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Final, Literal

ANNOTATION: Final = "kproxy.io/lb-algorithm"
"""Service annotation choosing the userspace algorithm; the parser copies it to `ServicePort.lb_algorithm`."""

Algorithm = Literal["round-robin", "least-connections", "random"]
ALGORITHMS: Final[tuple[Algorithm, ...]] = ("round-robin", "least-connections", "random")
Target = tuple[str, int]
"""(ip, port) of one endpoint: hashable, and exactly what `connect` wants."""

_SWEEP_EVERY: Final = 1024


def parse_algorithm(value: str) -> Algorithm:
    """Map an annotation value to an algorithm; unknown values fall back to round robin
    (a typo in an annotation must not take a service down) and the caller logs it."""
    v = value.strip().lower().replace("_", "-")
    if v in ("", "rr", "roundrobin"):
        return "round-robin"
    if v in ("leastconn", "least-conn", "leastconnections"):
        return "least-connections"
    for a in ALGORITHMS:
        if v == a:
            return a
    return "round-robin"


def is_known_algorithm(value: str) -> bool:
    v = value.strip().lower().replace("_", "-")
    return v in ("", "rr", "roundrobin", "leastconn", "least-conn", "leastconnections", *ALGORITHMS)


@dataclass(slots=True)
class _Sticky:
    target: Target
    last_used: float


class Balancer:
    """State of one service port: the endpoint order, active connection counts and the
    ClientIP affinity table. Not thread safe; lives on the event loop."""

    __slots__ = (
        "_active",
        "_affinity",
        "_algorithm",
        "_clock",
        "_down",
        "_index",
        "_picks",
        "_rng",
        "_targets",
        "affinity_timeout",
        "cooldown",
    )

    def __init__(
        self,
        targets: Iterable[Target] = (),
        *,
        algorithm: Algorithm = "round-robin",
        affinity_timeout: float = 0.0,
        cooldown: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._algorithm: Algorithm = algorithm
        self.affinity_timeout = affinity_timeout
        self._targets: list[Target] = []
        self._index = 0
        self._active: dict[Target, int] = {}
        self._affinity: dict[str, _Sticky] = {}
        self._picks = 0
        self.cooldown = cooldown
        """Seconds an endpoint whose dial failed is passed over, while others remain."""
        self._down: dict[Target, float] = {}
        self.update(targets)

    @property
    def algorithm(self) -> Algorithm:
        return self._algorithm

    @property
    def targets(self) -> tuple[Target, ...]:
        """The current endpoints in the order round robin walks them."""
        return tuple(self._targets)

    def configure(self, *, algorithm: Algorithm, affinity_timeout: float) -> None:
        self._algorithm = algorithm
        if affinity_timeout <= 0:
            self._affinity.clear()
        self.affinity_timeout = affinity_timeout

    def update(self, targets: Iterable[Target]) -> None:
        """Replace the endpoint set. Endpoints that remain keep their place in the order,
        their connection counts and their clients; new ones are shuffled in at the end, as
        the old userspace proxier shuffled its list so that nodes do not all start on the
        same backend."""
        new = list(dict.fromkeys(targets))
        keep = set(new)
        kept = [t for t in self._targets if t in keep]
        have = set(kept)
        added = [t for t in new if t not in have]
        self._rng.shuffle(added)
        old_len = len(self._targets)
        self._targets = kept + added
        if len(kept) != old_len or added:
            self._index = self._index % len(self._targets) if self._targets else 0
        if len(kept) != old_len:
            self._affinity = {c: s for c, s in self._affinity.items() if s.target in keep}
            self._down = {t: u for t, u in self._down.items() if t in keep}
        # counts of removed targets stay until their connections release: they drain.

    def pick(self, client_ip: str, exclude: Collection[Target] = ()) -> Target | None:
        """The endpoint for a new connection from `client_ip`, skipping `exclude` (endpoints
        that already failed for this connection). None when nothing is left."""
        targets = self._targets
        if not targets:
            return None
        if self.affinity_timeout > 0:
            now = self._clock()
            sticky = self._affinity.get(client_ip)
            if sticky is not None:
                if now - sticky.last_used <= self.affinity_timeout and sticky.target not in exclude:
                    sticky.last_used = now
                    return sticky.target
                del self._affinity[client_ip]
            target = self._choose(targets, exclude)
            if target is not None:
                self._affinity[client_ip] = _Sticky(target, now)
                self._picks += 1
                if self._picks % _SWEEP_EVERY == 0:
                    self._sweep(now)
            return target
        return self._choose(targets, exclude)

    def failed(self, client_ip: str, target: Target) -> None:
        """A dial to `target` failed: forget the client's affinity to it, and pass it over
        for `cooldown` seconds so other clients do not each pay a dial timeout for it."""
        sticky = self._affinity.get(client_ip)
        if sticky is not None and sticky.target == target:
            del self._affinity[client_ip]
        if self.cooldown > 0 and target in self._targets:
            self._down[target] = self._clock() + self.cooldown

    def acquire(self, target: Target) -> None:
        self._active[target] = self._active.get(target, 0) + 1

    def release(self, target: Target) -> None:
        n = self._active.get(target, 0) - 1
        if n > 0:
            self._active[target] = n
        else:
            self._active.pop(target, None)

    def active(self, target: Target) -> int:
        return self._active.get(target, 0)

    def affinity_of(self, client_ip: str) -> Target | None:
        sticky = self._affinity.get(client_ip)
        return sticky.target if sticky is not None else None

    def _choose(self, targets: list[Target], exclude: Collection[Target]) -> Target | None:
        if self._down:
            exclude = self._with_down(targets, exclude)
        return self._choose_from(targets, exclude)

    def _with_down(self, targets: list[Target], exclude: Collection[Target]) -> Collection[Target]:
        """Add cooling-down endpoints to `exclude`, unless that would leave nothing to try."""
        now = self._clock()
        down = {t for t, until in self._down.items() if until > now}
        if len(down) != len(self._down):
            self._down = {t: u for t, u in self._down.items() if t in down}
        if not down:
            return exclude
        merged = down.union(exclude)
        if all(t in merged for t in targets):
            return exclude
        return merged

    def _choose_from(self, targets: list[Target], exclude: Collection[Target]) -> Target | None:
        algorithm = self._algorithm
        n = len(targets)
        if algorithm == "random":
            if not exclude:
                return targets[self._rng.randrange(n)]
            left = [t for t in targets if t not in exclude]
            return left[self._rng.randrange(len(left))] if left else None
        if algorithm == "least-connections":
            return self._least(targets, exclude)
        for _ in range(n):
            i = self._index % n
            self._index = i + 1
            t = targets[i]
            if t not in exclude:
                return t
        return None

    def _least(self, targets: list[Target], exclude: Collection[Target]) -> Target | None:
        # Ties go round robin from the cursor, so an idle service still spreads its load.
        n = len(targets)
        start = self._index % n
        best: Target | None = None
        best_i = 0
        best_n = 0
        active = self._active
        for k in range(n):
            i = (start + k) % n
            t = targets[i]
            if t in exclude:
                continue
            c = active.get(t, 0)
            if best is None or c < best_n:
                best, best_i, best_n = t, i, c
                if c == 0:
                    break
        if best is not None:
            self._index = best_i + 1
        return best

    def _sweep(self, now: float) -> None:
        ttl = self.affinity_timeout
        self._affinity = {c: s for c, s in self._affinity.items() if now - s.last_used <= ttl}
