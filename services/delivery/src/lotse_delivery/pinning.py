"""Connections to a sink go to the address that was checked, not to a second DNS answer.

A sink's host name is resolved once per attempt and every address judged by the sink
policy (domain.check_sink); the attempt then connects to one of exactly those addresses.
Resolving again at connect time (what a plain HTTP client does) would let a name that
answers a public address to the check and an internal one to the connect (DNS rebinding)
reach the cluster's inside. The URL keeps its host name, so the Host header, TLS SNI and
certificate verification are all about the name the subscriber registered.

How: the HTTP client's network backend connects to the address pinned for the host in
the current task (a context variable set around the attempt) and refuses a host without a
pin, so nothing here ever falls back to the system resolver. No proxy is used (a proxy
would resolve the name itself). A kept-alive connection may serve a later attempt to the
same host: it goes to an address that was checked when it was opened.
"""

from __future__ import annotations

import asyncio
import socket
import typing
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType

import httpcore
import httpx

#: Resolves a host name to its addresses (empty: it does not resolve).
Resolver = Callable[[str, int], Awaitable[list[str]]]

_NO_PINS: Mapping[str, str] = MappingProxyType({})
_PINS: ContextVar[Mapping[str, str]] = ContextVar("lotse_delivery_pins", default=_NO_PINS)


async def system_resolver(host: str, port: int) -> list[str]:
    """The operating system's answer (getaddrinfo), addresses sorted, no duplicates."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return []
    return sorted({str(info[4][0]) for info in infos})


@contextmanager
def pinned(host: str, address: str) -> Iterator[None]:
    """Within this block (this task), connections to ``host`` go to ``address``."""
    token = _PINS.set({**_PINS.get(), host.lower(): address})
    try:
        yield
    finally:
        _PINS.reset(token)


class UnpinnedHost(httpcore.ConnectError):
    """A connection to a host nobody pinned: refused instead of resolved."""


class PinnedBackend(httpcore.AsyncNetworkBackend):
    """Connects to the pinned address of a host; refuses hosts without one."""

    def __init__(self, inner: httpcore.AsyncNetworkBackend | None = None) -> None:
        self.inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        address = _PINS.get().get(host.strip("[]").lower())
        if address is None:
            raise UnpinnedHost(f"no checked address pinned for {host}")
        return await self.inner.connect_tcp(
            address,
            port,
            timeout=timeout,
            local_address=local_address,
            socket_options=socket_options,
        )

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise UnpinnedHost("unix sockets are never a sink")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


_LIMITS = httpx.Limits(max_connections=200, max_keepalive_connections=100)


class PinnedTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport, with its connection pool on a :class:`PinnedBackend`."""

    def __init__(
        self,
        *,
        network: httpcore.AsyncNetworkBackend | None = None,
        limits: httpx.Limits = _LIMITS,
    ) -> None:
        super().__init__(trust_env=False, limits=limits)
        # httpx builds its pool without a way to pass a network backend: build the same pool
        # (its TLS context, limits, HTTP/1.1) with the pinning backend instead.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            http1=True,
            http2=False,
            network_backend=PinnedBackend(network),
        )


def pinned_client(
    timeout: float, *, network: httpcore.AsyncNetworkBackend | None = None, **options: typing.Any
) -> httpx.AsyncClient:
    """An HTTP client whose connections go only to pinned addresses; redirects are not
    followed (a redirect could point anywhere), the environment's proxies are ignored."""
    return httpx.AsyncClient(
        transport=PinnedTransport(network=network),
        timeout=httpx.Timeout(timeout),
        follow_redirects=False,
        trust_env=False,
        **options,
    )
