"""The bounded-frequency runner: bursts coalesce, failures retry, idle still syncs."""

from __future__ import annotations

import asyncio

from kproxy.infra.runner import BoundedFrequencyRunner


def test_a_burst_of_requests_costs_one_run_per_interval() -> None:
    async def scenario() -> int:
        runs = 0

        async def fn() -> bool:
            nonlocal runs
            runs += 1
            return True

        r = BoundedFrequencyRunner(fn, min_interval=0.2, max_interval=60)
        task = asyncio.create_task(r.loop())
        for _ in range(200):
            r.request()
            await asyncio.sleep(0)
        await asyncio.sleep(0.05)
        r.stop()
        await task
        return runs

    assert asyncio.run(scenario()) == 1


def test_idle_runner_still_runs_at_the_max_interval() -> None:
    async def scenario() -> int:
        calls = 0

        async def fn() -> bool:
            nonlocal calls
            calls += 1
            return True

        r = BoundedFrequencyRunner(fn, min_interval=0.0, max_interval=0.05)
        task = asyncio.create_task(r.loop())
        while calls < 3:
            await asyncio.sleep(0.01)
        r.stop()
        await task
        return calls

    assert asyncio.run(asyncio.wait_for(scenario(), 10)) >= 3


def test_a_failed_run_is_retried_without_a_new_request() -> None:
    async def scenario() -> list[bool]:
        results = [False, False, True]
        seen: list[bool] = []

        async def fn() -> bool:
            ok = results[len(seen)] if len(seen) < len(results) else True
            seen.append(ok)
            return ok

        r = BoundedFrequencyRunner(fn, min_interval=0.01, max_interval=60)
        task = asyncio.create_task(r.loop())
        r.request()
        while len(seen) < 3:
            await asyncio.sleep(0.01)
        r.stop()
        await task
        return seen

    assert asyncio.run(asyncio.wait_for(scenario(), 10))[:3] == [False, False, True]


def test_retries_back_off_from_the_minimum_to_the_maximum_interval() -> None:
    async def fn() -> bool:
        return True

    r = BoundedFrequencyRunner(fn, min_interval=1.0, max_interval=30.0)
    assert [r.retry_delay(n) for n in (1, 2, 3, 4, 5, 6, 50)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
