"""File capabilities: decode a `security.capability` xattr value into getcap's text form. Pure.

The value layout is the kernel's `struct vfs_cap_data` / `vfs_ns_cap_data` (little endian):
magic_etc (revision in the top byte, bit 0 = effective), then (permitted, inheritable) 32-bit word pairs:
one pair for revision 1 (12 bytes), two for revision 2 (20 bytes) and 3 (24 bytes: plus the namespace
root uid). Like the kernel, any other size or revision is refused.

The text is what libcap 2.66's `cap_to_text` prints (the `getcap` output after the file name), e.g.
`cap_net_raw=ep`, `cap_chown,cap_kill=ep`, `=ep` (all named capabilities), `=p cap_chown+i-p`. libcap asks the
running kernel how many capabilities have names; that would make the text depend on the host, so the count
is fixed here at 41 (CAP_LAST_CAP 40, cap_checkpoint_restore, Linux >= 5.9). Higher bits print as numbers
(`41+ep`). A revision 3 value with a non-zero root uid gets ` [rootid=N]`, as getcap prints it.
"""

from __future__ import annotations

import struct

from hostguard.errors import FormatError
from hostguard.record import Record

XATTR_NAME = "security.capability"

VFS_CAP_REVISION_MASK = 0xFF000000
VFS_CAP_FLAGS_EFFECTIVE = 0x000001
VFS_CAP_REVISION_1 = 0x01000000
VFS_CAP_REVISION_2 = 0x02000000
VFS_CAP_REVISION_3 = 0x03000000
_SIZES = {VFS_CAP_REVISION_1: 12, VFS_CAP_REVISION_2: 20, VFS_CAP_REVISION_3: 24}

CAP_NAMES: tuple[str, ...] = (
    "cap_chown", "cap_dac_override", "cap_dac_read_search", "cap_fowner", "cap_fsetid", "cap_kill",
    "cap_setgid", "cap_setuid", "cap_setpcap", "cap_linux_immutable", "cap_net_bind_service",
    "cap_net_broadcast", "cap_net_admin", "cap_net_raw", "cap_ipc_lock", "cap_ipc_owner", "cap_sys_module",
    "cap_sys_rawio", "cap_sys_chroot", "cap_sys_ptrace", "cap_sys_pacct", "cap_sys_admin", "cap_sys_boot",
    "cap_sys_nice", "cap_sys_resource", "cap_sys_time", "cap_sys_tty_config", "cap_mknod", "cap_lease",
    "cap_audit_write", "cap_audit_control", "cap_setfcap", "cap_mac_override", "cap_mac_admin", "cap_syslog",
    "cap_wake_alarm", "cap_block_suspend", "cap_audit_read", "cap_perfmon", "cap_bpf", "cap_checkpoint_restore",
)  # fmt: skip
NAMED_BITS = len(CAP_NAMES)  # 41
MAX_BITS = 64

# libcap's flag values (LIBCAP_EFF, LIBCAP_PER, LIBCAP_INH); letters print in the order e, i, p.
_EFF, _PER, _INH = 1, 2, 4


class FileCapabilities(Record):
    """A decoded `security.capability` value."""

    revision: int  # 1, 2 or 3
    effective: bool  # the single file "effective" flag
    permitted: int  # bit mask
    inheritable: int  # bit mask
    rootid: int = 0  # revision 3 only: the user namespace root uid the value applies to

    def to_text(self) -> str:
        return caps_to_text(self)


def parse_capability_xattr(value: bytes) -> FileCapabilities:
    """Decode a raw `security.capability` value; `FormatError` when the kernel would refuse it too."""
    if len(value) < 4:
        raise FormatError(f"security.capability value of {len(value)} bytes is too short")
    (magic,) = struct.unpack_from("<I", value, 0)
    revision = magic & VFS_CAP_REVISION_MASK
    size = _SIZES.get(revision)
    if size is None:
        raise FormatError(f"security.capability has unknown revision {revision >> 24:#x}")
    if len(value) != size:
        raise FormatError(f"security.capability revision {revision >> 24} must be {size} bytes, not {len(value)}")
    permitted = inheritable = 0
    words = 1 if revision == VFS_CAP_REVISION_1 else 2
    for i in range(words):
        p, inh = struct.unpack_from("<II", value, 4 + 8 * i)
        permitted |= p << (32 * i)
        inheritable |= inh << (32 * i)
    rootid = struct.unpack_from("<I", value, 20)[0] if revision == VFS_CAP_REVISION_3 else 0
    return FileCapabilities(
        revision=revision >> 24,
        effective=bool(magic & VFS_CAP_FLAGS_EFFECTIVE),
        permitted=permitted,
        inheritable=inheritable,
        rootid=rootid,
    )


def capability_text(value: bytes) -> str:
    """getcap text of a raw `security.capability` value (`FormatError` if malformed)."""
    return parse_capability_xattr(value).to_text()


def _flag_letters(flags: int) -> str:
    return ("e" if flags & _EFF else "") + ("i" if flags & _INH else "") + ("p" if flags & _PER else "")


def _cap_name(bit: int) -> str:
    return CAP_NAMES[bit] if bit < NAMED_BITS else str(bit)


def caps_to_text(caps: FileCapabilities) -> str:
    """libcap's `cap_to_text` over the (e, i, p) sets a file capability grants, with 41 named bits."""
    effective = (caps.permitted | caps.inheritable) if caps.effective else 0

    def flags(bit: int) -> int:
        f = 0
        if effective >> bit & 1:
            f |= _EFF
        if caps.inheritable >> bit & 1:
            f |= _INH
        if caps.permitted >> bit & 1:
            f |= _PER
        return f

    histo = [0] * 8
    for bit in range(NAMED_BITS):
        histo[flags(bit)] += 1
    # The most common combination becomes the "=..." base; ties go to the lower value (prefers "none").
    m = 7
    for t in range(6, -1, -1):
        if histo[t] >= histo[m]:
            m = t
    text = "=" + _flag_letters(m)
    for t in range(7, -1, -1):
        if t == m or not histo[t]:
            continue
        text += " " + ",".join(_cap_name(b) for b in range(NAMED_BITS) if flags(b) == t)
        raised = t & ~m
        if raised:
            op = "+"
            if text.startswith("= "):
                # libcap: "= foo,...+eip ..." is shortened to "foo,...=eip ...".
                text = text[2:]
                op = "="
            text += op + _flag_letters(raised)
        lowered = ~t & m
        if lowered:
            text += "-" + _flag_letters(lowered)
    # Bits without a name: all listed as raised, one clause per combination.
    histo = [0] * 8
    for bit in range(NAMED_BITS, MAX_BITS):
        histo[flags(bit)] += 1
    for t in range(7, 0, -1):
        if histo[t]:
            names = ",".join(_cap_name(b) for b in range(NAMED_BITS, MAX_BITS) if flags(b) == t)
            text += f" {names}+{_flag_letters(t)}"
    if caps.rootid:
        text += f" [rootid={caps.rootid}]"
    return text
