"""One Starlette app serving all five demo servers over streamable HTTP, plus `GET /health`.

Each server is mounted at `/<name>`, so its endpoint is `/<name>/mcp`. Starlette does
not run the lifespan of mounted apps, so the combined app's lifespan starts every
server's session manager itself; without it each endpoint fails with
"Task group is not initialized".
"""

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager

from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from demos import currency, echo, github_public, weather, wikipedia

SERVERS: dict[str, Callable[[], MCPServer]] = {
    "echo-test": echo.create_server,
    "weather": weather.create_server,
    "currency": currency.create_server,
    "wikipedia": wikipedia.create_server,
    "github-public": github_public.create_server,
}
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


def transport_security(extra_hosts: Sequence[str] = ()) -> TransportSecuritySettings:
    """DNS-rebinding protection admitting loopback names (any port) plus `extra_hosts`.

    The SDK answers 421 to any other `Host` and 403 to any other `Origin`.
    """
    hosts = [*LOOPBACK_HOSTS, *extra_hosts]
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=[f"{host}:*" for host in hosts],
        allowed_origins=[f"{scheme}://{host}:*" for host in hosts for scheme in ("http", "https")],
    )


def build_app(extra_hosts: Sequence[str] = ()) -> Starlette:
    """The combined app, with fresh server instances (a session manager can only run once).

    Stateless mode: no `Mcp-Session-Id`, every POST stands alone, so the gateway needs no
    session affinity. Not JSON-response mode, which would drop progress notifications.
    """
    servers = {name: factory() for name, factory in SERVERS.items()}
    security = transport_security(extra_hosts)
    mounts = [
        Mount(f"/{name}", app=server.streamable_http_app(stateless_http=True, transport_security=security))
        for name, server in servers.items()
    ]

    async def health(_: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "servers": [{"name": name, "path": f"/{name}/mcp"} for name in servers]})

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            for server in servers.values():
                await stack.enter_async_context(server.session_manager.run())
            yield

    return Starlette(routes=[Route("/health", health), *mounts], lifespan=lifespan)
