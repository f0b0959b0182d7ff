"""The host's verification state: rollback versions and the digest, verdict and parse caches (one sqlite file).

sqlite gives atomic, durable writes and safe concurrency for ten hooks at once (WAL, busy timeout). The
rollback version is written only after a fully successful verification, by the caller.

Opened on every hook run and `hostguard verify`, so opening is cheap: the C module `_sqlite3` is used directly
(the `sqlite3` package adds only date/time adapters we do not use, and its `datetime` import costs ~2 ms), and
the schema script runs only when `PRAGMA user_version` says the file predates this schema.
"""

from __future__ import annotations

import _sqlite3 as sqlite3  # what the sqlite3 package wraps; always present when that package is
import contextlib
import os
import time
from pathlib import Path

from hostguard.errors import ConfigError

TYPE_CHECKING = False  # typing costs ~3 ms to import; mypy treats this name like typing.TYPE_CHECKING
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any

    from hostguard.host.digest import FileIdentity

DB_NAME = "state.db"
SCHEMA_VERSION = 2
_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    name TEXT PRIMARY KEY, version INTEGER NOT NULL, verified_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS digests (
    dev INTEGER NOT NULL, ino INTEGER NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL, PRIMARY KEY (dev, ino));
CREATE TABLE IF NOT EXISTS verdicts (
    key TEXT PRIMARY KEY, valid_from REAL NOT NULL, valid_until REAL NOT NULL, result TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS parsed (
    key TEXT PRIMARY KEY, result TEXT NOT NULL, used REAL NOT NULL);
"""
# The parse cache (memoized pure parses, e.g. domain XML -> DomainSpec) keeps the most recently stored entries.
MAX_PARSED = 512
# Hashing the same file in several processes at once (ten domains on one base image) is serialized through
# this many lock files, chosen by the file's identity: the first hashes, the others then find its digest.
HASH_LOCKS = 64


class StateStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._db = sqlite3.connect(directory / DB_NAME, timeout=15.0, isolation_level=None)
            self._db.execute("PRAGMA synchronous=FULL")
            if self._db.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
                self._db.execute("PRAGMA journal_mode=WAL")  # persistent: kept in the file
                self._db.executescript(f"{_SCHEMA}PRAGMA user_version = {SCHEMA_VERSION};")
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
        """Raise the recorded version (never lower it) in one atomic statement.

        Re-verifying the recorded version writes nothing (no commit, no fsync): `verified_at` is when the
        version was first recorded.
        """
        self._run(
            "INSERT INTO versions (name, version, verified_at) VALUES (?, ?, ?) "
            "ON CONFLICT(name) DO UPDATE SET version = excluded.version, verified_at = excluded.verified_at "
            "WHERE excluded.version > versions.version",
            (name, version, time.time()),
        )

    # --- digest cache (hostguard.host.digest.DigestCache) ------------------------------------------------------

    def cached_digest(self, ident: FileIdentity) -> str | None:
        rows = self._run(
            "SELECT sha256 FROM digests WHERE dev = ? AND ino = ? AND size = ? AND mtime_ns = ? AND ctime_ns = ?",
            (ident.dev, ident.ino, ident.size, ident.mtime_ns, ident.ctime_ns),
        )
        return str(rows[0][0]) if rows else None

    @contextlib.contextmanager
    def hash_lock(self, ident: FileIdentity) -> Iterator[None]:
        """Hold the lock that serializes hashing the file with this (device, inode) across processes."""
        import fcntl

        locks = self.directory / "locks"
        try:
            locks.mkdir(mode=0o700, exist_ok=True)
            fd = os.open(
                locks / f"hash-{(ident.dev ^ ident.ino) % HASH_LOCKS}.lock",
                os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                0o600,
            )
        except OSError as exc:
            raise ConfigError(f"state directory {self.directory}: cannot open a hash lock: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

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
        import json

        result = json.loads(rows[0][0])
        return result if isinstance(result, dict) else None

    def store_verdict(self, key: str, valid_from: float, valid_until: float, result: dict[str, Any]) -> None:
        import json

        self._run(
            "INSERT OR REPLACE INTO verdicts (key, valid_from, valid_until, result) VALUES (?, ?, ?, ?)",
            (key, valid_from, valid_until, json.dumps(result, sort_keys=True)),
        )
        # Keep the table small: expired verdicts are never read again.
        self._run("DELETE FROM verdicts WHERE valid_until < ?", (now_ts() - 86400,))

    # --- parse cache: results of pure functions of bytes, keyed by the caller (see hostguard.domain.xmlparse) -------

    def cached_parse(self, key: str) -> str | None:
        rows = self._run("SELECT result FROM parsed WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    def store_parse(self, key: str, result: str) -> None:
        self._run("INSERT OR REPLACE INTO parsed (key, result, used) VALUES (?, ?, ?)", (key, result, now_ts()))
        self._run(
            "DELETE FROM parsed WHERE key NOT IN (SELECT key FROM parsed ORDER BY used DESC LIMIT ?)", (MAX_PARSED,)
        )


# --- CRL-number high-water marks (hostguard.host.trustdir) ----------------------------------------------------
# Self-contained: created on first use rather than in _SCHEMA, so this part needs no schema version of its own.
# Numbers (up to 20 octets, RFC 5280) are stored as zero-padded decimal text, whose order is numeric order.
_CRL_SCHEMA = """
CREATE TABLE IF NOT EXISTS crl_floors (scope TEXT PRIMARY KEY, number TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS trust_crls (
    fingerprint TEXT NOT NULL, scope TEXT NOT NULL, number TEXT NOT NULL, PRIMARY KEY (fingerprint, scope));
"""
_CRL_DIGITS = 49  # 2**160 < 10**49
MAX_TRUST_CRLS = 4096  # rows of trust_crls kept (oldest dropped): one per CRL sequence per trust-store version


class CrlFloors:
    """The highest CRL number used per CRL sequence, and the numbers each trust-store version held."""

    def __init__(self, state: StateStore) -> None:
        self._run = state._run
        try:
            state._db.executescript(_CRL_SCHEMA)
        except sqlite3.Error as exc:
            raise ConfigError(f"state database {state.directory / DB_NAME}: {exc}") from None

    def floor(self, scope: str) -> int | None:
        rows = self._run("SELECT number FROM crl_floors WHERE scope = ?", (scope,))
        return int(rows[0][0]) if rows else None

    def record(self, fingerprint: str, numbers: dict[str, int]) -> None:
        for scope, number in numbers.items():
            text = str(number).zfill(_CRL_DIGITS)
            self._run(
                "INSERT INTO crl_floors (scope, number) VALUES (?, ?) "
                "ON CONFLICT(scope) DO UPDATE SET number = excluded.number WHERE excluded.number > crl_floors.number",
                (scope, text),
            )
            self._run(
                "INSERT OR IGNORE INTO trust_crls (fingerprint, scope, number) VALUES (?, ?, ?)",
                (fingerprint, scope, text),
            )
        self._run("DELETE FROM trust_crls WHERE rowid <= (SELECT MAX(rowid) FROM trust_crls) - ?", (MAX_TRUST_CRLS,))

    def rolled_back(self, fingerprint: str) -> bool:
        rows = self._run(
            "SELECT 1 FROM trust_crls t JOIN crl_floors f ON t.scope = f.scope "
            "WHERE t.fingerprint = ? AND t.number < f.number LIMIT 1",
            (fingerprint,),
        )
        return bool(rows)


def now_ts() -> float:
    return time.time()


def default_state_dir() -> Path:
    return Path(os.environ.get("HOSTGUARD_STATE_DIR", "/var/lib/hostguard/state"))
