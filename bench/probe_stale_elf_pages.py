"""Look for ELF header pages a guest kernel holds in slab or free pages (the facts in docs/adr/0035).

    .venv/bin/python bench/probe_stale_elf_pages.py [--boots 3] [--seconds 300]

Boots the test bed's Debian 12 systemd guest (TCG) through the real libvirtd, `--boots` times, and every second
for `--seconds` lists each ELF header page whose use by the guest's own `struct page` is slab or free, with its
type, program-header count, bytes 32-39 (`e_phoff`) and whether it is ld.so's header but for those bytes (the
copy `load_elf_binary` reads into a kmalloc-64 object and frees). Needs root and libvirtd; nothing is judged.
"""

from __future__ import annotations

import argparse
import hashlib
import struct
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
LDSO = Path("/lib64/ld-linux-x86-64.so.2")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--boots", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=300.0)
    args = parser.parse_args()

    from tests.conftest import _require_guest_inputs
    from tests.testbed import guests
    from tests.testbed.debian_boot import debian_systemd_guest
    from tests.testbed.libvirt_env import LibvirtEnv

    debian = debian_systemd_guest(guests.busybox_guest(_require_guest_inputs()))
    for boot in range(args.boots):
        with LibvirtEnv() as env:
            seen = watch(env, debian, f"stale{boot}", args.seconds)
            print(f"boot {boot}: { ({use: sum(v == use for v in seen.values()) for use in ('slab', 'free')}) }")
    return 0


def watch(env: Any, guest: Any, name: str, seconds: float) -> dict[tuple[int, str], str]:
    """Boot `guest` as `name` and look every second for `seconds`; what was seen, by page and header."""
    from hostguard.host.libvirt import qemu_monitor_hmp
    from hostguard.memory import elfscan, structpage
    from hostguard.memory import kernel as kernelmod
    from hostguard.memory.live import LiveSource, forget_guest, live_guest

    ldso = LDSO.read_bytes()[:64]
    disk = env.overlay(guest.root_qcow2, f"{name}.qcow2")
    dom = env.define_guest(name, guest, disk_path=disk, cmdline_extra="hostguard.rw=1")
    dom.create()
    started, facts, seen = time.monotonic(), None, dict[tuple[int, str], str]()
    while time.monotonic() - started < seconds:
        time.sleep(1.0)
        live = live_guest(dom, lambda command: qemu_monitor_hmp(dom, command))
        info = LiveSource(live, dom, env.path("holds"), "never").vmcoreinfo(None)
        if info is None:
            continue  # the kernel is not up yet
        facts = facts or kernelmod.load_facts(guest.kernel, info, env.path("kernels"))
        heads = [(a, p) for a, p in live.ram.page_heads(elfscan.ELF_MAGIC) if elfscan.is_elf_program_header(p)]
        where = [a for a, _ in heads]
        uses = structpage.page_uses(live.ram.read, info, where, live.ram.end, facts.symbols.get("vmemmap_base"))
        for address, page in heads:
            key = (address, hashlib.sha256(page[:64]).hexdigest())
            if uses[address] not in ("slab", "free") or key in seen:
                continue
            seen[key] = uses[address]
            e_type, phnum = struct.unpack_from("<H", page, 16)[0], struct.unpack_from("<H", page, 56)[0]
            like = page[:32] == ldso[:32] and page[40:64] == ldso[40:64]
            print(
                f"{name} t={time.monotonic() - started:6.1f}s page {address:#x} use={uses[address]} type={e_type} "
                f"phnum={phnum} e_phoff={page[32:40].hex()} ld.so-like={like}",
                flush=True,
            )
    forget_guest(dom.UUIDString())
    return seen


if __name__ == "__main__":
    raise SystemExit(main())
