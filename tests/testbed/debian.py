"""A real Debian 12 root filesystem (debootstrap minbase) as a disk image: the inventory's full-distro case.

Unlike the synthetic test trees, this is what producers actually sign: usrmerge symlinks, setuid helpers
(su, passwd, mount, ...), a file capability set by a maintainer script (ping: cap_net_raw), thousands of
shared libraries without an x bit. Built once per cache key from the mirror apt uses (the tree and a qcow2
of it), about 30 s and 400 MB in the test-bed cache.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tests.testbed import images

SUITE = "bookworm"
# ping's postinst sets cap_net_raw with setcap when libcap2-bin is installed.
INCLUDE = ("iputils-ping", "libcap2-bin")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
APT_SOURCES = (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list"))


@dataclass(frozen=True)
class DebianImage:
    tree: Path  # the root filesystem as debootstrap left it, read from the host side as the oracle
    qcow2: Path


def apt_mirror() -> str:
    """The Debian mirror this host's apt uses (deb.debian.org when none is named)."""
    for source in APT_SOURCES:
        try:
            text = source.read_text()
        except OSError:
            continue
        for uri in re.findall(r"(?:URIs:\s*|^deb\s+(?:\[[^\]]*\]\s+)?)(\S+)", text, flags=re.MULTILINE):
            if uri.rstrip("/").endswith("/debian"):
                return str(uri).rstrip("/")
    return DEFAULT_MIRROR


def debian_image() -> DebianImage:
    mirror = apt_mirror()

    def build(out: Path) -> None:
        tree = out / "root"
        images.run(["debootstrap", "--variant=minbase", f"--include={','.join(INCLUDE)}", SUITE, tree, mirror])
        raw = images.make_ext4(tree, out / "root.raw", size_mb=600)
        images.to_qcow2(raw, out / "root.qcow2")
        raw.unlink()

    key = [SUITE, "minbase", *INCLUDE, mirror, *images.source_key("debian.py"), *images.package_versions("debootstrap")]
    entry = images.cached(key, build, name="debian12-minbase")
    return DebianImage(entry / "root", entry / "root.qcow2")
