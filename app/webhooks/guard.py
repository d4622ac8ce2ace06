"""SSRF guard for client webhook URLs: check the syntax, resolve once, allow public unicast only."""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

MAX_URL_LENGTH = 2048
RESOLVE_TIMEOUT_SECONDS = 5.0

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# Given (host, port), the addresses to check and connect to; tests inject a stub.
Resolver = Callable[[str, int], Awaitable[list[str]]]

# Belt and braces over `is_global`, whose tables have changed between Python patch releases.
_BLOCKED = [ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15",
    "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
    "::/128", "::1/128", "100::/64", "2001::/23", "2001:db8::/32", "fc00::/7", "fe80::/10",
    "fec0::/10", "ff00::/8",
)]
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NUMERIC_HOST = re.compile(r"^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}\.?$", re.IGNORECASE)
_FORBIDDEN_CHARS = re.compile(r"[\x00-\x20\x7f\\]")


class DestinationRefused(Exception):
    """The webhook URL or an address it resolves to may not be contacted."""


class ResolutionFailed(Exception):
    """The host did not resolve now; it may later (a retry, not a refusal)."""


@dataclass(frozen=True)
class Destination:
    """A checked webhook target: the original URL and the one address to connect to."""

    url: httpx.URL
    address: str

    @property
    def request_url(self) -> httpx.URL:
        """The URL with its host replaced by the checked address, so nothing resolves it again."""
        return self.url.copy_with(host=self.address)

    @property
    def host_header(self) -> str:
        """The original `Host` (with a non-default port), sent to the address."""
        return self.url.netloc.decode("ascii")

    @property
    def tls_name(self) -> str:
        """The name TLS must verify (SNI and certificate) although we connect to an address."""
        return self.url.raw_host.decode("ascii")


def parse_url(url: str) -> httpx.URL:
    """The webhook URL if its syntax is acceptable: http(s), a host, no userinfo, no tricks."""
    if len(url) > MAX_URL_LENGTH or _FORBIDDEN_CHARS.search(url):
        raise DestinationRefused("bad url")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError):
        raise DestinationRefused("bad url") from None
    if parsed.scheme not in ("http", "https") or not parsed.raw_host:
        raise DestinationRefused("bad url")
    authority = url.split("://", 1)[-1].split("/", 1)[0].split("?", 1)[0]
    # Userinfo and fragments are where parsers disagree about the host
    # ("http://a@127.0.0.1:80@evil/", "http://127.0.0.1#@evil/"); a webhook needs neither.
    if parsed.userinfo or "@" in authority or "#" in url:
        raise DestinationRefused("userinfo")
    host = parsed.raw_host.decode("ascii").lower()
    if _NUMERIC_HOST.match(host) and not _is_dotted_quad(host):
        # 2130706433, 0x7f.0.0.1, 0177.0.0.1, 127.1: legacy encodings only SSRF tricks use.
        raise DestinationRefused("numeric host")
    return parsed


def _is_dotted_quad(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def is_public(address: IPAddress) -> bool:
    """Whether an address is globally routable unicast (IPv4 inside IPv6 checked too)."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id:
            return False
        embedded = _embedded_ipv4(address)
        if embedded is not None and not is_public(embedded):
            return False
    if any(address in network for network in _BLOCKED if network.version == address.version):
        return False
    return address.is_global and not (
        address.is_private or address.is_loopback or address.is_link_local or address.is_multicast
        or address.is_reserved or address.is_unspecified
    )


async def system_resolver(host: str, port: int) -> list[str]:
    """Every address the system resolver gives for a host, in its order of preference."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


async def resolve(url: str, *, allow_private: bool, resolver: Resolver = system_resolver) -> Destination:
    """The one address to deliver to; refused when ANY address the host has is not public."""
    parsed = parse_url(url)
    host = parsed.raw_host.decode("ascii")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        texts = [host]
    else:
        try:
            texts = await asyncio.wait_for(resolver(host, port), timeout=RESOLVE_TIMEOUT_SECONDS)
        except (OSError, TimeoutError, UnicodeError):
            raise ResolutionFailed() from None
    addresses: list[IPAddress] = []
    for text in texts:
        try:
            addresses.append(ipaddress.ip_address(text))
        except ValueError:
            raise DestinationRefused("bad address") from None
    if not addresses:
        raise ResolutionFailed()
    if not allow_private and not all(is_public(a) for a in addresses):
        raise DestinationRefused("private address")
    return Destination(url=parsed, address=str(addresses[0]))
