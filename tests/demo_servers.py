"""Run the demo MCP servers and the fake public APIs on loopback ports for tests.

Plain helpers (not a conftest): each server runs under uvicorn in a daemon thread
with its own event loop, so it works beside any test loop. `start_*` return the
base URL and a `stop()` callable; the fixtures at the bottom wrap them per session.
Import the fixtures into a test module or conftest to use them.
"""

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
import uvicorn
from starlette.types import ASGIApp

from demos import currency, fake_apis, github_public, weather, wikipedia
from demos.app import build_app

STARTUP_TIMEOUT = 15.0
SHUTDOWN_TIMEOUT = 10.0
BASE_URL_ENV_VARS = (
    weather.BASE_URL_ENV,
    currency.BASE_URL_ENV,
    wikipedia.BASE_URL_ENV,
    github_public.BASE_URL_ENV,
)


def serve_in_thread(app: ASGIApp, port: int = 0, host: str = "127.0.0.1",
                    **uvicorn_options: Any) -> tuple[str, Callable[[], None]]:
    """Serve `app` on `host:port` (0: a free port) until the returned `stop()` is called.

    `uvicorn_options` go to uvicorn.Config (e.g. ssl_certfile and ssl_keyfile: then the URL is https).

    The socket is bound here, so the port is known without racing for it; this returns
    once the app's lifespan startup has completed.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    # Keep-alive outlives any test's pause: with uvicorn's 5 s default, a gateway reusing a connection
    # the instant uvicorn closes it gets a reset, a refunded 502 that a test counting statuses reads as a flake.
    uvicorn_options.setdefault("timeout_keep_alive", 120)
    config = uvicorn.Config(app, lifespan="on", log_config=None, log_level="warning", timeout_graceful_shutdown=2,
                            **uvicorn_options)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            thread.join(SHUTDOWN_TIMEOUT)
            sock.close()
            raise RuntimeError(f"uvicorn did not start on {host}:{port}")
        time.sleep(0.02)

    def stop() -> None:
        server.should_exit = True
        thread.join(SHUTDOWN_TIMEOUT)
        sock.close()

    scheme = "https" if uvicorn_options.get("ssl_certfile") else "http"
    return f"{scheme}://{host}:{sock.getsockname()[1]}", stop


def fake_api_env(fake_apis_url: str) -> dict[str, str]:
    """The environment that points every network demo at the fake APIs served at `fake_apis_url`."""
    return dict.fromkeys(BASE_URL_ENV_VARS, fake_apis_url)


def start_fake_apis(port: int = 0) -> tuple[str, Callable[[], None]]:
    """Serve `demos.fake_apis`; returns its base URL (use it with `fake_api_env`) and `stop()`."""
    return serve_in_thread(fake_apis.build_app(), port)


def start_demos(port: int = 0, env: Mapping[str, str] | None = None) -> tuple[str, Callable[[], None]]:
    """Serve the five demo servers; returns the base URL (servers at `{base}/<name>/mcp`) and `stop()`.

    `env` (e.g. `fake_api_env(...)`) is set in this process's environment, where the tools
    read it at call time, until `stop()` restores the previous values.
    """
    previous = {name: os.environ.get(name) for name in env or {}}
    os.environ.update(env or {})

    def restore_env() -> None:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    try:
        url, stop_server = serve_in_thread(build_app(), port)
    except BaseException:
        restore_env()
        raise

    def stop() -> None:
        stop_server()
        restore_env()

    return url, stop


@pytest.fixture(scope="session")
def fake_apis_url() -> Iterator[str]:
    """Base URL of the fake public APIs, served for the whole test session."""
    url, stop = start_fake_apis()
    yield url
    stop()


@pytest.fixture(scope="session")
def demos_url(fake_apis_url: str) -> Iterator[str]:
    """Base URL of the demo servers, wired to the fake APIs, served for the whole test session."""
    url, stop = start_demos(env=fake_api_env(fake_apis_url))
    yield url
    stop()
