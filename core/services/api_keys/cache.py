"""API keys this process verified recently, so that most requests need no database read for auth.

An entry (the key's sha256 -> its Principal) lives `ttl_s` seconds (UISPS_API_KEY_CACHE_TTL_S).
Only valid keys are cached: an unknown or revoked key is looked up every time. Revocation:

- through this process (`POST /api-keys/{id}/revoke`) the entry is dropped once the revocation
  commits: the next request with the key is refused at once;
- anywhere else (another API process, `uisps keys revoke`) the key keeps working here until its
  entry expires: at most `ttl_s` seconds.

`ttl_s = 0` turns the cache off (every request reads the key from the database).

It also remembers which keys it found valid, past their entries' expiry (`known`): their checks
against the database need not queue behind those of keys never seen, which a flood of made-up
keys fills (api.auth).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from core.services.api_keys.service import Principal

MAX_ENTRIES = 10_000


class KeyCache:
    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.clock = clock
        self._entries: dict[str, tuple[Principal, float]] = {}  # key hash -> (principal, expiry)
        self._known: dict[str, str] = {}  # key hash -> key id, of keys found valid here
        # Bumped by every forget(): a verification that began before it must not be cached, or a
        # key revoked meanwhile could come back for a whole TTL.
        self._generation = 0
        self._lock = threading.Lock()

    @property
    def generation(self) -> int:
        """Take it before reading a key from the database; hand it to put()."""
        return self._generation

    def get(self, key_hash: str) -> Principal | None:
        entry = self._entries.get(key_hash)
        if entry is None:
            return None
        if entry[1] <= self.clock():
            self._entries.pop(key_hash, None)
            return None
        return entry[0]

    def known(self, key_hash: str) -> bool:
        """Whether this key was found valid here before (and not revoked through this process)."""
        return key_hash in self._known

    def put(self, key_hash: str, principal: Principal, generation: int) -> None:
        with self._lock:
            if generation != self._generation:
                return
            if len(self._known) >= MAX_ENTRIES:
                self._known.clear()
            self._known[key_hash] = principal.key_id
            if self.ttl_s <= 0:
                return
            if len(self._entries) >= MAX_ENTRIES:
                self._entries.clear()
            self._entries[key_hash] = (principal, self.clock() + self.ttl_s)

    def forget(self, key_id: str) -> None:
        """Drop the key `key_id` (revoked): its next request is verified against the database."""
        with self._lock:
            self._generation += 1
            self._entries = {h: e for h, e in self._entries.items() if e[0].key_id != key_id}
            self._known = {h: i for h, i in self._known.items() if i != key_id}
