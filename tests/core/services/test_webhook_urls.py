"""Which addresses a webhook may be sent to: IPv6 forms that carry a private IPv4 address are
judged by that address (a NAT64 gateway, a 6to4 relay would deliver to it)."""

from __future__ import annotations

import ipaddress

import pytest

from core.services.webhooks.delivery import post_event
from core.services.webhooks.urls import InvalidCallbackUrl, address_kind, check_callback_url, is_public
from core.settings import Settings


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 of 169.254.169.254, the cloud metadata service
        ("64:ff9b::a00:5", "private"),  # NAT64 of 10.0.0.5
        ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
        ("::7f00:1", "loopback"),  # IPv4-compatible 127.0.0.1
        ("::ffff:0:7f00:1", "loopback"),  # IPv4-translated 127.0.0.1
        ("::ffff:192.168.0.1", "private"),  # IPv4-mapped
        ("64:ff9b:1::a00:5", "reserved"),  # NAT64 local-use prefix: its operator's networks
        ("fec0::1", "non-public"),  # site-local
    ],
)
def test_an_ipv6_form_of_a_private_address_is_not_public(address: str, kind: str) -> None:
    parsed = ipaddress.ip_address(address)

    assert not is_public(parsed)
    assert address_kind(parsed) == kind


@pytest.mark.parametrize(
    "address",
    [
        "192.0.0.192",  # Oracle Cloud's metadata service; global in Python 3.11.7's own table
        "168.63.129.16",  # Azure's WireServer: a public-looking address inside every VNet
        "64:ff9b::c000:c0",  # NAT64 of 192.0.0.192
        "3fff::1",  # documentation (RFC 9637, 2024); global in Python 3.11.7's own table
    ],
)
def test_special_purpose_and_cloud_addresses_are_not_public_whatever_python_says(address: str) -> None:
    assert not is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "2001:4860:4860::8888", "64:ff9b::808:808", "2002:808:808::"])
def test_public_addresses_and_their_ipv6_forms_are_public(address: str) -> None:
    assert is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize("host", ["2130706433", "0x7f000001", "0177.0.0.1", "127.1", "0xa9.0xfe.0xa9.0xfe"])
def test_an_address_in_an_older_ipv4_form_is_refused_when_the_request_is_made(host: str) -> None:
    settings = Settings(webhook_secret="whsec_" + "QUJD" * 8, webhook_allowed_hosts="*")

    with pytest.raises(InvalidCallbackUrl, match="loopback|link-local"):
        check_callback_url(f"https://{host}/hook", settings)
    assert check_callback_url("https://hooks.example.com/hook", settings)  # a name is resolved at send time


@pytest.mark.parametrize("host", ["a..example.com", "x" * 64 + ".example.com", ("x" * 60 + ".") * 4 + "example.com"])
def test_a_host_name_the_resolver_cannot_take_is_refused_when_the_request_is_made(host: str) -> None:
    settings = Settings(webhook_secret="whsec_" + "QUJD" * 8, webhook_allowed_hosts="*.example.com")

    with pytest.raises(InvalidCallbackUrl, match="not a valid host name"):
        check_callback_url(f"https://{host}/hook", settings)
    assert check_callback_url(f"https://{'x' * 63}.example.com/hook", settings)


def test_an_event_for_a_host_name_the_resolver_cannot_take_fails_for_good_at_once() -> None:
    # A request made before the check above may hold such a URL: its event must not raise in the
    # sender (which would retry it until the lease ran out, ten times over), but be refused.
    settings = Settings(webhook_secret="whsec_" + "QUJD" * 8, webhook_allowed_hosts="*")

    result = post_event("https://a..example.com/hook", "msg_1", b"{}", settings, "default")

    assert result.permanent and "not a valid host name" in (result.error or "")


@pytest.mark.parametrize("url, message", [
    ("https://hooks.example.com/hooks/caf\u00e9", "path and query must be ASCII"),  # a request line cannot carry it
    ("https://hooks.example.com/hook?name=\u00e9t\u00e9", "path and query must be ASCII"),
    ("https://hooks.example.com:0/hook", "port 0"),  # not quietly the scheme's port
])
def test_a_url_that_could_never_be_requested_is_refused_when_the_request_is_made(url: str, message: str) -> None:
    settings = Settings(webhook_secret="whsec_" + "QUJD" * 8, webhook_allowed_hosts="*.example.com")

    with pytest.raises(InvalidCallbackUrl, match=message):
        check_callback_url(url, settings)
    assert check_callback_url("https://hooks.example.com/hooks/caf%C3%A9?name=%C3%A9t%C3%A9", settings)
    # a Unicode host name is fine: it is sent in its IDNA (xn--) form
    assert check_callback_url("https://b\u00fccher.example.com/hook", settings)
