"""Run the real gateway: a `mitmdump -s mcpmeter_addon.py` subprocess on a free loopback port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import yaml

ROOT = Path(__file__).resolve().parent.parent
MITMDUMP = Path(sys.executable).with_name("mitmdump")
STARTUP_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_port() -> int:
    """A loopback port nothing listens on: the reverse-mode target, which must never be contacted."""
    return free_port()


@dataclass
class Gateway:
    url: str
    proc: subprocess.Popen[str]
    log_path: Path
    config_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def start_gateway(config: dict[str, Any], workdir: Path, env: dict[str, str] | None = None,
                  port: int | None = None, name: str = "gateway", extra_args: Sequence[str] = (),
                  script: Path | None = None, reverse_target: str | None = None) -> Gateway:
    """Start mitmdump with `config` written as YAML; returns once /health answers.

    `extra_args` are more mitmdump arguments (e.g. `-w FILE`, `--certs`, `--set
    ssl_verify_upstream_trusted_ca=...`); `script` replaces mcpmeter_addon.py (a copy to break
    under a running gateway); `reverse_target` replaces the closed port (an `https://` target makes
    clients speak TLS, and HTTP/2)."""
    config_path = write_config(workdir / f"{name}.yaml", config)
    port = port or free_port()
    log_path = workdir / f"{name}.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "REDIS_", "MCPMETER_"))}
    full_env.update(env or {})
    target = reverse_target or f"http://127.0.0.1:{closed_port()}"
    proc = subprocess.Popen(
        [str(MITMDUMP), "-s", str(script or ROOT / "mcpmeter_addon.py"),
         "--mode", f"reverse:{target}",
         "--listen-host", "127.0.0.1", "--listen-port", str(port),
         "--set", f"mcpmeter_config={config_path}", "--set", "termlog_verbosity=info", *extra_args],
        cwd=workdir, env=full_env, stdout=log_path.open("w"), stderr=subprocess.STDOUT, text=True,
    )
    scheme = "https" if target.startswith("https://") else "http"
    gw = Gateway(f"{scheme}://127.0.0.1:{port}", proc, log_path, config_path)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {proc.returncode}:\n{gw.log()}")
        try:
            if httpx2.get(gw.url + "/health", timeout=1, verify=False).status_code in (200, 503):
                return gw
        except httpx2.HTTPError:
            pass
        time.sleep(0.1)
    gw.stop()
    raise RuntimeError(f"gateway did not start:\n{gw.log()}")


def run_gateway_expecting_failure(config_path: Path, workdir: Path,
                                  timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """Start mitmdump with a config that must stop it at start; returns the finished process."""
    return subprocess.run(
        [str(MITMDUMP), "-s", str(ROOT / "mcpmeter_addon.py"),
         "--mode", f"reverse:http://127.0.0.1:{closed_port()}",
         "--listen-host", "127.0.0.1", "--listen-port", str(free_port()),
         "--set", f"mcpmeter_config={config_path}"],
        cwd=workdir, capture_output=True, text=True, timeout=timeout,
    )


@contextmanager
def gateway_pair(config: dict[str, Any], workdir: Path, env: dict[str, str]) -> Iterator[tuple[Gateway, Gateway]]:
    """Two gateways on the same backends (gateway-a, gateway-b), both stopped at the end."""
    a = start_gateway(config, workdir, env=env, name="gateway-a")
    try:
        b = start_gateway(config, workdir, env=env, name="gateway-b")
    except BaseException:
        a.stop()
        raise
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()
