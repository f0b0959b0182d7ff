"""Calls that may never return, waited for a bounded time.

A libvirt client call can wait forever: libvirt 9.0's client was seen wedged after a keepalive timeout (libvirtd
SIGSTOPped while calls were in flight): the thread that ran the connection's I/O loop blocked inside glib, and
every other call on that connection waited on it, for good (tests/faults/test_libvirtd.py, ADR 0024 §8). Such
a call cannot be interrupted; what can be done is to stop waiting for it and use another connection.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class _Outcome:
    __slots__ = ("done", "error", "value")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.value: object = None


def call_within(seconds: float, fn: Callable[[], T], name: str) -> tuple[bool, T | None]:
    """`fn()` in a daemon thread of its own, waited for at most `seconds`: (True, its result), or (False, None)
    while it still runs (the thread is left to finish or block on its own). Its exception is raised here."""
    outcome = _Outcome()

    def run() -> None:
        try:
            outcome.value = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, raised there
            outcome.error = exc
        finally:
            outcome.done.set()

    threading.Thread(target=run, name=name, daemon=True).start()
    if not outcome.done.wait(seconds):
        return False, None
    if outcome.error is not None:
        raise outcome.error
    return True, outcome.value  # type: ignore[return-value]
