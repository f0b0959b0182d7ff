"""The verification path the hook and `hostguard verify` run, for the attack tests (issue 13).

`verify` calls `hostguard.host.verify_files.verify_files` — the very function object that
hostguard.preboot.decide and hostguard.commands.verify_cmd call (asserted in test_one_verification_path.py) —
with the trust directory's content already loaded (`LoadedTrust` stands in for TrustDirFiles: the tests build
trust stores that the directory loader would refuse, such as a leaf planted as a root) and the disks already
hashed, as the hook passes them (`digested`).
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from hostguard.host.digest import Digested, FileIdentity
from hostguard.host.state import StateStore
from hostguard.host.trustdir import TrustDirFiles
from hostguard.host.verify_files import Outcome, verify_files
from hostguard.signed.policy import DEFAULT_POLICY, SignerPolicy
from hostguard.signed.trust import TrustStore
from tests.testbed.pki import NOW


class LoadedTrust(TrustDirFiles):
    """A trust directory whose content is given as a loaded store and policy."""

    __slots__ = ("_loaded",)

    def __init__(self, store: TrustStore, policy: SignerPolicy = DEFAULT_POLICY) -> None:
        super().__init__(Path("/nonexistent/trust"), ())
        object.__setattr__(self, "_loaded", (store, policy))

    @property
    def fingerprint(self) -> str:
        return f"loaded-{id(self)}"  # never shared: a test's verdict cache holds only its own trust store

    def load(self, state: StateStore | None = None) -> tuple[TrustStore, SignerPolicy]:
        loaded: tuple[TrustStore, SignerPolicy] = object.__getattribute__(self, "_loaded")
        return loaded


def digested(sha256: str, size: int, name: str = "disk.img") -> Digested:
    """A disk as the hook hands it over after hashing it through its own descriptor."""
    return Digested(Path("/images") / name, sha256, size, FileIdentity(1, hash(name) & 0xFFFF, size, 0, 0), False)


def verify(
    envelope: bytes,
    store: TrustStore,
    policy: SignerPolicy = DEFAULT_POLICY,
    now: dt.datetime | float = NOW,
    *,
    state: StateStore | None = None,
    disks: list[Digested] | None = None,
) -> Outcome:
    return verify_files(
        envelope, Path(os.devnull), now=now, state=state, trust=LoadedTrust(store, policy), digested=disks
    )
