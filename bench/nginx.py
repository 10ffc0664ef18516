"""nginx from deploy/nginx.conf on loopback, as a child process: for the scale-out test and benchmark.

The config file is the README's recipe itself; only its ${MCPMETER_...} placeholders are filled in
here (the listen address and the gateways'), so what is tested and measured is what is documented.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import textwrap
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "deploy" / "nginx.conf"
README = ROOT / "README.md"
STARTUP_TIMEOUT = 10.0
_PLACEHOLDER = re.compile(r"\$\{(MCPMETER_[A-Z_]+)\}")


class NginxMissing(Exception):
    """No nginx binary here (install the Debian package `nginx`)."""


def binary() -> str:
    """MCPMETER_NGINX if set, else `nginx` on PATH or in the sbin directories a non-root PATH lacks."""
    wanted = os.environ.get("MCPMETER_NGINX")
    if wanted:
        if not os.access(wanted, os.X_OK):
            raise NginxMissing(f"MCPMETER_NGINX={wanted} is not an executable")
        return wanted
    found = shutil.which("nginx", path=os.environ.get("PATH", "") + ":/usr/sbin:/usr/local/sbin")
    if found is None:
        raise NginxMissing("nginx is not installed (apt-get install nginx)")
    return found


def render(values: Mapping[str, str], template: Path = CONFIG) -> str:
    """deploy/nginx.conf with every ${MCPMETER_...} replaced; a placeholder without a value is an error."""
    text = template.read_text()
    missing = sorted(set(_PLACEHOLDER.findall(text)) - set(values))
    if missing:
        raise ValueError(f"no value for {', '.join(missing)} in {template}")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


def location_block(text: str) -> str:
    """The `location / { ... }` block of an nginx config (or of the README's snippet), dedented."""
    m = re.search(r"^([ \t]*)location / \{\n(.*?)^\1\}", text, flags=re.MULTILINE | re.DOTALL)
    if m is None:
        raise ValueError("no `location / { ... }` block")
    return textwrap.dedent(m.group(0)).strip() + "\n"


def readme_snippet(readme: Path = README) -> str:
    """The nginx code block of the README's scale-out recipe."""
    m = re.search(r"```nginx\n(.*?)```", readme.read_text(), flags=re.DOTALL)
    if m is None:
        raise ValueError("the README has no ```nginx block")
    return m.group(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Nginx:
    """A running nginx master (and its workers), listening on 127.0.0.1:port."""

    proc: subprocess.Popen[bytes]
    port: int
    prefix: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def pids(self) -> list[int]:
        """The master and its workers (their CPU is nginx's cost per request)."""
        out = [self.proc.pid]
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    status = Path(f"/proc/{entry}/status").read_text()
                except OSError:
                    continue
                if re.search(rf"^PPid:\s*{self.proc.pid}$", status, flags=re.MULTILINE):
                    out.append(int(entry))
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: a fast shutdown, workers included
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start(gateways: Sequence[str], prefix: Path, port: int | None = None,
          cpus: set[int] | None = None, extra_http: str = "") -> Nginx:
    """Run deploy/nginx.conf in front of `gateways` ("127.0.0.1:PORT", two of them) under `prefix`.

    `extra_http`: directives added at the top of its `http` block, as an operator's own settings would be.

    Returns once nginx accepts connections; raises NginxMissing without nginx, RuntimeError
    (with its log) when it does not start."""
    if len(gateways) != 2:
        raise ValueError("deploy/nginx.conf names two gateways")
    nginx = binary()
    port = port or free_port()
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / "tmp").mkdir(exist_ok=True)
    conf = prefix / "nginx.conf"
    text = render({"MCPMETER_LISTEN": f"127.0.0.1:{port}", "MCPMETER_GATEWAY_A": gateways[0],
                   "MCPMETER_GATEWAY_B": gateways[1]})
    conf.write_text(text.replace("\nhttp {\n", f"\nhttp {{\n    {extra_http}\n", 1) if extra_http else text)
    check = subprocess.run([nginx, "-t", "-q", "-c", str(conf), "-p", str(prefix), "-e", "stderr"],
                           capture_output=True, text=True, timeout=STARTUP_TIMEOUT)
    if check.returncode != 0:
        raise RuntimeError(f"nginx rejects the rendered deploy/nginx.conf:\n{check.stderr}")
    log = (prefix / "error.log").open("wb")
    proc = subprocess.Popen([nginx, "-c", str(conf), "-p", str(prefix), "-e", str(prefix / "error.log"),
                             "-g", "daemon off;"], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    log.close()
    running = Nginx(proc, port, prefix)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited with {proc.returncode}:\n{running.log()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return running
        except OSError:
            if time.monotonic() > deadline:
                running.stop()
                raise RuntimeError(f"nginx did not listen on 127.0.0.1:{port}:\n{running.log()}") from None
            time.sleep(0.05)
