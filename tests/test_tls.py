"""TLS for operators, both directions, with certificates made here (README, "TLS"):

- clients reach the gateway over TLS with mitmproxy's `--certs` (and an explicit `confdir`) and
  verify the certificate it serves; plain HTTP stays open on the same port (measured: README);
- an https upstream signed by a private CA is trusted with `ssl_verify_upstream_trusted_ca`: the
  call is billed; a gateway without it refuses the upstream's certificate: 502, refunded.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests import fault_server
from tests.backends import Backend, TestConsumer
from tests.demo_servers import serve_in_thread
from tests.gateway_proc import Gateway, start_gateway
from tests.refusals import refusal
from tests.test_e2e_gateway import MCP_HEADERS, assert_calls_cost, call, eventually, slug

PRICE = 1000


# --- a private PKI, made per test module ----------------------------------------------------------

def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _builder(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1)))


@dataclass(frozen=True)
class Pki:
    """A CA and one leaf it signed for 127.0.0.1 and localhost, as PEM files."""

    ca: Path  # the CA certificate: what clients trust
    leaf: x509.Certificate
    cert: Path  # the leaf certificate alone
    key: Path  # its private key
    bundle: Path  # leaf, CA, key: the form mitmproxy's --certs reads


def make_pki(directory: Path, name: str) -> Pki:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"mcpmeter test CA {name}")])
    ca = (_builder(ca_name, ca_name, ca_key)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (_builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]), ca_name, key)
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    paths = {part: directory / f"{name}-{part}.pem" for part in ("ca", "cert", "key", "bundle")}
    paths["ca"].write_bytes(_pem(ca))
    paths["cert"].write_bytes(_pem(leaf))
    paths["key"].write_bytes(_key_pem(key))
    paths["bundle"].write_bytes(_pem(leaf) + _pem(ca) + _key_pem(key))
    return Pki(ca=paths["ca"], leaf=leaf, cert=paths["cert"], key=paths["key"], bundle=paths["bundle"])


# --- the world: an https upstream, and gateways that serve TLS -------------------------------------

@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pki")


@pytest.fixture(scope="module")
def gateway_pki(pki_dir: Path) -> Pki:
    return make_pki(pki_dir, "gateway")


@pytest.fixture(scope="module")
def upstream_pki(pki_dir: Path) -> Pki:
    return make_pki(pki_dir, "upstream")


@pytest.fixture(scope="module")
def https_upstream(upstream_pki: Pki) -> Iterator[str]:
    """The fault server behind TLS, its certificate signed by a CA nobody trusts by default."""
    url, stop = serve_in_thread(fault_server.build_app(), ssl_certfile=str(upstream_pki.cert),
                                ssl_keyfile=str(upstream_pki.key))
    assert url.startswith("https://")
    yield url
    stop()


def tls_args(gateway_pki: Pki, confdir: Path) -> list[str]:
    return ["--certs", f"*={gateway_pki.bundle}", "--set", f"confdir={confdir}"]


@pytest.fixture(scope="module")
def tls_gateway(backend: Backend, gateway_pki: Pki, upstream_pki: Pki,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """Serves TLS to clients and trusts the upstream's private CA."""
    workdir = tmp_path_factory.mktemp("tls-gateway")
    gw = start_gateway(backend.config(), workdir, env=backend.env(), name="tls", extra_args=[
        *tls_args(gateway_pki, workdir / "confdir"),
        "--set", f"ssl_verify_upstream_trusted_ca={upstream_pki.ca}"])
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def untrusting_gateway(backend: Backend, gateway_pki: Pki,
                       tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """Serves TLS to clients, but was not told to trust the upstream's CA."""
    workdir = tmp_path_factory.mktemp("untrusting-gateway")
    gw = start_gateway(backend.config(), workdir, env=backend.env(), name="untrusting",
                       extra_args=tls_args(gateway_pki, workdir / "confdir"))
    yield gw
    gw.stop()


def https_url(gw: Gateway) -> str:
    return gw.url.replace("http://", "https://", 1)


async def post(url: str, body: Any, consumer: TestConsumer, verify: ssl.SSLContext | bool) -> httpx2.Response:
    async with httpx2.AsyncClient(timeout=20, verify=verify) as client:
        return await client.post(url, content=json.dumps(body).encode(), headers={**MCP_HEADERS, **consumer.auth})


async def settled(backend: Backend, request_id: str) -> tuple[Any, ...]:
    """(status, refunded, reason) of the call once settled (a billed answer settles just after it is sent)."""
    def row() -> tuple[Any, ...] | None:
        rows = backend.query(  # with wallets, a billed call's row is written only when it settles
            "SELECT status, refunded, reason, settled_at FROM mcpmeter_calls WHERE request_id = %s", (request_id,))
        assert len(rows) <= 1
        if not rows:
            return None
        [(status, refunded, reason, done)] = rows
        return (int(status), int(refunded), reason) if done is not None else None
    return await eventually(row)


# --- clients -> gateway ------------------------------------------------------------------------------

async def test_clients_reach_the_gateway_over_tls_and_verify_its_certificate(
        tls_gateway: Gateway, backend: Backend, gateway_pki: Pki, fault_url: str) -> None:
    s = slug("tls")
    backend.add_listing(s, fault_url + "/mcp", price=PRICE)
    c = backend.add_consumer(credit=10_000)
    trust = ssl.create_default_context(cafile=str(gateway_pki.ca))

    r = await post(f"{https_url(tls_gateway)}/{s}", call("ok"), c, verify=trust)
    assert r.status_code == 200, r.text
    assert r.headers["X-Mcpmeter-Billed"] == str(PRICE) and r.headers["X-Mcpmeter-Balance"] == "9000"
    assert await settled(backend, r.headers["X-Mcpmeter-Request-Id"]) == (200, 0, "result")

    # The certificate served is the one given with --certs (for the address and for the name) ...
    host, port = "127.0.0.1", int(tls_gateway.url.rsplit(":", 1)[1])
    for name in ("127.0.0.1", "localhost"):
        with socket.create_connection((host, port), timeout=10) as raw, \
                trust.wrap_socket(raw, server_hostname=name) as tls:
            served = tls.getpeercert(binary_form=True)
        assert served == gateway_pki.leaf.public_bytes(serialization.Encoding.DER)
    # ... and a client that does not trust its CA refuses it: the key is never sent.
    with pytest.raises(httpx2.ConnectError):
        await post(f"{https_url(tls_gateway)}/{s}", call("ok"), c, verify=ssl.create_default_context())
    assert backend.balance(c.user_id) == 9000

    # Measured with mitmproxy 12.3 (README, "TLS"): plain HTTP is still served on the same port.
    async with httpx2.AsyncClient(timeout=20) as client:
        assert (await client.get(f"{tls_gateway.url}/health")).status_code == 200


# --- gateway -> https upstream -------------------------------------------------------------------------

async def test_an_upstream_signed_by_a_trusted_private_ca_is_called_and_billed(
        tls_gateway: Gateway, backend: Backend, gateway_pki: Pki, https_upstream: str) -> None:
    s = slug("pca")
    backend.add_listing(s, https_upstream + "/mcp", price=PRICE)
    c = backend.add_consumer(credit=10_000)
    before = fault_server.calls["ok"]

    r = await post(f"{https_url(tls_gateway)}/{s}", call("ok"), c,
                   verify=ssl.create_default_context(cafile=str(gateway_pki.ca)))
    assert r.status_code == 200, r.text
    assert r.json()["result"]["content"][0]["text"] == "ok"
    assert r.headers["X-Mcpmeter-Billed"] == str(PRICE)
    assert fault_server.calls["ok"] == before + 1
    assert backend.balance(c.user_id) == 9000
    request_id = r.headers["X-Mcpmeter-Request-Id"]
    assert await settled(backend, request_id) == (200, 0, "result")
    assert backend.ledger(c.user_id)[0] == (10_000, "topup", None)
    assert_calls_cost(backend, c, 10_000, [(-PRICE, "usage", request_id)])


async def test_an_upstream_whose_ca_is_not_trusted_is_502_and_refunded(
        untrusting_gateway: Gateway, backend: Backend, https_upstream: str) -> None:
    s = slug("untrusted")
    backend.add_listing(s, https_upstream + "/mcp", price=PRICE)
    c = backend.add_consumer(credit=10_000)
    before = fault_server.calls["ok"]

    r = await post(f"{untrusting_gateway.url}/{s}", call("ok"), c, verify=False)
    assert r.status_code == 502, r.text
    assert refusal(r)["error"] == "upstream_failed"
    assert r.headers["X-Mcpmeter-Refunded"] == "1" and r.headers["X-Mcpmeter-Balance"] == "10000"
    assert fault_server.calls["ok"] == before  # the call never reached the upstream
    assert backend.balance(c.user_id) == 10_000
    request_id = r.headers["X-Mcpmeter-Request-Id"]
    assert backend.ledger(c.user_id)[0] == (10_000, "topup", None)
    assert_calls_cost(backend, c, 10_000, [(-PRICE, "usage", request_id), (PRICE, "refund", request_id)])
    assert await settled(backend, request_id) == (502, 1, "upstream_failed")
    [(description,)] = backend.query("SELECT description FROM credit_transactions WHERE request_id = %s"
                                     " AND type = 'refund'", (request_id,))
    assert description.endswith("(upstream_failed)")
    assert backend.unreconciled() == []
