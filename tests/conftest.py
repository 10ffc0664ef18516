"""Shared fixtures: upstream servers, the backends, and a running gateway per backend."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import fault_server
from tests.backends import Backend, SqliteBackend
from tests.demo_servers import demos_url, fake_apis_url, serve_in_thread  # noqa: F401  (fixtures)
from tests.gateway_proc import Gateway, start_gateway


@pytest.fixture(scope="session")
def fault_url() -> Iterator[str]:
    """The fault-on-demand upstream; its MCP endpoint is {fault_url}/mcp."""
    url, stop = serve_in_thread(fault_server.build_app())
    yield url
    stop()


def _open_backend(kind: str, workdir: Path) -> Backend:
    if kind == "sqlite":
        return SqliteBackend(workdir / "mcpmeter.db")
    from tests.backends import ProductionBackend

    return ProductionBackend(wallets=kind == "wallets")


@pytest.fixture(scope="module", params=["sqlite", "mysql", "wallets"], ids=["embedded", "mysql+redis", "wallets"])
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    """The store a module's gateway runs on: every behaviour test runs on both kinds."""
    b = _open_backend(request.param, tmp_path_factory.mktemp(f"store-{request.param}"))
    yield b
    b.close()


@pytest.fixture(scope="module")
def gateway_settings() -> dict[str, object]:
    """Extra gateway configuration for a module; override in a module to change it."""
    return {}


@pytest.fixture(scope="module")
def gateway(backend: Backend, gateway_settings: dict[str, object],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    workdir = tmp_path_factory.mktemp("gateway")
    gw = start_gateway({**backend.config(), **gateway_settings}, workdir, env=backend.env())
    yield gw
    gw.stop()


@pytest.fixture(autouse=True)
def _ledger_reconciles(request: pytest.FixtureRequest) -> Iterator[None]:
    """After every test that used a backend: each balance equals the sum of its ledger (I1)."""
    yield
    if "backend" in request.fixturenames:
        backend: Backend = request.getfixturevalue("backend")
        assert backend.unreconciled() == [], "balances differ from their ledgers"
