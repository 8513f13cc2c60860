"""A bounded-frequency runner, as kube-proxy paces its syncs.

Bursts of changes coalesce into one run; runs are at least `min_interval` apart (so a
storm of endpoint updates costs one sync a second, not thousands) and at most
`max_interval` apart (so drift, such as someone flushing the tables, is repaired
even when nothing changes). Event-driven: no polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable


class BoundedFrequencyRunner:
    def __init__(
        self,
        fn: Callable[[], Awaitable[bool]],
        min_interval: float,
        max_interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if min_interval < 0 or max_interval <= 0:
            raise ValueError("intervals must be positive")
        self._fn = fn
        self.min_interval = min_interval
        self.max_interval = max_interval
        self._clock = clock
        self._wake = asyncio.Event()
        self._last_run: float | None = None
        self._stopped = False
        self._failures = 0
        self._retry: asyncio.TimerHandle | None = None
        self.runs = 0

    def request(self) -> None:
        """Ask for a run as soon as the minimum interval allows."""
        self._wake.set()

    def stop(self) -> None:
        self._stopped = True
        if self._retry is not None:
            self._retry.cancel()
        self._wake.set()

    async def loop(self) -> None:
        while not self._stopped:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._until_forced())
            if self._stopped:
                return
            if self._last_run is not None:
                wait = self._last_run + self.min_interval - self._clock()
                if wait > 0:
                    await asyncio.sleep(wait)
                    if self._stopped:
                        return
            self._wake.clear()
            self._last_run = self._clock()
            self.runs += 1
            ok = await self._fn()
            if self._retry is not None:
                self._retry.cancel()
                self._retry = None
            if ok:
                self._failures = 0
            else:
                # Retried without waiting for a change, backing off from the minimum interval
                # up to the maximum (kube-proxy waits a whole sync period at once).
                self._failures += 1
                delay = self.retry_delay(self._failures)
                self._retry = asyncio.get_running_loop().call_later(delay, self._wake.set)

    def retry_delay(self, failures: int) -> float:
        base = max(self.min_interval, 0.1)
        return float(min(self.max_interval, base * 2 ** min(failures - 1, 30)))

    def _until_forced(self) -> float:
        if self._last_run is None:
            return self.max_interval
        return max(0.0, self._last_run + self.max_interval - self._clock())
