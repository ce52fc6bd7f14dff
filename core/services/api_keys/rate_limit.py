"""Rate limits: a token bucket of `rate_per_s` tokens a second, at most `burst`, per API key and
(a second limiter, with its own rate) per tenant, so that a tenant's many keys do not multiply
its share of the service.

Every authenticated request takes one token from its key's bucket and one from its tenant's; an
empty bucket is a 429 with `Retry-After` naming which. Two stores, picked by `make_rate_limiter`
from UISPS_RATE_LIMIT_BACKEND:

- `RedisRateLimiter`: one bucket per key shared by every API process, which lease its tokens a
  tenth of the burst at a time (see the class). The production choice: the broker's Redis is
  already there, and a key never gets more than its limit however many processes serve it.
- `MemoryRateLimiter`: one bucket per key in this process. Exact for a single API process (the
  embedded `uisps serve`); with N processes a key may get up to N times the rate.

The buckets used to live in the api_keys row, which made every request a write transaction
serialised on that row's lock; a rate limit does not need durability.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import Any, Protocol

from core.services.errors import RateLimited

logger = logging.getLogger(__name__)

BUCKET_PREFIX = "uisps:rate:"
TENANT_BUCKET_PREFIX = "uisps:rate-tenant:"
# A Redis outage lets requests through (a limit is protection, not correctness); it is logged at
# most this often.
REDIS_WARNING_INTERVAL_S = 60.0
REDIS_TIMEOUT_S = 1.0
# A Redis lease: up to this share of the burst, for at most this long.
LEASE_FRACTION = 0.1
LEASE_S = 1.0

# KEYS[1] the bucket; ARGV rate per second, burst, tokens handed back, tokens wanted. Redis's own
# clock, so every API process agrees. Returns {tokens granted, seconds until one is available}.
_LEASE_SCRIPT = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local bucket = redis.call('HMGET', KEYS[1], 'at', 'tokens')
local tokens = burst
if bucket[1] then
  tokens = math.min(burst, tonumber(bucket[2]) + math.max(0, now - tonumber(bucket[1])) * rate)
end
tokens = math.min(burst, tokens + tonumber(ARGV[3]))
local granted = math.min(tonumber(ARGV[4]), math.floor(tokens))
if granted < 0 then
  granted = 0
end
tokens = tokens - granted
redis.call('HSET', KEYS[1], 'at', tostring(now), 'tokens', tostring(tokens))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
local wait = 0
if granted == 0 then
  wait = (1 - tokens) / rate
end
return {granted, tostring(wait)}
"""


class RateLimiter(Protocol):
    async def take(self, key_id: str) -> None:
        """Take one token from `key_id`'s bucket; raise RateLimited when it is empty."""

    def give_back(self, key_id: str) -> None:
        """Return the token just taken (the request was refused by another limit after all)."""

    async def close(self) -> None: ...


def refusal(rate_per_s: float, burst: int, wait_s: float, scope: str = "API key") -> RateLimited:
    retry_after = max(1, math.ceil(wait_s))
    return RateLimited(
        f"rate limit of this {scope} exceeded ({rate_per_s:g} requests per second, bursts of {burst}); "
        f"retry in {retry_after} s",
        retry_after_s=retry_after,
    )


class Unlimited:
    """UISPS_RATE_LIMIT_PER_S=0: no limit."""

    async def take(self, key_id: str) -> None:
        return None

    def give_back(self, key_id: str) -> None:
        return None

    async def close(self) -> None:
        return None


class MemoryRateLimiter:
    """Buckets in this process. Called from the event loop only, so it needs no lock."""

    def __init__(
        self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic, *, scope: str = "API key"
    ) -> None:
        self.rate_per_s, self.burst, self.clock, self.scope = rate_per_s, burst, clock, scope
        self._buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens, at)

    async def take(self, key_id: str) -> None:
        now = self.clock()
        tokens, at = self._buckets.get(key_id, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + max(0.0, now - at) * self.rate_per_s)
        if tokens < 1.0:
            raise refusal(self.rate_per_s, self.burst, (1.0 - tokens) / self.rate_per_s, self.scope)
        self._buckets[key_id] = (tokens - 1.0, now)
        if len(self._buckets) > 100_000:  # keys come and go: forget the ones that are full again
            self._forget_full(now)

    def give_back(self, key_id: str) -> None:
        held = self._buckets.get(key_id)
        if held is not None:
            self._buckets[key_id] = (min(float(self.burst), held[0] + 1.0), held[1])

    def _forget_full(self, now: float) -> None:
        refill_s = self.burst / self.rate_per_s
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < refill_s}

    async def close(self) -> None:
        return None


class RedisRateLimiter:
    """Buckets in Redis (`uisps:rate:<key id>` hashes that expire once full again), leased.

    A process takes a key's tokens from Redis a lease at a time (up to a tenth of the burst) and
    spends them itself, so Redis sees one round trip per lease rather than per request. Tokens a
    lease still holds after `lease_s` go back to the bucket with the key's next lease. Whichever
    processes serve a key, it never gets more than its limit; the price is that tokens one process
    holds are not another's, so a key spread over N processes may be refused up to N leases early.

    Called from one event loop only (each API process has one).
    """

    def __init__(
        self, url: str, rate_per_s: float, burst: int, *, lease_s: float = LEASE_S,
        clock: Callable[[], float] = time.monotonic, scope: str = "API key", prefix: str = BUCKET_PREFIX,
    ) -> None:
        import redis.asyncio

        self.rate_per_s, self.burst, self.lease_s, self.clock = rate_per_s, burst, lease_s, clock
        self.scope, self.prefix = scope, prefix
        self.lease_size = max(1, int(burst * LEASE_FRACTION))
        self.client: Any = redis.asyncio.Redis.from_url(
            url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
        )
        self._script = self.client.register_script(_LEASE_SCRIPT)
        self._leases: dict[str, list[float]] = {}  # key id -> [tokens left, lease ends]
        self._refused_until: dict[str, float] = {}  # key id -> when its bucket has a token again
        self._locks: dict[str, asyncio.Lock] = {}
        self._warned_at = -math.inf

    async def take(self, key_id: str) -> None:
        if self._spend(key_id):
            return
        lock = self._locks.get(key_id)
        if lock is None:
            lock = self._locks[key_id] = asyncio.Lock()
        async with lock:  # one lease request per key at a time; the others then spend from it
            if self._spend(key_id):
                return
            await self._lease(key_id)
            if not self._spend(key_id):
                raise refusal(self.rate_per_s, self.burst, self._refused_until.get(key_id, 0.0) - self.clock(),
                              self.scope)

    def give_back(self, key_id: str) -> None:
        lease = self._leases.get(key_id)
        if lease is not None and self.clock() < lease[1]:  # else the lease went back to Redis already
            lease[0] += 1

    def _spend(self, key_id: str) -> bool:
        now = self.clock()
        refused_until = self._refused_until.get(key_id)
        if refused_until is not None:
            if now < refused_until:
                raise refusal(self.rate_per_s, self.burst, refused_until - now, self.scope)
            del self._refused_until[key_id]
        lease = self._leases.get(key_id)
        if lease is None or lease[0] < 1 or now >= lease[1]:
            return False
        lease[0] -= 1
        return True

    async def _lease(self, key_id: str) -> None:
        import redis

        held = self._leases.pop(key_id, None)
        unspent = int(held[0]) if held is not None and math.isfinite(held[0]) else 0
        try:
            granted, wait = await self._script(
                keys=[self.prefix + key_id], args=[self.rate_per_s, self.burst, unspent, self.lease_size]
            )
        except (redis.RedisError, OSError) as exc:
            # Fail open, and ask Redis again only when this lease ends, not at every request.
            self._warn(exc)
            self._leases[key_id] = [math.inf, self.clock() + self.lease_s]
            return
        now = self.clock()
        if int(granted) > 0:
            self._leases[key_id] = [float(granted), now + self.lease_s]
        else:
            self._refused_until[key_id] = now + float(wait)

    def _warn(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._warned_at >= REDIS_WARNING_INTERVAL_S:
            self._warned_at = now
            logger.warning("rate limit not enforced: Redis is unreachable (%s: %s)", type(exc).__name__, exc)

    async def close(self) -> None:
        await self.client.aclose()


def is_redis_url(url: str | None) -> bool:
    return bool(url) and url.split("://", 1)[0] in {"redis", "rediss"}


def make_rate_limiter(
    backend: str, rate_per_s: float, burst: int, broker_url: str | None, *, scope: str = "API key",
    prefix: str = BUCKET_PREFIX,
) -> RateLimiter:
    """`backend`: "redis" (the broker's Redis), "memory", or "auto" (redis when the broker is Redis).
    `scope` names what a bucket is for in refusals; `prefix` keeps each scope's Redis keys apart."""
    if rate_per_s <= 0:
        return Unlimited()
    if backend == "redis" or (backend == "auto" and is_redis_url(broker_url)):
        if not is_redis_url(broker_url):
            # The scheme only: the URL may carry the broker's password, and this error is logged.
            scheme = broker_url.split("://", 1)[0] if broker_url and "://" in broker_url else "(none)"
            raise ValueError(f"UISPS_RATE_LIMIT_BACKEND=redis needs a redis:// broker URL, not {scheme}://...")
        return RedisRateLimiter(broker_url, rate_per_s, burst, scope=scope, prefix=prefix)  # type: ignore[arg-type]
    return MemoryRateLimiter(rate_per_s, burst, scope=scope)
