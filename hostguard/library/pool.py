"""The image library: a directory of signed image sources that is also a libvirt `dir` storage pool.

Each source is `NAME.qcow2` (or `.raw`) + `NAME.qcow2.hgsig`, optionally `NAME.kernel` and `NAME.initrd` for
direct kernel boot. Sources are verified against the host trust store before they are accepted, copied
atomically (hashed while copying, so a source that changes mid-copy is refused) and made read-only (0444);
the image and envelope are also made immutable where the filesystem allows it, which keeps their ctime stable
so the digest cache holds across starts. An index in the state directory keeps what was verified and when.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hostguard.errors import DigestMismatchError, HostguardError, UsageError
from hostguard.host import libvirt
from hostguard.host.config import Config
from hostguard.host.digest import Digested
from hostguard.host.fsutil import atomic_write
from hostguard.host.libvirt import open_connection
from hostguard.host.state import StateStore
from hostguard.host.statedir import StateDir
from hostguard.host.verify_files import Outcome, read_envelope, verify_files
from hostguard.record import Record
from hostguard.signed.facts import check_rollback
from hostguard.signed.manifest import format_time

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
COPY_CHUNK = 4 * 1024 * 1024


class Source(Record):
    name: str
    image: Path
    envelope: Path
    kernel: Path | None
    initrd: Path | None

    @property
    def format(self) -> str:
        return "qcow2" if self.image.suffix == ".qcow2" else "raw"


def _copy_hashing(src: Path, dest: Path) -> str:
    """Copy src to dest (a new file), returning the sha256 of what was written."""
    h = hashlib.sha256()
    fd_in = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fd_out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            while chunk := os.read(fd_in, COPY_CHUNK):
                h.update(chunk)
                os.write(fd_out, chunk)
            os.fsync(fd_out)
        finally:
            os.close(fd_out)
    finally:
        os.close(fd_in)
    return h.hexdigest()


def _set_immutable(path: Path, on: bool) -> bool:
    try:
        result = subprocess.run(["chattr", "+i" if on else "-i", str(path)], capture_output=True, check=False)
    except OSError:
        return False
    return result.returncode == 0


class Library:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.dir = config.library_dir
        self.index_dir = StateDir(config.state_dir).library

    # --- sources --------------------------------------------------------------------------------------------

    def source(self, name: str) -> Source:
        for suffix in (".qcow2", ".raw"):
            image = self.dir / f"{name}{suffix}"
            if image.exists():
                kernel, initrd = self.dir / f"{name}.kernel", self.dir / f"{name}.initrd"
                return Source(
                    name,
                    image,
                    Path(f"{image}.hgsig"),
                    kernel if kernel.exists() else None,
                    initrd if initrd.exists() else None,
                )
        raise UsageError(f"no image {name!r} in the library {self.dir}")

    def names(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return sorted(p.name[: -len(".hgsig")].rsplit(".", 1)[0] for p in self.dir.glob("*.hgsig"))

    def index(self, name: str) -> dict[str, Any]:
        try:
            doc = json.loads((self.index_dir / f"{name}.json").read_text())
        except (OSError, ValueError):
            return {"name": name}
        return doc if isinstance(doc, dict) else {"name": name}

    def _verify(
        self,
        envelope: bytes,
        image: Path | None,
        kernel: Path | None,
        initrd: Path | None,
        *,
        digested: Sequence[Digested] | None = None,
        rollback: bool = True,
    ) -> Outcome:
        """The verification every source gets (`hostguard.host.verify_files`); with `rollback`, against the
        host's state: a version older than one this host has verified is refused, and a new one is recorded."""
        state = StateStore(self.config.state_dir) if rollback else None
        try:
            return verify_files(
                envelope,
                self.config.trust_dir,
                now=dt.datetime.now(dt.UTC),
                state=state,
                images=[image] if image is not None else None,
                kernel=kernel,
                initrd=initrd,
                digested=digested,
            )
        finally:
            if state is not None:
                state.close()

    def precheck(self, envelope: bytes) -> Outcome:
        """Signature, chain, revocation, signer policy, expiry and rollback, before any image bytes are fetched
        (the disk digests are checked by `add_fetched`, through the same `_verify`)."""
        outcome = self._verify(envelope, None, None, None, rollback=False)
        state = StateStore(self.config.state_dir)
        try:
            check_rollback(outcome.facts, state.highest_version(outcome.facts.name))
        finally:
            state.close()
        return outcome

    def default_name(self, outcome: Outcome, name: str | None) -> str:
        manifest = outcome.manifest
        if len(manifest.disks) != 1:
            raise UsageError("library sources hold one disk image each")
        name = name or f"{manifest.image.name}-v{manifest.image.version}"
        if not NAME_RE.fullmatch(name):
            raise UsageError(f"library name {name!r} must be letters, digits and ._+- (at most 128)")
        if name in self.names():
            raise UsageError(f"{name!r} is already in the library: remove it first or choose --name")
        return name

    def add(
        self,
        image: Path,
        envelope_path: Path,
        *,
        name: str | None = None,
        kernel: Path | None = None,
        initrd: Path | None = None,
    ) -> dict[str, Any]:

        envelope = read_envelope(envelope_path)
        outcome = self._verify(envelope, image, kernel, initrd)  # refuse a bad source before copying anything
        manifest = outcome.manifest
        name = self.default_name(outcome, name)
        self.dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        final = self._final_paths(name, manifest.disks[0].format, kernel is not None and initrd is not None)
        sources = {"image": image, "kernel": kernel, "initrd": initrd}
        temps: list[Path] = []
        try:
            for role, dest in final.items():
                src = sources[role]
                assert src is not None
                tmp = dest.with_name(f".{dest.name}.adding")
                tmp.unlink(missing_ok=True)
                temps.append(tmp)
                digest = _copy_hashing(src, tmp)
                wanted = manifest.disks[0].sha256 if role == "image" else getattr(manifest.boot, role).sha256
                if digest != wanted:
                    raise DigestMismatchError(f"{src} changed while it was copied into the library")
                tmp.chmod(0o444)
            return self._install(
                name, envelope, outcome, {role: d.with_name(f".{d.name}.adding") for role, d in final.items()}
            )
        finally:
            for tmp in temps:
                tmp.unlink(missing_ok=True)

    def add_fetched(
        self, envelope: bytes, name: str, files: dict[str, Path], disk: Digested, origin: dict[str, Any]
    ) -> dict[str, Any]:
        """Admit files fetched into the library directory (hidden names): verified by the same `_verify` as
        `add` with the disk digest computed while the bytes arrived, then moved into place. The caller removes
        `files` on failure."""
        outcome = self._verify(envelope, None, files.get("kernel"), files.get("initrd"), digested=[disk])
        name = self.default_name(outcome, name)
        for path in files.values():
            path.chmod(0o444)
        return self._install(name, envelope, outcome, files, origin)

    def _final_paths(self, name: str, disk_format: str, kernel_boot: bool) -> dict[str, Path]:
        suffix = ".qcow2" if disk_format == "qcow2" else ".raw"
        final = {"image": self.dir / f"{name}{suffix}"}
        if kernel_boot:
            final["kernel"] = self.dir / f"{name}.kernel"
            final["initrd"] = self.dir / f"{name}.initrd"
        return final

    def _install(
        self,
        name: str,
        envelope: bytes,
        outcome: Outcome,
        temps: dict[str, Path],
        origin: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Move verified temporary files (in the library directory) into place, then the envelope, the index."""
        manifest = outcome.manifest
        final = self._final_paths(name, manifest.disks[0].format, "kernel" in temps and "initrd" in temps)
        for role, dest in final.items():
            os.replace(temps[role], dest)
        atomic_write(Path(f"{final['image']}.hgsig"), envelope, mode=0o444)
        # The image and its envelope only: libvirt must relabel direct-boot kernels and initrds, and an immutable
        # one makes it refuse to start the domain ("Operation not permitted").
        immutable = all(_set_immutable(p, True) for p in (final["image"], Path(f"{final['image']}.hgsig")))
        entry = {
            "name": name,
            "image": manifest.image.name,
            "version": manifest.image.version,
            "signers": list(outcome.signer_subjects),
            "expires": format_time(manifest.expires),
            "size": manifest.disks[0].size,
            "sha256": manifest.disks[0].sha256,
            "format": manifest.disks[0].format,
            "kernel_boot": "kernel" in final,
            "immutable": immutable,
            "verified_at": format_time(dt.datetime.now(dt.UTC)),
            "status": "ok",
        }
        if origin:
            entry["origin"] = origin
        self._save_index(entry)
        self.refresh_pool()
        return entry

    def _save_index(self, entry: dict[str, Any]) -> None:
        self.index_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(self.index_dir / f"{entry['name']}.json", json.dumps(entry, indent=1).encode(), mode=0o600)

    def verify(self, name: str) -> dict[str, Any]:
        """Re-verify one source: signature, chain, revocation, expiry and the files' digests."""

        entry = self.index(name)
        try:
            src = self.source(name)
            outcome = self._verify(read_envelope(src.envelope), src.image, src.kernel, src.initrd, rollback=False)
            entry.update(
                status="ok",
                reason="",
                verified_at=format_time(dt.datetime.now(dt.UTC)),
                signers=list(outcome.signer_subjects),
            )
        except HostguardError as exc:
            entry.update(status="failed", reason=str(exc))
        self._save_index(entry)
        return entry

    def remove(self, name: str, *, force: bool = False) -> None:
        src = self.source(name)
        users = self.users(src)
        if users and not force:
            raise UsageError(f"{name!r} backs domain(s) {', '.join(users)}: undefine them first or use --force")
        for path in (src.image, src.envelope, src.kernel, src.initrd):
            if path is not None:
                _set_immutable(path, False)
                path.unlink(missing_ok=True)
        (self.index_dir / f"{name}.json").unlink(missing_ok=True)
        self.refresh_pool()

    def users(self, src: Source) -> list[str]:
        """Defined domains whose hostguard metadata names this source's envelope."""
        try:
            conn = open_connection()
        except HostguardError:
            return []
        try:
            return sorted(d.name() for d in conn.listAllDomains(0) if str(src.envelope) in d.XMLDesc(0))
        finally:
            conn.close()

    # --- the libvirt pool -----------------------------------------------------------------------------------

    def refresh_pool(self) -> None:
        """Make sure the `dir` pool exists, is active and autostarts, and rescan it."""

        conn = open_connection()
        try:
            try:
                pool = conn.storagePoolLookupByName(self.config.library_pool)
            except libvirt.libvirtError:
                xml = (
                    f"<pool type='dir'><name>{self.config.library_pool}</name>"
                    f"<target><path>{self.dir}</path></target></pool>"
                )
                pool = conn.storagePoolDefineXML(xml, 0)
                pool.setAutostart(1)
            if not pool.isActive():
                pool.create(0)
            pool.refresh(0)
        except libvirt.libvirtError as exc:
            raise UsageError(f"libvirt pool {self.config.library_pool}: {exc.get_error_message()}") from None
        finally:
            conn.close()
