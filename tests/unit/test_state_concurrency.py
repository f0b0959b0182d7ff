"""The state database under concurrent use: opening and writing wait for each other (sqlite's busy handler),
they never fail a hook decision or a post-start check because another process holds the database."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from hostguard.errors import ConfigError
from hostguard.host import state as state_module
from hostguard.host.state import CREATED_MARKER, DB_NAME, StateStore


class _HoldsARead:
    """A connection that, right after its first statement, holds a read transaction until told to go on: another
    check reading the database at the moment this one opens it for the first time."""

    def __init__(self, conn: Any, holding: threading.Event, go_on: threading.Event) -> None:
        self.conn, self.holding, self.go_on = conn, holding, go_on

    def execute(self, sql: str, *args: Any) -> Any:
        result = self.conn.execute(sql, *args)
        if not self.holding.is_set():
            self.conn.execute("BEGIN")
            self.conn.execute("SELECT count(*) FROM sqlite_master").fetchall()
            self.holding.set()
            self.go_on.wait(timeout=30)
            self.conn.execute("COMMIT")
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)


def test_opening_a_new_state_directory_while_another_check_reads_it_succeeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two checks of one domain at once (STARTED event + the hook's notification) on a new host: the second switched
    the fresh file to WAL while the first read it, which sqlite refuses at once (no busy wait for that lock
    upgrade): "database is locked", an error verdict. The file now appears whole (made aside, then linked)."""
    real: Any = getattr(state_module, "sqlite3")  # noqa: B009 - the module it connects with
    holding, go_on = threading.Event(), threading.Event()
    first = threading.get_ident()

    class Module:
        Error = real.Error

        @staticmethod
        def connect(database: Any, *args: Any, **kwargs: Any) -> Any:
            conn = real.connect(database, *args, **kwargs)
            is_db = str(database).split("?")[0].endswith(f"/{DB_NAME}")
            return _HoldsARead(conn, holding, go_on) if is_db and threading.get_ident() == first else conn

    monkeypatch.setattr(state_module, "sqlite3", Module)
    errors: list[str] = []

    def second() -> None:
        holding.wait(timeout=30)
        try:
            with StateStore(tmp_path / "state") as store:
                store.record_version("image-2", 2)
        except ConfigError as exc:
            errors.append(exc.message)
        finally:
            go_on.set()

    t = threading.Thread(target=second)
    t.start()
    with StateStore(tmp_path / "state") as store:
        store.record_version("image-1", 1)
    t.join()
    assert errors == []
    monkeypatch.undo()
    with StateStore(tmp_path / "state") as store:
        assert [store.highest_version(f"image-{n}") for n in (1, 2)] == [1, 2]
    assert [p.name for p in (tmp_path / "state").iterdir() if "tmp" in p.name] == []


def test_many_processes_opening_a_new_state_directory_at_once_all_succeed(tmp_path: Path) -> None:
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    for trial in range(5):
        directory = tmp_path / f"state-{trial}"
        barrier, results = ctx.Barrier(6), ctx.Queue()
        procs = [ctx.Process(target=_open_and_write, args=(directory, n, barrier, results)) for n in range(6)]
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join()
        assert outcomes == ["ok"] * 6


def _open_and_write(directory: Path, n: int, barrier: Any, results: Any) -> None:
    barrier.wait()
    try:
        with StateStore(directory) as store:
            store.record_version(f"image-{n}", n)
        results.put("ok")
    except ConfigError as exc:
        results.put(exc.message)


def test_a_writer_holding_the_database_makes_an_open_and_a_write_wait_not_fail(tmp_path: Path) -> None:
    import _sqlite3

    StateStore(tmp_path).close()
    holder = _sqlite3.connect(str(tmp_path / DB_NAME), isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("INSERT INTO versions VALUES ('held', 7, 0)")
    release = threading.Timer(0.8, lambda: holder.execute("COMMIT"))
    release.start()
    started = time.monotonic()
    with StateStore(tmp_path) as store:
        store.record_version("waiting", 1)
        assert store.highest_version("held") == 7
    assert time.monotonic() - started >= 0.7
    release.join()
    holder.close()


def test_a_deleted_state_database_is_refused_not_silently_recreated(tmp_path: Path) -> None:
    """Its rollback high-water marks are gone: an empty database would let an older image version pass."""
    with StateStore(tmp_path) as store:
        store.record_version("image", 5)
    assert (tmp_path / CREATED_MARKER).exists()
    for p in tmp_path.glob(f"{DB_NAME}*"):
        p.unlink()
    with pytest.raises(ConfigError) as err:
        StateStore(tmp_path)
    assert "is missing, but this host created one" in err.value.message
    assert "rollback high-water marks are lost" in err.value.message
    assert f"removing {tmp_path / CREATED_MARKER}" in err.value.message
    assert not (tmp_path / DB_NAME).exists()
    # The recovery the line names: accept the loss explicitly.
    (tmp_path / CREATED_MARKER).unlink()
    with StateStore(tmp_path) as store:
        assert store.highest_version("image") is None


def test_an_emptied_state_database_is_refused(tmp_path: Path) -> None:
    StateStore(tmp_path).close()
    (tmp_path / DB_NAME).write_bytes(b"")
    with pytest.raises(ConfigError, match="is empty, but this host created one"):
        StateStore(tmp_path)


def test_a_garbage_state_database_is_refused_with_how_to_recover(tmp_path: Path) -> None:
    StateStore(tmp_path).close()
    (tmp_path / DB_NAME).write_bytes(b"garbage" * 1000)
    with pytest.raises(ConfigError) as err:
        StateStore(tmp_path)
    assert "file is not a database" in err.value.message
    assert "restore the state directory from a backup" in err.value.message


def test_a_database_from_before_the_schema_version_is_upgraded_in_place(tmp_path: Path) -> None:
    import _sqlite3

    db = _sqlite3.connect(str(tmp_path / DB_NAME), isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE versions (name TEXT PRIMARY KEY, version INTEGER NOT NULL, verified_at REAL NOT NULL)")
    db.execute("INSERT INTO versions VALUES ('old', 3, 0)")
    db.close()
    with StateStore(tmp_path) as store:
        assert store.highest_version("old") == 3
        store.store_parse("k", "v")
    assert (tmp_path / CREATED_MARKER).exists()


def test_a_database_full_error_is_not_taken_for_a_full_disk(tmp_path: Path) -> None:
    """sqlite's "database or disk is full" also means a page limit; the line claims a full disk only when the file
    system says so."""
    import _sqlite3

    with StateStore(tmp_path) as store:
        store._db.execute("PRAGMA max_page_count = 1")
        with pytest.raises(ConfigError) as err:
            store.store_parse("k", "v" * 100_000)
    assert "database or disk is full" in err.value.message
    assert "is full (" not in err.value.message
    assert _sqlite3.connect(str(tmp_path / DB_NAME)).execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_a_first_open_racing_the_creator_waits_for_it_instead_of_taking_its_marker_for_a_loss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The creator writes state.created before it links the database into place: another first open that comes
    in between must wait for the link, not report a deleted database."""
    import os

    real_link = os.link
    about_to_link, go_on = threading.Event(), threading.Event()

    def slow_link(src: Any, dst: Any) -> None:
        about_to_link.set()
        go_on.wait(timeout=30)
        real_link(src, dst)

    monkeypatch.setattr(os, "link", slow_link)
    errors: list[str] = []

    def creator() -> None:
        with StateStore(tmp_path) as store:
            store.record_version("first", 1)

    def second() -> None:
        try:
            with StateStore(tmp_path) as store:
                store.record_version("second", 2)
        except ConfigError as exc:
            errors.append(exc.message)

    a = threading.Thread(target=creator)
    a.start()
    assert about_to_link.wait(timeout=30) and (tmp_path / CREATED_MARKER).exists()
    b = threading.Thread(target=second)
    b.start()
    time.sleep(0.3)  # b is at the lock now
    go_on.set()
    a.join()
    b.join()
    assert errors == []
    monkeypatch.undo()
    with StateStore(tmp_path) as store:
        assert (store.highest_version("first"), store.highest_version("second")) == (1, 2)
