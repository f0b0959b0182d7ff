"""The files QEMU runs are the files `prepare` verified (issue 14, ADR 0018): closing the rename window.

`prepare` verifies files by path, and QEMU opens them by path later. Whoever can rename inside an image's
directory can swap the verified file for another in between. The identities `prepare` verified (device and
inode of every disk layer and boot file) are in the domain's pre-boot record; two later hook calls compare:

* `start begin` (libvirt has built the command line, QEMU is not spawned yet): every recorded path must still
  name the recorded file. A swap made before this point is refused before QEMU exists.
* `started begin` (QEMU runs; libvirt 9 has already started the vCPUs unless the domain was started paused):
  every recorded disk layer must be among the regular files QEMU holds open (`/proc/PID/fd`, by device and
  inode), and no file QEMU holds under a recorded path may be another one. On a mismatch the hook kills QEMU
  at once (SIGKILL: the guest stops that instant) and fails, which makes libvirt tear the domain down.
  The kernel and initrd are read and closed by QEMU before this point: their paths are checked again.

Pure logic over small I/O (`stat`, `/proc`); nothing heavy is imported.
"""

from __future__ import annotations

import os
import stat

TYPE_CHECKING = False  # typing costs ~3 ms to import; mypy treats this name like typing.TYPE_CHECKING
if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from hostguard.domain.record import DomainRecord
    from hostguard.host.config import Config

QEMU_RUN_DIR = "/run/libvirt/qemu"  # libvirt's system instance: <name>.pid, written before QEMU execs


def _recorded(record: DomainRecord, *, disks: bool = True, boot: bool = True) -> Iterator[tuple[str, int, int]]:
    if disks:
        for disk in record.disks:
            for layer in disk.layers:
                yield layer.path, layer.dev, layer.ino
    if boot:
        for f in record.boot:
            yield f.path, f.dev, f.ino


def _path_identity(path: str) -> tuple[int, int] | str:
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"cannot be opened ({exc.strerror})"
    if not stat.S_ISREG(st.st_mode):
        return "is no longer a regular file"
    return st.st_dev, st.st_ino


def paths_refusal(record: DomainRecord, *, disks: bool = True) -> str | None:
    """Why a recorded path no longer names the verified file, or None."""
    for path, dev, ino in _recorded(record, disks=disks):
        found = _path_identity(path)
        if isinstance(found, str):
            return f"{path} {found} since it was verified"
        if found != (dev, ino):
            return (
                f"{path} was replaced after it was verified (device/inode {found[0]}/{found[1]}, verified {dev}/{ino})"
            )
    return None


def qemu_pid(name: str, run_dir: str | Path = QEMU_RUN_DIR) -> int:
    """QEMU's pid from libvirt's pid file. ValueError/OSError when there is none."""
    with open(os.path.join(run_dir, f"{name}.pid"), "rb") as fh:
        text = fh.read(32).decode("ascii").strip()
    pid = int(text)
    if pid <= 1:
        raise ValueError(f"pid {pid}")
    return pid


def held_files(pid: int) -> dict[tuple[int, int], str]:
    """The regular files process `pid` holds open: (device, inode) -> the path the kernel shows for it."""
    held: dict[tuple[int, int], str] = {}
    fd_dir = f"/proc/{pid}/fd"
    for name in os.listdir(fd_dir):
        link = f"{fd_dir}/{name}"
        try:
            st = os.stat(link)  # follows the magic link to the open file itself, whatever its name is now
            target = os.readlink(link)
        except OSError:
            continue  # closed meanwhile
        if stat.S_ISREG(st.st_mode):
            held[(st.st_dev, st.st_ino)] = target
    return held


def held_refusal(record: DomainRecord, held: dict[tuple[int, int], str]) -> str | None:
    """Why the files QEMU holds are not the verified disk layers, or None."""
    by_path = {path: ident for ident, path in held.items()}
    for path, dev, ino in _recorded(record, boot=False):
        other = by_path.get(path)
        if other is not None and other != (dev, ino):
            return (
                f"QEMU opened {path} as device/inode {other[0]}/{other[1]}, not the verified file {dev}/{ino}: "
                "it was swapped after the check"
            )
        if (dev, ino) not in held:
            return f"QEMU does not hold the verified {path} (device/inode {dev}/{ino}): it opened another file"
    return None


def check_pinned(config: Config, xml: bytes, domain: str, op: str, run_dir: str | Path = QEMU_RUN_DIR) -> str | None:
    """At `start begin` / `started begin`: why the files QEMU gets are not the verified ones, or None. At
    `started`, a refusal has already killed QEMU (unless the configuration is in audit mode)."""
    # lazy: runs at start/started only; the prepare path never loads it
    from hostguard.host.state import StateStore
    from hostguard.host.statedir import load_domain_record
    from hostguard.preboot.parsecache import parse_domain_xml_cached

    state_dir = config.state_dir
    with StateStore(state_dir) as state:
        spec = parse_domain_xml_cached(xml, state)
    record = load_domain_record(state_dir, spec.uuid)
    if record is None:
        return "no pre-boot record of this start: the verified files are unknown"
    if op == "start":
        return paths_refusal(record)
    try:
        pid = qemu_pid(domain, run_dir)
        held = held_files(pid)
    except (OSError, ValueError) as exc:
        return f"cannot see the files QEMU holds ({exc})"
    reason = held_refusal(record, held) or paths_refusal(record, disks=False)
    if reason is not None and config.mode != "audit":
        import signal

        try:
            os.kill(pid, signal.SIGKILL)  # the guest stops now, not when libvirt gets round to it
            reason += "; QEMU was killed"
        except OSError:
            pass  # gone already
    return reason
