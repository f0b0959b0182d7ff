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
import errno
import os
import time
from pathlib import Path

from hostguard.errors import ConfigError
from hostguard.host.securepath import check_secure, check_secure_file

TYPE_CHECKING = False  # typing costs ~3 ms to import; mypy treats this name like typing.TYPE_CHECKING
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any

    from hostguard.host.digest import FileIdentity

DB_NAME = "state.db"
# sqlite's primary result codes (the low byte of an extended code) that name a cause an admin can act on.
SQLITE_CORRUPT, SQLITE_FULL, SQLITE_IOERR, SQLITE_NOTADB = 11, 13, 10, 26
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
# Seconds a connection waits for another's write lock (sqlite's busy handler) before the open or write fails.
BUSY_TIMEOUT = 15.0
# Written once the host has made its database: a missing database is then a loss to report, not a first use.
CREATED_MARKER = "state.created"
RECOVER = (
    "restore the state directory from a backup, or accept the loss (every image's next version is trusted as "
    "its first) by moving {db} aside and removing {marker}"
)


class StateStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        path = directory / DB_NAME
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Rows here are trusted (verdicts, digests, rollback versions): refuse a directory, or a database
            # file, that anyone but root (or the user running hostguard) could have written (issue 22/10).
            check_secure(directory, "state directory")
            if not os.path.lexists(path):
                _create(directory)
            for name in (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm"):
                with contextlib.suppress(FileNotFoundError):
                    check_secure_file(os.lstat(directory / name), directory / name, "state database")
            # mode=rw: never create the file here. A database that vanished after the host made one is refused
            # by _create (its rollback high-water marks are lost), not silently replaced by an empty one.
            self._db = sqlite3.connect(_uri(path), uri=True, timeout=BUSY_TIMEOUT, isolation_level=None)
            self._db.execute("PRAGMA synchronous=FULL")
            if self._db.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
                _upgrade(self._db, directory)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(_unusable(f"state directory {directory} is unusable", directory, exc)) from None

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
            raise ConfigError(_unusable(f"state database {self.directory / DB_NAME}", self.directory, exc)) from None

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


def _uri(path: Path) -> str:
    """A `file:` URI opening an existing database read-write (the characters URIs give a meaning escaped)."""
    quoted = str(path).replace("%", "%25").replace("?", "%3f").replace("#", "%23")
    return f"file:{quoted}?mode=rw"


def _create(directory: Path) -> None:
    """Make the database whole under a temporary name, then link it into place: no process ever opens a
    half-initialised file. (Two processes initialising one file raced on the switch to WAL, which sqlite makes
    without its busy handler: one of them failed with "database is locked".)"""
    with _schema_lock(directory):
        if not os.path.lexists(directory / DB_NAME):  # else another process made it while we waited
            _create_locked(directory)


def _create_locked(directory: Path) -> None:
    import threading

    path, marker = directory / DB_NAME, directory / CREATED_MARKER
    if os.path.lexists(marker):
        raise ConfigError(
            f"state database {path} is missing, but this host created one ({marker} exists): its rollback "
            f"high-water marks are lost, so an older image version would pass; "
            + RECOVER.format(db=path, marker=marker)
        )
    tmp = directory / f".{DB_NAME}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        db = sqlite3.connect(str(tmp), isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")  # persistent: kept in the file
            db.executescript(f"{_SCHEMA}PRAGMA user_version = {SCHEMA_VERSION};")
        finally:
            db.close()  # the last connection checkpoints: the file alone holds everything
        fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        # The marker goes first: a database in place always has one (a crash in between errs on the safe side,
        # a refusal that names the marker to remove).
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # atomic, never replaces (and under the schema lock: no one else is linking)
        except OSError:
            marker.unlink(missing_ok=True)
            raise
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            leftover.unlink(missing_ok=True)


@contextlib.contextmanager
def _schema_lock(directory: Path) -> Iterator[None]:
    """Creating or upgrading the database: one process at a time (others wait, then find it done)."""
    import fcntl

    (directory / "locks").mkdir(mode=0o700, exist_ok=True)
    fd = os.open(directory / "locks" / "schema.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _upgrade(db: Any, directory: Path) -> None:
    """Bring a database made by an older version to this schema: one process at a time, in one transaction."""
    with _schema_lock(directory):
        if db.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
            return  # another process upgraded it meanwhile
        has_versions = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'versions'").fetchall()
        if not has_versions and os.path.lexists(directory / CREATED_MARKER):
            path = directory / DB_NAME
            raise ConfigError(
                f"state database {path} is empty, but this host created one with content: its rollback "
                f"high-water marks are lost, so an older image version would pass; "
                + RECOVER.format(db=path, marker=directory / CREATED_MARKER)
            )
        db.execute("PRAGMA journal_mode=WAL")  # a no-op on every database hostguard made
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    if not os.path.lexists(directory / CREATED_MARKER):
        (directory / CREATED_MARKER).write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ\n", time.gmtime()))


def _unusable(what: str, directory: Path, exc: BaseException) -> str:
    """One line for an error opening or writing the database; a full file system is named as such, with where
    (sqlite reports ENOSPC as "database or disk is full" or, writing its shared-memory file, "disk I/O error")."""
    detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    code = getattr(exc, "sqlite_errorcode", None)
    if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or (
        code is not None and code & 0xFF in (SQLITE_FULL, SQLITE_IOERR)
    ):
        # lazy: on the hook's start-up path, needed only when a cache misses or on a rarer branch
        from hostguard.host.fsutil import full_filesystem

        full = full_filesystem(directory)
        if full is not None:
            return f"{what}: {full}: {detail}; nothing was recorded"
    if code is not None and code & 0xFF in (SQLITE_CORRUPT, SQLITE_NOTADB):
        return f"{what}: {detail}; " + RECOVER.format(db=directory / DB_NAME, marker=directory / CREATED_MARKER)
    return f"{what}: {detail}"


def now_ts() -> float:
    return time.time()


def default_state_dir() -> Path:
    return Path(os.environ.get("HOSTGUARD_STATE_DIR", "/var/lib/hostguard/state"))
