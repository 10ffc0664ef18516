"""Ledger and catalogue adapters."""

from __future__ import annotations

from ..config import Config
from .base import CreditLimit, Store, StoreUnavailable, UnknownUser


def open_store(config: Config) -> Store:
    """Build the configured store; raises ConfigError if it cannot start."""
    if config.store == "mysql" and config.wallets:
        from .wallets import WalletStore

        return WalletStore(config)
    if config.store == "mysql":
        from .mysql import MysqlStore

        return MysqlStore(config)
    from .sqlite import SqliteStore

    return SqliteStore(config)


__all__ = ["CreditLimit", "Store", "StoreUnavailable", "UnknownUser", "open_store"]
