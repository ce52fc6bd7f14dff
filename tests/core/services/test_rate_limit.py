"""The per-key rate limit's buckets: in memory (one API process) and in Redis (shared by all)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from core.services.api_keys.rate_limit import MemoryRateLimiter, RedisRateLimiter, make_rate_limiter
from core.services.errors import RateLimited


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _admitted(limiter, key: str, tries: int) -> int:  # noqa: ANN001
    admitted = 0
    for _ in range(tries):
        try:
            await limiter.take(key)
        except RateLimited:
            continue
        admitted += 1
    return admitted


def test_memory_buckets_allow_the_burst_then_the_rate() -> None:
    clock = Clock()
    limiter = MemoryRateLimiter(rate_per_s=2.0, burst=5, clock=clock)

    assert asyncio.run(_admitted(limiter, "k", 8)) == 5
    with pytest.raises(RateLimited) as refused:
        asyncio.run(limiter.take("k"))
    assert refused.value.retry_after_s == 1
    clock.now += 1.0  # two tokens back
    assert asyncio.run(_admitted(limiter, "k", 3)) == 2
    assert asyncio.run(_admitted(limiter, "another key", 3)) == 3


def test_redis_buckets_hold_the_limit_across_processes(redis_url: str) -> None:
    # Two limiters stand for two API processes; together they never let a key exceed its burst.
    async def run() -> tuple[int, int]:
        first = RedisRateLimiter(redis_url, rate_per_s=0.001, burst=50)
        second = RedisRateLimiter(redis_url, rate_per_s=0.001, burst=50)
        key = uuid.uuid4().hex
        try:
            a = b = 0
            for _ in range(40):
                a += await _admitted(first, key, 1)
                b += await _admitted(second, key, 1)
            return a, b
        finally:
            await first.close()
            await second.close()

    a, b = asyncio.run(run())

    assert a + b == 50 and a >= 20 and b >= 20


def test_redis_refusal_says_when_a_token_is_back(redis_url: str) -> None:
    async def run() -> RateLimited:
        limiter = RedisRateLimiter(redis_url, rate_per_s=0.25, burst=2)
        key = uuid.uuid4().hex
        try:
            await limiter.take(key)
            await limiter.take(key)
            with pytest.raises(RateLimited) as refused:
                await limiter.take(key)
            return refused.value
        finally:
            await limiter.close()

    refused = asyncio.run(run())

    assert 3 <= refused.retry_after_s <= 4  # 1 token at 0.25/s
    assert "0.25 requests per second, bursts of 2" in str(refused)


def test_tokens_a_process_did_not_spend_go_back_to_the_bucket(redis_url: str) -> None:
    async def run() -> int:
        key = uuid.uuid4().hex
        holder = RedisRateLimiter(redis_url, rate_per_s=0.001, burst=20, lease_s=0.2)
        other = RedisRateLimiter(redis_url, rate_per_s=0.001, burst=20)
        try:
            await holder.take(key)  # leases 2 tokens (a tenth of the burst), spends 1
            assert await _admitted(other, key, 30) == 18
            await asyncio.sleep(0.3)
            await holder.take(key)  # its lease ended: the unspent token goes back, and is taken again
            return await _admitted(other, key, 5)
        finally:
            await holder.close()
            await other.close()

    assert asyncio.run(run()) == 0  # 20 in all: 1 + 18 + 1


def test_an_unreachable_redis_lets_requests_through_asking_it_once_per_lease() -> None:
    now = [0.0]

    async def run() -> tuple[int, int]:
        limiter = RedisRateLimiter("redis://127.0.0.1:1/0", rate_per_s=1.0, burst=1, lease_s=1.0, clock=lambda: now[0])
        script, tries = limiter._script, 0

        async def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            nonlocal tries
            tries += 1
            return await script(*args, **kwargs)

        limiter._script = counted
        try:
            admitted = await _admitted(limiter, "k", 10)
            now[0] += 1.5  # the lease has ended: Redis is asked again, once
            admitted += await _admitted(limiter, "k", 10)
            return admitted, tries
        finally:
            await limiter.close()

    admitted, tries = asyncio.run(run())

    assert admitted == 20 and tries == 2  # failed open, one refused connection per lease, not per request


def test_auto_picks_redis_for_a_redis_broker_and_memory_otherwise(redis_url: str) -> None:
    assert isinstance(make_rate_limiter("auto", 20, 200, redis_url), RedisRateLimiter)
    assert isinstance(make_rate_limiter("auto", 20, 200, "sqla+sqlite:///x.db"), MemoryRateLimiter)
    assert isinstance(make_rate_limiter("memory", 20, 200, redis_url), MemoryRateLimiter)
    with pytest.raises(ValueError, match="needs a redis:// broker URL"):
        make_rate_limiter("redis", 20, 200, "sqla+sqlite:///x.db")


def test_a_redis_backend_without_a_redis_broker_is_refused_without_the_url() -> None:
    with pytest.raises(ValueError, match="needs a redis:// broker URL, not amqp://...$") as refused:
        make_rate_limiter("redis", 1.0, 5, "amqp://uisps:s3cret@rabbit:5672//")

    assert "s3cret" not in str(refused.value)  # the error is logged; the URL carries the password
