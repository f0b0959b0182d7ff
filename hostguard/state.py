"""The host's verification state: rollback versions, the digest cache and the verdict cache (one sqlite file).

sqlite gives atomic, durable writes and safe concurrency for ten hooks at once (WAL, busy timeout). The
rollback version is written only after a fully successful verification, by the caller.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from hostguard.digest import FileIdentity
from hostguard.errors import ConfigError

DB_NAME = "state.db"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    name TEXT PRIMARY KEY, version INTEGER NOT NULL, verified_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS digests (
    dev INTEGER NOT NULL, ino INTEGER NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL, PRIMARY KEY (dev, ino));
CREATE TABLE IF NOT EXISTS verdicts (
    key TEXT PRIMARY KEY, valid_from REAL NOT NULL, valid_until REAL NOT NULL, result TEXT NOT NULL);
"""


class StateStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._db = sqlite3.connect(directory / DB_NAME, timeout=15.0, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"state directory {directory} is unusable: {exc}") from None

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _run(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        try:
            return self._db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise ConfigError(f"state database {self.directory / DB_NAME}: {exc}") from None

    # --- rollback -----------------------------------------------------------------------------------------

    def highest_version(self, name: str) -> int | None:
        rows = self._run("SELECT version FROM versions WHERE name = ?", (name,))
        return int(rows[0][0]) if rows else None

    def record_version(self, name: str, version: int) -> None:
        """Raise the recorded version (never lower it) in one atomic statement."""
        self._run(
            "INSERT INTO versions (name, version, verified_at) VALUES (?, ?, ?) "
            "ON CONFLICT(name) DO UPDATE SET version = max(version, excluded.version), "
            "verified_at = excluded.verified_at",
            (name, version, time.time()),
        )

    # --- digest cache (hostguard.digest.DigestCache) ------------------------------------------------------

    def cached_digest(self, ident: FileIdentity) -> str | None:
        rows = self._run(
            "SELECT sha256 FROM digests WHERE dev = ? AND ino = ? AND size = ? AND mtime_ns = ? AND ctime_ns = ?",
            (ident.dev, ident.ino, ident.size, ident.mtime_ns, ident.ctime_ns),
        )
        return str(rows[0][0]) if rows else None

    def store_digest(self, ident: FileIdentity, sha256: str) -> None:
        self._run(
            "INSERT OR REPLACE INTO digests (dev, ino, size, mtime_ns, ctime_ns, sha256) VALUES (?, ?, ?, ?, ?, ?)",
            (ident.dev, ident.ino, ident.size, ident.mtime_ns, ident.ctime_ns, sha256),
        )

    # --- verdict cache ------------------------------------------------------------------------------------

    def cached_verdict(self, key: str, now: float) -> dict[str, Any] | None:
        rows = self._run(
            "SELECT result FROM verdicts WHERE key = ? AND valid_from <= ? AND ? < valid_until", (key, now, now)
        )
        if not rows:
            return None
        result = json.loads(rows[0][0])
        return result if isinstance(result, dict) else None

    def store_verdict(self, key: str, valid_from: float, valid_until: float, result: dict[str, Any]) -> None:
        self._run(
            "INSERT OR REPLACE INTO verdicts (key, valid_from, valid_until, result) VALUES (?, ?, ?, ?)",
            (key, valid_from, valid_until, json.dumps(result, sort_keys=True)),
        )
        # Keep the table small: expired verdicts are never read again.
        self._run("DELETE FROM verdicts WHERE valid_until < ?", (now_ts() - 86400,))


def now_ts() -> float:
    return time.time()


def default_state_dir() -> Path:
    return Path(os.environ.get("HOSTGUARD_STATE_DIR", "/var/lib/hostguard/state"))
