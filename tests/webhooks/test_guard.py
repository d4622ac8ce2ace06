"""The SSRF guard: URL syntax, forbidden destinations, and one resolution that is also the address used."""

from __future__ import annotations

import ipaddress

import pytest

from app.webhooks import guard
from app.webhooks.guard import DestinationRefused, ResolutionFailed

PUBLIC_V4 = "93.184.216.34"
PUBLIC_V6 = "2606:2800:220:1:248:1893:25c8:1946"
UNSPECIFIED = "0.0.0.0"  # noqa: S104  (a destination to refuse, not a bind address)


async def no_dns(host: str, port: int) -> list[str]:
    raise AssertionError(f"nothing should be resolved here, got {host}:{port}")


def stub(*answers: list[str]) -> guard.Resolver:
    """A resolver that gives each answer in turn (the last one from then on) and counts calls."""
    calls: list[tuple[str, int]] = []

    async def resolve(host: str, port: int) -> list[str]:
        calls.append((host, port))
        return answers[min(len(calls), len(answers)) - 1]

    resolve.calls = calls  # type: ignore[attr-defined]
    return resolve


@pytest.mark.parametrize("url", [
    "ftp://example.com/hook",
    "file:///etc/passwd",
    "gopher://example.com:25/",
    "javascript:alert(1)",
    "ws://example.com/hook",
    "http:///no-host",
    "http://",
    "//example.com/hook",
    "example.com/hook",
    "http://user:secret@example.com/hook",
    "http://user@example.com/hook",
    "http://a@127.0.0.1:80@example.com/",
    "http://example.com\\@127.0.0.1/",
    "http://127.0.0.1#@example.com/",
    "http://exa mple.com/",
    "http://example.com/\nHost: evil",
    "http://2130706433/",
    "http://0x7f000001/",
    "http://0x7f.0.0.1/",
    "http://0177.0.0.1/",
    "http://127.1/",
    "http://0/",
    "http://017700000001/",
    "https://example.com/" + "a" * 2100,
])
@pytest.mark.parametrize("allow_private", [False, True])
async def test_bad_urls_are_refused_whatever_the_setting(url: str, allow_private: bool) -> None:
    with pytest.raises(DestinationRefused):
        await guard.resolve(url, allow_private=allow_private, resolver=stub([PUBLIC_V4]))


@pytest.mark.parametrize("host", [
    "127.0.0.1", "127.255.255.254", "10.0.0.1", "10.255.255.255", "172.16.0.1", "172.31.255.255",
    "192.168.0.1", "192.168.255.255", "169.254.169.254", "169.254.0.1", UNSPECIFIED, "100.64.0.1",
    "192.0.0.8", "192.0.2.1", "198.18.0.1", "198.51.100.7", "203.0.113.9", "224.0.0.1",
    "239.255.255.250", "240.0.0.1", "255.255.255.255",
    "[::1]", "[::]", "[fc00::1]", "[fd12:3456::1]", "[fe80::1]", "[fec0::1]", "[ff02::1]",
    "[::ffff:127.0.0.1]", "[::ffff:10.0.0.1]", "[::ffff:169.254.169.254]", "[::ffff:8.8.8.8]",
    "[64:ff9b::7f00:1]", "[2002:7f00:1::1]", "[2002:a00:1::1]", "[2001:db8::1]", "[100::1]",
    "[2001::1]",
])
async def test_private_literal_addresses_are_refused(host: str) -> None:
    with pytest.raises(DestinationRefused):
        await guard.resolve(f"https://{host}/hook", allow_private=False, resolver=no_dns)


@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]", "10.1.2.3", "192.168.1.1"])
async def test_private_literal_addresses_are_allowed_when_enabled(host: str) -> None:
    destination = await guard.resolve(f"http://{host}:8080/hook?x=1", allow_private=True, resolver=no_dns)
    assert destination.address == host.strip("[]")


@pytest.mark.parametrize("host", [PUBLIC_V4, f"[{PUBLIC_V6}]", "8.8.8.8", "1.1.1.1"])
async def test_public_literal_addresses_are_allowed_without_dns(host: str) -> None:
    destination = await guard.resolve(f"https://{host}/hook", allow_private=False, resolver=no_dns)
    assert destination.address == host.strip("[]")


@pytest.mark.parametrize(("answer", "allowed"), [
    ([PUBLIC_V4], True),
    ([PUBLIC_V6], True),
    ([PUBLIC_V4, PUBLIC_V6], True),
    (["127.0.0.1"], False),
    ([PUBLIC_V4, "10.0.0.5"], False),  # any private address refuses the whole name
    ([PUBLIC_V6, "fe80::1"], False),
    (["::ffff:127.0.0.1"], False),
    (["169.254.169.254"], False),
    ([UNSPECIFIED], False),
])
async def test_names_are_judged_by_every_address_they_resolve_to(answer: list[str], allowed: bool) -> None:
    resolver = stub(answer)
    if allowed:
        destination = await guard.resolve("https://hooks.example.com/in", allow_private=False, resolver=resolver)
        assert destination.address == answer[0]
    else:
        with pytest.raises(DestinationRefused):
            await guard.resolve("https://hooks.example.com/in", allow_private=False, resolver=resolver)
    assert resolver.calls == [("hooks.example.com", 443)]  # type: ignore[attr-defined]


async def test_the_checked_address_is_the_one_connected_to_so_rebinding_cannot_follow() -> None:
    # First answer public, every later one loopback: a second lookup would reach 127.0.0.1.
    resolver = stub([PUBLIC_V4], ["127.0.0.1"])
    destination = await guard.resolve("https://hooks.example.com:8443/in?customId=1", allow_private=False,
                                      resolver=resolver)
    assert resolver.calls == [("hooks.example.com", 8443)]  # type: ignore[attr-defined]
    assert str(destination.request_url) == f"https://{PUBLIC_V4}:8443/in?customId=1"
    assert destination.host_header == "hooks.example.com:8443"
    assert destination.tls_name == "hooks.example.com"


async def test_ipv6_addresses_are_bracketed_in_the_request_url() -> None:
    destination = await guard.resolve("http://hooks.example.com/in", allow_private=False,
                                      resolver=stub([PUBLIC_V6]))
    assert str(destination.request_url) == f"http://[{PUBLIC_V6}]/in"
    assert destination.host_header == "hooks.example.com"


@pytest.mark.parametrize("answer", [[], ["not-an-address"]])
async def test_useless_answers_are_not_trusted(answer: list[str]) -> None:
    with pytest.raises((ResolutionFailed, DestinationRefused)):
        await guard.resolve("https://hooks.example.com/", allow_private=True, resolver=stub(answer))


async def test_a_failed_lookup_is_retryable_not_refused() -> None:
    async def failing(host: str, port: int) -> list[str]:
        raise OSError("Temporary failure in name resolution")

    with pytest.raises(ResolutionFailed):
        await guard.resolve("https://hooks.example.com/", allow_private=False, resolver=failing)


@pytest.mark.parametrize(("address", "public"), [
    ("8.8.8.8", True), (PUBLIC_V6, True), ("127.0.0.1", False), ("10.0.0.1", False),
    ("172.16.5.4", False), ("192.168.0.1", False), ("169.254.1.1", False), ("224.0.0.251", False),
    ("::1", False), ("fc00::1", False), ("fe80::1", False), ("::ffff:127.0.0.1", False),
    ("::", False), (UNSPECIFIED, False), ("ff05::2", False),
])
def test_is_public(address: str, public: bool) -> None:
    assert guard.is_public(ipaddress.ip_address(address)) is public
