"""Which callback URLs may be called: checked when a request is made, and again at send time on
the addresses the host resolves to then (a name that resolved to a public address when the request
was made may point at 127.0.0.1 by the time the event is sent). Torch-free."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from core.db.tables import CALLBACK_URL_LENGTH
from core.errors import UisError
from core.settings import Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class InvalidCallbackUrl(UisError):
    code = "invalid_callback_url"


class WebhooksNotConfigured(UisError):
    code = "webhooks_not_configured"


class RefusedAddress(Exception):
    """The callback's host resolves to an address the service may not call."""


@dataclass(frozen=True)
class CallbackTarget:
    scheme: str
    host: str  # lower case, IPv6 without brackets
    port: int
    target: str  # path and query, as sent on the request line

    @property
    def literal_address(self) -> IPAddress | None:
        return literal_address(self.host)


def literal_address(host: str) -> IPAddress | None:
    """The address `host` is written as, or None for a name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        # The older IPv4 forms the system resolver also takes as an address, not a name:
        # 2130706433, 0x7f000001, 0177.0.0.1, 127.1 (all 127.0.0.1).
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def check_callback_url(url: str, settings: Settings) -> str:
    """The check made when a deletion request is created: InvalidCallbackUrl (422) says what is wrong."""
    if settings.webhook_secret is None:
        raise WebhooksNotConfigured(
            "this service sends no webhooks: its operator has not set UISPS_WEBHOOK_SECRET"
        )
    target = parse_callback_url(url, settings)
    address = target.literal_address
    if address is not None and not settings.webhook_allow_private_addresses and not is_public(address):
        raise InvalidCallbackUrl(f"callback_url names {address}, a {address_kind(address)} address")
    return url


def parse_callback_url(url: str, settings: Settings) -> CallbackTarget:
    """Form, scheme and allowed host (UISPS_WEBHOOK_ALLOWED_HOSTS); no name is resolved here."""
    if len(url) > CALLBACK_URL_LENGTH:
        raise InvalidCallbackUrl(f"callback_url is longer than {CALLBACK_URL_LENGTH} characters")
    if any(char.isspace() or ord(char) < 0x20 or ord(char) == 0x7F for char in url):
        raise InvalidCallbackUrl("callback_url contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidCallbackUrl(f"callback_url is not a valid URL: {exc}") from None
    if port == 0:
        raise InvalidCallbackUrl("callback_url names port 0, which no receiver listens on")
    schemes = ("https", "http") if settings.webhook_allow_http else ("https",)
    if parts.scheme.lower() not in schemes:
        allowed = " or ".join(f"{s}://" for s in schemes)
        raise InvalidCallbackUrl(f"callback_url must start with {allowed}")
    if not parts.hostname:
        raise InvalidCallbackUrl("callback_url has no host")
    if parts.username is not None or parts.password is not None:
        raise InvalidCallbackUrl("callback_url must not carry credentials (user:password@)")
    if parts.fragment:
        raise InvalidCallbackUrl("callback_url must not have a #fragment")
    host = parts.hostname.rstrip(".")
    _check_host_form(host)
    if not host_allowed(host, settings.webhook_allowed_host_patterns):
        raise InvalidCallbackUrl(
            f"callback host {host!r} is not one this service may call (UISPS_WEBHOOK_ALLOWED_HOSTS)"
        )
    scheme = parts.scheme.lower()
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if not target.isascii():
        # An HTTP request line is ASCII: such a path could never be sent (it is not converted, so
        # what is stored and shown is what is requested). A host may be a Unicode name (IDNA).
        raise InvalidCallbackUrl("callback_url's path and query must be ASCII: percent-encode other characters (RFC 3986)")
    return CallbackTarget(scheme, host, port or (443 if scheme == "https" else 80), target)


def _check_host_form(host: str) -> None:
    """A name the resolver can take: getaddrinfo raises UnicodeError, not OSError, for an empty
    label or one of more than 63 characters, and no name of more than 253 resolves; a sender would
    fail on such a name at every attempt."""
    if literal_address(host) is not None:
        return
    try:
        encoded = host.encode("idna")
    except UnicodeError:
        encoded = None
    if encoded is None or len(encoded) > 253:  # DNS's limit for a whole name (RFC 1035)
        raise InvalidCallbackUrl(
            f"callback host {host[:100]!r} is not a valid host name (an empty label, one of more "
            "than 63 characters, or more than 253 in all)"
        ) from None


def host_allowed(host: str, patterns: list[str]) -> bool:
    """`*` allows any host, `*.example.com` the subdomains of example.com, anything else itself."""
    for pattern in patterns:
        if pattern == "*" or host == pattern:
            return True
        if pattern.startswith("*.") and host.endswith(pattern[1:]):
            return True
    return False


# IPv6 forms whose last 32 bits are an IPv4 address that the packet reaches (NAT64's well-known
# prefix, the deprecated IPv4-compatible and SIIT IPv4-translated forms); IPv4-mapped and 6to4
# have attributes of their own.
_CARRY_IPV4 = tuple(ipaddress.ip_network(net) for net in ("64:ff9b::/96", "::/96", "::ffff:0:0:0/96"))
# Never public, whatever the tables of the running Python say (before 3.11.10 and 3.12.4, for
# one, most of 192.0.0.0/24 counted as global, Oracle Cloud's metadata address 192.0.0.192 among
# them): IANA's special-purpose ranges that are not globally reachable (whole blocks: the few
# anycast and infrastructure addresses IANA marks reachable inside them, such as 192.0.0.9 and
# parts of 2001::/23, are no webhook receivers), and cloud services that answer on a
# public-looking address (Azure's WireServer). Python's `is_global` is asked too.
_NOT_PUBLIC_V4 = tuple(ipaddress.ip_network(net) for net in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15",
    "198.51.100.0/24", "203.0.113.0/24", "240.0.0.0/4", "168.63.129.16/32",
))
# The same for IPv6, with site-local (deprecated) and NAT64's local-use prefix, whose translators
# reach networks of their operator's choosing.
_NOT_PUBLIC_V6 = tuple(ipaddress.ip_network(net) for net in (
    "::/127", "100::/64", "2001::/23", "2001:db8::/32", "3fff::/20", "5f00::/16", "fc00::/7",
    "fe80::/10", "fec0::/10", "ff00::/8", "64:ff9b:1::/48",
))


def _effective(address: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 address stands for, where it carries one (a NAT64 gateway sends
    64:ff9b::7f00:1 to 127.0.0.1); else the address itself."""
    if isinstance(address, ipaddress.IPv4Address) or address.is_loopback or address.is_unspecified:
        return address  # ::1 and :: are themselves, not IPv4-compatible 0.0.0.1 and 0.0.0.0
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    if address.sixtofour is not None:
        return address.sixtofour
    if any(address in net for net in _CARRY_IPV4):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def is_public(address: IPAddress) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and any(address in net for net in _NOT_PUBLIC_V6):
        return False
    address = _effective(address)
    if isinstance(address, ipaddress.IPv4Address) and any(address in net for net in _NOT_PUBLIC_V4):
        return False
    return address.is_global and not address.is_multicast


def address_kind(address: IPAddress) -> str:
    address = _effective(address)
    for kind in ("loopback", "link_local", "private", "multicast", "unspecified", "reserved"):
        if getattr(address, f"is_{kind}"):
            return kind.replace("_", "-")
    return "non-public"


def resolve(target: CallbackTarget, *, allow_private: bool) -> list[IPAddress]:
    """Every address the host resolves to now; RefusedAddress if any of them is not public (a host
    with one private address among public ones may be an attack on whichever one is picked)."""
    infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    addresses: list[IPAddress] = []
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%", 1)[0])  # drop an IPv6 zone id
        if address not in addresses:
            addresses.append(address)
    if not allow_private:
        for address in addresses:
            if not is_public(address):
                raise RefusedAddress(f"{target.host} resolves to {address}, a {address_kind(address)} address")
    return addresses
