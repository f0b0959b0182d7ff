"""Session fixtures shared by all tests: the test bed's guests, built once per session (and cached on disk)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.testbed import content, guests
from tests.testbed.prereq import require, require_root, require_tool


def _require_guest_inputs() -> str:
    require_root()
    for tool in ("mkfs.ext4", "qemu-img", "cpio"):
        require_tool(tool)
    require(content.BUSYBOX.is_file(), "busybox-static is not installed (/bin/busybox missing)")
    version = content.kernel_version()
    require(
        Path(f"/boot/vmlinuz-{version}").is_file() and Path(f"/lib/modules/{version}/modules.dep").is_file(),
        "no Debian kernel with modules in /boot and /lib/modules: install linux-image-amd64",
    )
    return version


@pytest.fixture(scope="session")
def busybox_guest() -> guests.Guest:
    """The busybox guest: Debian kernel, busybox initramfs, ext4 root with `content.populate_root` content."""
    return guests.busybox_guest(_require_guest_inputs())


@pytest.fixture(scope="session")
def python_guest() -> guests.Guest:
    """The python guest (supermin: python3-minimal + python3-cryptography); built only when a test asks."""
    version = _require_guest_inputs()
    require_tool("supermin")
    require(
        os.path.exists("/usr/lib/python3/dist-packages/cryptography"),
        "python3-cryptography is not installed on the host (supermin copies host packages)",
    )
    require(shutil.which("dpkg-query") is not None, "python guest needs a Debian host (dpkg-query)")
    return guests.python_guest(version)
