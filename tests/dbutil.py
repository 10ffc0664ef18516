"""MySQL / MariaDB for the tests: a throwaway database per use, always dropped afterwards.

The server is 127.0.0.1:3306 as root with no password unless MCPMETER_TEST_MYSQL_HOST, _PORT,
_USER, _PASSWORD say otherwise (the gateway's DB_* variables are deliberately not read: a
test must never touch a real database). When no server answers, MySQL tests skip and say why.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pymysql
import pytest

from addon.config import MysqlSettings

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "schema.sql"
REFERENCE_SCHEMA = Path(__file__).resolve().parent / "fixtures" / "reference-schema.sql"

SERVER = MysqlSettings(
    host=os.environ.get("MCPMETER_TEST_MYSQL_HOST", "127.0.0.1"),
    port=int(os.environ.get("MCPMETER_TEST_MYSQL_PORT", "3306")),
    user=os.environ.get("MCPMETER_TEST_MYSQL_USER", "root"),
    password=os.environ.get("MCPMETER_TEST_MYSQL_PASSWORD", ""),
    database="",
    pool_size=8,
)
_unreachable: str | None = None
_checked = False


def require_server() -> MysqlSettings:
    """The test server's settings, or skip the test with the reason it cannot be reached."""
    global _checked, _unreachable
    if not _checked:
        _checked = True
        try:
            connect(SERVER).close()
        except pymysql.Error as e:
            _unreachable = f"{e.args[0]}: {e.args[1]}" if len(e.args) > 1 else str(e)
    if _unreachable is not None:
        if os.environ.get("MCPMETER_REQUIRE_BACKENDS") == "1":  # CI: a skipped production test is a failure
            pytest.fail(f"MCPMETER_REQUIRE_BACKENDS=1 but MySQL/MariaDB is not reachable: {_unreachable}")
        pytest.skip(f"MySQL/MariaDB not reachable at {SERVER.host}:{SERVER.port} as {SERVER.user!r} "
                    f"({_unreachable}); set MCPMETER_TEST_MYSQL_HOST/_PORT/_USER/_PASSWORD to run these tests")
    return SERVER


def connect(settings: MysqlSettings) -> pymysql.connections.Connection:
    """A plain autocommit connection in UTC, for setting up and inspecting test databases."""
    return pymysql.connect(host=settings.host, port=settings.port, user=settings.user, password=settings.password,
                           database=settings.database or None, charset="utf8mb4", autocommit=True,
                           connect_timeout=2, init_command="SET time_zone = '+00:00'")


@contextmanager
def scratch_database(*sql_files: Path) -> Iterator[MysqlSettings]:
    """A new database `mcpmeter_test_<pid>_<random>` with `sql_files` loaded; dropped on exit, whatever happens."""
    server = require_server()
    name = f"mcpmeter_test_{os.getpid()}_{secrets.token_hex(4)}"
    _admin(server, f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
    try:
        settings = replace(server, database=name)
        for path in sql_files:
            load_sql(settings, path)
        yield settings
    finally:
        _admin(server, f"DROP DATABASE IF EXISTS `{name}`")


def _admin(server: MysqlSettings, statement: str) -> None:
    conn = connect(server)  # a new connection each time: a test may have killed the old ones
    try:
        conn.cursor().execute(statement)
    finally:
        conn.close()


def load_sql(settings: MysqlSettings, path: Path) -> None:
    conn = connect(settings)
    try:
        cur = conn.cursor()
        for statement in split_sql(path.read_text()):
            cur.execute(statement)
    finally:
        conn.close()


def split_sql(text: str) -> list[str]:
    """The statements of a schema dump: `--` comment lines dropped, split at `;` ending a line."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("--")]
    return [s.strip() for s in re.split(r";\s*$", "\n".join(lines), flags=re.MULTILINE) if s.strip()]


class Db:
    """Plain SQL on a test database (autocommit, UTC), as an operator or the Laravel app would write it."""

    def __init__(self, settings: MysqlSettings) -> None:
        self.settings = settings
        self.conn = connect(settings)

    def execute(self, statement: str, args: Sequence[Any] = ()) -> int:
        cur = self.conn.cursor()
        cur.execute(statement, tuple(args))
        return cur.lastrowid if statement.lstrip().upper().startswith("INSERT") else cur.rowcount

    def rows(self, statement: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        cur = self.conn.cursor()
        cur.execute(statement, tuple(args))
        return list(cur.fetchall())

    def columns(self, table: str) -> set[str]:
        return {r[0] for r in self.rows("SELECT COLUMN_NAME FROM information_schema.COLUMNS"
                                        " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = %s", (table,))}

    def close(self) -> None:
        self.conn.close()


def schema_snapshot(db: Db) -> dict[str, list[tuple[Any, ...]]]:
    """Every column, index and procedure of a database as information_schema describes them, for comparing layouts."""
    return {
        "columns": db.rows(
            "SELECT TABLE_NAME, ORDINAL_POSITION, COLUMN_NAME, COLUMN_TYPE, IS_NULLABLE, COLUMN_DEFAULT,"
            " COLLATION_NAME, EXTRA FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE()"
            " ORDER BY TABLE_NAME, ORDINAL_POSITION"),
        "indexes": db.rows(
            "SELECT TABLE_NAME, INDEX_NAME, NON_UNIQUE, SEQ_IN_INDEX, COLUMN_NAME FROM information_schema.STATISTICS"
            " WHERE TABLE_SCHEMA = DATABASE() ORDER BY TABLE_NAME, INDEX_NAME, SEQ_IN_INDEX"),
        "tables": db.rows("SELECT TABLE_NAME, ENGINE, TABLE_COLLATION FROM information_schema.TABLES"
                          " WHERE TABLE_SCHEMA = DATABASE() ORDER BY TABLE_NAME"),
        "routines": db.rows("SELECT ROUTINE_NAME, ROUTINE_TYPE, SECURITY_TYPE, ROUTINE_DEFINITION"
                            " FROM information_schema.ROUTINES WHERE ROUTINE_SCHEMA = DATABASE()"
                            " ORDER BY ROUTINE_NAME"),
    }


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SilentServer:
    """Accepts TCP connections and never says a word: a database host that hangs."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()


class Relay:
    """A TCP relay to the test server that can be switched off and on: MySQL going away and coming back."""

    def __init__(self, target: MysqlSettings) -> None:
        self.target = (target.host, target.port)
        self.port = closed_port()
        self._listener: socket.socket | None = None
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._skip: int | None = None  # requests to let through before the one whose answer is lost
        self._to: bytes | None = None  # only requests containing these bytes count
        self._times = 0  # answers still to lose, one after the other
        self.lost = 0  # answers lost so far

    def lose_answer(self, after: int = 0, to: bytes | None = None, times: int = 1) -> None:
        """The answer to the next request sent (on any connection) after `after` more never reaches the
        client: the relay reads it to its end (the server ran the statements, COMMIT included, and
        answered), then cuts that connection. What a network cut right after a COMMIT looks like.
        With `to`, only requests whose bytes contain it count (a CALL of one procedure: the lookups,
        the connection's handshake and its init_command go through); `times` such answers are lost."""
        with self._lock:
            self._skip, self._to, self._times = after, to, times

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        """Refuse new connections and cut the open ones."""
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _sent(self, data: bytes) -> bool:
        """A request goes to the server: True for one whose answer is lost (one more let through: False)."""
        with self._lock:
            if self._skip is None or (self._to is not None and self._to not in data):
                return False
            if self._skip > 0:
                self._skip -= 1
                return False
            self._times -= 1
            if self._times <= 0:
                self._skip = None
            return True

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=2)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._socks += [client, upstream]
            lose = threading.Event()  # set: this connection's next answer is lost
            threading.Thread(target=self._pipe, args=(client, upstream, False, lose), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True, lose), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, answers: bool, lose: threading.Event) -> None:
        try:
            while data := src.recv(65536):
                if not answers:
                    if self._sent(data):
                        lose.set()
                elif lose.is_set():
                    with self._lock:
                        self.lost += 1
                    src.settimeout(0.3)
                    while src.recv(65536):  # the rest of the answer, until the server is done
                        pass
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
