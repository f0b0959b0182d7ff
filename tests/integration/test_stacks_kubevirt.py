"""KubeVirt's layout through the installed hook and a real TCG boot (issue 15 item 7): virt-launcher's containerDisk
`disk_0.img` (the signed qcow2, no sidecar: its envelope found by digest), the overlay `disk.qcow2` whose chain the
XML spells out in `<backingStore>`, and a vfat NoCloud seed labelled cidata under `[policy] profile = "kubevirt"`.
A `<backingStore>` contradicting the qcow2 header is refused before QEMU starts, with hostguard's one line."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_stacks_nova import allowed_notes
from tests.testbed.guarded import GuardedHost
from tests.testbed.guests import Guest
from tests.testbed.libvirt_env import Disk, LibvirtEnv
from tests.testbed.prereq import require_tool

pytestmark = pytest.mark.integration


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


class Launcher:
    """virt-launcher's files for VMI default/testvmi under the environment's work directory."""

    def __init__(self, host: GuardedHost, signed_base: Path, env: LibvirtEnv) -> None:
        for tool in ("qemu-img", "mkfs.vfat"):
            require_tool(tool)
        self.env = env
        run_dir = env.path("run")
        self.base = run_dir / "kubevirt" / "container-disks" / "disk_0.img"
        self.overlay = run_dir / "kubevirt-ephemeral-disks" / "disk-data" / "containerdisk" / "disk.qcow2"
        self.seed = run_dir / "kubevirt-ephemeral-disks" / "cloud-init-data" / "default" / "testvmi" / "noCloud.iso"
        for d in (self.base.parent, self.overlay.parent, self.seed.parent):
            d.mkdir(mode=0o755, parents=True)
        for d in [run_dir, *run_dir.rglob("*")]:
            d.chmod(0o755)
        shutil.copyfile(signed_base, self.base)  # the containerDisk's /disk/ file, as signed
        run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(self.base), str(self.overlay))
        run("truncate", "-s", "2M", str(self.seed))
        run("mkfs.vfat", "-n", "cidata", str(self.seed))
        for f in (self.base, self.overlay, self.seed):
            f.chmod(0o644)
        index = env.path("envelopes")
        index.mkdir(mode=0o755)
        shutil.copyfile(f"{signed_base}.hgsig", index / f"{hashlib.sha256(self.base.read_bytes()).hexdigest()}.hgsig")
        host.write_config(envelope_index_dirs=json.dumps([str(index)]), profile='"kubevirt"')

    def define(self, name: str, guest: Guest, backing: Path) -> Any:
        """The VMI's domain (`<namespace>_<vmi>`) with the root disk's chain given in the XML, naming `backing`."""
        xml = self.env.domain_xml(name, guest, disk_path=self.overlay, extra_disks=[Disk(self.seed, "raw")])
        chain = f"<backingStore type='file'><format type='qcow2'/><source file='{backing}'/></backingStore>"
        source = f'<source file="{self.overlay}"/>'
        assert xml.count(source) == 1, xml
        xml = xml.replace(source, source + chain)
        full = self.env.domain_name(name)
        self.env.names.append(full)
        self.env.consoles[full] = self.env.path(f"{name}-console.log")
        return self.env.connection().defineXML(xml)


@pytest.fixture
def launcher(host: GuardedHost, signed_base: Path, libvirt_env: LibvirtEnv) -> Iterator[Launcher]:
    try:
        yield Launcher(host, signed_base, libvirt_env)
    finally:
        host.write_config()


def test_a_kubevirt_shaped_vmi_with_an_agreeing_backing_store_boots(
    host: GuardedHost, launcher: Launcher, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    dom = launcher.define("default_testvmi", busybox_guest, launcher.base)
    dom.create()
    libvirt_env.wait_for_console(dom, busybox_guest.marker, timeout=180)
    notes = allowed_notes(host, dom)
    assert f"disk vdb: KubeVirt NoCloud seed {launcher.seed}" in notes, notes


def test_a_backing_store_contradicting_the_header_is_refused_with_one_line(
    host: GuardedHost, launcher: Launcher, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    import libvirt

    other = launcher.base.with_name("disk_1.img")
    shutil.copyfile(launcher.base, other)  # the same signed bytes: still not the file the header names
    other.chmod(0o644)
    dom = launcher.define("default_liar", busybox_guest, other)
    with pytest.raises(libvirt.libvirtError) as info:
        dom.create()
    fault = str(info.value.get_error_message())
    assert "hostguard: denied" in fault and f"<backingStore> #1 names file {other}" in fault, fault
    assert "\n" not in fault.strip(), fault
    assert not dom.isActive()
