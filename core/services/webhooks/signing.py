"""Standard Webhooks signatures (https://www.standardwebhooks.com): HMAC-SHA256 of
`{webhook-id}.{webhook-timestamp}.{body}` with the secret's key, sent as `v1,<base64>`.

Each tenant's events are signed with a secret of its own, derived from the service's
`UISPS_WEBHOOK_SECRET` and the tenant id: a tenant verifies with its secret and cannot sign an
event that another tenant's receiver would accept. Deriving it (rather than storing one per
tenant) means nothing more to keep, back up or hand to the workers: the database holds only each
tenant's generation, which a rotation moves on. Rotating the service's secret rotates every
tenant's; UISPS_WEBHOOK_SECRET_PREVIOUS keeps the secrets derived from the one before signing
meanwhile."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Sequence

SECRET_PREFIX = "whsec_"
_TENANT_LABEL = b"uisps webhook signing secret of tenant\x00"


def signing_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_<base64>` secret (the form core.settings accepts)."""
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def tenant_secret(service_secret: str, tenant_id: str, generation: int = 0) -> str:
    """The `whsec_<base64>` secret that signs `tenant_id`'s events at this generation of its secret
    (an HMAC-based key derivation, labelled so that the key serves this one purpose; each rotation
    moves the generation on)."""
    info = _TENANT_LABEL + tenant_id.encode() + (f"\0{generation}".encode() if generation else b"")
    derived = hmac.new(signing_key(service_secret), info, hashlib.sha256).digest()
    return SECRET_PREFIX + base64.b64encode(derived).decode()


def signing_keys(service_secrets: Sequence[str], tenant_id: str, generations: Sequence[int]) -> list[bytes]:
    """The HMAC keys that sign one of the tenant's events: each of its signing generations, derived
    from each service secret (the current one first, then the one an operator is replacing)."""
    keys: list[bytes] = []
    for service_secret in service_secrets:
        for generation in generations:
            key = signing_key(tenant_secret(service_secret, tenant_id, generation))
            if key not in keys:
                keys.append(key)
    return keys


def sign(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def webhook_headers(keys: Sequence[bytes], message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The headers of one attempt; one signature per key, space-separated (the spec's form, which
    verifiers accept when any one of them checks out)."""
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(sign(key, message_id, timestamp, body) for key in keys),
        "content-type": "application/json",
    }
