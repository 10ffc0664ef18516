"""How the MySQL store talks to the server, on the worker threads (pymysql) and on the event loop
(aiomysql) alike: connection options, timeouts, retries, and what an error means."""

from __future__ import annotations

from typing import Any

import pymysql
from pymysql.constants import CLIENT

from ..config import MysqlSettings

CONNECT_TIMEOUT = 1.0  # seconds to open a connection, handshake included
IO_TIMEOUT = 5.0  # seconds a statement may take on the wire; above LOCK_WAIT_SECONDS
LOCK_WAIT_SECONDS = 2  # innodb_lock_wait_timeout for our sessions (the server default is 50)
DOWN_FOR = 1.0  # after a failed connect, refuse at once for this long instead of trying again
ATTEMPTS = 8  # a transaction chosen as a deadlock victim (or timed out on a lock) is run again...
RETRY_BUDGET = 5.0  # ... while it has taken less than this many seconds in all

# ER_LOCK_WAIT_TIMEOUT, ER_LOCK_DEADLOCK: InnoDB rolled the work back (the caller rolls back the rest).
# ER_AUTOINC_READ_FAILED: the same, on InnoDB's table AUTO-INC lock, which an INSERT ... SELECT takes
# (innodb_autoinc_lock_mode 1) while holding row locks; MariaDB reports its deadlock victim as 1467.
# (The per-call work writes with INSERT ... VALUES, which takes no such lock; the Ledger too.)
RETRYABLE = {1205, 1213, 1467}
GONE = {1053, 1077, 1152, 1927, 4031}  # server shutdown, aborted or killed connection, idle disconnect
DENIED = {1044, 1045}  # ER_DBACCESS_DENIED_ERROR, ER_ACCESS_DENIED_ERROR
UNKNOWN_DB = 1049
LOST = 2013  # CR_SERVER_LOST: what a statement past IO_TIMEOUT is reported as
CANNOT_CONNECT = 2003  # CR_CONN_HOST_ERROR: what a connect that fails or times out is reported as


def connect_args(s: MysqlSettings) -> dict[str, Any]:
    """The options of every connection, for pymysql.connect and aiomysql.connect (the database's
    keyword differs: the caller adds it)."""
    return {
        "host": s.host, "port": s.port, "user": s.user, "password": s.password, "charset": "utf8mb4",
        "autocommit": False, "connect_timeout": CONNECT_TIMEOUT,
        # FOUND_ROWS: rowcount and ROW_COUNT() count rows matched; MULTI_STATEMENTS: a batch of
        # charges or of billed settlements is one text (mysql_trip.py, mysql_batch.py), every value
        # in it escaped by pymysql.
        "client_flag": CLIENT.FOUND_ROWS | CLIENT.MULTI_STATEMENTS,
        "init_command": f"SET time_zone = '+00:00', innodb_lock_wait_timeout = {LOCK_WAIT_SECONDS}",
    }


def code(e: BaseException) -> int | None:
    return e.args[0] if e.args and isinstance(e.args[0], int) else None


def reason(e: BaseException) -> str:
    if len(e.args) >= 2:
        return f"({e.args[0]}) {e.args[1]}"
    return str(e) or type(e).__name__


def gone(e: BaseException, closed: bool) -> bool:
    """The connection cannot be used again: a client-side (2xxx) error, or the server ended it."""
    c = code(e)
    return isinstance(e, pymysql.err.InterfaceError) or closed or (c is not None and (c >= 2000 or c in GONE))
