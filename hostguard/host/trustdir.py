"""The host's trust directory on disk: roots/, intermediates/, crls/ and signers.toml.

Reading (`read_trust_dir`, no cryptography import) is split from loading (`TrustDirFiles.load`), so the
verdict cache can key on the exact bytes of the trust store without paying for parsing certificates.
Anything wrong in the directory is a ConfigError: a broken trust store never means "skip checks".
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from hostguard.errors import ConfigError, CrlStateError, FormatError
from hostguard.host.digest import sha256_hex
from hostguard.host.securepath import check_secure, check_secure_file
from hostguard.record import Record

TYPE_CHECKING = False  # typing costs ~3 ms to import; mypy treats this name like typing.TYPE_CHECKING
if TYPE_CHECKING:
    from collections.abc import Callable

    from hostguard.host.state import StateStore
    from hostguard.signed.policy import SignerPolicy
    from hostguard.signed.trust import TrustStore

MAX_TRUST_FILE = 16 * 1024 * 1024
MAX_TRUST_FILES = 1000
SUBDIRS = {"roots": (".pem", ".crt"), "intermediates": (".pem", ".crt"), "crls": (".pem", ".crl")}


class TrustDirFiles(Record):
    directory: Path
    files: tuple[tuple[str, bytes], ...]  # (relative path, content), sorted

    @property
    def fingerprint(self) -> str:
        parts: list[bytes] = []
        for name, data in self.files:
            parts.append(b"%d:%s\0%d:" % (len(name), name.encode(), len(data)))
            parts.append(data)
        return sha256_hex(*parts)

    def load(self, state: StateStore | None = None) -> tuple[TrustStore, SignerPolicy]:
        """Parse and check everything. With `state`, CRL numbers are held to this host's high-water marks."""
        import tomllib

        # lazy: on the hook's start-up path, needed only when a cache misses or on a rarer branch
        from hostguard.signed import policy as policy_mod
        from hostguard.signed import trust

        roots, intermediates, crls = [], [], []
        signers_doc: dict[str, object] | None = None
        for name, data in self.files:
            where = self.directory / name
            try:
                if name.startswith("roots/"):
                    for cert in trust.load_pem_certificates(data, str(where)):
                        if not trust.is_ca(cert):
                            raise ConfigError(
                                f"{where}: {trust.subject_of(cert)!r} is not a CA (CA:TRUE) certificate; "
                                "only CA certificates may be roots"
                            )
                        roots.append(cert)
                elif name.startswith("intermediates/"):
                    intermediates.extend(trust.load_pem_certificates(data, str(where)))
                elif name.startswith("crls/"):
                    crls.append(trust.load_crl(data, str(where)))
                elif name == "signers.toml":
                    signers_doc = tomllib.loads(data.decode("utf-8"))
            except FormatError as exc:
                raise ConfigError(f"trust directory: {exc.message}") from None
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{where}: {exc}") from None
        if not roots:
            raise ConfigError(f"trust directory {self.directory} has no root certificates in roots/")
        store = trust.TrustStore(roots=tuple(roots), intermediates=tuple(intermediates), crls=tuple(crls))
        signer_policy = policy_mod.DEFAULT_POLICY
        if signers_doc is not None:
            # `root` pins resolve against roots/ now: a pin naming no root, or two, is a configuration error.
            signer_policy = policy_mod.policy_from_toml(signers_doc, trust.resolve_roots(store))
        store = trust.TrustStore(store.roots, store.intermediates, store.crls, signer_policy.require_crl)
        trust.check_crl_requirements(store)
        if state is not None:
            self._check_crl_numbers(store, state)
        return store, signer_policy

    def _check_crl_numbers(self, store: TrustStore, state: StateStore) -> None:
        """Refuse a CRL older than one this host already used (an older genuine CRL, still before its
        nextUpdate, would un-revoke); then raise the marks. Several CRLs of one sequence here: the newest
        counts, the older ones only add revocations."""
        # lazy: on the hook's start-up path, needed only when a cache misses or on a rarer branch
        from hostguard.host.state import CrlFloors  # the caller has imported it: it passes a StateStore
        from hostguard.signed import trust

        newest: dict[str, trust.CrlMark] = {}
        for mark in trust.crl_marks(store):
            if mark.scope not in newest or mark.number > newest[mark.scope].number:
                newest[mark.scope] = mark
        floors = CrlFloors(state)
        for mark in newest.values():
            floor = floors.floor(mark.scope)
            if floor is not None and mark.number < floor:
                raise CrlStateError(
                    _rollback_message(self.directory, f"number {mark.number} from {mark.issuer!r}", floor)
                )
        floors.record(self.fingerprint, {m.scope: m.number for m in newest.values()})


def _rollback_message(directory: Path, which: str, floor: int | None) -> str:
    than = f"number {floor}" if floor is not None else "one"
    return (
        f"a CRL in {directory}/crls ({which}) is older than {than} already used on this host (CRL rollback): "
        "install the current CRL"
    )


def check_crl_rollback(files: TrustDirFiles, state: StateStore) -> None:
    """Before a cached verdict is used: were this trust directory's CRLs superseded on this host since it was
    loaded? (A cached verdict is keyed by the trust directory's bytes, which an older CRL restores.)"""
    # lazy: on the hook's start-up path, needed only when a cache misses or on a rarer branch
    from hostguard.host.state import CrlFloors  # the caller has imported it: it passes a StateStore

    if CrlFloors(state).rolled_back(files.fingerprint):
        raise CrlStateError(_rollback_message(files.directory, "restored", None))


def _check_not_writable_by_others(path: Path, st: os.stat_result) -> None:
    if st.st_mode & 0o002:
        raise ConfigError(f"{path} is world-writable: anyone could add a trust root")
    # Owned by root (or us), no group/other write, a symlink's target too (hostguard.host.securepath, issue 22/10).
    if path.is_symlink():
        check_secure(path, "trust directory entry")
    else:
        check_secure_file(st, path, "trust directory entry")


def _read(directory_fd: int, name: str, path: Path) -> bytes:
    """The file `name` of the directory open as `directory_fd` (`path` names it in messages)."""
    try:
        st = os.stat(name, dir_fd=directory_fd)
        _check_not_writable_by_others(path, st)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path} is not a regular file")
        if st.st_size > MAX_TRUST_FILE:
            raise ConfigError(f"{path} is larger than {MAX_TRUST_FILE} bytes")
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=directory_fd)
        with os.fdopen(fd, "rb") as fh:
            return fh.read(MAX_TRUST_FILE + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None


def _is(directory_fd: int, name: str, kind: Callable[[int], bool]) -> bool:
    try:
        return kind(os.stat(name, dir_fd=directory_fd).st_mode)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise ConfigError(f"cannot read trust directory entry {name}: {exc.strerror}") from None


def _open_directory(name: str | Path, dir_fd: int | None = None) -> int:
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)


def read_trust_dir(directory: Path) -> TrustDirFiles:
    """Everything in the trust directory, read through one open descriptor of it: a store swapped atomically
    meanwhile (a symlink or the directory renamed to the new version) is read whole, old or new, never a mix of
    the old roots and the new CRLs (issue 20)."""
    files: list[tuple[str, bytes]] = []
    try:
        _check_not_writable_by_others(directory, directory.stat())
        check_secure(directory, "trust directory")
        top = _open_directory(directory)
    except OSError as exc:
        raise ConfigError(f"cannot read trust directory {directory}: {exc.strerror}") from None
    try:
        if not _is(top, "roots", stat.S_ISDIR):
            raise ConfigError(f"trust directory {directory} has no roots/ directory")
        for sub, suffixes in SUBDIRS.items():
            subdir = directory / sub
            try:
                fd = _open_directory(sub, top)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise ConfigError(f"cannot read trust directory {directory}: {exc.strerror}") from None
            try:
                _check_not_writable_by_others(subdir, os.fstat(fd))
                for name in sorted(os.listdir(fd)):
                    if name.startswith(".") or os.path.splitext(name)[1] not in suffixes:
                        continue
                    if not name.isprintable():
                        # Undecodable bytes (surrogate escapes) or control characters: refuse, in one escaped line.
                        raise ConfigError(f"{subdir}: file name {name!r} is not printable UTF-8")
                    files.append((f"{sub}/{name}", _read(fd, name, subdir / name)))
                    if len(files) > MAX_TRUST_FILES:
                        raise ConfigError(f"trust directory {directory} holds more than {MAX_TRUST_FILES} files")
            except OSError as exc:
                raise ConfigError(f"cannot read trust directory {directory}: {exc.strerror}") from None
            finally:
                os.close(fd)
        if _is(top, "signers.toml", lambda _mode: True):
            files.append(("signers.toml", _read(top, "signers.toml", directory / "signers.toml")))
    finally:
        os.close(top)
    return TrustDirFiles(directory, tuple(files))
