"""The pre-boot policy rule for hostguard's own fw_cfg entry (stdlib only: cheap to import from the hook).

`hostguard bootchannel attach` puts K into the domain as ``<sysinfo type='fwcfg'><entry
name='opt/org.hostguard/owner-k' file='/run/hostguard/bootchannel/UUID.k'/>``. A policy that refuses fw_cfg
blobs (they hand host data to the guest) can still allow exactly this one: see `is_bootchannel_fwcfg`.
"""

from __future__ import annotations

import os
import stat

from hostguard.owner.names import DEFAULT_RUN_DIR, FWCFG_NAME


def is_bootchannel_fwcfg(name: str, path: str | None, run_dir: str = DEFAULT_RUN_DIR) -> bool:
    """True for hostguard's K blob: entry `FWCFG_NAME`, a regular file (not a symlink) named ``*.k``
    directly in `run_dir`, with no group or other permissions (owner root, or the QEMU user while the
    domain runs: libvirt's DAC driver hands it over and back)."""
    if name != FWCFG_NAME or not path:
        return False
    directory, base = os.path.split(path)
    if os.path.normpath(directory) != os.path.normpath(run_dir) or not base.endswith(".k") or base == ".k":
        return False
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and not st.st_mode & 0o077
