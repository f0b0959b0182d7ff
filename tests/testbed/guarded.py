"""A guarded host for integration tests and the demo: a test PKI and trust store, a hostguard.toml, the hook
installed into the running libvirtd, and helpers to publish signed images from test-bed guests.

Everything lives under one per-run directory that QEMU can read; `close()` uninstalls the hook, restarts
libvirtd (so it forgets the hook) and removes the directory.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import secrets
import shutil
import subprocess
from pathlib import Path

from hostguard.cli import main as hostguard_main
from hostguard.host.config import DEFAULT_CMDLINE_PARAMS
from tests.testbed.guests import Guest
from tests.testbed.libvirt_env import host_exclusive
from tests.testbed.pki import DAY, Identity, TestPKI
from tests.testbed.signed import sign

REPO = Path(__file__).resolve().parents[2]
ROOT = Path("/var/lib/libvirt/images/hostguard-test")
HOOKS_DIR = Path("/etc/libvirt/hooks")


# What the test bed's own guests need beyond the defaults: their init reads hostguard.* kernel parameters
# (tests/testbed/guests.py), and the save/restore and migrate tests restore guests. Tests of the refusals
# pass these keys with other values.
TESTBED_POLICY = {
    "allow_cmdline_params": json.dumps([*DEFAULT_CMDLINE_PARAMS, "hostguard.*"]),
    "allow_restore": "true",
    "allow_incoming_migration": "true",
}


def run_hostguard(*args: str) -> None:
    code = hostguard_main(list(args))
    if code != 0:
        raise RuntimeError(f"hostguard {' '.join(args)} exited {code}")


class GuardedHost:
    def __init__(self, *, install_hook: bool = True, hooks_dir: Path = HOOKS_DIR) -> None:
        # The hook is host-wide and installing it restarts libvirtd: hold the test bed's host lock so that
        # another test run on this machine waits instead of having its plain domains refused.
        self._exclusive = contextlib.ExitStack()
        if install_hook:
            self._exclusive.enter_context(host_exclusive())
        self.dir = ROOT / f"host-{os.getpid()}-{secrets.token_hex(3)}"
        self.dir.mkdir(parents=True, mode=0o755)
        self.dir.chmod(0o755)
        self.pki = TestPKI()
        self.revoked = self.pki.leaf_variant("revoked-build")
        self.trust = self.pki.write_trust_dir(self.dir / "trust", crls=[self.pki.crl([self.revoked.cert])])
        self.keys = self.dir / "keys"
        self.cert, self.key = self.pki.leaf.write(self.keys, "leaf")
        self.chain = self.keys / "chain.pem"
        self.chain.write_bytes(self.pki.intermediate.pem)
        self.state = self.dir / "state"
        self.audit_log = self.dir / "audit.jsonl"
        self.config = self.dir / "hostguard.toml"
        self.library = self.dir / "library"
        self.library.mkdir(mode=0o755)
        self.hooks_dir = hooks_dir
        self.library_dir = self.dir / "hostguard-library"  # `hostguard library`'s own directory and pool
        self.pool = f"hgt-lib-{self.dir.name}"
        self.write_config()
        self.hook_installed = False
        if install_hook:
            try:
                run_hostguard(
                    "hook", "install", "--hooks-dir", str(hooks_dir), "--config", str(self.config), "--restart-libvirtd"
                )
            except BaseException:
                self.close()
                raise
            self.hook_installed = True

    def write_config(self, mode: str = "enforce", extra: str = "", **policy: str) -> None:
        """hostguard.toml for the test bed: TESTBED_POLICY, with `policy` (TOML values) replacing its keys."""
        lines = "".join(f"{key} = {value}\n" for key, value in {**TESTBED_POLICY, **policy}.items())
        self.config.write_text(
            f"""[trust]
dir = "{self.trust}"

[state]
dir = "{self.state}"

[policy]
mode = "{mode}"
deadline_seconds = 60
{lines}{extra}
[audit]
log = "{self.audit_log}"
syslog = false

[daemon]
socket = "{self.dir / "hostguard.sock"}"

[library]
dir = "{self.library_dir}"
pool = "{self.pool}"
"""
        )

    # --- publishing ------------------------------------------------------------------------------------------

    def publish(
        self,
        guest: Guest,
        name: str,
        version: int = 1,
        *,
        filename: str | None = None,
        reader: str = "auto",
        cmdline: str | None = None,
    ) -> Path:
        """Copy the guest's root qcow2 into the library, inventory it, sign it (with `cmdline`, the exact kernel
        command line too); returns the image path."""
        image = self.library / (filename or f"{name}-v{version}.qcow2")
        shutil.copyfile(guest.root_qcow2, image)
        image.chmod(0o644)
        manifest = self.dir / f"{image.name}.manifest.json"
        create = f"manifest create {image} --name {name} --version {version} --format qcow2 --reader {reader}"
        boot = ["--kernel", str(guest.kernel), "--initrd", str(guest.initrd)]
        boot += ["--cmdline", cmdline] if cmdline is not None else []
        run_hostguard(*create.split(), *boot, "--quiet", "-o", str(manifest))
        sign = f"sign {manifest} --key {self.key} --cert {self.cert} --chain {self.chain} -o {image}.hgsig"
        run_hostguard(*sign.split())
        return image

    def sign_custom(self, image: Path, payload: bytes, signer: Identity | None = None) -> Path:
        """Sign arbitrary manifest bytes (expired manifests, other signers) into IMAGE.hgsig."""
        envelope = Path(str(image) + ".hgsig")
        envelope.write_bytes(sign(payload, [(signer or self.pki.leaf, [self.pki.intermediate])]))
        return envelope

    def manifest_for(
        self, image: Path, guest: Guest, name: str, *, expired: bool = False, disk_format: str = "qcow2"
    ) -> bytes:
        """Manifest bytes for `image` booted with the guest's kernel and initrd (no file inventory)."""
        from hostguard.host.digest import digest_file
        from hostguard.signed.manifest import BootFiles, DiskEntry, ImageId, Manifest

        now = dt.datetime.now(dt.UTC)
        d = digest_file(image).blob
        return Manifest(
            image=ImageId(name, 1),
            created=now - 30 * DAY,
            expires=now - DAY if expired else now + 30 * DAY,
            disks=(DiskEntry(d.sha256, d.size, disk_format),),
            boot=BootFiles(digest_file(guest.kernel).blob, digest_file(guest.initrd).blob),
        ).to_bytes()

    # --- the hook as libvirt runs it ----------------------------------------------------------------------

    def installed_hook(self) -> Path:
        return self.hooks_dir / "qemu.d" / "50-hostguard"

    def run_hook(self, *args: str, xml: bytes) -> subprocess.CompletedProcess[bytes]:
        """Run the installed hook file exactly as libvirt does (clean environment, XML on stdin)."""
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
        return subprocess.run(
            [str(self.installed_hook()), *args], input=xml, capture_output=True, env=env, timeout=120, check=False
        )

    def audit_records(self) -> list[dict[str, object]]:
        import json

        if not self.audit_log.exists():
            return []
        return [json.loads(line) for line in self.audit_log.read_text().splitlines() if line.strip()]

    def _remove_pool(self) -> None:
        import libvirt

        conn = libvirt.open("qemu:///system")
        try:
            if self.pool not in conn.listStoragePools() + conn.listDefinedStoragePools():
                return  # no `hostguard library` command made it (and a lookup would print libvirt's error)
            pool = conn.storagePoolLookupByName(self.pool)
            if pool.isActive():
                pool.destroy()
            pool.undefine()
        except libvirt.libvirtError:
            return  # no pool was made
        finally:
            conn.close()

    def close(self) -> None:
        try:
            self._remove_pool()
            subprocess.run(["chattr", "-R", "-i", str(self.dir)], capture_output=True, check=False)
            if self.hook_installed:
                run_hostguard("hook", "uninstall", "--hooks-dir", str(self.hooks_dir), "--restart-libvirtd")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
            self._exclusive.close()

    def __enter__(self) -> GuardedHost:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
